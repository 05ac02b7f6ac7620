"""Metrics every tier shares: they read samples (or features) and never train.

- Sample distances in any dimension: unbiased MMD^2 with RBF kernels (``mmd``; an unbiased
  estimate, so it can be slightly negative when the two sets match), sliced 1-Wasserstein
  (``sliced_wasserstein``) and its class-by-class version (``state_distance``).
- FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to features,
      FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2),
  with a pluggable feature extractor (``extract``; Inception-v3 in ``InceptionFeatures``,
  downloaded weights, fail fast offline).
- Diversity (DDIL paper, Sec. 5): pairwise LPIPS (or any distance) among samples of the same
  conditioning, averaged over pairs, then over conditionings.
- Precision / recall (Kynkaenniemi et al. 2019): k-NN manifold estimates in feature space.

Images are (N, C, H, W) in [-1, 1]; features (N, D).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .hub import require_download


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.05, 0.1, 0.2, 0.5, 1.0),
        max_n: int = 2000, seed: int = 0) -> float:
    """Unbiased squared MMD with a sum of RBF kernels; at most ``max_n`` points of each set."""
    g = torch.Generator().manual_seed(seed)
    x = x.double().flatten(1)[torch.randperm(len(x), generator=g)[:max_n]]
    y = y.double().flatten(1)[torch.randperm(len(y), generator=g)[:max_n]]

    def k(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance: the mean over random directions of W1 between the
    projections (compared at matched quantiles, so the two sets may differ in size)."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    q = torch.linspace(0.0005, 0.9995, max(len(x), len(y)), dtype=torch.float64)
    px = torch.quantile(x @ dirs, q, dim=0)
    py = torch.quantile(y @ dirs, q, dim=0)
    return float((px - py).abs().mean())


def state_distance(a: torch.Tensor, b: torch.Tensor, label_a=None, label_b=None, **kw) -> float:
    """Sliced W1 between two sets of states at the same t; with labels, the class-weighted
    average of the per-class distances (so a guided rollout is compared class by class)."""
    if label_a is None:
        return sliced_wasserstein(a, b, **kw)
    total = 0.0
    for c in torch.unique(label_a):
        ia, ib = label_a == c, label_b == c
        if ib.sum() < 2 or ia.sum() < 2:
            raise ValueError(f"class {int(c)} has fewer than 2 states in one of the sets")
        total += float(ia.double().mean()) * sliced_wasserstein(a[ia], b[ib], **kw)
    return total


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------
def gaussian_stats(feats) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = torch.as_tensor(feats).detach().double().cpu().flatten(1)
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors, got {len(f)}")
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(S: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix (eigenvalues clamped at 0)."""
    lam, U = torch.linalg.eigh((S + S.T) / 2)
    return (U * lam.clamp_min(0).sqrt()) @ U.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """FD between N(mu_a, cov_a) and N(mu_b, cov_b), computed in float64.
    Tr((S_a S_b)^1/2) is taken as Tr((R S_b R)^1/2) with R = S_a^1/2 (same eigenvalues, and
    symmetric, so no complex parts as with scipy's sqrtm)."""
    mu_a, mu_b, cov_a, cov_b = (torch.as_tensor(a).double() for a in (mu_a, mu_b, cov_a, cov_b))
    R = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(R @ cov_b @ R).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(fd.clamp_min(0))


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D), (N_b, D).
    FID when the features are Inception pool features."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


# ---------------------------------------------------------------------------------------------
# feature extractors: callables (N, C, H, W) in [-1, 1] -> (N, D)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def extract(features, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Apply a feature extractor in batches; returns float32 features on the CPU."""
    dev = module_device(features, x)
    return torch.cat([features(x[i:i + batch_size].to(dev)).float().cpu()
                      for i in range(0, len(x), batch_size)])


def module_device(model, x: torch.Tensor) -> torch.device:
    """Where a model's parameters live (x's device for parameter-free callables)."""
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    return next((p.device for p in params), x.device)


