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
