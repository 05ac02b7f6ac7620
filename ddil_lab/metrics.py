"""Metrics every tier shares: they read samples (or features) and never train.

- Sample distances in any dimension: unbiased MMD^2 with RBF kernels (``mmd``; an unbiased
  estimate, so it can be slightly negative when the two sets match), sliced 1-Wasserstein
  (``sliced_wasserstein``) and its class-by-class version (``state_distance``).
- FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to features,
      FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2),
  with a pluggable feature extractor (``extract``). Numbers meant to sit next to published
  ones: ``InceptionFeatures()`` (torch-fidelity's TF-Inception on uint8 images) and
  ``fid_score`` (torch-fidelity's maths), with reference statistics cached as npz
  (``reference_fid_stats``); ``frechet_distance`` (our own maths) is their oracle in the tests
  and the FID of classifier features on the digits.
- Diversity (DDIL paper, Sec. 5): pairwise LPIPS (or any distance) among samples of the same
  conditioning, averaged over pairs, then over conditionings.
- Precision / recall (Kynkaenniemi et al. 2019): k-NN manifold estimates in feature space.

Images are (N, C, H, W) in [-1, 1]; features (N, D).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .hub import require_download


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.05, 0.1, 0.2, 0.5, 1.0),
        max_n: int = 2000, seed: int = 0, cache: dict | None = None) -> float:
    """Unbiased squared MMD with a sum of RBF kernels; at most ``max_n`` points of each set.
    ``cache``: a dict kept with the reference set ``y`` (e.g. across the students scored
    against one teacher): its y-y kernel sum is computed once (when y is not subsampled, the
    sum does not depend on the order the subsampling draws)."""
    g = torch.Generator().manual_seed(seed)
    cacheable = cache is not None and len(y) <= max_n  # y whole: its sum is order-free
    x = x.double().flatten(1)[torch.randperm(len(x), generator=g)[:max_n]]
    y = y.double().flatten(1)[torch.randperm(len(y), generator=g)[:max_n]]

    n, m = len(x), len(y)
    key = ("mmd_yy", tuple(bandwidths), m)
    if cacheable and key in cache:
        syy, dyy = cache[key]
    else:
        syy, dyy = _kernel_sum(y, y, bandwidths)
        if cacheable:
            cache[key] = (syy, dyy)
    (sxx, dxx), (sxy, _) = (_kernel_sum(a, b, bandwidths) for a, b in ((x, x), (x, y)))
    return float((sxx - dxx) / (n * (n - 1)) + (syy - dyy) / (m * (m - 1)) - 2 * sxy / (n * m))


def _kernel_sum(a, b, bandwidths) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, trace) of the summed-RBF kernel matrix between a and b, without materialising a
    matrix per bandwidth (one buffer, exponentiated in place: 3x faster than a sum of exps)."""
    d2 = ((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2 * a @ b.T).clamp_min_(0)
    buf, total, trace = torch.empty_like(d2), 0.0, 0.0
    for h in bandwidths:
        torch.mul(d2, -1.0 / (2 * h * h), out=buf).exp_()
        total, trace = total + buf.sum(), trace + buf.diagonal().sum()
    return total, trace


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_proj: int = 256, seed: int = 0,
                       cache: dict | None = None) -> float:
    """Sliced 1-Wasserstein distance: the mean over random directions of W1 between the
    projections (compared at matched quantiles, so the two sets may differ in size).
    ``cache``: as for ``mmd``, keeps the reference set y's quantiles."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    q = torch.linspace(0.0005, 0.9995, max(len(x), len(y)), dtype=torch.float64)
    px = torch.quantile(x @ dirs, q, dim=0)
    key = ("sw_y", n_proj, seed, len(q))
    if cache is None or key not in cache:
        py = torch.quantile(y @ dirs, q, dim=0)
        if cache is not None:
            cache[key] = py
    py = cache[key] if cache is not None else py
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


# ---------------------------------------------------------------------------------------------
# the standard FID: TF-Inception through torch-fidelity, uint8 inputs, the library's maths
# ---------------------------------------------------------------------------------------------
# Published FIDs (DDPM, PD, consistency models, LCM, DMD2, the DDIL paper) use the TensorFlow
# Inception graph of 2015-12-05 on images quantised to uint8, resized to 299 with TF's bilinear
# resize, pool3 features (2048-d) and the TTUR Frechet code. torch-fidelity reproduces that
# pipeline (its weights are a conversion of the TF graph); FID moves by whole points with other
# weights, resizing or quantisation, so numbers meant to sit next to published ones come from here.
FID_NETWORK = "inception-v3-compat"  # torch-fidelity's name for its TF-Inception port
FID_LAYER = "2048"


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255], rounded as saving a PNG does (uint8 passes
    through); grayscale repeated to RGB."""
    if x.dtype != torch.uint8:
        x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def tf_inception_weights(weights: str | Path | None = None) -> Path:
    """The local file of torch-fidelity's TF-Inception weights: ``weights`` if given, else the
    torch hub cache (downloaded there once when the host is reachable). Raises ``OfflineError``
    within seconds, naming the file and the folder it goes to, when it is neither there nor
    downloadable. The file is checked to hold only tensors (``torch.load(weights_only=True)``)
    before torch-fidelity reads it."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as url

    path = Path(weights) if weights is not None else _cached_weights(url)
    if weights is not None and not path.is_file():
        raise FileNotFoundError(f"weights={str(weights)!r}: no such file (torch-fidelity's "
                                f"{url.rsplit('/', 1)[-1]})")
    if not path.is_file():
        _require_weights("torch-fidelity's TF-Inception weights (the standard FID network)", url)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=None, progress=False)
    try:
        torch.load(path, map_location="cpu", weights_only=True)  # tensors only, or it raises
    except Exception as e:
        raise ValueError(f"{path} is not a plain state dict of tensors: {e}") from e
    return path


class InceptionFeatures(nn.Module):
    """2048-d pool features of Inception-v3 for FID, on images in [-1, 1] of any size.

    :param kind: "standard" (default): torch-fidelity's TF-Inception on uint8-quantised images,
        the network and preprocessing of published FIDs; "torchvision" (ImageNet weights; close
        to but not the same as published FIDs) or "pytorch_fid" (needs ``pip install
        pytorch-fid``).
    :param extractor: with kind "standard", any torch-fidelity ``FeatureExtractorBase`` in place
        of the TF-Inception (tests pass a tiny one); its first requested feature is used.
    :param weights: a local copy of the standard weights (default: the torch hub cache).
    Raises ``OfflineError`` within seconds when the weights are not cached and cannot be
    downloaded. ``fid_score`` (the library's maths) goes with kind "standard".
    """

    KINDS = ("standard", "torchvision", "pytorch_fid")

    def __init__(self, kind: str = "standard", extractor: nn.Module | None = None,
                 weights: str | Path | None = None):
        super().__init__()
        if kind == "auto":  # the old default
            kind = "standard"
        if kind not in self.KINDS:
            raise ValueError(f"kind={kind!r} is not one of {self.KINDS}")
        if extractor is not None and kind != "standard":
            raise ValueError(f"extractor= needs kind='standard', got kind={kind!r}")
        self.kind = kind
        if kind == "standard":
            if extractor is None:
                from torch_fidelity.feature_extractor_inceptionv3 import \
                    FeatureExtractorInceptionV3
                extractor = FeatureExtractorInceptionV3(
                    FID_NETWORK, [FID_LAYER],
                    feature_extractor_weights_path=str(tf_inception_weights(weights)))
            self.model = extractor
            self.network = extractor.get_name()
        elif kind == "torchvision":
            from torchvision.models import Inception_V3_Weights, inception_v3

            w = Inception_V3_Weights.IMAGENET1K_V1
            _require_weights("Inception-v3 weights for FID", w.url)
            self.model = inception_v3(weights=w, aux_logits=True, transform_input=False)
            self.model.fc = nn.Identity()
            self.network = "torchvision-inception-v3"
        else:
            try:
                from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
            except ImportError as e:
                raise ImportError("InceptionFeatures(kind='pytorch_fid') needs "
                                  "`pip install pytorch-fid`") from e
            _require_weights("pytorch-fid Inception weights", FID_WEIGHTS_URL)
            self.model = InceptionV3([3], resize_input=True, normalize_input=True)
            self.network = "pytorch-fid-inception-v3"
        self.eval().requires_grad_(False)

    def forward(self, x):
        if self.kind == "standard":  # torch-fidelity resizes (TF bilinear) and rescales itself
            return self.model(to_uint8(x))[0].float().flatten(1)
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
        if self.kind == "pytorch_fid":
            return self.model((x + 1) / 2)[0].flatten(1)  # it resizes and rescales itself
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device)[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device)[:, None, None]
        return self.model(((x + 1) / 2 - mean) / std)


def tiny_fid_extractor(name: str = "ddil-tiny-random", dim: int = 24) -> nn.Module:
    """A tiny *random* torch-fidelity feature extractor (uint8 images -> (N, dim)), registered
    under ``name`` so torch-fidelity's own ``calculate_metrics`` can run it too: for tests of
    the standard-FID path without the TF-Inception weights. Not a metric."""
    import torch_fidelity
    from torch_fidelity import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class TinyRandom(FeatureExtractorBase):
        def __init__(self, name, features_list, **kw):
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(0)  # the same weights however it is built
            self.conv = nn.Conv2d(3, dim // 4, 3, 2)
            with torch.no_grad():
                self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
                self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g))

        @staticmethod
        def get_provided_features_list():
            return (str(dim),)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return str(dim)

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):  # (N, 3, H, W) uint8, as torch-fidelity's extractors take them
            h = torch.tanh(self.conv(x.float() / 64))
            return (nn.functional.adaptive_avg_pool2d(h, 2).flatten(1),)

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, TinyRandom)
    return FEATURE_EXTRACTORS_REGISTRY[name](name, [str(dim)]).eval()


def fid_stats(feats) -> dict:
    """{"mu": (D,), "sigma": (D, D)} of features (N, D), float64 numpy, by torch-fidelity's
    ``fid_features_to_statistics`` (the TTUR code)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    f = torch.as_tensor(feats).detach().double().cpu().flatten(1)
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors, got {len(f)}")
    return fid_features_to_statistics(f)


def fid_score(a, b) -> float:
    """FID between two feature sets (N, D) or ``fid_stats`` dicts, by torch-fidelity's
    ``fid_statistics_to_metric`` (what published numbers use; ``frechet_distance`` is the
    project's own maths, kept as the oracle and for classifier features)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    sa, sb = (s if isinstance(s, dict) else fid_stats(s) for s in (a, b))
    sa, sb = ({k: np.asarray(s[k], dtype=np.float64) for k in ("mu", "sigma")} for s in (sa, sb))
    if sa["mu"].shape != sb["mu"].shape:
        raise ValueError(f"feature dimensions differ: {sa['mu'].shape} vs {sb['mu'].shape}")
    return float(fid_statistics_to_metric(sa, sb, verbose=False)[KEY_METRIC_FID])


# Reference statistics: npz files (loaded with allow_pickle=False), one per data set, split,
# resolution, sample count and feature network, so a changed protocol never reuses old numbers.
def fid_cache_dir() -> Path:
    """``$DDIL_FID_CACHE``, else ``~/.cache/ddil_lab/fid_stats``."""
    return Path(os.environ.get("DDIL_FID_CACHE",
                               Path.home() / ".cache" / "ddil_lab" / "fid_stats"))


def fid_stats_key(dataset: str, resolution: int, n: int, network: str = FID_NETWORK) -> str:
    """The file stem of a reference: e.g. ``cifar10-train_32px_n50000_inception-v3-compat``."""
    for name, v in (("dataset", dataset), ("network", network)):
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(f"{name}={v!r}: use letters, digits, '-', '_' or '.' only")
    return f"{dataset}_{int(resolution)}px_n{int(n)}_{network}"


def save_fid_stats(path: str | Path, stats: dict, **meta) -> Path:
    """Write ``fid_stats`` (and JSON-able ``meta``) to an npz file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=np.asarray(stats["mu"], np.float64),
             sigma=np.asarray(stats["sigma"], np.float64), meta=np.array(json.dumps(meta)))
    tmp.replace(path)
    return path


def load_fid_stats(path: str | Path) -> tuple[dict, dict]:
    """(stats, meta) from ``save_fid_stats``'s npz (no pickles: ``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        return {"mu": z["mu"], "sigma": z["sigma"]}, meta


def reference_fid_stats(dataset: str, resolution: int, n: int, features, compute,
                        cache_dir: str | Path | None = None) -> dict:
    """Reference statistics of ``n`` images of ``dataset`` at ``resolution`` in ``features``
    (its ``network`` name is part of the key): loaded from the cache, or computed as
    ``fid_stats(compute())`` (``compute() -> features (n, D)``) and saved there."""
    network = getattr(features, "network", type(features).__name__)
    key = fid_stats_key(dataset, resolution, n, network)
    path = Path(cache_dir or fid_cache_dir()) / f"{key}.npz"
    if path.is_file():
        return load_fid_stats(path)[0]
    feats = compute()
    if len(feats) != n:
        raise ValueError(f"reference {key}: computed {len(feats)} feature vectors, expected {n}")
    stats = fid_stats(feats)
    save_fid_stats(path, stats, dataset=dataset, resolution=resolution, n=n, network=network)
    return stats


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
