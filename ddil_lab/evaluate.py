"""One evaluation for any pipeline, so an exported student sits next to public checkpoints:

    python -m ddil_lab.evaluate PIPELINE_DIR_OR_HUB_ID --protocol coco5k|coco30k|cifar10-50k \\
        --out runs/eval [--captions captions_val2017.json --images val2017/] [--root data/cifar10]

Protocols (their name and version go into ``metrics.json``):
    coco5k        COCO-2017 val 5K (the DDIL paper's table): one image per caption of the 5000
                  val images, FID against those images, CLIP score (OpenCLIP ViT-g/14), LPIPS
                  diversity (50 prompts x 10 seeds), HPSv2 when installed (``sd.metrics``)
    coco30k       COCO-2014 val 30K, the same metrics
    cifar10-50k   FID of 50,000 unconditional samples against CIFAR-10 train (``image.protocol``)

Any diffusers text-to-image pipeline (a folder written by ``sd.export_pipeline`` samples with the
call recorded in its ``ddil_student.json``; others with ``--steps``/``--guidance-scale``/
``--timesteps``) and any unconditional one (``DDPMPipeline``: exported image-tier students and
google/ddpm-cifar10-32 sample with our DDIM / consistency sampler on their grid; ``--sampler
pipeline`` calls the pipeline itself) is evaluated by the same code. FID uses torch-fidelity's
TF-Inception (``--fid-weights`` for a local copy); every network is loaded before any image is
generated, and a missing download fails within seconds. ``--n`` runs a smaller sample of the
same protocol (recorded as such: not comparable with published numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .hub import check_pipeline_folder, missing_model
from .validation import (ConfigError, MissingPath, check_bool, check_choice, check_device,
                         check_int, check_number, check_out_dir, cli_exit, fail, is_int,
                         parse_list)

PICKLE_SWITCH = "allow_pickle=True (--allow-pickle)"
PROTOCOL_NAMES = ("coco5k", "coco30k", "cifar10-50k")
SAMPLERS = ("auto", "pipeline", "ddim", "consistency")
UNCONDITIONAL = ("DDPMPipeline", "DDIMPipeline")  # sampled with our sampler by default


def local_pipeline(model: str) -> str:
    """A local folder for a pipeline folder or hub id (the cached snapshot, else downloaded;
    ``OfflineError`` within seconds when the hub cannot be reached)."""
    from .image.pretrained import pipeline_folder

    return str(pipeline_folder(model, patterns=None))


def _check(protocol, captions, images, root, n, batch_size, **kw):
    """Every argument of ``evaluate``, before any network is loaded or image generated."""
    if protocol not in PROTOCOL_NAMES:
        raise ConfigError(f"protocol={protocol!r} is not one of {PROTOCOL_NAMES}")
    if protocol.startswith("coco"):
        if captions is None or not os.path.isfile(captions):
            raise MissingPath(f"captions={captions!r}: protocol {protocol} needs the COCO "
                              "captions file (annotations/captions_val2017.json, or "
                              "captions_val2014.json for coco30k)")
        if images is not None and not os.path.isdir(images):
            raise MissingPath(f"images={images!r}: no such folder (the COCO val images)")
    elif root is None or not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        raise MissingPath(f"root={root!r}: protocol cifar10-50k needs the folder holding "
                          "cifar-10-batches-py/ (the reference statistics are of CIFAR-10 "
                          "train)")
    if n is not None and not (is_int(n) and n >= 2):
        raise ConfigError(f"n={n!r} must be an int >= 2 (or None: the protocol's count)")
    if not (is_int(batch_size) and batch_size >= 1):
        raise ConfigError(f"batch_size={batch_size!r} must be a positive int")
    check_choice("sampler", kw["sampler"], SAMPLERS)
    check_out_dir("out_dir", kw["out_dir"])
    check_int("seed", kw["seed"], 0)
    check_device("device", kw["device"])
    check_int("steps", kw["steps"], 1, none=True)
    check_number("guidance_scale", kw["guidance_scale"], 0.0, none=True,
                 why="a negative guidance scale pushes samples away from the prompt")
    ts = kw["timesteps"]
    if ts is not None:
        allowed = "None or a non-empty list of distinct ints >= 0 in descending order"
        if not (isinstance(ts, (list, tuple)) and ts and all(is_int(t) for t in ts)):
            fail("timesteps", ts, allowed)
        if any(t < 0 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            fail("timesteps", list(ts), allowed, "samplers walk from the noisiest timestep down")
        if kw["steps"] is not None:
            fail("steps", kw["steps"], "None when timesteps are given",
                 f"timesteps={list(ts)} already fix the grid")
    if protocol == "cifar10-50k" and kw["guidance_scale"] is not None:
        fail("guidance_scale", kw["guidance_scale"], "None for cifar10-50k",
             "the protocol samples an unconditional model")
    check_int("lpips_prompts", kw["lpips_prompts"], 0)
    if kw["lpips_prompts"]:
        check_int("lpips_seeds", kw["lpips_seeds"], 2,
                  why="LPIPS diversity compares images of the same prompt, so it needs 2 or more")
    if kw["hps"] not in ("auto", True, False):
        fail("hps", kw["hps"], "'auto', True or False")
    check_bool("allow_pickle", kw["allow_pickle"])
    check_bool("progress", kw["progress"])


def _check_folder(folder: str, model: str, allow_pickle: bool, timesteps) -> dict:
    """The pipeline folder's model_index.json after checking its components and weights (no
    pickles unless allowed) and that the timesteps lie on its scheduler's range."""
    config = check_pipeline_folder(folder, allow_pickle, switch=PICKLE_SWITCH)
    sched = os.path.join(folder, "scheduler", "scheduler_config.json")
    T = 1000
    if os.path.isfile(sched):
        with open(sched, encoding="utf-8") as f:
            T = int(json.load(f).get("num_train_timesteps", 1000))
    if timesteps is not None and max(timesteps) > T - 1:
        fail("timesteps", list(timesteps), f"ints in [0, {T - 1}] (the scheduler of {model} "
             f"has T={T})", "a timestep is out of range")
    return config


