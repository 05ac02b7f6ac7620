"""Export a distilled sd student as a standard diffusers pipeline folder.

The folder holds the teacher pipeline's VAE, text encoder(s) and tokenizer(s), the student's UNet
(LoRA merged in, the guidance-scale embedding kept) and a scheduler chosen so that the pipeline
walks the student's grid ``ddil_lab.diffusion.timesteps(n)`` (e.g. 999, 749, 500, 250) exactly
as the student was trained to sample:

    sampler="ddim"          (PD students) ``DPMSolverMultistepScheduler`` with solver_order=1 and
                            algorithm_type="dpmsolver++" (first-order DPM-Solver++ *is* DDIM),
                            timestep_spacing="linspace" (our grid), final_sigmas_type="zero"
                            (the last step lands on x0). ``pipe(prompt, num_inference_steps=n)``
                            reproduces the grid by itself.
    sampler="consistency"   (LCM and DMD2 students) ``LCMScheduler``: predict x0, re-noise to the
                            next grid point with fresh noise (multistep consistency sampling),
                            with LCM's boundary scalings (timestep_scaling of the student's
                            consistency function; 1e4 for DMD2, whose students have none). No
                            LCM spacing gives our grid (LCM's own walks 999, 749, 499, 249), so
                            pass it: ``pipe(prompt, timesteps=[999, 749, 500, 250])``. The
                            scheduler is saved with ``original_inference_steps=1``, so that the
                            call that would walk another grid, ``pipe(prompt,
                            num_inference_steps=n)`` with n > 1, is refused by diffusers
                            (ValueError: "The combination of `original_steps x strength`: 1 x
                            1.0 is smaller than `num_inference_steps`");
                            with ``timesteps=`` diffusers logs that the points are "not on the
                            original schedule", which is expected here.

``ddil_student.json`` in the folder records the call: ``pipeline_kwargs(folder)`` returns it as
keyword arguments (num_inference_steps or timesteps, and guidance_scale: 1.0 for a student that
distilled a guided teacher at a fixed w, so the pipeline runs no CFG of its own; the chosen w for
a guidance-conditioned student, which the pipeline then feeds to the UNet's w embedding).

A student distilled from a guided teacher has the teacher's unconditional branch (the empty
prompt, or the backend's ``negative_prompt``) built in: its pipeline runs no CFG, so a
``negative_prompt=`` passed to it changes nothing (diffusers ignores it at guidance_scale 1 and
for w-embedded UNets); ``ddil_student.json`` records the teacher's negative prompt.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from .backend import DIFFUSERS_PREDICTION, unet_of
from ..diffusion import timesteps

SAMPLERS = ("ddim", "consistency")
INFO_FILE = "ddil_student.json"
NO_SKIP_SCALING = 1e4  # LCMScheduler timestep_scaling that makes c_skip ~ 0 (pure x0 prediction)


def student_scheduler(base_config, sampler: str, prediction: str,
                      timestep_scaling: float = NO_SKIP_SCALING):
    """The diffusers scheduler that samples like our ``sampler`` on the grid ``timesteps(n)``,
    with the betas of ``base_config`` (the teacher's scheduler config)."""
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    if prediction not in DIFFUSERS_PREDICTION:
        raise ValueError(f"prediction={prediction!r} is not one of {tuple(DIFFUSERS_PREDICTION)}")
    common = {k: base_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                          "beta_schedule") if k in base_config}
    common["prediction_type"] = DIFFUSERS_PREDICTION[prediction]
    # steps_offset is unused by both schedulers with these spacings; 1 keeps SD pipelines quiet
    common["steps_offset"] = 1
    if sampler == "ddim":
        return DPMSolverMultistepScheduler(solver_order=1, algorithm_type="dpmsolver++",
                                           timestep_spacing="linspace", final_sigmas_type="zero",
                                           lower_order_final=True, **common)
    # original_inference_steps=1: LCM's own n-step spacing (999, 499 for n=2) differs from our
    # grid (999, 500), so diffusers refuses num_inference_steps > 1; pass timesteps=grid
    return LCMScheduler(original_inference_steps=1, timestep_scaling=timestep_scaling,
                        set_alpha_to_one=True, **common)


def _merged_unet(student, backend=None, dtype=torch.float32) -> torch.nn.Module:
    """A float32 copy of the student's UNet with any LoRA adapters merged into its weights. A
    LoRA student on a bf16 / fp16 frozen base is merged into the teacher's fp32 weights
    (``backend.fp32_unet()``), so the export does not carry the base's rounding."""
    trained = unet_of(student)
    lora = getattr(trained, "peft_config", None)
    low = any(p.dtype != torch.float32 for p in trained.parameters())
    if lora and low and backend is not None and dtype == torch.float32:
        from .backend import add_lora, add_w_embedding

        unet = backend.fp32_unet()
        dim = trained.config.time_cond_proj_dim
        if dim is not None:
            unet = add_w_embedding(unet, dim)
        cfg = next(iter(lora.values()))
        add_lora(unet, cfg.r, cfg.lora_alpha, tuple(cfg.target_modules))
        own = {k: v for k, v in trained.state_dict().items() if "lora_" in k or "cond_proj" in k}
        missing = set(own) - set(unet.state_dict())
        if missing:
            raise RuntimeError(f"LoRA export: keys not in the fp32 UNet: {sorted(missing)[:5]}")
        unet.load_state_dict(own, strict=False)
        unet.eval()
    else:
        unet = copy.deepcopy(trained).eval()
    if unet.dtype != torch.float32 or low:
        unet.to(dtype=torch.float32)
    if getattr(unet, "peft_config", None):
        unet.fuse_lora()
        unet.unload_lora()
    if dtype != torch.float32:
        unet.to(dtype=dtype)
    unet.requires_grad_(False)
    unet.disable_gradient_checkpointing()
    return unet


