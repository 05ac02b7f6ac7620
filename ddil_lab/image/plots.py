"""Plotting helpers of the image tier (matplotlib, headless-safe): sample grids per arm and
covariate shift per student step."""

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
    import matplotlib.pyplot as plt

    cols = min(cols, len(samples))
    rows = math.ceil(len(samples) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, (size + 0.3) * rows),
                             squeeze=False)
    for ax in axes.flat[len(samples):]:
        ax.axis("off")
    for ax, (name, v) in zip(axes.flat, samples.items()):
        image_grid(_images(v)[:n], ax, nrow=nrow, title=name)
    fig.tight_layout()
    return fig


def shift_curves(results: dict, grid, floor: dict | None = None, ax=None,
                 title: str = "covariate shift per student step"):
    """Per-step covariate shift of every arm: ``results`` maps an arm to a row with
    ``shift_t{t}`` for t in ``grid``; ``floor`` ({t: value}) is drawn dotted (the estimate's
    noise floor: two forward sets)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    labels = [str(t) for t in grid]
    for name, r in results.items():
        if f"shift_t{grid[0]}" in r:  # rows without a trajectory (held-out data) are skipped
            ax.plot(labels, [r[f"shift_t{t}"] for t in grid], marker="o", label=name)
    if floor:
        ax.plot(labels, [floor[t] for t in grid], "k:", label="noise floor (forward vs forward)")
    ax.set_xlabel("timestep t of the state")
    ax.set_ylabel("Frechet distance to q_t (pooled pixels)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return ax