def call_kwargs(folder: str, steps=None, guidance_scale=None, timesteps=None) -> dict:
    """How to call a text-to-image pipeline: an exported student's recorded call
    (``ddil_student.json``), then the overrides given."""
    kw = {}
    if os.path.isfile(os.path.join(folder, "ddil_student.json")):
        from .sd.export import pipeline_kwargs
        kw = pipeline_kwargs(folder)
    if steps is not None:
        kw.pop("timesteps", None)
        kw["num_inference_steps"] = steps
    if timesteps is not None:
        kw.pop("num_inference_steps", None)
        kw["timesteps"] = list(timesteps)
    if guidance_scale is not None:
        kw["guidance_scale"] = guidance_scale
    return kw


def evaluate(model: str, protocol: str, out_dir: str, *, captions=None, images=None, root=None,
             n: int | None = None, seed: int = 0, batch_size: int = 8, device="cpu",
             steps: int | None = None, guidance_scale: float | None = None, timesteps=None,
             sampler: str = "auto", features=None, fid_weights=None, clip=None,
             lpips_model=None, lpips_prompts: int = 50, lpips_seeds: int = 10, hps="auto",
             cache_dir=None, progress: bool = True, allow_pickle: bool = False) -> dict:
    """Evaluate a pipeline folder or hub id with a named protocol; writes ``metrics.json`` (with
    the protocol, the model and how it was sampled) and ``samples.png`` under ``out_dir``.

    ``features`` / ``clip`` / ``lpips_model`` replace the standard networks (tests pass tiny
    ones); the rest are the command-line options (``main``). Every argument is checked first
    (``ConfigError`` naming it); only safetensors weights load unless ``allow_pickle``."""
    from .metrics import InceptionFeatures, lpips_model as load_lpips

    if not isinstance(model, (str, os.PathLike)) or not os.fspath(model):
        fail("model", model, "a pipeline folder or a hub id 'owner/name'")
    model = os.fspath(model)
    _check(protocol, captions, images, root, n, batch_size, out_dir=out_dir, seed=seed,
           device=device, steps=steps, guidance_scale=guidance_scale, timesteps=timesteps,
           sampler=sampler, lpips_prompts=lpips_prompts, lpips_seeds=lpips_seeds, hps=hps,
           allow_pickle=allow_pickle, progress=progress)
    if os.path.isdir(model):  # a local folder is checked before any network loads
        _check_folder(model, model, allow_pickle, timesteps)
    else:
        missing_model(model)  # not a hub id either: no such folder
    # every network first: a missing download fails before any image is generated
    if features is None and (protocol == "cifar10-50k" or images is not None):
        features = InceptionFeatures(weights=fid_weights)
    if features is not None and hasattr(features, "to"):
        features = features.to(device)
    folder = local_pipeline(model)
    index = _check_folder(folder, model, allow_pickle, timesteps)
    if protocol == "cifar10-50k" and steps is None and timesteps is None and sampler != \
            "pipeline" and (sampler != "auto" or index.get("_class_name") in UNCONDITIONAL):
        from .image.pretrained import student_info

        if "timesteps" not in (student_info(folder) or {}):
            fail("steps", None, "an int >= 1 (e.g. 4), or timesteps, or sampler='pipeline'",
                 f"{model} is not an exported student, so it records no grid to sample on")
    safe = {"use_safetensors": None if allow_pickle else True}
    os.makedirs(out_dir, exist_ok=True)
    if protocol == "cifar10-50k":
        res = _evaluate_cifar(folder, index, out_dir, root, n, seed, batch_size, device, steps,
                              timesteps, sampler, features, cache_dir, progress, allow_pickle)
    else:
        from .sd.metrics import evaluate_protocol, load_clip, pipeline_generator

        clip = clip if clip is not None else load_clip(device=device)
        if lpips_prompts and lpips_model is None:
            lpips_model = load_lpips(device=device)
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder, **safe).to(device)
        pipe.set_progress_bar_config(disable=True)
        kw = call_kwargs(folder, steps, guidance_scale, timesteps)
        resolution = pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8)
        res = evaluate_protocol(pipeline_generator(pipe, **kw), protocol, captions, out_dir,
                                image_dir=images, resolution=resolution, n_captions=n,
                                features=features, cache_dir=cache_dir, seed=seed, clip=clip,
                                lpips_model=lpips_model, lpips_prompts=lpips_prompts,
                                lpips_seeds=lpips_seeds, hps=hps, batch_size=batch_size,
                                progress=progress)
        res["sampling"] = {"pipeline": type(pipe).__name__, "call": kw}
    res["model"] = model
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2)
    return res