def _infer(student, method):
    """(sampler, timestep_scaling) from the method (or the student's wrapper type)."""
    from ..sampling import ConsistencyPolicy

    scaling = getattr(student, "scaling", None)  # ConsistencyFn (LCM) has one
    if method is not None:
        consistent = isinstance(method.student_policy(student), ConsistencyPolicy)
    else:
        consistent = scaling is not None
    return ("consistency" if consistent else "ddim"), float(scaling or NO_SKIP_SCALING)


def export_pipeline(backend, student, folder: str | os.PathLike, n_steps: int | None = None,
                    sampler: str | None = None, guidance_scale: float | None = None,
                    safe_serialization: bool = True, dtype: torch.dtype = torch.float32) -> str:
    """Save a distilled student as a diffusers pipeline folder and return the folder.

    :param backend: the ``SDBackend`` the student was distilled on (its VAE, text encoders,
        tokenizers and pipeline class are reused).
    :param student: a ``DistillResult`` (its student, method and n_steps are used) or a student
        Denoiser (then give ``n_steps``).
    :param n_steps: inference steps n; the grid is ``timesteps(n)``.
    :param sampler: "ddim" (PD) or "consistency" (LCM, DMD2); default: from the method.
    :param guidance_scale: for a guidance-conditioned student, the w to record for inference
        (default: the backend's w, or the middle of its range); ignored otherwise (1.0).
    :param dtype: of every module in the folder (float32; bfloat16 halves an SDXL-size export
        and shares the backend's bf16 frozen parts instead of copying them).
    """
    method = getattr(student, "method", None)
    if method is not None:  # a DistillResult
        n_steps = n_steps or method.n_steps
        student = student.student
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps={n_steps!r} must be a positive int (or pass a DistillResult)")
    auto_sampler, scaling = _infer(student, method)
    sampler = sampler or auto_sampler
    unet = _merged_unet(student, backend, dtype)
    prediction = backend.student_prediction
    scheduler = student_scheduler(backend.pipe.scheduler.config, sampler, prediction, scaling)
    # one dtype for the whole folder (float32, as the student trains): with mixed precision the
    # backend holds its frozen parts in bf16/fp16; load with torch_dtype= to sample in either
    parts = {k: copy.deepcopy(v).to(dtype)
             if isinstance(v, torch.nn.Module) and v.dtype != dtype else v
             for k, v in backend.pipe.components.items() if k != "unet"}
    parts.update(unet=unet, scheduler=scheduler)
    if "safety_checker" in parts:
        parts["requires_safety_checker"] = False
    pipe = type(backend.pipe)(**parts)
    folder = os.fspath(folder)
    pipe.save_pretrained(folder, safe_serialization=safe_serialization)

    w_embed = unet.config.time_cond_proj_dim is not None
    if w_embed:
        w = guidance_scale or backend.w or sum(backend.w_range) / 2
    else:
        w = 1.0
    grid = timesteps(n_steps, backend.schedule.T).tolist()
    info = {"sampler": sampler, "num_inference_steps": n_steps, "timesteps": grid,
            "guidance_scale": float(w), "w_embed": w_embed, "prediction": prediction,
            "teacher_guidance": backend.w_range or backend.w,
            "teacher_negative_prompt": getattr(backend, "negative_prompt", None)}
    with open(os.path.join(folder, INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return folder


def pipeline_kwargs(folder: str | os.PathLike) -> dict:
    """The keyword arguments that make ``pipe(prompt, **kw)`` sample the exported student on its
    grid: ``num_inference_steps`` (ddim) or ``timesteps`` (consistency), and ``guidance_scale``."""
    path = os.path.join(os.fspath(folder), INFO_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {folder!r} was not written by export_pipeline")
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    kw = {"guidance_scale": info["guidance_scale"]}
    if info["sampler"] == "ddim":
        kw["num_inference_steps"] = info["num_inference_steps"]
    else:
        kw["timesteps"] = info["timesteps"]
    return kw


def load_student_pipeline(folder: str | os.PathLike, allow_pickle: bool = False,
                          **from_pretrained_kw):
    """``(pipe, kwargs)``: the exported pipeline (``DiffusionPipeline.from_pretrained``) and the
    call arguments from ``pipeline_kwargs``; sample with ``pipe(prompt, **kwargs)``. The folder
    is checked first (``hub.check_pipeline_folder``); pickled weights load only with
    ``allow_pickle=True``."""
    from diffusers import DiffusionPipeline

    from ..hub import check_pipeline_folder

    check_pipeline_folder(folder, allow_pickle, param="folder")
    from_pretrained_kw.setdefault("use_safetensors", None if allow_pickle else True)
    pipe = DiffusionPipeline.from_pretrained(os.fspath(folder), **from_pretrained_kw)
    return pipe, pipeline_kwargs(folder)
