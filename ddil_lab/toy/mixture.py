"""The toy tier: Gaussian mixtures in [-1, 1]^d with an exact teacher.

Under the VP forward process a mixture stays a mixture: component k of q_t is
N(alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I). With Sigma_k = U_k diag(lam_k) U_k^T that
covariance is U_k diag(alpha^2 lam_k + sigma^2) U_k^T, so one eigendecomposition per component
gives, for any t, the exact marginal density log q_t(x) and the exact posterior mean
(Tweedie's denoiser)

    E[x0 | x_t] = sum_k r_k(x_t) [mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^-1 (x_t - alpha mu_k)],
    r_k(x_t) = softmax_k(log w_k + log N(x_t; alpha mu_k, alpha^2 Sigma_k + sigma^2 I)).

Components may carry class labels: conditioning on label c restricts the mixture to the
components of class c, which gives exact conditional *and* unconditional teachers for
classifier-free guidance.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..diffusion import Schedule
from ..validation import ConfigError, fail, is_int


def _softmax0(z: torch.Tensor) -> torch.Tensor:
    """softmax over dim 0 of a (K, B) tensor: with K small (mixture components) and B large,
    reductions over the leading dim run vectorised across B (3-4x faster than over dim 1)."""
    e = (z - z.amax(0, keepdim=True)).exp_()
    return e.div_(e.sum(0, keepdim=True))


class GMM:
    """A Gaussian mixture with optional per-component class labels (all math in float64).

    :param means: (K, d) component means.
    :param covs: (K, d, d) covariances, or (K,) / float isotropic standard deviations.
    :param weights: (K,) mixture weights (normalised here); uniform if None.
    :param labels: (K,) integer class of each component, or None for an unconditional mixture.
    """

    def __init__(self, means, covs=0.05, weights=None, labels=None, name: str = "custom"):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        K, d = means.shape
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.ndim <= 1:  # isotropic standard deviations
            covs = (covs.expand(K) ** 2)[:, None, None] * torch.eye(d, dtype=torch.float64)
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape ({K}, {d}, {d}) or ({K},), got {tuple(covs.shape)}")
        weights = torch.ones(K) if weights is None else torch.as_tensor(weights)
        weights = weights.to(torch.float64)
        if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum")
        self.means, self.covs, self.name = means, covs, name
        self.weights = weights / weights.sum()
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels is not None and self.labels.shape != (K,):
            raise ValueError(f"labels must have shape ({K},), got {tuple(self.labels.shape)}")
        self.lam, self.U = torch.linalg.eigh(covs)  # (K, d), (K, d, d): Sigma = U diag(lam) U^T
        if (self.lam <= 0).any():
            raise ValueError("covariances must be positive definite")
        self._chol = torch.linalg.cholesky(covs)
        s2 = self.lam[:, :1]  # isotropic components (Sigma_k = s_k^2 I): a fast posterior mean
        iso = torch.allclose(covs, s2[..., None] * torch.eye(d, dtype=torch.float64), 0, 0)
        self._iso = s2[:, 0] if iso else None  # (K,)
        # one variance shared by every component (the mixture family): a faster posterior mean
        self._shared = float(s2[0, 0]) if iso and bool((s2 == s2[0, 0]).all()) else None
        self._mu2 = (means ** 2).sum(1)[None]  # (1, K)
        self._params = {}  # (class, dtype) -> its components' means and log weights
        if self.labels is not None:  # the components of each class
            self._class_comps = [(self.labels == c).nonzero().squeeze(1)
                                 for c in range(self.num_classes)]

    K = property(lambda self: self.means.shape[0])
    d = property(lambda self: self.means.shape[1])
    num_classes = property(lambda self: 0 if self.labels is None else int(self.labels.max()) + 1)

    def __repr__(self):
        return f"GMM({self.name!r}, K={self.K}, d={self.d}, classes={self.num_classes})"

    def fingerprint(self) -> str:
        """A hash of the mixture's full content (means, covariances, weights, labels): two
        mixtures share a fingerprint iff they are the same distribution with the same classes."""
        h = hashlib.sha256()
        for a in (self.means, self.covs, self.weights):
            h.update(a.contiguous().numpy().tobytes())
        h.update(b"none" if self.labels is None else self.labels.numpy().tobytes())
        return h.hexdigest()[:16]

    # ---- sampling ----
    def sample(self, n: int, generator: torch.Generator | None = None, label=None):
        """Draw n points. Returns (x (n, d) float32, component (n,), class label (n,) or None).
        ``label`` (int or (n,) tensor) restricts to the components of that class."""
        if label is None:  # one draw of n components from the mixture weights
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:  # each sample from its class's components
            comp = torch.multinomial(self._logw(label, n).exp(), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        x = self.means[comp] + torch.einsum("nij,nj->ni", self._chol[comp], z)
        lab = None if self.labels is None else self.labels[comp]
        return x.float(), comp, lab

    def _check_labels(self, label, B: int) -> torch.Tensor:
        """Class labels (B,) on the CPU, each -1 (none) or a class of this mixture."""
        if self.labels is None:
            raise ValueError(f"mixture {self.name!r} has no class labels, got a conditioning")
        label = torch.as_tensor(label, dtype=torch.long).expand(B).cpu()
        if (label >= self.num_classes).any() or (label < -1).any():
            raise ValueError(f"class labels must be -1 (none) or in [0, {self.num_classes})")
        return label

    def _logw(self, label, B: int) -> torch.Tensor:
        """(B, K) log weights, restricted to each sample's class (label -1 or None: all): row
        ``label`` of a (classes + 1, K) table whose last row is the unrestricted mixture."""
        logw = self.weights.log()
        if label is None:
            return logw.expand(B, self.K)
        label, C = self._check_labels(label, B), self.num_classes
        if not hasattr(self, "_logw_table"):
            keep = self.labels[None] == torch.arange(C)[:, None]  # (C, K)
            table = torch.where(keep, logw, torch.tensor(-math.inf, dtype=torch.float64))
            self._logw_table = torch.cat([table, logw[None]])  # (C + 1, K)
        return self._logw_table.index_select(0, torch.where(label < 0, C, label))

    # ---- exact marginals of the forward process ----
    def _components(self, x, t, schedule):
        """Per component: eigen-coordinates of x - alpha mu, variances, alpha. Shapes (B, K, d)."""
        x = x.detach().to(torch.float64).cpu() if not x.requires_grad else x.to(torch.float64).cpu()
        B = x.shape[0]
        if schedule is None:  # the clean data distribution
            a = torch.ones(B, dtype=torch.float64)
            s = torch.zeros(B, dtype=torch.float64)
        else:
            t = torch.as_tensor(t).expand(B).cpu()
            a, s = schedule.alpha(t).double(), schedule.sigma(t).double()
        diff = x[:, None, :] - a[:, None, None] * self.means[None]  # (B, K, d)
        proj = torch.einsum("kij,bki->bkj", self.U, diff)  # coordinates in each eigenbasis
        var = a[:, None, None] ** 2 * self.lam[None] + s[:, None, None] ** 2  # (B, K, d)
        return proj, var, a

    def _log_joint(self, x, t, schedule, label):
        proj, var, a = self._components(x, t, schedule)
        logpdf = -0.5 * ((proj ** 2 / var) + torch.log(2 * math.pi * var)).sum(-1)  # (B, K)
        return self._logw(label, x.shape[0]) + logpdf, proj, var, a

    def log_prob(self, x, t=None, schedule: Schedule | None = None, label=None) -> torch.Tensor:
        """log q_t(x) (or log p_data(x) when schedule is None), optionally given the class."""
        lj, *_ = self._log_joint(x, t, schedule, label)
        lw = self._logw(label, x.shape[0])
        return torch.logsumexp(lj, 1) - torch.logsumexp(lw, 1)

    def posterior_mean(self, x_t, t, schedule: Schedule, label=None,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """E[x0 | x_t] under the (class-restricted) mixture, on the CPU, in float64 (the oracle);
        ``dtype=torch.float32`` computes the equal-variance family's case in float32 (about
        2.5x faster; error bounded against float64 in the tests), others in float64."""
        if self._shared is not None:
            return self._posterior_mean_iso(x_t, t, schedule, label, dtype)
        if self._iso is not None:
            return self._posterior_mean_iso(x_t, t, schedule, label)
        lj, proj, var, a = self._log_joint(x_t, t, schedule, label)
        r = torch.softmax(lj, dim=1)  # (B, K)
        gain = a[:, None, None] * self.lam[None] / var * proj  # (B, K, d) in eigen-coordinates
        m = self.means[None] + torch.einsum("kij,bkj->bki", self.U, gain)  # (B, K, d)
        return (r[..., None] * m).sum(1)

    def _posterior_mean_iso(self, x, t, schedule, label, dtype=torch.float64) -> torch.Tensor:
        """The same for isotropic components, without (B, K, d) intermediates: with
        v_k = alpha^2 s_k^2 + sigma^2 and g_k = alpha s_k^2 / v_k,
        E[x0 | x] = sum_k r_k (mu_k + g_k (x - alpha mu_k)), |x - alpha mu_k|^2 by matmuls.
        When every component has the same s (the mixture family): ``_pm_shared``, once per
        class present in the batch, over that class's components only."""
        x = x.detach().to(dtype).cpu()
        B = x.shape[0]
        t = torch.as_tensor(t).expand(B).cpu()
        a, s = schedule.alpha(t).to(dtype)[:, None], schedule.sigma(t).to(dtype)[:, None]  # (B, 1)
        if self._shared is not None:
            if label is None:
                return self._pm_shared(x, a, s, *self._class_params(-1, dtype))
            label = self._check_labels(label, B)
            order = torch.argsort(label, stable=True)  # rows grouped by class, then one slice
            counts = torch.bincount(label + 1, minlength=self.num_classes + 1).tolist()
            xs, as_, ss = (v.index_select(0, order) for v in (x, a, s))
            parts, i = [], 0
            for c, n in zip(range(-1, self.num_classes), counts):
                if n:  # one class: only its components
                    sl = slice(i, i + n)
                    parts.append(self._pm_shared(xs[sl], as_[sl], ss[sl],
                                                 *self._class_params(c, dtype)))
                i += n
            out = torch.empty_like(x)
            return out.index_copy_(0, order, torch.cat(parts)) if parts else out  # B may be 0
        xm = x @ self.means.T  # (B, K)
        d2 = (x * x).sum(1, keepdim=True) - 2 * a * xm + a ** 2 * self._mu2
        v = a ** 2 * self._iso[None] + s ** 2  # (B, K)
        lj = self._logw(label, B) - 0.5 * (d2.clamp_min(0) / v + self.d * torch.log(2 * math.pi * v))
        r = _softmax0(lj.T).T
        rg = r * (a * self._iso[None] / v)  # (B, K)
        return r @ self.means + rg.sum(1, keepdim=True) * x - a * (rg @ self.means)

    def _class_params(self, c: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(means (K_c, d), log weights (K_c, 1)) of class c's components (c = -1: all), in
        ``dtype``; made once."""
        key = (c, dtype)
        if key not in self._params:
            comps = slice(None) if c < 0 else self._class_comps[c]
            self._params[key] = (self.means[comps].to(dtype),
                                 self.weights.log()[comps, None].to(dtype))
        return self._params[key]

    def _pm_shared(self, x, a, s, means, logw) -> torch.Tensor:
        """The posterior mean when every component has variance s2 = ``self._shared``: v and
        g do not depend on k, and the terms of the log-likelihood that do not (|x|^2, log v)
        cancel in the softmax, r = softmax_k(log w_k + (alpha x.mu_k - alpha^2 |mu_k|^2 / 2) / v),
        E = (1 - alpha g) sum_k r_k mu_k + g x. Computed in (K, B) layout: the softmax then
        reduces over the short leading dim, vectorised across B."""
        at, v = a.T, a.T ** 2 * self._shared + s.T ** 2  # (1, B)
        lj = logw + (at * (means @ x.T) - (0.5 * at ** 2) * (means ** 2).sum(1)[:, None]) / v
        r = _softmax0(lj)  # (K, B)
        g = (at * self._shared / v).T  # (B, 1)
        return (1 - a * g) * (means.T @ r).T + g * x

    def assign(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest component of each clean sample by likelihood, and its Mahalanobis distance."""
        proj, var, _ = self._components(x, None, None)
        maha2 = (proj ** 2 / var).sum(-1)  # (B, K)
        logpdf = -0.5 * (maha2 + torch.log(2 * math.pi * var).sum(-1))
        k = (self.weights.log()[None] + logpdf).argmax(1)
        return k, maha2.gather(1, k[:, None]).squeeze(1).sqrt()


# ---- the mixture family ----
LAYOUTS = ("ring", "grid")


def _ring(n: int, radius: float) -> torch.Tensor:
    ang = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    return radius * torch.stack([ang.cos(), ang.sin()], 1)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def class_mixture(modes: int = 8, classes: int = 2, std: float = 0.1, radius: float = 0.7,
                  layout: str = "ring", weights=None, dim: int = 2,
                  name: str | None = None) -> GMM:
    """Class-conditional rings and grids: ``modes`` isotropic components of standard deviation
    ``std``, on a circle of radius ``radius`` ("ring") or a square grid in [-radius, radius]^2
    ("grid"; ``modes`` a square number), mode i in class ``i % classes`` (neighbouring modes in
    different classes; ``classes=0``: unconditional), mixture ``weights`` per mode (None: equal;
    within a class they set the class's mode weights, across classes the class prior), embedded
    in ``dim`` dimensions (``embed``). Every setting is checked before anything is built
    (``ConfigError`` naming it).
    """
    _check_family(modes, classes, std, radius, layout, weights, dim)
    if layout == "ring":
        means = _ring(modes, radius)
    else:
        g = torch.linspace(-radius, radius, math.isqrt(modes), dtype=torch.float64)
        means = torch.cartesian_prod(g, g)
    labels = [i % classes for i in range(modes)] if classes else None
    name = name or f"{layout}{modes}" + (f"c{classes}" if classes else "") + f"_s{std:g}"
    return embed(GMM(means, std, weights=weights, labels=labels, name=name), dim)


def _check_family(modes, classes, std, radius, layout, weights, dim, prefix: str = ""):
    if layout not in LAYOUTS:
        fail(f"{prefix}layout", layout, f"one of {LAYOUTS}")
    if not (is_int(modes) and modes >= 1):
        fail(f"{prefix}modes", modes, "a positive int")
    if layout == "grid" and math.isqrt(modes) ** 2 != modes:
        fail(f"{prefix}modes", modes, "a square number (4, 9, 16, 25, ...) for layout='grid'")
    if not (is_int(classes) and 0 <= classes <= modes):
        fail(f"{prefix}classes", classes, f"an int in [0, modes={modes}] (0 = unconditional)")
    if not (_number(std) and 0 < std <= 0.5):
        fail(f"{prefix}std", std, "a number in (0, 0.5] (modes live in [-1, 1]^2)")
    if not (_number(radius) and 0 < radius <= 1):
        fail(f"{prefix}radius", radius, "a number in (0, 1] (the data support is [-1, 1])")
    if weights is not None:
        w = list(weights) if not torch.is_tensor(weights) else weights.tolist()
        if len(w) != modes or not all(_number(v) and v >= 0 for v in w) or sum(w) <= 0:
            fail(f"{prefix}weights", weights,
                 f"None or {modes} non-negative numbers with a positive sum (one per mode)")
    if not (is_int(dim) and dim >= 2):
        fail(f"{prefix}dim", dim, "an int >= 2 (the mixture's plane, embedded in dim dimensions)")


def ring8(std: float = 0.1) -> GMM:
    """8 equal modes on a circle of radius 0.7."""
    return class_mixture(8, 0, std, 0.7, name="ring8")


def grid25(std: float = 0.05) -> GMM:
    """5x5 equal modes on a grid in [-0.8, 0.8]^2."""
    return class_mixture(25, 0, std, 0.8, "grid", name="grid25")


def imbalanced(std: float = 0.1) -> GMM:
    """ring8 with unequal weights (from 0.30 down to 0.03)."""
    w = [0.30, 0.20, 0.15, 0.10, 0.08, 0.07, 0.06, 0.04]
    return class_mixture(8, 0, std, 0.7, weights=w, name="imbalanced")


def ring8_cond(std: float = 0.1) -> GMM:
    """Class-conditional ring: 8 modes alternating between 2 classes (4 modes each), with
    unequal weights, for classifier-free guidance."""
    w = [0.20, 0.08, 0.15, 0.12, 0.10, 0.16, 0.05, 0.14]
    return class_mixture(8, 2, std, 0.7, weights=w, name="ring8_cond")


RING12_WEIGHTS = (1.0, 0.5, 0.8, 0.3, 1.2, 0.6, 0.9, 0.4, 1.1, 0.7, 0.5, 1.0)


def ring12_cond3(std: float = 0.04) -> GMM:
    """The regime map's mixture family at 3 classes: 12 narrow modes on a circle of radius 0.7,
    mode i in class i % 3 (4 modes per class), unequal weights (``RING12_WEIGHTS``)."""
    return class_mixture(12, 3, std, 0.7, weights=RING12_WEIGHTS, name="ring12_cond3")


MIXTURES = {"ring8": ring8, "grid25": grid25, "imbalanced": imbalanced, "ring8_cond": ring8_cond,
            "ring12_cond3": ring12_cond3}


def embed(gmm: GMM, dim: int, off_std: float = 0.02, seed: int = 0) -> GMM:
    """The same mixture in ``dim`` dimensions: the plane is rotated by a random orthonormal map,
    and each component gets a small spread ``off_std`` off the plane."""
    if not (is_int(dim) and dim >= gmm.d):
        fail("dim", dim, f"an int >= the mixture's dimension {gmm.d}")
    if dim == gmm.d:
        return gmm
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, gmm.d, generator=g, dtype=torch.float64))  # (D, d)
    off = off_std ** 2 * (torch.eye(dim, dtype=torch.float64) - Q @ Q.T)
    covs = Q @ gmm.covs @ Q.T + off
    return GMM(gmm.means @ Q.T, covs, gmm.weights, gmm.labels, name=f"{gmm.name}@{dim}d")


def make_mixture(name: str | GMM, dim: int = 2) -> GMM:
    if isinstance(name, GMM):
        return embed(name, dim)
    if not isinstance(name, str) or name not in MIXTURES:
        raise ConfigError(f"mixture={name!r} is not one of {tuple(MIXTURES)} (or pass a GMM, "
                          "e.g. from class_mixture)")
    return embed(MIXTURES[name](), dim)
