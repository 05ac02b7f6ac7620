"""Pretrained image teachers: a diffusers ``DDPMPipeline`` folder or hub id.

``google/ddpm-cifar10-32`` (Ho et al. 2020) ships as ``model_index.json`` + ``unet/`` (a
``UNet2DModel``, ~36M parameters, eps-prediction) + ``scheduler/`` (a ``DDPMScheduler``: linear
betas 1e-4..0.02, T = 1000). ``load_pretrained`` reads the three, builds the ``Schedule`` from
the scheduler config (checked against the betas the scheduler itself computes) and wraps the
UNet by its ``prediction_type`` (``epsilon`` -> ``PredEps``: x0 = (x_t - sigma eps) / alpha), so
the teacher is a Denoiser ``(x_t, t, cond) -> x0_hat`` like every other model and PD, LCM and
DMD2 distil it with the same ``distill(...)`` (``ImageBackend.from_pretrained``).

``export_student`` writes a distilled student back as such a folder (so
``DDPMPipeline.from_pretrained`` loads it) with ``ddil_student.json`` saying how it samples
(DDIM or consistency, on which grid); ``python -m ddil_lab.evaluate FOLDER --protocol
cifar10-50k`` evaluates either kind of folder with the same code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..denoiser import wrap
from ..diffusion import prediction_from_config, schedule_from_config
from ..hub import check_pipeline_folder, hub_id_what, missing_model, require_download

PIPELINES = ("DDPMPipeline", "DDIMPipeline")
# diffusers' names -> ours (the same tables as the sd tier's; tiers do not import each other)
STUDENT_FILE = "ddil_student.json"

# google/ddpm-cifar10-32's public unet/config.json and scheduler config (Ho et al. 2020: 35.7M
# parameters, attention at 16x16; eps-prediction, linear betas, T = 1000)
DDPM_CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1, norm_eps=1e-6,
    norm_num_groups=32, time_embedding_type="positional")
DDPM_CIFAR10_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear",
                              beta_start=1e-4, beta_end=0.02, clip_sample=True,
                              variance_type="fixed_large", trained_betas=None)


def make_ddpm_folder(folder: str | os.PathLike, channels=None, norm_groups: int | None = None,
                     seed: int = 0) -> str:
    """A ``DDPMPipeline`` folder with a *randomly initialised* UNet of google/ddpm-cifar10-32's
    architecture (``channels``/``norm_groups`` shrink its widths, same block layout) and its
    scheduler: what the tests load through the same path as the real checkpoint."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    cfg = dict(DDPM_CIFAR10_UNET)
    if channels is not None:
        cfg["block_out_channels"] = tuple(channels)
    if norm_groups is not None:
        cfg["norm_num_groups"] = norm_groups
    torch.manual_seed(seed)
    pipe = DDPMPipeline(unet=UNet2DModel(**cfg), scheduler=DDPMScheduler(**DDPM_CIFAR10_SCHEDULER))
    pipe.save_pretrained(os.fspath(folder))
    return os.fspath(folder)


class DiffusersUNet(nn.Module):
    """A pretrained ``diffusers.UNet2DModel`` called as ``net(x_t, t, cond)``; an unconditional
    model ignores ``cond`` (None), a class-conditional one takes labels (B,)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.num_classes = 0 if unet.config.num_class_embeds is None else \
            int(unet.config.num_class_embeds)

    def forward(self, x_t, t, cond=None):
        labels = cond if self.num_classes and cond is not None else None
        return self.unet(x_t, t, class_labels=labels).sample

    def features(self, x_t, t, cond=None) -> torch.Tensor:
        """The mid-block activations (B, C_mid, h, w), for DMD2's optional GAN head."""
        out = {}
        hook = self.unet.mid_block.register_forward_hook(lambda m, i, o: out.update(h=o))
        try:
            self.forward(x_t, t, cond)
        finally:
            hook.remove()
        return out["h"]



def pipeline_folder(model: str | os.PathLike, patterns=("model_index.json", "unet/*",
                                                         "scheduler/*", STUDENT_FILE)) -> Path:
    """A local pipeline folder for a folder or hub id: the folder itself, or the hub snapshot in
    the local cache (files matching ``patterns``; None: all). A name that is no folder and not
    of the hub's ``owner/name`` form raises ``MissingPath`` (no such folder); a hub id that is
    not cached raises ``OfflineError`` within seconds when the hub is unreachable (saying that
    no such folder exists either), else it is downloaded."""
    model = os.fspath(model)
    if os.path.isdir(model):
        return Path(model)
    missing_model(model)
    from huggingface_hub import snapshot_download

    patterns = list(patterns) if patterns is not None else None
    try:
        return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError is both)
        require_download(hub_id_what(model),
                         hint="Download it on a machine with internet access (e.g. `hf download "
                              f"{model} --local-dir DIR`) and pass the folder DIR instead.")
        return Path(snapshot_download(model, allow_patterns=patterns))


