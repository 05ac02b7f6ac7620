"""The full tier: Stable Diffusion 1.5 and SDXL / SSD-1B through diffusers, in latent space.

The teacher is the pipeline's UNet, called as ``net(x_t, t, cond)`` by ``UNetNet`` and wrapped by
what the scheduler says it predicts (``epsilon`` -> ``PredEps``, ``v_prediction`` -> ``PredV``),
so it returns x0 like every Denoiser here; classifier-free guidance is the ``CFG`` wrapper. The
conditioning is a dict of per-sample tensors (B first), the same for both pipeline shapes:

    emb       (B, L, D)  text encoder hidden states (SDXL: both encoders, concatenated)
    pooled    (B, P)     SDXL only: pooled projection of text encoder 2
    time_ids  (B, 6)     SDXL only: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)
    w         (B,)       guidance scale: fixed, or w ~ U[w_min, w_max] for guidance-conditioned
                         students (Meng et al. 2023; LCM), which see it through the UNet's
                         ``time_cond_proj_dim`` embedding of (w - 1), exactly as diffusers'
                         pipelines feed it at inference

The Schedule is built from the scheduler's config (betas, T) and checked against its
``alphas_cumprod``; ``sampling.sample`` with DDIM then reproduces ``pipe(...)`` with a DDIM
scheduler on the same timesteps (tests/test_sd.py, the oracle).
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import torch
from torch import nn

from .data import (LatentCache, image_size, load_image_captions, read_captions, sample_latents,
                   vae_moments)
from ..denoiser import CFG, BatchedCFG, wrap  # noqa: F401 (BatchedCFG: re-exported)
from ..diffusion import (DIFFUSERS_PREDICTIONS, Schedule, Threshold, prediction_from_config,
                         schedule_from_config, threshold)
from ..hub import OfflineError
from ..validation import check_device
from .loading import (SUPPORTED, check_pipeline_folder, load_pipeline, load_unet,  # noqa: F401
                      looks_like_path)
from ..backend import Backend

PREDICTIONS = DIFFUSERS_PREDICTIONS
DIFFUSERS_PREDICTION = {v: k for k, v in DIFFUSERS_PREDICTIONS.items()}
MIXED_PRECISION = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# ---- schedule and parameterisation from the scheduler config ----
def schedule_from_scheduler(scheduler) -> Schedule:
    """The ``Schedule`` of a diffusers scheduler, checked against its ``alphas_cumprod``
    (``diffusion.schedule_from_config``)."""
    return schedule_from_config(scheduler.config, getattr(scheduler, "alphas_cumprod", None))


def prediction_from_scheduler(scheduler) -> str:
    """"eps", "v" or "x0" from the scheduler's ``prediction_type``."""
    return prediction_from_config(scheduler.config)


