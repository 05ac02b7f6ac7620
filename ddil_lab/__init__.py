"""ddil_lab: diffusion distillation with imitation learning (DDIL), from 2D mixtures to SD.

The parts (see shared/DESIGN.md), each importable from here (loaded on first use):

- core: ``Schedule``, ``timesteps`` and ``threshold`` (``diffusion``); the denoiser adapters and
  ``CFG`` (``denoiser``); ``StateSampler`` (``rollout``: where training states come from); the
  methods ``PD``, ``LCM``, ``DMD2`` (``methods``: the feedback); shared ``metrics``;
- the loop: ``distill`` and ``progressive`` (``train``);
- one package per tier: ``toy`` (``Toy2dBackend``, ``make_mixture``), ``image``
  (``ImageBackend``), ``sd`` (``SDBackend``); ``config`` builds a run of any tier.
"""
from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # core
    "Schedule": ".diffusion", "Threshold": ".diffusion", "timesteps": ".diffusion",
    "threshold": ".diffusion",
    "CFG": ".denoiser", "PredEps": ".denoiser", "PredV": ".denoiser", "PredX0": ".denoiser",
    "StateSampler": ".rollout", "SOURCES": ".rollout",
    "PD": ".methods", "LCM": ".methods", "DMD2": ".methods", "make_method": ".methods",
    # the loop
    "distill": ".train", "progressive": ".train", "DistillResult": ".train",
    "train_arm": ".train", "make_arm": ".train", "train_cells": ".train", "Budget": ".train",
    "shift_diagnostic": ".shift", "ShiftReport": ".shift", "class_mixture": ".toy", "ConfigError": ".validation",
    # tiers
    "Toy2dBackend": ".toy", "make_mixture": ".toy", "MIXTURES": ".toy", "GMM": ".toy",
    "ImageBackend": ".image", "SDBackend": ".sd", "plan_memory": ".sd",
    "make_random_pipeline": ".sd", "Tracker": ".train",
    # subpackages and modules
    "diffusion": ".diffusion", "denoiser": ".denoiser", "sampling": ".sampling",
    "rollout": ".rollout", "methods": ".methods", "metrics": ".metrics", "train": ".train",
    "toy": ".toy", "image": ".image", "sd": ".sd", "config": ".config",
    "notebook": ".notebook", "hub": ".hub", "shift": ".shift", "validation": ".validation",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
