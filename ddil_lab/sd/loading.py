"""Loading Stable Diffusion pipelines (hub ids or local folders) the safe way: a mistyped path is
reported as a missing folder, a folder without a component (or its weights) names it, only
safetensors weights load unless the caller opts in to pickles, and anything that would need a
download fails within seconds offline (``OfflineError``)."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..hub import (NO_WEIGHTS, PICKLE_EXTS, check_pipeline_folder, hub_id_what, hub_offline,
                   is_hub_id, missing_model, require_download)

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def looks_like_path(s: str) -> bool:
    """A local path rather than a hub id 'owner/name'."""
    return os.path.exists(s) or not is_hub_id(s)


def load_pipeline(model, dtype: torch.dtype = torch.float32, variant: str | None = None,
                  allow_pickle: bool = False):
    """A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` from a hub id or a local
    folder (or the pipeline itself, returned as is), in ``dtype``. Files already in the hub cache
    load offline; anything that would need a download raises ``OfflineError`` within seconds
    when the hub cannot be reached. Only safetensors weights load unless ``allow_pickle``. The
    safety checker of SD1.5 checkpoints is not loaded."""
    from diffusers import DiffusionPipeline

    if isinstance(model, DiffusionPipeline):
        _check_class(type(model).__name__, model)
        return model
    model = os.fspath(model)
    if os.path.isdir(model):
        config, local = check_pipeline_folder(model, allow_pickle), True
    else:
        missing_model(model)  # a path (not of the hub's owner/name form): no such folder
        try:
            config, local = DiffusionPipeline.load_config(model, local_files_only=True), True
        except (OSError, ValueError):
            require_download(hub_id_what(model),
                             hint="Download it on a machine with internet access "
                                  "(e.g. `hf download ...`) and pass the local folder.")
            config, local = DiffusionPipeline.load_config(model), False
    _check_class(config.get("_class_name"), model)
    extra = {}
    if config["_class_name"] == SUPPORTED[0]:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    kw = dict(dtype=dtype, variant=variant, use_safetensors=None if allow_pickle else True,
              **extra)
    try:
        return DiffusionPipeline.from_pretrained(model, local_files_only=local, **kw)
    except OSError:
        if os.path.isdir(model):
            raise
        require_download(f"weights of diffusers pipeline {model!r}")
        return DiffusionPipeline.from_pretrained(model, **kw)


def load_unet(model: str, variant: str | None = None, allow_pickle: bool = False,
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """The UNet of a pipeline folder or (cached) hub id, in ``dtype``: a student's fp32 start
    without keeping an fp32 copy of the teacher in memory."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(
        model, subfolder="unet", variant=variant, dtype=dtype,
        use_safetensors=None if allow_pickle else True,
        local_files_only=os.path.isdir(model) or hub_offline())


def _check_class(name, model):
    if name not in SUPPORTED:
        raise ValueError(f"model={model!r} is a {name}; the sd backend supports {SUPPORTED}")


__all__ = ["NO_WEIGHTS", "PICKLE_EXTS", "SUPPORTED", "check_pipeline_folder", "load_pipeline", "load_unet", "looks_like_path"]