# ---- the UNet as a network net(x_t, t, cond) ----
def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales w (B,) -> (B, dim), as diffusers'
    ``get_guidance_scale_embedding`` (which pipelines call with guidance_scale - 1)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                      * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class UNetNet(nn.Module):
    """``net(x_t, t, cond) -> eps or v``: a diffusers ``UNet2DConditionModel`` called with our
    conditioning dict (see the module docstring). Inputs are cast to the UNet's dtype; with
    ``autocast`` (bf16 / fp16) the forward runs under ``torch.autocast`` (fp32 master weights).
    A UNet with ``time_cond_proj_dim`` reads ``cond["w"]`` (guidance-conditioned student)."""

    def __init__(self, unet: nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.unet, self.autocast = unet, autocast

    def _kwargs(self, cond: dict, B: int, device) -> dict:
        if not isinstance(cond, dict) or "emb" not in cond:
            raise ValueError("the sd backend needs a conditioning dict with 'emb' (text "
                             "embeddings); use backend.sample_cond / encode_prompts")
        dt = self.unet.dtype
        kw = {"encoder_hidden_states": cond["emb"].to(device, dt)}
        if "pooled" in cond:
            kw["added_cond_kwargs"] = {"text_embeds": cond["pooled"].to(device, dt),
                                       "time_ids": cond["time_ids"].to(device, dt)}
        dim = self.unet.config.time_cond_proj_dim
        if dim is not None:
            if "w" not in cond:
                raise ValueError("a guidance-conditioned UNet needs cond['w']")
            w = torch.as_tensor(cond["w"], device=device).float().expand(B)
            kw["timestep_cond"] = guidance_embedding(w - 1.0, dim).to(dt)
        return kw

    def forward(self, x_t, t, cond=None):
        kw = self._kwargs(cond, x_t.shape[0], x_t.device)
        with torch.autocast(x_t.device.type, dtype=self.autocast or torch.float32,
                            enabled=self.autocast is not None):
            return self.unet(x_t.to(self.unet.dtype), t, return_dict=False, **kw)[0]

    def features(self, x_t, t, cond=None) -> torch.Tensor:
        """The UNet's mid-block activations (for a GAN head on the DMD2 critic)."""
        out = {}
        hook = self.unet.mid_block.register_forward_hook(lambda m, i, o: out.setdefault("h", o))
        try:
            self.forward(x_t, t, cond)
        finally:
            hook.remove()
        return out["h"].float()


def add_w_embedding(unet: nn.Module, dim: int = 256) -> nn.Module:
    """``unet`` with a guidance-scale input (``time_cond_proj_dim=dim``), as LCM's students have:
    a new UNet that takes over ``unet``'s weight tensors (no copy: pass a copy to keep ``unet``
    apart), built on the meta device so an SDXL-size UNet is never allocated twice. The new
    projection is zero-initialised, so the result starts equal to ``unet`` for every w."""
    from diffusers import UNet2DConditionModel

    if unet.config.time_cond_proj_dim is not None:
        return unet
    p = next(unet.parameters())
    with torch.device("meta"):
        new = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": dim})
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False, assign=True)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise RuntimeError(f"w-embedding copy: missing {missing}, unexpected {unexpected}")
    te = new.time_embedding
    te.cond_proj = nn.Linear(dim, te.linear_1.in_features, bias=False, device=p.device,
                             dtype=p.dtype)
    nn.init.zeros_(te.cond_proj.weight)
    left = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"w-embedding copy: tensors left on the meta device: {left}")
    return new


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None,
             targets: tuple = LORA_TARGETS) -> nn.Module:
    """Freeze ``unet`` and add trainable LoRA adapters (peft) of ``rank`` on the attention
    projections; B is zero-initialised, so the UNet is unchanged until trained. A w-embedding
    projection, if any, stays trainable."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("lora_rank > 0 needs the 'peft' package: pip install peft") from e
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=list(targets)))
    if unet.time_embedding.cond_proj is not None:
        unet.time_embedding.cond_proj.requires_grad_(True)
    for p in unet.parameters():  # trained in fp32 even on a bf16 / fp16 frozen base
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return unet


def adamw(params, lr: float, eight_bit: bool = False, **kw) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW with ``eight_bit=True`` (GPU memory for SDXL-size
    students). Only parameters that require grad are optimised."""
    params = [p for p in params if p.requires_grad]
    if not eight_bit:
        return torch.optim.AdamW(params, lr=lr, **kw)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("eight_bit=True needs the 'bitsandbytes' package: "
                          "pip install bitsandbytes") from e
    return bnb.optim.AdamW8bit(params, lr=lr, **kw)


# ---- thresholding in latent space ----
class LatentThreshold(Threshold):
    """The data support in latent space. "static" clamps x0 to [lo, hi]. "dynamic" is Imagen's
    dynamic thresholding measured in units of the range's half-width h around its centre c:
    per sample, s = clamp(quantile(|x0 - c| / h, ratio), 1, max_value) and
    x0 -> c + h clamp((x0 - c) / h, -s, s) / s, the identity for latents inside the range."""

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.mode != "dynamic":
            return super().__call__(x0)
        c, h = (self.hi + self.lo) / 2, (self.hi - self.lo) / 2
        return c + h * threshold((x0 - c) / h, "dynamic", ratio=self.ratio,
                                 max_value=self.max_value)


