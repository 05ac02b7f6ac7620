"""Plotting helpers of the image tier (matplotlib, headless-safe): sample grids per arm and
covariate shift per student step.

Figures are made with ``matplotlib.figure.Figure``, not pyplot: pyplot would register them with
the notebook's inline backend, which shows every open figure again at the end of the cell (on
top of the PNG the notebook's ``Recorder`` shows), and keeps them in memory until closed."""

from __future__ import annotations

import math

import torch


def to_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1) -> torch.Tensor:
    """Tile images (N, C, H, W) in [-1, 1] into one (H', W', C) array in [0, 1] for imshow."""
    from torchvision.utils import make_grid

    x = x.detach().float().cpu().clamp(-1, 1)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(x)))))
    grid = make_grid((x + 1) / 2, nrow=nrow, padding=pad, pad_value=1.0)  # (3, H', W')
    return grid.permute(1, 2, 0)


def save_grid(x: torch.Tensor, path: str, nrow: int | None = None) -> str:
    """Save images (N, C, H, W) in [-1, 1] as one PNG grid (the first 64); returns the path."""
    from torchvision.utils import save_image

    x = x[:64].detach().float().cpu().clamp(-1, 1)
    save_image((x + 1) / 2, path, nrow=nrow or max(1, int(math.ceil(math.sqrt(len(x))))))
    return path


def new_figure(rows: int = 1, cols: int = 1, figsize=(6, 3.6), **kw):
    """(Figure, axes) without pyplot (see the module docstring)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **kw)


def image_grid(x: torch.Tensor, ax, nrow: int | None = None, title: str | None = None):
    """Show samples (N, C, H, W) in [-1, 1] as one grid on ``ax``."""
    ax.imshow(to_grid(x, nrow).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def _images(v) -> torch.Tensor:
    return v["samples"] if isinstance(v, dict) else v


def grids(samples: dict, nrow: int = 8, n: int = 64, size: float = 2.6, cols: int = 4):
    """One grid of the first ``n`` images per arm, ``cols`` arms per row. ``samples`` maps an
    arm's name to its images (N, C, H, W) or to a result row holding them under "samples"
    (``ImageEvaluator.evaluate(..., with_samples=True)``)."""
    cols = min(cols, len(samples))
    rows = math.ceil(len(samples) / cols)
    fig, axes = new_figure(rows, cols, figsize=(size * cols, (size + 0.3) * rows), squeeze=False)
    for ax in axes.flat[len(samples):]:
        ax.axis("off")
    for ax, (name, v) in zip(axes.flat, samples.items()):
        image_grid(_images(v)[:n], ax, nrow=nrow, title=name)
    fig.tight_layout()
    return fig


def shift_curves(results: dict, grid, floor: dict | None = None, ax=None,
                 title: str = "covariate shift per student step", floor_sd: dict | None = None):
    """Per-step covariate shift of every arm: ``results`` maps an arm to a row with
    ``shift_t{t}`` for t in ``grid``; ``floor`` ({t: value}) is drawn dotted (the estimate's
    noise floor: forward-diffused data in place of a policy's states) and, with ``floor_sd``,
    the band floor +- 2 sd in which a policy's states cannot be told from forward states."""
    if ax is None:
        _, ax = new_figure(figsize=(6.4, 3.8))
    labels = [str(t) for t in grid]
    for name, r in results.items():
        if f"shift_t{grid[0]}" in r:  # rows without a trajectory (held-out data) are skipped
            ax.plot(labels, [r[f"shift_t{t}"] for t in grid], marker="o", label=name)
    if floor:
        lo = [floor[t] - 2 * (floor_sd or {}).get(t, 0.0) for t in grid]
        hi = [floor[t] + 2 * (floor_sd or {}).get(t, 0.0) for t in grid]
        ax.plot(labels, [floor[t] for t in grid], "k:",
                label="noise floor (forward states)" + (" +- 2 sd" if floor_sd else ""))
        if floor_sd:
            ax.fill_between(labels, lo, hi, color="k", alpha=0.12, linewidth=0)
    ax.set_xlabel("timestep t of the state (sampling runs left to right)")
    ax.set_ylabel("Frechet distance to q_t\n(8x8-pooled pixels, no unit)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax
