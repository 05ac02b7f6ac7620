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

import copy
import hashlib
import math

import torch
from torch import nn

from ..denoiser import CFG, PARAMETERISATIONS
from ..diffusion import Schedule, Threshold
from ..backend import Backend
from ..train.settings import ConfigError, check_names, fail, is_int, reuse


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
        logw = self._logw(label, n)
        comp = torch.multinomial(logw.exp(), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        x = self.means[comp] + torch.einsum("nij,nj->ni", self._chol[comp], z)
        lab = None if self.labels is None else self.labels[comp]
        return x.float(), comp, lab

    def _logw(self, label, B: int) -> torch.Tensor:
        """(B, K) log weights, restricted to each sample's class (label -1 or None: all)."""
        logw = self.weights.log().expand(B, self.K)
        if label is None:
            return logw
        if self.labels is None:
            raise ValueError(f"mixture {self.name!r} has no class labels, got a conditioning")
        label = torch.as_tensor(label, dtype=torch.long).expand(B).cpu()
        keep = (self.labels[None] == label[:, None]) | (label[:, None] < 0)
        if not keep.any(1).all():
            raise ValueError(f"class labels must be -1 (none) or in [0, {self.num_classes})")
        return torch.where(keep, logw, torch.tensor(-math.inf, dtype=torch.float64))

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

    def posterior_mean(self, x_t, t, schedule: Schedule, label=None) -> torch.Tensor:
        """E[x0 | x_t] under the (class-restricted) mixture, float64, on the CPU."""
        if self._iso is not None:
            return self._posterior_mean_iso(x_t, t, schedule, label)
        lj, proj, var, a = self._log_joint(x_t, t, schedule, label)
        r = torch.softmax(lj, dim=1)  # (B, K)
        gain = a[:, None, None] * self.lam[None] / var * proj  # (B, K, d) in eigen-coordinates
        m = self.means[None] + torch.einsum("kij,bkj->bki", self.U, gain)  # (B, K, d)
        return (r[..., None] * m).sum(1)

    def _posterior_mean_iso(self, x, t, schedule, label) -> torch.Tensor:
        """The same for isotropic components, without (B, K, d) intermediates: with
        v_k = alpha^2 s_k^2 + sigma^2 and g_k = alpha s_k^2 / v_k,
        E[x0 | x] = sum_k r_k (mu_k + g_k (x - alpha mu_k)), |x - alpha mu_k|^2 by matmuls."""
        x = x.detach().to(torch.float64).cpu()
        B = x.shape[0]
        t = torch.as_tensor(t).expand(B).cpu()
        a, s = schedule.alpha(t).double()[:, None], schedule.sigma(t).double()[:, None]  # (B, 1)
        xm = x @ self.means.T  # (B, K)
        d2 = (x * x).sum(1, keepdim=True) - 2 * a * xm + a ** 2 * (self.means ** 2).sum(1)[None]
        v = a ** 2 * self._iso[None] + s ** 2  # (B, K)
        lj = self._logw(label, B) - 0.5 * (d2.clamp_min(0) / v + self.d * torch.log(2 * math.pi * v))
        r = torch.softmax(lj, dim=1)
        rg = r * (a * self._iso[None] / v)  # (B, K)
        return r @ self.means + rg.sum(1, keepdim=True) * x - a * (rg @ self.means)

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


# ---- teachers and networks ----
class ExactTeacher(nn.Module):
    """The closed-form denoiser E[x0 | x_t (, c)] of a mixture: a perfect teacher."""

    def __init__(self, gmm: GMM, schedule: Schedule):
        super().__init__()
        self.gmm, self.schedule = gmm, schedule

    def forward(self, x_t, t, cond=None):
        x0 = self.gmm.posterior_mean(x_t, t, self.schedule, label=cond)
        return x0.to(device=x_t.device, dtype=torch.float32)


def time_embedding(t: torch.Tensor, dim: int = 32, T: int = 1000) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    ang = (t.float()[:, None] + 1) / T * 1000.0 * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], 1)