def _cached_weights(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _require_weights(what: str, url: str) -> None:
    """Fail fast unless the torch-hub file of ``url`` is cached or its host is reachable."""
    if not _cached_weights(url).is_file():
        host = url.split("/")[2]
        require_download(f"{what} ({url})", host=host,
                         hint=f"Copy {url.rsplit('/', 1)[-1]} into {_cached_weights(url).parent} "
                              "(the torch hub cache; TORCH_HOME moves it), or use the offline "
                              "digits features (train_classifier).")


class InceptionFeatures(nn.Module):
    """2048-d pool features of Inception-v3 for FID, on images in [-1, 1] of any size (resized
    to 299; grayscale repeated to RGB).

    :param kind: "torchvision" (ImageNet weights from download.pytorch.org; values are close to
        but not the same as published FIDs) or "pytorch_fid" (the standard TF-FID weights of
        the pytorch-fid package, from github.com; needs ``pip install pytorch-fid``); "auto"
        picks "pytorch_fid" when that package is installed.
    Raises ``OfflineError`` within seconds when the weights are not cached and cannot be
    downloaded.
    """

    def __init__(self, kind: str = "auto"):
        super().__init__()
        if kind == "auto":
            try:
                import pytorch_fid  # noqa: F401
                kind = "pytorch_fid"
            except ImportError:
                kind = "torchvision"
        if kind == "torchvision":
            from torchvision.models import Inception_V3_Weights, inception_v3

            w = Inception_V3_Weights.IMAGENET1K_V1
            _require_weights("Inception-v3 weights for FID", w.url)
            self.model = inception_v3(weights=w, aux_logits=True, transform_input=False)
            self.model.fc = nn.Identity()
        elif kind == "pytorch_fid":
            try:
                from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
            except ImportError as e:
                raise ImportError("InceptionFeatures(kind='pytorch_fid') needs "
                                  "`pip install pytorch-fid`") from e
            _require_weights("pytorch-fid Inception weights", FID_WEIGHTS_URL)
            self.model = InceptionV3([3], resize_input=True, normalize_input=True)
        else:
            raise ValueError(f"kind={kind!r} is not one of ('auto', 'torchvision', 'pytorch_fid')")
        self.kind = kind
        self.eval().requires_grad_(False)

    def forward(self, x):
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
        if self.kind == "pytorch_fid":
            return self.model((x + 1) / 2)[0].flatten(1)  # it resizes and rescales itself
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device)[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device)[:, None, None]
        return self.model(((x + 1) / 2 - mean) / std)


# ---------------------------------------------------------------------------------------------
# diversity
# ---------------------------------------------------------------------------------------------
def _groups(samples_by_cond) -> list[torch.Tensor]:
    """A dict cond -> (n, ...), a list of (n, ...), a (G, n, ...) tensor or one (n, ...) set."""
    if isinstance(samples_by_cond, dict):
        groups = list(samples_by_cond.values())
    elif isinstance(samples_by_cond, (list, tuple)):
        groups = list(samples_by_cond)
    elif torch.is_tensor(samples_by_cond) and samples_by_cond.ndim == 5:
        groups = list(samples_by_cond)
    else:
        groups = [samples_by_cond]
    if not groups or any(len(x) < 2 for x in groups):
        raise ValueError("samples_by_cond needs at least one group, each with >= 2 samples")
    return groups


@torch.no_grad()
def pairwise_diversity(samples_by_cond, distance, batch_size: int = 64) -> float:
    """The paper's diversity protocol with any distance: for each conditioning, the mean of
    ``distance(a, b)`` (P,) over all pairs of its samples; then the mean over conditionings."""
    per_group = []
    for x in _groups(samples_by_cond):
        i, j = torch.triu_indices(len(x), len(x), offset=1)
        d = torch.cat([distance(x[i[k:k + batch_size]], x[j[k:k + batch_size]]).flatten().cpu()
                       for k in range(0, len(i), batch_size)])
        per_group.append(d.double().mean())
    return float(torch.stack(per_group).mean())


