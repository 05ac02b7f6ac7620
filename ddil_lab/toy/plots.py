"""Plotting helpers shared by notebooks and experiments (matplotlib, headless-safe)."""

from __future__ import annotations

import torch


def scatter2d(x: torch.Tensor, ax, gmm=None, color="C0", s: float = 2.0, alpha: float = 0.4,
              lim: float = 1.2, title: str | None = None, **kw):
    """Scatter the first two coordinates of samples, with the mixture's means as crosses."""
    x = x.detach().float().cpu()
    ax.scatter(x[:, 0], x[:, 1], s=s, alpha=alpha, color=color, linewidths=0, **kw)
    if gmm is not None and gmm.d == 2:
        m = gmm.means
        ax.scatter(m[:, 0], m[:, 1], marker="x", color="k", s=25, linewidths=1)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def density2d(gmm, ax, t: int | None = None, schedule=None, lim: float = 1.2, n: int = 150,
              cmap="Greys", label=None):
    """Shade the exact density log q_t (or the data density when t is None) on a grid."""
    g = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    tt = None if t is None else torch.full((len(pts),), int(t))
    lp = gmm.log_prob(pts, tt, schedule if t is not None else None, label=label)
    ax.imshow(lp.exp().reshape(n, n).numpy(), origin="lower", extent=(-lim, lim, -lim, lim),
              cmap=cmap, alpha=0.6)
    return ax


# ---- helpers for results tables (experiments/toy_table.py, notebooks) ----

def _np(x):
    """A tensor, list or array as a float numpy array."""
    import numpy as np
    if torch.is_tensor(x):
        x = x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=float)


def sample_grid(samples: dict, gmm=None, labels=None, ncols: int | None = None,
                n_max: int = 2000, size: float = 2.2, suptitle: str | None = None):
    """One scatter panel per entry of ``samples``, e.g. one per arm: a dict {title: (N, d)
    tensor} or a list of (title, tensor) pairs (titles may then repeat, e.g. a reference panel
    at the start of every row).

    :param labels: None, or class labels (N,) shared by all entries (colours samples by class,
        for guided students), or a dict {title: labels}.
    :param ncols: panels per row (default: all in one row).
    :param n_max: at most this many points per panel.
    Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    items = list(samples.items()) if isinstance(samples, dict) else list(samples)
    ncols = ncols or len(items)
    nrows = -(-len(items) // ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3),
                            squeeze=False)
    for ax in axs.flat[len(items):]:
        ax.axis("off")
    for ax, (name, x) in zip(axs.flat, items):
        x = x[:n_max]
        lab = labels.get(name) if isinstance(labels, dict) else labels
        if lab is None:
            scatter2d(x, ax, gmm=gmm, title=name)
            continue
        lab = torch.as_tensor(lab)[:n_max]
        for i, c in enumerate(torch.unique(lab).tolist()):
            scatter2d(x[lab == c], ax, gmm=gmm if i == 0 else None, color=f"C{i}",
                      title=name)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def step_curves(ax, grid, curves: dict, ylabel: str = "", title: str | None = None,
                reference: dict | None = None, band: str = "std"):
    """Per-timestep curves with error bands: ``curves`` maps a name to values of shape
    (n_seeds, len(grid)) (or (len(grid),)); the line is the mean over seeds and the band
    +-1 std (``band="std"``) or the min-max range (``band="range"``). ``reference`` adds
    dashed lines (e.g. the teacher's own curve). The x axis runs from noise (t = 999) to data."""
    import numpy as np

    if band not in ("std", "range"):
        raise ValueError(f"band={band!r} is not one of ('std', 'range')")
    t = _np(grid)
    for i, (name, v) in enumerate(curves.items()):
        v = np.atleast_2d(_np(v))
        mu = v.mean(0)
        if band == "std":
            sd = v.std(0, ddof=1) if len(v) > 1 else np.zeros_like(mu)
            lo, hi = mu - sd, mu + sd
        else:
            lo, hi = v.min(0), v.max(0)
        ax.plot(t, mu, marker="o", ms=3, color=f"C{i}", label=name)
        ax.fill_between(t, lo, hi, color=f"C{i}", alpha=0.2, linewidth=0)
    for j, (name, v) in enumerate((reference or {}).items()):
        ax.plot(t, _np(v).reshape(-1, len(t)).mean(0), "--", color="k", alpha=0.4 + 0.3 * j,
                label=name)
    ax.set_xlim(max(t) + 30, min(t) - 30)  # noise on the left, data on the right
    ax.set_xlabel("student timestep t")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return ax


def mode_histogram(ax, hists: dict, weights=None, title: str | None = None, colors=None):
    """Grouped bars of mode frequencies: ``hists`` maps a name to (n_seeds, K) or (K,)
    frequencies (bar = mean, error bar = std over seeds); ``weights`` (K,) draws the target
    histogram (true weights or the teacher's) as black ticks; ``colors``: one per name
    (default C0, C1, ...)."""
    import numpy as np

    names = list(hists)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        h = np.atleast_2d(_np(hists[name]))
        K = h.shape[1]
        x = np.arange(K) - 0.4 + width * (i + 0.5)
        sd = h.std(0, ddof=1) if len(h) > 1 else None
        ax.bar(x, h.mean(0), width, yerr=sd, color=colors[i] if colors else f"C{i}", label=name,
               capsize=1.5)
    if weights is not None:
        w = _np(weights)
        ax.scatter(np.arange(len(w)), w, marker="_", s=200, color="k", zorder=3, label="target")
    ax.set_xlabel("mode")
    ax.set_ylabel("frequency")
    if title:
        ax.set_title(title, fontsize=9)
    return ax