class MLP(nn.Module):
    """A small time- and class-conditioned MLP ``net(x_t, t, cond) -> output`` (B, d).

    cond is None or class labels (B,); label -1 and None both mean "no class" (a learned null
    embedding), which is what classifier-free guidance needs."""

    def __init__(self, d: int = 2, hidden: int = 128, depth: int = 3, num_classes: int = 0,
                 temb: int = 32):
        super().__init__()
        self.d, self.num_classes, self.temb = d, num_classes, temb
        self.cemb = nn.Embedding(num_classes + 1, temb) if num_classes else None
        layers, width = [], d + temb
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, d)

    def _features(self, x_t, t, cond=None) -> torch.Tensor:
        h = time_embedding(t, self.temb)
        if self.cemb is not None:
            c = torch.full((x_t.shape[0],), -1, device=x_t.device) if cond is None else cond
            h = h + self.cemb(torch.where(c < 0, self.num_classes, c))
        return self.body(torch.cat([x_t.float(), h], 1))

    def features(self, x_t, t, cond=None) -> torch.Tensor:
        """The last hidden layer (for a GAN head on DMD2's critic). A separate entry point:
        sharded (FSDP) training hooks it like ``forward``, so ``forward`` must not call it."""
        return self._features(x_t, t, cond)

    def forward(self, x_t, t, cond=None):
        return self.out(self._features(x_t, t, cond))


