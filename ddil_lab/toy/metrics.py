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
from ..metrics import mmd, sliced_wasserstein


def nll(x: torch.Tensor, gmm, label=None) -> float:
    """Mean negative log-likelihood (nats) of samples under the true mixture."""
    return float(-gmm.log_prob(x, label=label).mean())


def mode_stats(x: torch.Tensor, gmm, off_mode_sigma: float = 4.0, min_count: int = 1,
               label=None) -> dict:
    """Assign each sample to its most likely component. A sample further than
    ``off_mode_sigma`` (Mahalanobis) from it is off-mode. Coverage: the fraction of modes with
    at least ``min_count`` on-mode samples; TV: total variation between the on-mode histogram
    and the true weights.

    With ``label`` (each sample's class) the mixture is read class by class: ``off_mode_class``
    is the fraction of samples further than ``off_mode_sigma`` from every mode of their *own*
    class (a sample sitting on another class's mode is on-mode for ``off_mode`` but not here),
    and ``tv`` is the average over classes of the TV between that class's on-mode histogram and
    its within-class weights (so unequal class frequencies in the labels do not count)."""
    k, dist = gmm.assign(x)
    on = dist <= off_mode_sigma
    hist = torch.bincount(k[on], minlength=gmm.K).double()
    freq = hist / hist.sum().clamp_min(1)
    out = {"coverage": float((hist >= min_count).double().mean()),
           "tv": float(0.5 * (freq - gmm.weights).abs().sum()),
           "off_mode": float((~on).double().mean()),
           "hist": freq.tolist()}
    if label is not None and gmm.labels is not None:
        label = torch.as_tensor(label).cpu()
        proj, var, _ = gmm._components(x, None, None)
        maha = (proj ** 2 / var).sum(-1).sqrt()  # (B, K)
        own = gmm.labels[None] == label[:, None]
        out["off_mode_class"] = float((maha.masked_fill(~own, float("inf")).min(1).values
                                       > off_mode_sigma).double().mean())
        tvs = []
        for c in torch.unique(label).tolist():
            comp = gmm.labels == c
            h = torch.bincount(k[on & (label == c)], minlength=gmm.K).double()[comp]
            w = gmm.weights[comp] / gmm.weights[comp].sum()
            tvs.append(float(0.5 * (h / h.sum().clamp_min(1) - w).abs().sum()))
        out["tv"] = sum(tvs) / len(tvs)
    return out


def per_class(fn, a: torch.Tensor, b: torch.Tensor, label_a=None, label_b=None,
              cache: dict | None = None) -> float:
    """``fn(a, b)`` (e.g. MMD or sliced W1) class by class, averaged over the classes of
    ``label_a`` with equal weight (each class against its own reference samples); pooled when
    there are no labels. ``cache`` (a dict kept with the reference set ``b``): passed on to
    ``fn`` as ``cache=``, one sub-dict per class, so b's side is computed once."""
    def call(x, y, key):
        return fn(x, y) if cache is None else fn(x, y, cache=cache.setdefault(key, {}))
    if label_a is None:
        return call(a, b, None)
    vals = []
    for c in torch.unique(label_a):
        ia, ib = label_a == c, label_b == c
        if ia.sum() < 2 or ib.sum() < 2:
            raise ValueError(f"class {int(c)} has fewer than 2 samples in one of the sets")
        vals.append(call(a[ia], b[ib], int(c)))
    return sum(vals) / len(vals)


def covariate_shift(x_t: torch.Tensor, t: int, gmm, schedule: Schedule, label=None,
                    n_ref: int = 20000, seed: int = 0) -> float:
    """E[-log q_t(x_t | c)] over the given states minus the same over forward samples of q_t
    (with the same class labels, if any). Positive: the states sit where training data at t is
    rare; about 0: no covariate shift. Forward samples estimate the entropy of q_t.

    It is a cross-entropy minus an entropy, so it is signed and one-sided: states piled onto the
    densest part of q_t (a collapsed, over-concentrated student) score *below* 0 although they
    are shifted too. Read it with a two-sided distance between the state sets, e.g.
    ``state_distance`` to forward states of q_t (the ``gap_t`` columns of ``ddil_lab.toy.experiments``)."""
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


def toy_metrics(x: torch.Tensor, gmm, ref: torch.Tensor | None = None, label=None,
                ref_label=None) -> dict:
    """Every sample-quality metric of one set of samples; ``ref`` (e.g. true or teacher
    samples) adds MMD (x1e3; the unbiased estimate of MMD^2, which can be slightly negative
    when the two sets match) and sliced W1 (x1e3); with labels, both per class (``per_class``)
    and the class-aware mode statistics."""
    m = {"nll": nll(x, gmm, label), **mode_stats(x, gmm, label=label)}
    if ref is not None:
        rl = label if ref_label is None else ref_label
        m["mmd_x1e3"] = 1e3 * per_class(mmd, x, ref, label, rl)
        m["sw_x1e3"] = 1e3 * per_class(sliced_wasserstein, x, ref, label, rl)
    return m