# torchvision weights that lpips loads for its trunk
_LPIPS_TRUNKS = {"alex": ("AlexNet_Weights", "IMAGENET1K_V1"),
                 "vgg": ("VGG16_Weights", "IMAGENET1K_V1"),
                 "squeeze": ("SqueezeNet1_1_Weights", "IMAGENET1K_V1")}


def lpips_model(net: str = "alex", pretrained: bool = True, device="cpu") -> nn.Module:
    """An ``lpips.LPIPS`` model. ``pretrained=False`` keeps the package's calibrated linear
    layers but uses a random trunk (no download; for tests only: not a perceptual metric).
    Raises ``OfflineError`` within seconds when the trunk's weights are needed and not cached."""
    import torchvision.models as tvm

    if net not in _LPIPS_TRUNKS:
        raise ValueError(f"net={net!r} is not one of {tuple(_LPIPS_TRUNKS)}")
    if pretrained:
        enum, member = _LPIPS_TRUNKS[net]
        _require_weights(f"{net} trunk weights for LPIPS", getattr(getattr(tvm, enum), member).url)
    import warnings

    import lpips

    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=not pretrained, verbose=False)
    return model.to(device).eval().requires_grad_(False)


def lpips_diversity(samples_by_cond, net: str = "alex", model: nn.Module | None = None,
                    min_size: int = 64, batch_size: int = 64, device="cpu") -> float:
    """LPIPS diversity (DDIL paper, Sec. 5): pairwise LPIPS among the samples of each
    conditioning (e.g. 10 seeds of one prompt), averaged over pairs and then over
    conditionings. Higher = more diverse.

    :param samples_by_cond: dict cond -> images (n, C, H, W) in [-1, 1], a list of such sets, a
        (G, n, C, H, W) tensor, or one set (n, C, H, W). Grayscale is repeated to RGB; images
        smaller than ``min_size`` are upsampled (AlexNet's trunk needs about 64 px).
    :param model: an ``lpips.LPIPS`` (default ``lpips_model(net)``, which needs the trunk's
        weights).
    """
    model = model if model is not None else lpips_model(net, device=device)
    dev = next(model.parameters()).device

    def distance(a, b):
        a, b = (lpips_input(v, min_size).to(dev) for v in (a, b))
        return model(a, b)

    return pairwise_diversity(samples_by_cond, distance, batch_size)


def lpips_input(x: torch.Tensor, min_size: int) -> torch.Tensor:
    x = x.float().clamp(-1, 1)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if min(x.shape[-2:]) < min_size:
        x = nn.functional.interpolate(x, size=(min_size, min_size), mode="bilinear",
                                      align_corners=False)
    return x


def feature_diversity(samples_by_cond, features) -> float:
    """The same protocol with the Euclidean distance between features (an offline stand-in for
    LPIPS, e.g. with the digits classifier's features)."""
    def distance(a, b):
        return (extract(features, a) - extract(features, b)).norm(dim=1)

    return pairwise_diversity(samples_by_cond, distance)


# ---------------------------------------------------------------------------------------------
# precision / recall
# ---------------------------------------------------------------------------------------------
def precision_recall(real_feats, fake_feats, k: int = 3) -> dict:
    """Improved precision and recall (Kynkaenniemi et al. 2019). Each set's manifold is the
    union of balls around its points with radius the distance to the k-th nearest neighbour;
    precision: fraction of fake points inside the real manifold, recall: of real points inside
    the fake manifold."""
    real = torch.as_tensor(real_feats).double().flatten(1)
    fake = torch.as_tensor(fake_feats).double().flatten(1)

    def inside(points, ref):
        radius = torch.cdist(ref, ref).kthvalue(k + 1, dim=1).values  # (M,): k-th neighbour
        return (torch.cdist(points, ref) <= radius[None]).any(1).double().mean()

    return {"precision": float(inside(fake, real)), "recall": float(inside(real, fake))}