def _evaluate_cifar(folder, index, out_dir, root, n, seed, batch_size, device, steps, timesteps,
                    sampler, features, cache_dir, progress, allow_pickle) -> dict:
    from .diffusion import timesteps as grid_of
    from .image.backend import teacher_shape
    from .image.pretrained import load_student
    from .image.protocol import (CIFAR10_50K, cifar10_reference, evaluate_unconditional,
                                 pipeline_generator, policy_generator)

    ref = cifar10_reference(root, features, cache_dir=cache_dir)
    n = CIFAR10_50K["n_samples"] if n is None else n
    cls = index.get("_class_name", "")
    if sampler == "pipeline" or (sampler == "auto" and cls not in UNCONDITIONAL):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(
            folder, use_safetensors=None if allow_pickle else True).to(device)
        pipe.set_progress_bar_config(disable=True)
        kw = {"num_inference_steps": steps} if steps is not None else {}
        gen, how = pipeline_generator(pipe, **kw), {"pipeline": cls, "call": kw}
    else:
        den, info = load_student(folder, device, allow_pickle)
        base = getattr(den, "denoiser", den)  # a ConsistencyFn wraps the loaded UNet
        kind = info.get("sampler", "ddim") if sampler == "auto" else sampler
        if timesteps is not None:
            grid = [int(t) for t in timesteps]
        elif steps is not None:
            grid = grid_of(steps, base.schedule.T).tolist()
        else:  # an exported student's grid (evaluate checked that there is one)
            grid = info["timesteps"]
        gen = policy_generator(den, base.schedule, grid, kind, teacher_shape(base), device)
        how = {"sampler": kind, "timesteps": grid, "student": bool(info)}
    res = evaluate_unconditional(gen, ref, out_dir, features=features, n=n, seed=seed,
                                 batch_size=batch_size, progress=progress)
    res["protocol"]["full"] = n == CIFAR10_50K["n_samples"]
    res["sampling"] = how
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ddil_lab.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="pipeline folder or hub id")
    p.add_argument("--protocol", required=True, choices=PROTOCOL_NAMES)
    p.add_argument("--out", required=True, help="results folder (metrics.json, samples.png)")
    p.add_argument("--captions", help="COCO captions json (coco5k: captions_val2017.json)")
    p.add_argument("--images", help="COCO val image folder (FID reference; without it no FID)")
    p.add_argument("--root", help="CIFAR-10 folder holding cifar-10-batches-py/ (cifar10-50k)")
    p.add_argument("--n", type=int, default=None, help="fewer images than the protocol's "
                                                       "(a smaller run, recorded as such)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="inference steps")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--timesteps", default=None, help="explicit grid, e.g. 999,749,500,250")
    p.add_argument("--sampler", default="auto", choices=SAMPLERS,
                   help="cifar10-50k: our DDIM / consistency sampler, or the pipeline's call")
    p.add_argument("--fid-weights", default=None, help="local copy of torch-fidelity's "
                                                       "weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--lpips-prompts", type=int, default=50)
    p.add_argument("--lpips-seeds", type=int, default=10)
    p.add_argument("--no-hps", action="store_true", help="skip HPSv2 even when installed")
    p.add_argument("--cache-dir", default=None, help="FID reference statistics (npz); default "
                                                     "$DDIL_FID_CACHE or ~/.cache/ddil_lab")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allow-pickle", action="store_true", help="also load pickled .bin "
                   "weights (unpickling runs code: only for a folder you trust)")
    a = p.parse_args(argv)
    ts = list(parse_list("timesteps", a.timesteps, int)) if a.timesteps is not None else None
    res = evaluate(a.model, a.protocol, a.out, captions=a.captions, images=a.images, root=a.root,
                   n=a.n, seed=a.seed, batch_size=a.batch_size, device=a.device, steps=a.steps,
                   guidance_scale=a.guidance_scale, timesteps=ts, sampler=a.sampler,
                   fid_weights=a.fid_weights, lpips_prompts=a.lpips_prompts,
                   lpips_seeds=a.lpips_seeds, hps=False if a.no_hps else "auto",
                   cache_dir=a.cache_dir, progress=not a.no_progress,
                   allow_pickle=a.allow_pickle)
    keys = ("fid", "clip_score", "lpips_diversity", "hpsv2")
    print(json.dumps({"protocol": res["protocol"]["name"], "n_images": res["n_images"],
                      **{k: res.get(k) for k in keys if k in res}}))
    return res


if __name__ == "__main__":
    sys.exit(cli_exit(main, "python -m ddil_lab.evaluate"))