def read_pipeline_configs(folder: Path) -> tuple[dict, dict]:
    """(model_index.json, scheduler config) of a pipeline folder, checked to be a DDPM/DDIM
    pipeline with a UNet2DModel."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no "
                                "model_index.json)")
    index = json.loads(index_path.read_text())
    if index.get("_class_name") not in PIPELINES:
        raise ValueError(f"{folder} holds a {index.get('_class_name')}; the image tier loads "
                         f"{PIPELINES} folders (an unconditional UNet2DModel and its scheduler)")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise FileNotFoundError(f"{sched_path} is missing")
    return index, json.loads(sched_path.read_text())


def check_from_pretrained(model, data, kw: dict) -> bool:
    """The arguments of ``ImageBackend.from_pretrained``, before anything is loaded
    (``ConfigError`` naming the first bad one); pops and returns ``allow_pickle`` from ``kw``."""
    from ..validation import check_bool, check_device, fail
    from .backend import check_args

    allow_pickle = kw.pop("allow_pickle", False)
    check_bool("allow_pickle", allow_pickle)
    if "teacher" in kw:
        fail("teacher", kw["teacher"], "nothing: from_pretrained loads the teacher from model")
    if not isinstance(model, (str, os.PathLike)) or not os.fspath(model):
        fail("model", model, "a DDPMPipeline folder or a hub id 'owner/name'")
    check_args({"data": data, **kw})
    check_device("device", kw.get("device", "cpu"))
    return allow_pickle


def load_pretrained(model: str | os.PathLike, device="cpu", allow_pickle: bool = False
                    ) -> nn.Module:
    """The UNet of a ``DDPMPipeline`` folder or hub id as a frozen Denoiser
    ``(x_t, t, cond) -> x0_hat``, parameterised and scheduled as its scheduler config says
    (``.net`` is a ``DiffusersUNet``, ``.schedule`` the ``Schedule``; ``.source`` the folder).
    The folder is checked first (``hub.check_pipeline_folder``: every component present, and
    safetensors weights only, unless ``allow_pickle`` for a folder you trust)."""
    from diffusers import DDPMScheduler, UNet2DModel

    folder = pipeline_folder(model)
    check_pipeline_folder(folder, allow_pickle)
    _, sched_cfg = read_pipeline_configs(folder)
    schedule = schedule_from_config(sched_cfg)
    ref = DDPMScheduler.from_config(sched_cfg).alphas_cumprod  # the scheduler's own betas
    if not torch.allclose(schedule.alpha_bar[:-1], torch.as_tensor(ref).float(), atol=1e-6,
                          rtol=1e-5):
        raise ValueError(f"{schedule} does not reproduce the scheduler's alphas_cumprod")
    unet = UNet2DModel.from_pretrained(str(folder), subfolder="unet",
                                       use_safetensors=None if allow_pickle else True)
    teacher = wrap(DiffusersUNet(unet), schedule, prediction_from_config(sched_cfg))
    teacher.source = str(model)
    return teacher.to(device).eval().requires_grad_(False)


def export_student(student, folder: str | os.PathLike, n_steps: int, sampler: str,
                   teacher_folder: str | os.PathLike) -> str:
    """Save a student distilled from a pretrained teacher as a ``DDPMPipeline`` folder (its UNet
    and the teacher's scheduler config) plus ``ddil_student.json``: ``sampler`` ("ddim" for PD
    students, "consistency" for LCM and DMD2), the grid ``timesteps(n_steps)`` it samples on,
    and the boundary scalings of an LCM student's consistency function.

    :param student: ``DistillResult.student`` of a run on ``ImageBackend.from_pretrained``: a
        wrapped ``DiffusersUNet``, or LCM's ``ConsistencyFn`` around one.
    """
    from diffusers import DDPMPipeline, DDPMScheduler

    from ..diffusion import timesteps
    from ..methods.lcm import ConsistencyFn

    if sampler not in ("ddim", "consistency"):
        raise ValueError(f"sampler={sampler!r} is not one of ('ddim', 'consistency')")
    info = {"sampler": sampler, "num_inference_steps": int(n_steps)}
    if isinstance(student, ConsistencyFn):
        info["consistency_fn"] = {"sigma_data": student.sigma_data, "scaling": student.scaling}
        student = student.denoiser
    info["timesteps"] = timesteps(n_steps, student.schedule.T).tolist()
    net = getattr(student, "net", None)
    if not isinstance(net, DiffusersUNet):
        raise TypeError("export_student needs a student of ImageBackend.from_pretrained (its "
                        f".net is a DiffusersUNet), got {type(net).__name__}")
    _, sched_cfg = read_pipeline_configs(pipeline_folder(teacher_folder))
    info["prediction"] = prediction_from_config(sched_cfg)
    DDPMPipeline(unet=net.unet, scheduler=DDPMScheduler.from_config(sched_cfg)).save_pretrained(
        os.fspath(folder))
    (Path(folder) / STUDENT_FILE).write_text(json.dumps(info, indent=2))
    return os.fspath(folder)


def student_info(folder: str | os.PathLike) -> dict | None:
    """``ddil_student.json`` of an exported student (None for other pipeline folders)."""
    path = Path(folder) / STUDENT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_student(model: str | os.PathLike, device="cpu", allow_pickle: bool = False
                 ) -> tuple[nn.Module, dict]:
    """(Denoiser, info) of a pipeline folder: an exported student re-wrapped as it was trained
    (its consistency function included), with its ``ddil_student.json``; any other DDPM
    pipeline as its plain Denoiser with info {} (sample it with DDIM). Safetensors weights
    only, unless ``allow_pickle``."""
    from ..methods.lcm import ConsistencyFn

    den = load_pretrained(model, device, allow_pickle)
    info = student_info(pipeline_folder(model)) or {}
    if "consistency_fn" in info:
        c = info["consistency_fn"]
        den = ConsistencyFn(den, c["sigma_data"], c["scaling"]).eval()
    return den, info
