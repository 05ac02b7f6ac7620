"""Text-to-image data for the full tier: image-caption folders, prompt files, Hugging Face datasets,
VAE latents, and an on-disk latent cache.

Sources
    image-caption folder   the ``imagefolder`` layout: images plus ``metadata.jsonl`` with one
                           ``{"file_name": ..., "text": ...}`` per line (``text`` may be a list of
                           captions; one is drawn at random each time)
    prompts file           captions only, for data-free distillation (teacher rollouts stand in
                           for data): ``.txt`` (one per line), ``.jsonl`` (``text`` or ``caption``
                           field) or ``.json`` (a list, or COCO ``{"annotations": [{"caption"}]}``)
    ``datasets`` name      a Hugging Face dataset with an image and a text column (optional
                           package; fails fast offline)

Latents: an image x in [-1, 1] is encoded by the VAE into a diagonal Gaussian with moments
(mean, logvar); a latent is z = (mean + exp(logvar / 2) eps - shift) * scaling_factor. The cache
stores the moments (not one sample), so cached and uncached draws are the same distribution.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..hub import require_download

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---- captions and prompts ----
def _caption_of(rec: dict, path, line) -> str | list[str]:
    for key in ("text", "caption", "prompt"):
        if key in rec:
            return rec[key]
    raise ValueError(f"{path}: record {line} has none of the fields 'text', 'caption', 'prompt'")


def read_captions(path: str | os.PathLike) -> list[str]:
    """Read prompts / captions from a ``.txt`` (one per line, blank lines skipped), ``.jsonl``
    (field ``text``, ``caption`` or ``prompt``) or ``.json`` file (a list of strings, or a COCO
    captions file ``{"annotations": [{"caption": ...}, ...]}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts / captions file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = [_caption_of(json.loads(s), path, i + 1) for i, s in enumerate(text.splitlines())
               if s.strip()]
    elif path.suffix == ".json":
        obj = json.loads(text)
        if isinstance(obj, dict) and "annotations" in obj:
            out = [a["caption"] for a in obj["annotations"]]
        elif isinstance(obj, list):
            out = [s if isinstance(s, str) else _caption_of(s, path, i + 1)
                   for i, s in enumerate(obj)]
        else:
            raise ValueError(f"{path}: a .json captions file must be a list or COCO annotations")
    else:
        out = [s.strip() for s in text.splitlines() if s.strip()]
    out = [c if isinstance(c, str) else c[0] for c in out]
    if not out:
        raise ValueError(f"{path}: no captions found")
    return out


# ---- images ----
def image_size(resolution) -> tuple[int, int]:
    """(height, width) of ``resolution``: an int side (square) or a pair (height, width)."""
    if isinstance(resolution, (tuple, list)):
        if len(resolution) != 2:
            raise ValueError(f"resolution={resolution!r} must be an int or (height, width)")
        return int(resolution[0]), int(resolution[1])
    return int(resolution), int(resolution)


def _norm(resolution):
    """An int for a square size (as before), else the (height, width) pair."""
    H, W = image_size(resolution)
    return H if H == W else (H, W)


def preprocess(image, resolution, center_crop: bool = True) -> torch.Tensor:
    """PIL image -> (3, H, W) float tensor in [-1, 1], (H, W) = ``image_size(resolution)``:
    resize so the image covers H x W (bilinear), then center-crop (or resize to H x W if not
    center_crop)."""
    import numpy as np
    from PIL import Image

    H, W = image_size(resolution)
    image = image.convert("RGB")
    w, h = image.size
    if center_crop:
        s = max(W / w, H / h)
        image = image.resize((max(W, round(w * s)), max(H, round(h * s))), Image.BILINEAR)
        w, h = image.size
        left, top = (w - W) // 2, (h - H) // 2
        image = image.crop((left, top, left + W, top + H))
    else:
        image = image.resize((W, H), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return x / 127.5 - 1.0


class ImageCaptionFolder:
    """An ``imagefolder`` directory: images and a ``metadata.jsonl`` naming them.

    :param root: the folder holding ``metadata.jsonl``.
    :param resolution: side of the square training images, or (height, width).
    """

    def __init__(self, root: str | os.PathLike, resolution, center_crop: bool = True):
        self.root, self.center_crop = Path(root), center_crop
        self.resolution = _norm(resolution)
        meta = self.root / "metadata.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(f"data={str(root)!r}: no metadata.jsonl (imagefolder layout: "
                                    "images plus one {\"file_name\", \"text\"} record per line)")
        self.files, self.texts = [], []
        for i, line in enumerate(meta.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "file_name" not in rec:
                raise ValueError(f"{meta}: line {i + 1} has no 'file_name'")
            f = self.root / rec["file_name"]
            if not f.is_file():
                raise FileNotFoundError(f"{meta}: line {i + 1} names {rec['file_name']!r}, "
                                        "which does not exist")
            self.files.append(f)
            self.texts.append(_caption_of(rec, meta, i + 1))
        if not self.files:
            raise ValueError(f"{meta} lists no images")

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (f"ImageCaptionFolder({str(self.root)!r}, n={len(self)}, "
                f"resolution={self.resolution})")

    def image(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return preprocess(im, self.resolution, self.center_crop)

    def caption(self, i: int, generator: torch.Generator | None = None) -> str:
        t = self.texts[i]
        if isinstance(t, str):
            return t
        return t[int(torch.randint(len(t), (), generator=generator))]

    def captions(self) -> list[str]:
        return [t if isinstance(t, str) else t[0] for t in self.texts]

    def fingerprint(self) -> str:
        """Changes whenever a file, its size or mtime, or the resolution / crop changes."""
        h = hashlib.sha1(f"{self.resolution}|{self.center_crop}".encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()


class HFImageCaptions:
    """A Hugging Face ``datasets`` split with an image and a text column, with the same interface
    as ``ImageCaptionFolder``."""

    def __init__(self, ds, resolution: int, image_column: str = "image",
                 caption_column: str = "text", center_crop: bool = True, name: str = ""):
        for col in (image_column, caption_column):
            if col not in ds.column_names:
                raise ValueError(f"dataset {name!r} has no column {col!r}; "
                                 f"columns: {ds.column_names}")
        self.ds, self.resolution, self.center_crop = ds, _norm(resolution), center_crop
        self.name = name
        self.image_column, self.caption_column = image_column, caption_column

    def __len__(self) -> int:
        return len(self.ds)

    def image(self, i: int) -> torch.Tensor:
        return preprocess(self.ds[i][self.image_column], self.resolution, self.center_crop)

    def caption(self, i: int, generator: torch.Generator | None = None) -> str:
        t = self.ds[i][self.caption_column]
        return t if isinstance(t, str) else t[int(torch.randint(len(t), (), generator=generator))]

    def captions(self) -> list[str]:
        return [t if isinstance(t, str) else t[0] for t in self.ds[self.caption_column]]

    def fingerprint(self) -> str:
        fp = getattr(self.ds, "_fingerprint", self.name)
        return hashlib.sha1(f"{fp}|{self.resolution}|{self.center_crop}".encode()).hexdigest()


def load_image_captions(data: str | os.PathLike, resolution: int, split: str = "train",
                        image_column: str = "image", caption_column: str = "text",
                        center_crop: bool = True):
    """An image-caption dataset from a local ``imagefolder`` directory (with ``metadata.jsonl``),
    a folder written by ``datasets``' ``save_to_disk``, or a Hugging Face ``datasets`` name.
    A hub name fails fast with ``OfflineError`` when the hub cannot be reached."""
    path = Path(data)
    if (path / "metadata.jsonl").is_file():
        return ImageCaptionFolder(path, resolution, center_crop)
    is_saved = path.is_dir() and ((path / "dataset_info.json").is_file()
                                  or (path / "dataset_dict.json").is_file())
    if path.exists() and not is_saved:
        raise ValueError(f"data={str(data)!r} is neither an imagefolder (no metadata.jsonl) nor a "
                         "folder saved by datasets' save_to_disk")
    if not path.exists():
        require_download(f"dataset {str(data)!r}",
                         hint="Download it elsewhere and pass a local imagefolder or a "
                              "save_to_disk folder as data=...")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"data={str(data)!r} is a Hugging Face dataset, which needs the "
                          "'datasets' package: pip install datasets") from e
    if is_saved:
        ds = datasets.load_from_disk(str(path))
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(str(data), split=split)
    return HFImageCaptions(ds, resolution, image_column, caption_column, center_crop, str(data))


def make_imagefolder(root: str | os.PathLike, images: torch.Tensor, captions: list) -> str:
    """Write images (N, 3, H, W) in [-1, 1] as PNGs with a ``metadata.jsonl`` (for tests and
    small experiments). Returns the folder."""
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images and {len(captions)} captions")
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, (x, c) in enumerate(zip(images, captions)):
            arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(root / f"{i:05d}.png")
            f.write(json.dumps({"file_name": f"{i:05d}.png", "text": c}) + "\n")
    return str(root)


# ---- VAE latents ----
@torch.no_grad()
def vae_moments(vae, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Encode images (N, 3, H, W) in [-1, 1] into the VAE's Gaussian moments (N, 2C, h, w),
    mean and logvar stacked along channels, float32 on the images' device."""
    p = next(vae.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device=p.device, dtype=p.dtype)
        out.append(vae.encode(x).latent_dist.parameters.float())
    return torch.cat(out).to(images.device)


def sample_latents(moments: torch.Tensor, vae_config, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Draw scaled latents z = (mean + std eps - shift) * scaling_factor from VAE moments."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = (0.5 * logvar.clamp(-30.0, 20.0)).exp()
    eps = torch.randn(mean.shape, generator=generator,
                      device=generator.device if generator is not None else "cpu").to(mean.device)
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (mean + std * eps - shift) * vae_config.scaling_factor


class LatentCache:
    """VAE moments of a whole dataset in one safetensors file, rebuilt when the dataset, the VAE
    or the resolution changes (the key is stored in the file's metadata).

    :param path: the ``.safetensors`` file to read or write.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.suffix != ".safetensors":
            raise ValueError(f"latent_cache={str(path)!r} must be a .safetensors file path")

    @staticmethod
    def key(dataset, vae) -> str:
        cfg = json.dumps(dict(vae.config), sort_keys=True, default=str)
        w = next(vae.parameters()).detach().flatten()[:64].float().cpu().numpy().tobytes()
        return hashlib.sha1((dataset.fingerprint() + cfg).encode() + w).hexdigest()

    def load(self, key: str) -> torch.Tensor | None:
        from safetensors import safe_open

        if not self.path.is_file():
            return None
        with safe_open(str(self.path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return f.get_tensor("moments")

    def build(self, dataset, vae, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """Load the cached moments if the key matches, else encode every image and save."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        key = self.key(dataset, vae)
        cached = self.load(key)
        if cached is not None:
            return cached
        parts = []
        for i in tqdm(range(0, len(dataset), batch_size), desc="VAE latents", disable=not progress):
            idx = range(i, min(i + batch_size, len(dataset)))
            imgs = torch.stack([dataset.image(j) for j in idx])
            parts.append(vae_moments(vae, imgs, batch_size).cpu())
        moments = torch.cat(parts).contiguous()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"moments": moments}, str(self.path),
                  metadata={"key": key, "n": str(len(moments))})
        return moments
