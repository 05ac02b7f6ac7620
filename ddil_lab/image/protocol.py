"""CIFAR-10 FID-50k, the protocol of the published CIFAR-10 numbers (DDPM, Progressive
Distillation, Consistency Models): 50,000 unconditional samples, quantised to uint8, against
the statistics of the 50,000 CIFAR-10 *training* images, in the TF-Inception pool features
(``ddil_lab.metrics.InceptionFeatures()``: torch-fidelity) with torch-fidelity's Frechet maths.
Image i is drawn from ``torch.Generator().manual_seed(seed + i)``, so every model is scored on
the same noise.

A *generator* is ``generate(seeds) -> images (B, C, H, W) in [-1, 1]``: ``policy_generator`` runs
our sampler (a teacher, a trained student, an exported student folder), ``pipeline_generator``
any diffusers unconditional pipeline (``DDPMPipeline``, ``DDIMPipeline``, ...), so a student and a
public checkpoint go through the same ``evaluate_unconditional``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import torch

from ..metrics import (FID_NETWORK, InceptionFeatures, extract, fid_score, fid_stats,
                       reference_fid_stats)

CIFAR10_50K = {"name": "cifar10-50k", "version": 1, "n_samples": 50000,
               "reference": "CIFAR-10 train, all 50000 images, 32 px",
               "features": f"torch-fidelity {FID_NETWORK} pool3 (2048), uint8 inputs",
               "fid": "torch-fidelity fid_statistics_to_metric",
               "seeds": "image i: torch.Generator().manual_seed(seed + i)"}

Generate = Callable[[Sequence[int]], torch.Tensor]


def policy_generator(denoiser, schedule, grid, sampler: str = "ddim", shape=(3, 32, 32),
                     device="cpu") -> Generate:
    """``generate(seeds)`` with our sampler: x_T of image i from ``manual_seed(seeds[i])``, then
    DDIM ("ddim") or multistep consistency sampling ("consistency", its fresh noise from a
    generator seeded with the batch's first seed) on ``grid`` (e.g. ``timesteps(4)``)."""
    from ..sampling import ConsistencyPolicy, DDIMPolicy, sample

    if sampler not in ("ddim", "consistency"):
        raise ValueError(f"sampler={sampler!r} is not one of ('ddim', 'consistency')")
    grid = [int(t) for t in grid]

    @torch.no_grad()
    def generate(seeds):
        x_T = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds]).to(device)
        g = torch.Generator(x_T.device).manual_seed(int(seeds[0]) + 10**9)
        policy = DDIMPolicy(denoiser, schedule) if sampler == "ddim" else \
            ConsistencyPolicy(denoiser, schedule, generator=g)
        return sample(policy, x_T, grid, None, schedule=schedule).sample.float().clamp(-1, 1).cpu()
    return generate


def pipeline_generator(pipe, **call_kw) -> Generate:
    """``generate(seeds)`` with an unconditional diffusers pipeline (``DDPMPipeline`` and friends:
    ``pipe(batch_size=..., generator=[...], output_type="np", **call_kw)``)."""
    def generate(seeds):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        out = pipe(batch_size=len(seeds), generator=gens, output_type="np", **call_kw).images
        return torch.from_numpy(out).permute(0, 3, 1, 2).float() * 2 - 1  # (B, C, H, W)
    return generate


def cifar10_reference(root, features, n: int | None = None, cache_dir=None) -> dict:
    """FID statistics of the CIFAR-10 training images (all 50,000, or the first ``n``) in
    ``features``, cached as npz keyed by data set, resolution, count and network."""
    from .data import load_cifar10

    data = load_cifar10(root, train=True, download=False)
    n = len(data) if n is None else min(n, len(data))
    return reference_fid_stats("cifar10-train", 32, n, features,
                               lambda: extract(features, data.images[:n]), cache_dir)


def evaluate_unconditional(generate: Generate, reference: dict | torch.Tensor, out_dir=None, *,
                           features=None, n: int = 50000, seed: int = 0, batch_size: int = 500,
                           protocol: dict | None = None, grid_size: int = 64,
                           progress: bool = False) -> dict:
    """FID of ``n`` images from ``generate`` against ``reference`` (``fid_stats`` or reference
    features (N, D)), generated and featurised batch by batch. Writes ``samples.png`` and
    ``metrics.json`` (with the protocol's name and version) to ``out_dir`` when given."""
    from tqdm.auto import tqdm

    features = features if features is not None else InceptionFeatures()
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n={n!r} must be an int >= 2 (FID needs a covariance)")
    feats, grid = [], []
    for i in tqdm(range(0, n, batch_size), desc="generate", disable=not progress):
        x = generate(list(range(seed + i, seed + min(i + batch_size, n))))
        if x.ndim != 4:
            raise ValueError(f"generate returned shape {tuple(x.shape)}, expected (B, C, H, W)")
        feats.append(extract(features, x))
        if sum(len(g) for g in grid) < grid_size:
            grid.append(x[:grid_size - sum(len(g) for g in grid)])
    res = {"protocol": dict(protocol or CIFAR10_50K, n_samples=n, seed=seed),
           "n_images": n, "features": getattr(features, "network", type(features).__name__),
           "fid": fid_score(fid_stats(torch.cat(feats)), reference)}
    if out_dir is not None:
        from .plots import save_grid

        os.makedirs(out_dir, exist_ok=True)
        save_grid(torch.cat(grid), os.path.join(out_dir, "samples.png"))
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return res
