"""Exact metrics for the toy tier (Gaussian mixtures).

Sample quality: NLL under the true mixture, mode coverage, total variation between the mode
histogram and the true weights, the fraction of off-mode samples, MMD and sliced Wasserstein
to reference samples. Covariate shift at a timestep t (DDIL, Sec. 3): how unlikely the states a
policy visits are under the forward marginal q_t that forward-only training draws from,

    shift_t = E_{x ~ states}[-log q_t(x)] - E_{x ~ q_t}[-log q_t(x)]      (0 = no shift),

and, where no closed form applies (guided rollouts), a sample distance between two sets of
states at the same t (``state_distance``).
"""

from __future__ import annotations

import torch

from ..diffusion import Schedule


def nll(x: torch.Tensor, gmm, label=None) -> float:
    """Mean negative log-likelihood (nats) of samples under the true mixture."""
    return float(-gmm.log_prob(x, label=label).mean())


def mode_stats(x: torch.Tensor, gmm, off_mode_sigma: float = 4.0, min_count: int = 1) -> dict:
    """Assign each sample to its most likely component. A sample further than
    ``off_mode_sigma`` (Mahalanobis) from it is off-mode. Coverage: the fraction of modes with
    at least ``min_count`` on-mode samples; TV: total variation between the on-mode histogram
    and the true weights."""
    k, dist = gmm.assign(x)
    on = dist <= off_mode_sigma
    hist = torch.bincount(k[on], minlength=gmm.K).double()
    freq = hist / hist.sum().clamp_min(1)
    return {"coverage": float((hist >= min_count).double().mean()),
            "tv": float(0.5 * (freq - gmm.weights).abs().sum()),
            "off_mode": float((~on).double().mean()),
            "hist": freq.tolist()}


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


def covariate_shift(x_t: torch.Tensor, t: int, gmm, schedule: Schedule, label=None,
                    n_ref: int = 20000, seed: int = 0) -> float:
    """E[-log q_t(x_t | c)] over the given states minus the same over forward samples of q_t
    (with the same class labels, if any). Positive: the states sit where training data at t is
    rare; about 0: no covariate shift. Forward samples estimate the entropy of q_t.

    It is a cross-entropy minus an entropy, so it is signed and one-sided: states piled onto the
    densest part of q_t (a collapsed, over-concentrated student) score *below* 0 although they
    are shifted too. Read it with a two-sided distance between the state sets, e.g.
    ``state_distance`` to forward states of q_t (the ``gap_t`` columns of ``toy_experiments``)."""
    g = torch.Generator().manual_seed(seed)
    if label is not None:
        ref_label = torch.as_tensor(label)[torch.randint(0, len(x_t), (n_ref,), generator=g)]
        x0, _, _ = gmm.sample(n_ref, g, label=ref_label)
    else:
        ref_label = None
        x0, _, _ = gmm.sample(n_ref, g)
    tt = torch.full((n_ref,), int(t))
    ref = schedule.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
    t_x = torch.full((len(x_t),), int(t))
    return float(-gmm.log_prob(x_t, t_x, schedule, label).mean()
                 + gmm.log_prob(ref, tt, schedule, ref_label).mean())


def toy_metrics(x: torch.Tensor, gmm, ref: torch.Tensor | None = None) -> dict:
    """Every sample-quality metric of one set of samples; ``ref`` (e.g. true or teacher
    samples) adds MMD (x1e3) and sliced W1 (x1e3)."""
    m = {"nll": nll(x, gmm), **mode_stats(x, gmm)}
    if ref is not None:
        m["mmd_x1e3"] = 1e3 * mmd(x, ref)
        m["sw_x1e3"] = 1e3 * sliced_wasserstein(x, ref)
    return m
