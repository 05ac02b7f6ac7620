"""Loading Stable Diffusion pipelines (hub ids or local folders) the safe way: a mistyped path is
reported as a missing folder, a folder without a component (or its weights) names it, only
safetensors weights load unless the caller opts in to pickles, and anything that would need a
download fails within seconds offline (``OfflineError``)."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..hub import hub_offline, require_download

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
NO_WEIGHTS = ("Tokenizer", "TokenizerFast", "Scheduler", "ImageProcessor", "FeatureExtractor")
PICKLE_EXTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def looks_like_path(s: str) -> bool:
    """A local path rather than a hub id 'org/name' (which has exactly one '/')."""
    return (os.path.isabs(s) or s.startswith((".", "~")) or s.count("/") > 1
            or os.sep != "/" and os.sep in s or os.path.exists(s))


def check_pipeline_folder(folder: str, allow_pickle: bool = False) -> dict:
    """The ``model_index.json`` of a local pipeline folder, after checking that every component
    it lists has its subfolder and, for networks, safetensors weights (pickled ``.bin`` weights
    only with ``allow_pickle=True``: unpickling runs code). Raises ``FileNotFoundError`` naming
    the missing component."""
    import json

    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"model={folder!r}: the folder holds no model_index.json, so it "
                                "is not a diffusers pipeline folder (save one with "
                                "pipe.save_pretrained(folder))")
    with open(index, encoding="utf-8") as f:
        config = json.load(f)
    for name, spec in config.items():
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2 and spec[1]):
            continue
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"model={folder!r}: component {name!r} ({spec[1]}) is listed "
                                    f"in model_index.json but the folder has no {name}/")
        if spec[1].endswith(NO_WEIGHTS):
            continue
        files = os.listdir(sub)
        if any(f.endswith(".safetensors") for f in files):
            continue
        pickles = sorted(f for f in files if f.endswith(PICKLE_EXTS))
        if not pickles:
            raise FileNotFoundError(f"model={folder!r}: component {name!r} ({spec[1]}) has no "
                                    f"weights in {sub} (no .safetensors file)")
        if not allow_pickle:
            raise ValueError(f"model={folder!r}: component {name!r} holds only pickled weights "
                             f"({', '.join(pickles)}), which are not loaded (unpickling runs "
                             "code); convert them to safetensors, or pass allow_pickle=True for "
                             "a folder you trust")
    return config


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
    elif looks_like_path(model):
        raise FileNotFoundError(f"model={model!r}: the folder does not exist (expected a local "
                                "diffusers pipeline folder; a hub id looks like 'org/name')")
    else:
        try:
            config, local = DiffusionPipeline.load_config(model, local_files_only=True), True
        except (OSError, ValueError):
            require_download(f"diffusers pipeline {model!r}",
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


__all__ = ["SUPPORTED", "check_pipeline_folder", "load_pipeline", "load_unet", "looks_like_path"]
