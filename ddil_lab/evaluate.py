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

PROTOCOL_NAMES = ("coco5k", "coco30k", "cifar10-50k")
SAMPLERS = ("auto", "pipeline", "ddim", "consistency")


def local_pipeline(model: str) -> str:
    """A local folder for a pipeline folder or hub id (the cached snapshot, else downloaded;
    ``OfflineError`` within seconds when the hub cannot be reached)."""
    from .image.pretrained import pipeline_folder

    return str(pipeline_folder(model, patterns=None))


def _pipeline_class(folder: str) -> str:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no "
                                "model_index.json)")
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("_class_name", "")


def _check(protocol, captions, images, root, n, batch_size):
    if protocol not in PROTOCOL_NAMES:
        raise ValueError(f"protocol={protocol!r} is not one of {PROTOCOL_NAMES}")
    if protocol.startswith("coco"):
        if captions is None or not os.path.isfile(captions):
            raise FileNotFoundError(f"captions={captions!r}: protocol {protocol} needs the COCO "
                                    "captions file (annotations/captions_val2017.json, or "
                                    "captions_val2014.json for coco30k)")
        if images is not None and not os.path.isdir(images):
            raise FileNotFoundError(f"images={images!r}: no such folder (the COCO val images)")
    elif root is None or not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        raise FileNotFoundError(f"root={root!r}: protocol cifar10-50k needs the folder holding "
                                "cifar-10-batches-py/ (the reference statistics are of CIFAR-10 "
                                "train)")
    if n is not None and not (isinstance(n, int) and n >= 2):
        raise ValueError(f"n={n!r} must be an int >= 2 (or None: the protocol's count)")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")


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
             cache_dir=None, progress: bool = True) -> dict:
    """Evaluate a pipeline folder or hub id with a named protocol; writes ``metrics.json`` (with
    the protocol, the model and how it was sampled) and ``samples.png`` under ``out_dir``.

    ``features`` / ``clip`` / ``lpips_model`` replace the standard networks (tests pass tiny
    ones); the rest are the command-line options (``main``)."""
    from .metrics import InceptionFeatures, lpips_model as load_lpips

    _check(protocol, captions, images, root, n, batch_size)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    # every network first: a missing download fails before any image is generated
    if features is None and (protocol == "cifar10-50k" or images is not None):
        features = InceptionFeatures(weights=fid_weights)
    if features is not None and hasattr(features, "to"):
        features = features.to(device)
    folder = local_pipeline(model)
    os.makedirs(out_dir, exist_ok=True)
    if protocol == "cifar10-50k":
        res = _evaluate_cifar(folder, out_dir, root, n, seed, batch_size, device, steps,
                              timesteps, sampler, features, cache_dir, progress)
    else:
        from .sd.metrics import evaluate_protocol, load_clip, pipeline_generator

        clip = clip if clip is not None else load_clip(device=device)
        if lpips_prompts and lpips_model is None:
            lpips_model = load_lpips(device=device)
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder).to(device)
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


def _evaluate_cifar(folder, out_dir, root, n, seed, batch_size, device, steps, timesteps,
                    sampler, features, cache_dir, progress) -> dict:
    from .diffusion import timesteps as grid_of
    from .image.backend import teacher_shape
    from .image.pretrained import load_student
    from .image.protocol import (CIFAR10_50K, cifar10_reference, evaluate_unconditional,
                                 pipeline_generator, policy_generator)

    ref = cifar10_reference(root, features, cache_dir=cache_dir)
    n = CIFAR10_50K["n_samples"] if n is None else n
    cls = _pipeline_class(folder)
    if sampler == "pipeline" or (sampler == "auto" and cls not in ("DDPMPipeline",
                                                                    "DDIMPipeline")):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder).to(device)
        pipe.set_progress_bar_config(disable=True)
        kw = {"num_inference_steps": steps} if steps is not None else {}
        gen, how = pipeline_generator(pipe, **kw), {"pipeline": cls, "call": kw}
    else:
        den, info = load_student(folder, device)
        base = getattr(den, "denoiser", den)  # a ConsistencyFn wraps the loaded UNet
        kind = info.get("sampler", "ddim") if sampler == "auto" else sampler
        if timesteps is not None:
            grid = [int(t) for t in timesteps]
        elif steps is not None:
            grid = grid_of(steps, base.schedule.T).tolist()
        elif "timesteps" in info:
            grid = info["timesteps"]
        else:
            raise ValueError(f"{folder} is not an exported student: give steps (e.g. 4) or "
                             "timesteps for the DDIM sampler, or sampler='pipeline'")
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
    a = p.parse_args(argv)
    ts = [int(t) for t in a.timesteps.split(",")] if a.timesteps else None
    res = evaluate(a.model, a.protocol, a.out, captions=a.captions, images=a.images, root=a.root,
                   n=a.n, seed=a.seed, batch_size=a.batch_size, device=a.device, steps=a.steps,
                   guidance_scale=a.guidance_scale, timesteps=ts, sampler=a.sampler,
                   fid_weights=a.fid_weights, lpips_prompts=a.lpips_prompts,
                   lpips_seeds=a.lpips_seeds, hps=False if a.no_hps else "auto",
                   cache_dir=a.cache_dir, progress=not a.no_progress)
    keys = ("fid", "clip_score", "lpips_diversity", "hpsv2")
    print(json.dumps({"protocol": res["protocol"]["name"], "n_images": res["n_images"],
                      **{k: res.get(k) for k in keys if k in res}}))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
