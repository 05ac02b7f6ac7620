"""Settings checks of the SD backend (used by ``ddil_lab.config`` and the full-tier recipes):
cheap, before any model is loaded or data read."""

from __future__ import annotations

import json
import os

from ..hub import OfflineError, require_download
from ..train.settings import check_names, fail, is_int, reuse
from .backend import DIFFUSERS_PREDICTION, MIXED_PRECISION, SDBackend, looks_like_path
from .data import read_captions


def _vae_factor(model: str) -> int:
    """Image pixels per latent pixel: 2 ** (VAE levels - 1), read from a local folder (8 for
    SD1.5 / SDXL)."""
    try:
        with open(os.path.join(model, "vae", "config.json")) as f:
            return 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    except (OSError, KeyError, ValueError, TypeError):
        return 8


def check_params(p: dict) -> None:
    """Check the SD backend's settings ``p`` (a config's ``backend`` section, or a recipe's)
    before any model is loaded; raises ``ConfigError`` naming ``backend.<key>``, or
    ``OfflineError`` for a hub id that is neither cached nor downloadable."""
    check_names("backend", p, SDBackend, "the sd backend")
    model = p.get("model")
    local = None
    if model is None:
        fail("backend.model", model, "a hub id such as 'runwayml/stable-diffusion-v1-5', a "
              "local diffusers pipeline folder, or a loaded pipeline")
    if isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
        if looks_like_path(model):
            path = os.path.expanduser(model)
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                fail("backend.model", model, "a diffusers pipeline folder (with "
                      "model_index.json) or a hub id 'org/name'",
                      "the folder does not exist" if not os.path.isdir(path)
                      else "the folder holds no model_index.json")
            local = path
        else:  # a hub id: cached, or downloadable now (fails within seconds offline)
            from huggingface_hub import try_to_load_from_cache
            if not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
                try:
                    require_download(f"diffusers pipeline {model!r}")
                except OfflineError as e:
                    raise OfflineError(f"backend.model={model!r}: {e}") from None
    data, prompts = p.get("data"), p.get("prompts")
    if data is None and prompts is None:
        fail("backend.data", data, "images with captions (an imagefolder, a save_to_disk "
              "folder or a datasets name), or give backend.prompts for data-free distillation")
    if isinstance(data, (str, os.PathLike)) and looks_like_path(os.fspath(data)):
        d = os.path.expanduser(os.fspath(data))
        if not os.path.isdir(d):
            fail("backend.data", os.fspath(data), "an existing imagefolder (images + "
                  "metadata.jsonl), a datasets.save_to_disk folder, or a datasets name",
                  "the data folder does not exist")
    if isinstance(prompts, (str, os.PathLike)):
        if not os.path.isfile(prompts):
            fail("backend.prompts", os.fspath(prompts), "a .txt / .jsonl / .json prompts file "
                  "or a list of prompts", "the file does not exist")
        reuse(f"backend.prompts={os.fspath(prompts)!r}", read_captions, prompts)
    elif prompts is not None and not (isinstance(prompts, (list, tuple)) and len(prompts)):
        fail("backend.prompts", prompts, "a prompts file or a non-empty list of prompts")
    support = p.get("support", "dynamic")
    if support not in ("static", "dynamic"):
        fail("backend.support", support, "'static' or 'dynamic' (the latent thresholding mode)")
    mp = p.get("mixed_precision", "no")
    if mp not in MIXED_PRECISION:
        fail("backend.mixed_precision", mp, f"one of {tuple(MIXED_PRECISION)}")
    sp = p.get("student_prediction")
    if sp is not None and sp not in DIFFUSERS_PREDICTION:
        fail("backend.student_prediction", sp, f"None or one of {tuple(DIFFUSERS_PREDICTION)}")
    res = p.get("resolution")
    factor = _vae_factor(local) if local else 8
    sides = list(res) if isinstance(res, (list, tuple)) and len(res) == 2 else [res]
    if res is not None and not all(is_int(v) and v > 0 and v % factor == 0 for v in sides):
        fail("backend.resolution", res, f"a positive multiple of the VAE factor {factor} "
              "(images are resized and cropped to resolution x resolution), or a pair "
              "(height, width) of them")
    g = p.get("guidance", 7.5)
    if isinstance(g, (list, tuple)):
        if not (len(g) == 2 and all(isinstance(v, (int, float)) for v in g) and 1 <= g[0] <= g[1]):
            fail("backend.guidance", list(g), "a number >= 1 or a range [w_min, w_max] with "
                  "1 <= w_min <= w_max")
    elif not (isinstance(g, (int, float)) and g >= 1):
        fail("backend.guidance", g, "a number >= 1 (1 = no guidance) or a range [w_min, w_max]")
    lr_ = p.get("lora_rank", 0)
    if not (is_int(lr_) and lr_ >= 0):
        fail("backend.lora_rank", lr_, "an int >= 0 (0: train all weights)")
    cache = p.get("latent_cache")
    if cache is not None and not str(cache).endswith(".safetensors"):
        fail("backend.latent_cache", cache, "None or a path ending in .safetensors")