def train_denoiser(gmm: GMM, schedule: Schedule, steps: int = 3000, batch: int = 512,
                   lr: float = 5e-3, hidden: int = 128, depth: int = 3, p_uncond: float = 0.15,
                   seed: int = 0, progress: bool = False, prediction: str = "v") -> nn.Module:
    """Train an MLP denoiser on mixture samples (an imperfect teacher).

    The network predicts ``prediction`` ("v", "eps" or "x0"; wrapped to an x0 Denoiser); every
    parameterisation is trained with the same v-space loss (= x0 loss weighted by SNR + 1), so
    they differ only in what the network outputs. Class-conditional mixtures drop the label with
    probability ``p_uncond`` so the network is both conditional and unconditional
    (classifier-free guidance). Returns the Denoiser in eval mode. About 10 s on a laptop CPU
    with the defaults; ``steps=0`` returns a randomly initialised one (seeded by ``seed``).
    """
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MLP(gmm.d, hidden, depth, gmm.num_classes)
    den = PARAMETERISATIONS[prediction](net, schedule)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr * 0.05)
    for _ in tqdm(range(steps), desc="toy teacher", disable=not progress):
        x0, _, lab = gmm.sample(batch, g)
        if lab is not None:
            lab = torch.where(torch.rand(batch, generator=g) < p_uncond, -1, lab)
        t = torch.randint(0, schedule.T, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = schedule.q_sample(x0, t, eps)
        v = schedule.v_from_x0(x_t, t, x0)
        if prediction == "v":  # the network's own output (bit-identical to the v-only past)
            v_hat = net(x_t, t, lab)
        else:
            v_hat = schedule.v_from_x0(x_t, t, den(x_t, t, lab))
        loss = ((v_hat - v) ** 2).mean()  # v-loss = x0-loss weighted by SNR + 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return den.eval().requires_grad_(False)


_TRAINED: dict = {}  # cache of trained MLP denoisers, keyed by their full recipe (``_recipe``)
_EXACT: dict = {}  # exact teachers by mixture content and schedule
TEACHERS = ("exact", "mlp")
STUDENT_INITS = ("pretrained", "random")


def _recipe(gmm: GMM, schedule: Schedule, init_steps: int, hidden: int, seed: int,
            prediction: str) -> tuple:
    """What a pretrained MLP depends on: the mixture's full content (not its name or means
    alone: a std sweep of one ring must not share networks), the schedule's table, the recipe."""
    sched = hashlib.sha256(schedule.alpha_bar.numpy().tobytes()).hexdigest()[:16]
    return (gmm.fingerprint(), sched, int(init_steps), int(hidden), int(seed), prediction)


def check_toy_args(mixture="ring8", teacher="exact", guidance=1.0, dim=2, schedule=None,
                   init_steps=3000, hidden=128, seed=0, student_init="pretrained",
                   student_param="v", prefix: str = "") -> GMM:
    """Check every ``Toy2dBackend`` setting (types and ranges) before any network is trained;
    raise ``ConfigError`` naming ``<prefix><parameter>``, its value and what is allowed.
    Returns the mixture (cheap: no training)."""
    def name(k):
        return f"{prefix}{k}"
    if teacher not in TEACHERS:
        fail(name("teacher"), teacher, "'exact' (closed form) or 'mlp' (trained here)")
    if not (_number(guidance) and guidance >= 1.0):
        fail(name("guidance"), guidance, "a number >= 1 (1 = no guidance)")
    if not (is_int(dim) and dim >= 2):
        fail(name("dim"), dim, "an int >= 2 (the 2D mixture is embedded in dim dimensions)")
    if schedule is not None and not isinstance(schedule, Schedule):
        fail(name("schedule"), schedule, "None (the default Schedule()) or a Schedule")
    if not (is_int(init_steps) and init_steps >= 0):
        fail(name("init_steps"), init_steps,
             "an int >= 0 (training steps of the pretrained MLP; 0 = untrained)")
    if not (is_int(hidden) and hidden >= 1):
        fail(name("hidden"), hidden, "a positive int (MLP width)")
    if not is_int(seed):
        fail(name("seed"), seed, "an int")
    if student_init not in STUDENT_INITS:
        fail(name("student_init"), student_init,
             f"one of {STUDENT_INITS} (start from the pretrained MLP, or from random weights)")
    if student_param not in PARAMETERISATIONS:
        fail(name("student_param"), student_param,
             f"one of {tuple(PARAMETERISATIONS)} (what the student network predicts)")
    if not isinstance(mixture, (str, GMM)):
        fail(name("mixture"), mixture, f"one of {tuple(MIXTURES)} or a GMM (e.g. class_mixture)")
    try:
        gmm = make_mixture(mixture, dim)
    except ConfigError as e:
        raise ConfigError(f"{prefix[:-1]}: {e}" if prefix else str(e)) from e
    if guidance != 1.0 and gmm.labels is None:
        fail(name("guidance"), guidance, "1.0 for this mixture, or a class-conditional mixture "
             "such as 'ring8_cond' or class_mixture(classes >= 1)",
             f"mixture {gmm.name!r} has no classes to guide")
    return gmm


class Toy2dBackend(Backend):
    """Gaussian-mixture backend.

    :param mixture: a name in ``MIXTURES`` or a ``GMM`` (e.g. ``class_mixture(...)``).
    :param teacher: "exact" (closed-form posterior mean) or "mlp" (a trained, imperfect MLP).
    :param guidance: classifier-free guidance scale w of the teacher (needs a labelled mixture);
        1.0 means the plain conditional teacher.
    :param dim: embed the 2D mixture in this many dimensions.
    :param init_steps: training steps of the MLP denoiser that students and critics start from
        (the MLP teacher itself when teacher="mlp"; with the exact teacher, students still start
        from a pretrained denoiser, as real students start from the teacher's weights).
    :param hidden: width of that MLP (and of a randomly initialised student).
    :param student_init: "pretrained" (a copy of that MLP) or "random" (a fresh MLP of width
        ``hidden``, initialised from torch's global random stream: ``train_arm`` seeds it with
        each run's seed, so a seed study varies the initialisation too).
    :param student_param: what the student network predicts: "v" (default), "eps" or "x0"
        (a pretrained start is then pretrained in that parameterisation).
    Every setting is checked (``check_toy_args``) before any network is trained.
    """

    def __init__(self, mixture: str | GMM = "ring8", teacher: str = "exact", guidance: float = 1.0,
                 dim: int = 2, schedule: Schedule | None = None, init_steps: int = 3000,
                 hidden: int = 128, seed: int = 0, student_init: str = "pretrained",
                 student_param: str = "v"):
        self.gmm = check_toy_args(mixture, teacher, guidance, dim, schedule, init_steps, hidden,
                                  seed, student_init, student_param)
        self.schedule = schedule or Schedule()
        self.shape, self.guidance, self.teacher_kind = (self.gmm.d,), guidance, teacher
        self.hidden, self.student_init, self.student_param = hidden, student_init, student_param
        self.support = Threshold("static", -1.0, 1.0)
        self._init_net = None
        if teacher == "mlp" or student_init == "pretrained":
            key = _recipe(self.gmm, self.schedule, init_steps, hidden, seed, student_param)
            if key not in _TRAINED:
                _TRAINED[key] = train_denoiser(self.gmm, self.schedule, init_steps,
                                               hidden=hidden, seed=seed,
                                               prediction=student_param)
            self._init_net = _TRAINED[key]
        if teacher == "exact":  # one per mixture and schedule: backends that differ only in w
            key = _recipe(self.gmm, self.schedule, 0, 0, 0, "exact")  # share it (train_cells)
            base = _EXACT.setdefault(key, ExactTeacher(self.gmm, self.schedule))
        else:
            base = self._init_net
        self.cond_teacher = base
        self.teacher = CFG(base, guidance) if guidance != 1.0 else base

    @property
    def init_net(self) -> nn.Module:
        """The pretrained MLP students start from (trained on first use when
        ``student_init="random"``, which does not need it)."""
        if self._init_net is None:
            raise AttributeError("this backend has student_init='random' and the exact teacher: "
                                 "it trains no pretrained MLP")
        return self._init_net

    @property
    def conditional(self) -> bool:
        return self.gmm.labels is not None

    def sample_data(self, n, generator=None):
        x, _, lab = self.gmm.sample(n, generator)
        return x, lab

    def sample_cond(self, n, generator=None):
        if not self.conditional:
            return None
        return self.gmm.sample(n, generator)[2]

    def make_student(self) -> nn.Module:
        if self.student_init == "random":
            net = MLP(self.gmm.d, self.hidden, 3, self.gmm.num_classes)
            return PARAMETERISATIONS[self.student_param](net, self.schedule).train()
        return copy.deepcopy(self.init_net).train().requires_grad_(True)

    def make_critic(self) -> nn.Module:
        """DMD2's fake critic: a copy of the pretrained MLP where there is one (it estimates
        the student's score from the start), else a random one."""
        if self._init_net is None:
            return self.make_student()
        return copy.deepcopy(self._init_net).train().requires_grad_(True)

    def plot_samples(self, x, ax, **kw):
        from .plots import scatter2d
        return scatter2d(x, ax, gmm=self.gmm, **kw)


def check_params(p: dict) -> None:
    """Check the toy backend's settings ``p`` (a config's ``backend`` section) before any
    teacher is trained; raises ``ConfigError`` naming ``backend.<key>``. The checks are the
    constructor's own (``check_toy_args``); a schedule given as a dict or a kind is built."""
    check_names("backend", p, Toy2dBackend, "the toy2d backend")
    kw = dict(p)
    sched = kw.get("schedule")
    if isinstance(sched, dict):
        kw["schedule"] = reuse("backend.schedule", Schedule, **sched)
    elif isinstance(sched, str):
        kw["schedule"] = reuse("backend.schedule", Schedule, sched)
    check_toy_args(**kw, prefix="backend.")
