"""The image tier's data: labelled image sets in memory (``ImageData``), the offline digits set
(scikit-learn's bundled 8x8 digits upsampled to 16x16, 10 classes = the known modes) and
CIFAR-10 through torchvision's loader (``root`` given by the user; nothing is unpickled here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..hub import require_download


@dataclass
class ImageData:
    """A labelled image set held in memory.

    :param images: (N, C, H, W) uint8 in [0, 255] (kept compact, converted per batch) or float
        in [-1, 1].
    :param labels: (N,) integer class of each image.
    :param hflip: random horizontal flips as training augmentation (CIFAR-10 yes, digits no).
    """
    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list
    hflip: bool = False

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},), "
                             f"got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"ImageData({self.name!r}, n={len(self)}, shape={self.shape}, "
                f"classes={self.num_classes})")

    shape = property(lambda self: tuple(self.images.shape[1:]))  # (C, H, W)
    num_classes = property(lambda self: len(self.class_names))

    @property
    def class_weights(self) -> torch.Tensor:
        """(K,) frequency of each class: the weights of the known modes."""
        return torch.bincount(self.labels, minlength=self.num_classes).double() / len(self)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images idx as float32 in [-1, 1] (B, C, H, W), and their labels (B,)."""
        x = self.images[idx]
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        return x, self.labels[idx]

    def sample(self, n: int, generator: torch.Generator | None = None,
               augment: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """n images drawn uniformly with replacement: (x0 (n, C, H, W) in [-1, 1], labels (n,)).
        ``augment`` flips half of them horizontally when the data set allows it."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        x, y = self.get(idx)
        if augment and self.hflip:
            flip = torch.rand(n, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y

    def split(self, frac: float = 0.9, seed: int = 0) -> tuple[ImageData, ImageData]:
        """A random (train, held-out) split with ``frac`` of the images in the first part."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        k = int(round(frac * len(self)))
        return self._subset(perm[:k], ":train"), self._subset(perm[k:], ":heldout")

    def _subset(self, idx, tag: str) -> ImageData:
        return ImageData(f"{self.name}{tag}", self.images[idx], self.labels[idx],
                         self.class_names, self.hflip)


def load_digits(size: int = 16) -> ImageData:
    """scikit-learn's bundled handwritten digits (1797 images, 8x8, values 0..16), bilinearly
    upsampled to size x size and scaled to [-1, 1]; the 10 digit classes are the known modes."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    if size != 8:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    return ImageData("digits", x, torch.tensor(d.target), [str(k) for k in range(10)])


def load_cifar10(root: str | Path, train: bool = True, download: bool | None = None) -> ImageData:
    """CIFAR-10 through torchvision, as (N, 3, 32, 32) uint8 images and their 10 labels.

    :param root: folder that holds (or will hold) ``cifar-10-batches-py/``.
    :param download: True: download when missing; False: never (clear error when missing);
        None: download when missing and www.cs.toronto.edu is reachable, else fail fast with
        ``OfflineError``.
    """
    from torchvision.datasets import CIFAR10

    if root is None:
        raise ValueError("data='cifar10' needs root=<folder holding cifar-10-batches-py/>")
    folder = Path(root) / CIFAR10.base_folder
    files = [f for f, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        if download is False:
            raise FileNotFoundError(f"CIFAR-10 files {missing} are missing in {folder}; pass "
                                    "download=True, or extract cifar-10-python.tar.gz into "
                                    f"root={str(root)!r}")
        require_download(f"CIFAR-10 ({CIFAR10.url}; missing in {folder}: {missing})",
                         host="www.cs.toronto.edu",
                         hint=f"Extract cifar-10-python.tar.gz into root={str(root)!r} on this "
                              "machine, or use the offline data set data='digits'.")
    try:
        ds = CIFAR10(str(root), train=train, download=bool(missing))
    except RuntimeError as e:  # present but wrong checksum
        raise RuntimeError(f"CIFAR-10 files in {folder} failed torchvision's check: {e}") from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    return ImageData("cifar10" if train else "cifar10:test", images, torch.tensor(ds.targets),
                     list(ds.classes), hflip=True)


DATASETS = ("digits", "cifar10")


def make_data(data: str | ImageData, root=None, download: bool | None = None) -> ImageData:
    """An ``ImageData`` from a name in ``DATASETS`` (or one passed through)."""
    if isinstance(data, ImageData):
        return data
    if data == "digits":
        return load_digits()
    if data == "cifar10":
        return load_cifar10(root, train=True, download=download)
    raise ValueError(f"data={data!r} is not one of {DATASETS} (or pass an ImageData)")