# ---- the backend ----
class SDBackend(Backend):
    """Stable Diffusion 1.5 / SDXL / SSD-1B in latent space (see the module docstring).

    :param model: a hub id (``"runwayml/stable-diffusion-v1-5"``, ``"segmind/SSD-1B"``), a local
        pipeline folder (e.g. from ``sd_tiny.make_tiny_pipeline``), or a loaded pipeline.
    :param data: images with captions: an imagefolder (``metadata.jsonl``), a ``save_to_disk``
        folder or a ``datasets`` name. None: data-free distillation from ``prompts``.
    :param prompts: a prompts file (or list) for ``sample_cond``; default: the data's captions.
    :param guidance: the teacher's classifier-free guidance scale w (1: no guidance), or a range
        (w_min, w_max) from which each sample draws its w (guidance-conditioned students).
    :param w_embed: give students a guidance-scale embedding (default: iff guidance is a range).
    :param student_prediction: what students predict ("eps", "v", "x0"); default the teacher's.
    :param lora_rank: > 0: students and critics train LoRA adapters (peft) instead of all weights.
    :param mixed_precision: "no", "bf16" or "fp16": frozen teacher / VAE / text encoders are
        loaded in it; students keep fp32 trainable weights and run under autocast (full
        students start from the checkpoint's fp32 weights, read again from disk; LoRA students
        and critics share the teacher's frozen weights, their adapters are fp32).
    :param gradient_checkpointing: on the students' and critics' UNets.
    :param support: "static" (clamp to ``latent_range``) or "dynamic" (``LatentThreshold``): the
        support used when a method is ``reflected``.
    :param resolution: training image size: an int side (square) or (height, width); default
        the UNet's native ``sample_size`` times the VAE factor (a pair for non-square UNets).
    :param negative_prompt: the unconditional branch of the guided teacher (classifier-free
        guidance), as diffusers pipelines' ``negative_prompt``; None: the empty prompt (zeros for
        SDXL pipelines with ``force_zeros_for_empty_prompt``).
    :param latent_cache: a ``.safetensors`` path: encode the dataset with the VAE once, reuse.
    :param device: where the networks live; every tensor the backend returns is on it.
    :param variant: weights variant to load (e.g. "fp16" files of a hub checkpoint).
    :param allow_pickle: also load pickled ``.bin`` weights (only for folders you trust).
    """

    def __init__(self, model, data=None, prompts=None, *, guidance=7.5, w_embed: bool | None = None,
                 w_embed_dim: int = 256, student_prediction: str | None = None,
                 lora_rank: int = 0, lora_alpha: float | None = None, mixed_precision: str = "no",
                 gradient_checkpointing: bool = False, support: str = "dynamic",
                 latent_range: tuple = (-4.0, 4.0), threshold_ratio: float = 0.995,
                 threshold_max: float = 1.5, resolution: int | tuple | None = None,
                 negative_prompt: str | None = None,
                 latent_cache: str | None = None, split: str = "train",
                 image_column: str = "image", caption_column: str = "text",
                 device: str | torch.device = "cpu", variant: str | None = None,
                 allow_pickle: bool = False):
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={mixed_precision!r} is not one of "
                             f"{tuple(MIXED_PRECISION)}")
        if support not in ("static", "dynamic"):
            raise ValueError(f"support={support!r} is not one of ('static', 'dynamic')")
        if data is None and prompts is None:
            raise ValueError("give data= (images with captions) or prompts= (a prompts file or "
                             "list, for data-free distillation)")
        if not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"lora_rank={lora_rank!r} must be an int >= 0")
        check_device("device", device)  # before anything is loaded
        self.device = torch.device(device)
        self.dtype = MIXED_PRECISION[mixed_precision]
        self._set_guidance(guidance)
        self.w_embed = self.w_range is not None if w_embed is None else bool(w_embed)
        self.w_embed_dim, self.lora_rank, self.lora_alpha = w_embed_dim, lora_rank, lora_alpha
        self.gradient_checkpointing = gradient_checkpointing

        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt={negative_prompt!r} must be None or a string")
        self.negative_prompt = negative_prompt
        self.variant, self.allow_pickle = variant, allow_pickle
        # frozen parts load in the mixed-precision dtype directly (no fp32 pipeline in memory)
        pipe = load_pipeline(model, dtype=self.dtype, variant=variant, allow_pickle=allow_pickle)
        pipe.set_progress_bar_config(disable=True)
        self.is_xl = type(pipe).__name__ == SUPPORTED[1]
        self.schedule = schedule_from_scheduler(pipe.scheduler)
        self.prediction = prediction_from_scheduler(pipe.scheduler)
        self.student_prediction = student_prediction or self.prediction
        if self.student_prediction not in DIFFUSERS_PREDICTION:
            raise ValueError(f"student_prediction={student_prediction!r} is not one of "
                             f"{tuple(DIFFUSERS_PREDICTION)}")
        # where full students get their fp32 weights: the checkpoint on disk (read again per
        # student), or, for a pipeline passed in memory, an fp32 copy kept here
        self._source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        self._fp32_copy = None
        if self._source is None and self.dtype != torch.float32:
            self._fp32_copy = copy.deepcopy(pipe.unet).to(torch.float32)
        pipe.to(self.device)
        if any(m.dtype != self.dtype for m in pipe.components.values() if isinstance(m, nn.Module)):
            pipe.to(dtype=self.dtype)
        if self.dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
            pipe.vae.to(torch.float32)  # the SDXL VAE overflows in fp16
        for m in pipe.components.values():
            if isinstance(m, nn.Module):
                m.requires_grad_(False).eval()
        self.pipe, self.vae = pipe, pipe.vae

        f = pipe.vae_scale_factor
        native = tuple(f * v for v in image_size(pipe.unet.config.sample_size))
        if resolution is None:
            size = native
        else:
            if not (isinstance(resolution, int) or isinstance(resolution, (tuple, list))
                    and len(resolution) == 2 and all(isinstance(v, int) for v in resolution)):
                raise ValueError(f"resolution={resolution!r} must be None, an int or "
                                 "(height, width)")
            size = image_size(resolution)
            if isinstance(resolution, int) and native[0] != native[1]:
                warnings.warn(f"resolution={resolution} trains square {resolution}x{resolution} "
                              f"images on a UNet whose native size is {native[0]}x{native[1]} "
                              f"(height x width); pass resolution=({native[0]}, {native[1]}) "
                              "(or another pair) to keep its aspect", stacklevel=2)
        if size[0] % f or size[1] % f or min(size) < f:
            raise ValueError(f"resolution={resolution!r} ({size[0]}x{size[1]}) must be positive "
                             f"multiples of the VAE factor {f}")
        self.size = size  # (height, width) in pixels
        self.resolution = size[0] if size[0] == size[1] else size
        self.shape = (pipe.unet.config.in_channels, size[0] // f, size[1] // f)
        self._set_data(data, prompts, latent_cache, split, image_column, caption_column)
        lo, hi = latent_range
        self.support = LatentThreshold(support, lo, hi, threshold_ratio, threshold_max)

        with torch.no_grad():
            self.uncond_cond = self._uncond_embeddings()
        self.cond_teacher = wrap(UNetNet(pipe.unet), self.schedule, self.prediction).eval()
        self.teacher = self.cond_teacher if self.w_range is None and self.w == 1.0 else \
            BatchedCFG(self.cond_teacher, None if self.w_range else self.w, uncond=self.uncond)

    def __repr__(self):
        kind = "SDXL" if self.is_xl else "SD"
        return (f"SDBackend({kind}, prediction={self.prediction!r}, shape={self.shape}, "
                f"guidance={self.w_range or self.w}, has_data={self.has_data}, "
                f"device={str(self.device)!r})")

    # ---- set-up helpers ----
    def _set_guidance(self, guidance):
        if isinstance(guidance, (tuple, list)):
            lo, hi = map(float, guidance)
            if not 1.0 <= lo <= hi:
                raise ValueError(f"guidance range {tuple(guidance)} must satisfy "
                                 "1 <= w_min <= w_max")
            self.w_range, self.w = (lo, hi), None
        else:
            if not float(guidance) >= 1.0:
                raise ValueError(f"guidance={guidance} must be >= 1 (1 = no guidance) or a range")
            self.w_range, self.w = None, float(guidance)

    def _set_data(self, data, prompts, latent_cache, split, image_column, caption_column):
        self.dataset, self.moments = None, None
        if data is not None:
            self.dataset = load_image_captions(data, self.resolution, split, image_column,
                                               caption_column)
            if latent_cache:
                self.moments = LatentCache(latent_cache).build(self.dataset, self.vae)
        self.has_data = self.dataset is not None
        if prompts is None:
            self.prompts = self.dataset.captions()
        elif isinstance(prompts, (list, tuple)):
            self.prompts = [str(p) for p in prompts]
        else:
            self.prompts = read_captions(prompts)
        if not self.prompts:
            raise ValueError("prompts is empty")

    def _uncond_embeddings(self) -> dict:
        """The unconditional input of CFG: the negative prompt if given, else the empty prompt,
        or zeros where an SDXL pipeline sets force_zeros_for_empty_prompt (as its __call__ does
        without a negative prompt)."""
        c = self.encode_prompts([self.negative_prompt or ""])
        if self.is_xl and self.negative_prompt is None and \
                self.pipe.config.get("force_zeros_for_empty_prompt", True):
            c["emb"], c["pooled"] = torch.zeros_like(c["emb"]), torch.zeros_like(c["pooled"])
        return {k: c[k] for k in ("emb", "pooled") if k in c}

    def uncond(self, cond: dict) -> dict:
        """``cond`` with its text replaced by the unconditional embedding (CFG's ``uncond``)."""
        B = cond["emb"].shape[0]
        return {**cond, **{k: v.expand(B, *v.shape[1:]) for k, v in self.uncond_cond.items()}}

    # ---- conditioning ----
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], w=None) -> dict:
        """Text -> the conditioning dict (emb, and for SDXL pooled and time_ids; w when given or
        when the backend has a guidance scale)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        B = len(prompts)
        if self.is_xl:
            emb, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False)
            H, W = self.size  # (original size, crop top-left, target size), as the pipeline
            ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=emb.dtype, device=self.device)
            cond = {"emb": emb, "pooled": pooled, "time_ids": ids.repeat(B, 1)}
        else:
            emb, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
            cond = {"emb": emb}
        if w is None and self.w is not None:
            w = self.w
        if w is not None:
            w = torch.as_tensor(w, dtype=torch.float32, device=self.device)
            cond["w"] = w.expand(B).clone()
        return cond

    def _draw_w(self, n, generator):
        if self.w_range is None:
            return None
        lo, hi = self.w_range
        u = torch.rand(n, generator=generator, device=_gen_device(generator))
        return lo + (hi - lo) * u.to(self.device)

    def sample_cond(self, n: int, generator: torch.Generator | None = None) -> dict:
        idx = torch.randint(len(self.prompts), (n,), generator=generator,
                            device=_gen_device(generator)).tolist()
        return self.encode_prompts([self.prompts[i] for i in idx], self._draw_w(n, generator))

    # ---- data ----
    def sample_data(self, n: int, generator: torch.Generator | None = None):
        """(x0 latents (n, C, h, w), cond) for n random images of the dataset."""
        if not self.has_data:
            raise ValueError("this SDBackend is data-free (prompts only): sample_data is not "
                             "available; use teacher rollouts (beta_teacher_bckwrd) instead of "
                             "forward states")
        idx = torch.randint(len(self.dataset), (n,), generator=generator,
                            device=_gen_device(generator)).tolist()
        if self.moments is not None:
            moments = self.moments[idx].to(self.device)
        else:
            images = torch.stack([self.dataset.image(i) for i in idx]).to(self.device)
            moments = vae_moments(self.vae, images)
        x0 = sample_latents(moments, self.vae.config, generator).to(self.device)
        captions = [self.dataset.caption(i, generator) for i in idx]
        return x0, self.encode_prompts(captions, self._draw_w(n, generator))

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        x = torch.randn((n, *self.shape), generator=generator, device=_gen_device(generator))
        return x.to(self.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (a draw from the VAE posterior)."""
        return sample_latents(vae_moments(self.vae, images.to(self.device)), self.vae.config,
                              generator).to(self.device)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W) in [-1, 1], float32 (no gradient)."""
        cfg = self.vae.config
        z = x.float() / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()

    # ---- students ----
    def fp32_unet(self) -> nn.Module:
        """A fresh float32 copy of the teacher's UNet on the backend's device (read from the
        checkpoint again, so no fp32 copy of an SDXL-size UNet stays in memory)."""
        if self.dtype == torch.float32 and self.pipe.unet.dtype == torch.float32:
            return copy.deepcopy(self.pipe.unet)
        if self._fp32_copy is not None:
            return copy.deepcopy(self._fp32_copy).to(self.device)
        return load_unet(self._source, self.variant, self.allow_pickle).to(self.device)

    def _trainable_unet(self, w_embed: bool) -> nn.Module:
        if self.lora_rank:  # the teacher's frozen weights, shared (not copied); fp32 adapters
            unet = shared_copy(self.pipe.unet)
        else:
            unet = self.fp32_unet()
        if w_embed:
            unet = add_w_embedding(unet, self.w_embed_dim)
        if self.lora_rank:
            add_lora(unet, self.lora_rank, self.lora_alpha)
        else:
            unet.requires_grad_(True)
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return unet.train()

    def _autocast(self):
        return None if self.dtype == torch.float32 else self.dtype

    def make_student(self) -> nn.Module:
        """A trainable copy of the teacher's UNet (fp32), with a zero-initialised guidance-scale
        embedding if ``w_embed``, LoRA adapters if ``lora_rank``; a Denoiser predicting
        ``student_prediction``."""
        net = UNetNet(self._trainable_unet(self.w_embed), self._autocast())
        return wrap(net, self.schedule, self.student_prediction)

    def make_critic(self) -> nn.Module:
        """DMD2's fake critic: a trainable copy of the (unguided) teacher network."""
        return wrap(UNetNet(self._trainable_unet(False), self._autocast()), self.schedule,
                    self.prediction)

    def plot_samples(self, x, ax, nrow: int | None = None, **kw):
        """Decode latents and show them as one image grid on a matplotlib axis."""
        from torchvision.utils import make_grid

        imgs = (self.decode(x).clamp(-1, 1) + 1) / 2
        grid = make_grid(imgs.cpu(), nrow=nrow or math.ceil(math.sqrt(len(imgs))))
        ax.imshow(grid.permute(1, 2, 0).numpy(), **kw)
        ax.axis("off")
        return ax


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are the original's tensors (new module
    objects, no new weights): the frozen base of LoRA students and critics, which costs no
    memory. Adapters added to the copy do not touch the original; never cast or move the copy
    in place (``.to``) while the original is in use. ``copy.deepcopy`` of the copy is a full
    copy again."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def _gen_device(generator):
    return generator.device if generator is not None else "cpu"


def unet_of(denoiser: nn.Module) -> nn.Module:
    """The diffusers UNet inside a student Denoiser (through ConsistencyFn / PredX wrappers)."""
    m = denoiser
    for _ in range(4):
        if isinstance(m, UNetNet):
            return m.unet
        inner = getattr(m, "net", None)
        m = inner if inner is not None else getattr(m, "denoiser", None)
        if m is None:
            break
    raise ValueError(f"{type(denoiser).__name__} does not wrap an sd UNetNet")


__all__ = [
    "BatchedCFG",
    "LatentThreshold",
    "OfflineError",
    "SDBackend",
    "UNetNet",
    "adamw",
    "add_lora",
    "add_w_embedding",
    "check_pipeline_folder",
    "guidance_embedding",
    "load_pipeline",
    "load_unet",
    "looks_like_path",
    "prediction_from_scheduler",
    "schedule_from_scheduler",
    "shared_copy",
    "unet_of",
]
