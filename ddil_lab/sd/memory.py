"""Memory planner of the full tier: peak memory per process of a recipe, before it runs.

    plan = plan_memory("sdxl", "dmd2", batch_size=1, lora_rank=64)   # or a pipeline folder
    print(plan)                       # the parts, in GiB
    plan.fits(80)                     # does it fit an 80 GiB GPU?
    fitting_settings("sdxl", "dmd2", gpu_gib=80)    # which settings fit

What a process holds (P: UNet parameters, p: trainable parameters, b: bytes of the frozen dtype):

    frozen      teacher UNet, VAE, text encoder(s), in the mixed-precision dtype (b bytes each);
                LoRA students and critics share the teacher's frozen weights (no copy); a copy
                of a LoRA student (LCM's target, PD's previous student, EMA) holds its own base
    trained     p fp32 weights + p fp32 gradients + AdamW's 2 p fp32 moments (8-bit AdamW: 2 p
                bytes); under autocast, fp32 weights are also cast to a b-byte copy per forward
                (held until backward when not checkpointing)
    copies      PD: the previous stage's student, frozen, teaching (and kept for the next stage);
                LCM: the EMA target (a copy of the student); DMD2: the fake critic (trained like
                the student); ``ema``: an EMA of the student
    sharding    "zero1" divides AdamW's moments by the process count; "fsdp" divides the
                trained modules, their gradients, moments and copies (the teacher stays whole)
    activations what backward needs, per sample and latent pixel: measured once per
                architecture (``activation_bytes_per_pixel``: tensors autograd saves in one
                forward under bf16 autocast, on the meta device, with attention saving only
                q, k, v and its output, as flash / memory-efficient attention does), times
                batch and latent pixels; with checkpointing, what is saved at the checkpoints
                plus the recompute of one block (taken as 15% of the full activations)
    transient   the VAE encoder on a batch of images (none with a latent cache), 10% margin

It is an estimate: ``tests/test_full_size.py`` compares it with the peak RSS of one real-size
CPU training step (and ``experiments/bench_full.py`` with CUDA peak memory on a GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

GiB = 2 ** 30
METHODS = ("pd", "lcm", "dmd2")
SHARDING = ("none", "zero1", "fsdp")
BYTES = {"no": 4, "bf16": 2, "fp16": 2}
HUB_SHAPES = {"runwayml/stable-diffusion-v1-5": "sd15",
              "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "segmind/SSD-1B": "ssd1b",
              "stabilityai/stable-diffusion-xl-base-1.0": "sdxl"}
# bytes autograd keeps per sample and latent pixel (bf16 autocast), measured with
# ``activation_bytes_per_pixel(shape, checkpointing)`` (tests/test_full_size.py re-measures them)
ACTIVATIONS = {("sd15", False): 500_000, ("sd15", True): 75_500,
               ("ssd1b", False): 562_000, ("ssd1b", True): 58_300,
               ("sdxl", False): 939_000, ("sdxl", True): 71_700}
RECOMPUTE = 0.15  # checkpointing: one block's recompute, as a fraction of the full activations
GPUS = {"24 GiB (RTX 4090 / A10)": 24, "40 GiB (A100-40)": 40, "80 GiB (A100 / H100)": 80,
        "141 GiB (H200)": 141}


# ---- the architecture: parameter counts and activations ----
def _modules(shape: str, device: str = "meta") -> dict:
    """The UNet, VAE and text encoder(s) of a named shape ("sd15", "ssd1b", "sdxl", "tiny-sd15",
    "tiny-sdxl") or a local pipeline folder, built on the meta device (no memory)."""
    import torch

    if shape.startswith("tiny-"):
        from . import tiny

        kind = shape[5:]
        tok = tiny.tiny_tokenizer()
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        with torch.device(device):
            out = {"unet": tiny._unet(kind), "vae": tiny._vae(),
                   "text_encoder": CLIPTextModel(tiny._text_config(tok))}
            if kind == "sdxl":
                out["text_encoder_2"] = CLIPTextModelWithProjection(
                    tiny._text_config(tok, projection_dim=tiny.TEXT_WIDTH))
        return out
    from .random_pipeline import CONFIGS, build_component

    if shape in CONFIGS:
        return {k: build_component(shape, k, device=device)
                for k in ("unet", "vae", "text_encoder", "text_encoder_2") if k in CONFIGS[shape]}
    if not os.path.isfile(os.path.join(shape, "model_index.json")):
        raise ValueError(f"shape={shape!r} is not allowed: one of sd15, ssd1b, sdxl, tiny-sd15, "
                         "tiny-sdxl, a known hub id, or a local pipeline folder")
    import diffusers
    import transformers

    out = {}
    with open(os.path.join(shape, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        spec = index.get(name)
        if not (isinstance(spec, list) and spec[1]):
            continue
        lib = diffusers if spec[0] == "diffusers" else transformers
        cls = getattr(lib, spec[1])
        with torch.device(device):
            if lib is diffusers:
                out[name] = cls.from_config(cls.load_config(os.path.join(shape, name)))
            else:
                out[name] = cls(transformers.AutoConfig.from_pretrained(os.path.join(shape, name)))
    return out


def resolve_shape(model: str, tiny_kind: str = "sd15") -> str:
    """The planner's shape of a recipe's ``model_id``."""
    if model == "tiny":
        return f"tiny-{tiny_kind}"
    if model in HUB_SHAPES:
        return HUB_SHAPES[model]
    return model


@functools.lru_cache(maxsize=8)
def architecture(shape: str, lora_rank: int = 0) -> dict:
    """Parameter counts of ``shape``: {"unet", "vae", "text": ..., "lora": LoRA parameters at
    ``lora_rank`` on the attention projections, "native": (H, W) latent side, "channels"}."""
    from .backend import LORA_TARGETS
    from .data import image_size

    mods = _modules(shape)
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in mods.items()}
    lora = 0
    if lora_rank:
        for name, m in mods["unet"].named_modules():
            if any(name.endswith("." + t) for t in LORA_TARGETS) and hasattr(m, "in_features"):
                lora += lora_rank * (m.in_features + m.out_features)
    cfg = mods["unet"].config
    return {"unet": n["unet"], "vae": n["vae"],
            "text": n["text_encoder"] + n.get("text_encoder_2", 0), "lora": lora,
            "native": image_size(cfg.sample_size), "channels": cfg.in_channels,
            "cond_dim": cfg.cross_attention_dim, "xl": "text_encoder_2" in mods,
            "vae_factor": 2 ** (len(mods["vae"].config.block_out_channels) - 1)}


def activation_bytes_per_pixel(shape: str, checkpointing: bool, sides=(16, 32)) -> float:
    """Bytes autograd saves for backward in one training forward of the UNet of ``shape``, per
    sample and latent pixel, under bf16 autocast: the slope between two latent sizes (the
    constant part, casts of the weights, is counted with the parameters). Runs on the meta
    device; attention saves q, k, v, its output and the logsumexp, as flash attention does."""
    import torch
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention

    class FlashLike(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = sdpa(q, k, v)
            ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
            return out

        @staticmethod
        def backward(ctx, g):  # never run: only what is saved matters here
            raise NotImplementedError

    unet = _modules(shape)["unet"]
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    arch = architecture(shape)
    totals = []
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: FlashLike.apply(q, k, v)
    try:
        for side in sides:
            saved = []
            with torch.device("meta"):
                x = torch.randn(1, arch["channels"], side, side, requires_grad=True)
                kw = {"encoder_hidden_states": torch.randn(1, 77, arch["cond_dim"])}
                if arch["xl"]:
                    dim = unet.config.projection_class_embeddings_input_dim \
                        - 6 * unet.config.addition_time_embed_dim
                    kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, dim),
                                               "time_ids": torch.randn(1, 6)}
                t = torch.tensor([500])
            pack = (lambda s: lambda x_: s.append(x_.numel() * x_.element_size()) or x_)(saved)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x_: x_):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    unet(x, t, return_dict=False, **kw)
            totals.append(sum(saved))
    finally:
        F.scaled_dot_product_attention = sdpa
    (a, b), (sa, sb) = totals, sides
    return (b - a) / (sb ** 2 - sa ** 2)


def _activations(shape: str, checkpointing: bool) -> float:
    key = (shape, checkpointing)
    if key not in ACTIVATIONS:
        ACTIVATIONS[key] = activation_bytes_per_pixel(shape, checkpointing)
    per_px = ACTIVATIONS[key]
    if checkpointing:
        per_px += RECOMPUTE * _activations(shape, False)
    return per_px


# ---- the plan ----
@dataclasses.dataclass
class MemoryPlan:
    """Predicted peak memory per process (bytes per part; ``total``)."""
    settings: dict
    parts: dict

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def fits(self, gib: float) -> bool:
        return self.total <= gib * GiB

    def __str__(self):
        s = self.settings
        head = (f"memory plan: {s['shape']} {s['method']}, batch {s['batch_size']}/process at "
                f"{s['resolution'][0]}x{s['resolution'][1]} px, {s['mixed_precision']}, "
                f"checkpointing {s['gradient_checkpointing']}, "
                + (f"LoRA rank {s['lora_rank']}" if s["lora_rank"] else "full weights")
                + f", sharding {s['sharding']} over {s['num_processes']} process(es)")
        unit, u = ("GiB", GiB) if self.total >= GiB else ("MiB", 2 ** 20)
        rows = [f"  {k:<36} {v / u:9.2f} {unit}" for k, v in self.parts.items() if v]
        fit = ", ".join(f"{name}: {'fits' if self.fits(g) else 'no'}" for name, g in GPUS.items())
        return "\n".join([head, *rows, f"  {'total (peak, per process)':<36} "
                          f"{self.total / u:9.2f} {unit}", f"  {fit}"])


def plan_memory(shape: str = "sd15", method: str = "pd", batch_size: int = 1,
                resolution=None, mixed_precision: str = "bf16",
                gradient_checkpointing: bool = True, lora_rank: int = 0,
                sharding: str = "none", num_processes: int = 1, ema: bool = False,
                eight_bit: bool = False, gan: bool = False, w_embed: bool = True,
                latent_cache: bool = False, cuda: bool = True,
                teacher_copy: bool | None = None) -> MemoryPlan:
    """Predict the peak memory of one process (see the module docstring for the model).

    :param shape: "sd15", "ssd1b", "sdxl", "tiny-sd15", "tiny-sdxl", a known hub id or a local
        pipeline folder (read from its configs, never its weights).
    :param batch_size: samples per process (the recipe's global batch / processes).
    :param resolution: image side (or (H, W)) in pixels; default the UNet's native size.
    :param w_embed: the student has a guidance embedding (PD's gc stages, LCM).
    :param cuda: False: on CPU, where autocast caches no weight copies and attention saves its
        full matrix (the activation term is then a lower bound).
    :param teacher_copy: PD only: the teacher is a frozen copy of the previous stage's student
        (the recipe's halving stages, its peak; default). False: the backend's teacher (the
        first stages, or ``PD(...)`` on its own).
    """
    from .data import image_size

    shape = HUB_SHAPES.get(shape, shape)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if sharding not in SHARDING:
        raise ValueError(f"sharding={sharding!r} is not one of {SHARDING}")
    if mixed_precision not in BYTES:
        raise ValueError(f"mixed_precision={mixed_precision!r} is not one of {tuple(BYTES)}")
    for name, v in (("batch_size", batch_size), ("num_processes", num_processes)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name}={v!r} must be an int >= 1")
    if not (isinstance(lora_rank, int) and lora_rank >= 0):
        raise ValueError(f"lora_rank={lora_rank!r} must be an int >= 0")
    a = architecture(shape, lora_rank)
    H, W = image_size(resolution) if resolution is not None else \
        tuple(a["vae_factor"] * v for v in a["native"])
    b = BYTES[mixed_precision]
    P = a["unet"]
    p = a["lora"] + (256 * 1280 if w_embed and method != "dmd2" else 0) if lora_rank else P
    n = num_processes
    fs = n if sharding == "fsdp" else 1  # what FSDP divides
    parts = {"teacher UNet (frozen)": P * b, "VAE + text encoders (frozen)": (a["vae"]
                                                                               + a["text"]) * b}
    trained = 2 if method == "dmd2" else 1  # student (+ the DMD2 critic)
    base = P * b if lora_rank else 0  # the frozen base of a copy of a LoRA student
    parts["student weights (fp32 trained)"] = p * 4 / fs  # a LoRA base is the teacher's
    parts["student gradients"] = p * 4 / fs
    opt = p * (2 if eight_bit else 8)
    parts["student AdamW moments"] = opt / (n if sharding in ("zero1", "fsdp") else 1)
    if method == "dmd2":
        parts["critic weights + gradients"] = p * 8 / fs
        parts["critic AdamW moments"] = parts["student AdamW moments"]
    copy = p * 4 + base  # a frozen copy of the student (fp32 trained part + base)
    if method == "pd" and teacher_copy is not False:
        parts["previous stage's student (teacher)"] = copy / fs
    elif method == "lcm":
        parts["EMA target"] = copy / fs
    if ema:
        parts["EMA of the student"] = copy / fs
    if cuda and mixed_precision != "no" and not gradient_checkpointing:
        parts["autocast weight copies"] = p * b * trained
    px = (H // a["vae_factor"]) * (W // a["vae_factor"])
    act = _activations(shape, gradient_checkpointing) * px * batch_size
    if method == "dmd2" and gan:  # the GAN term backpropagates through the critic too
        act *= 2
    parts["activations"] = act * (1 if mixed_precision != "no" else 2)
    if not latent_cache:  # VAE encoder: ~4 maps of 128 channels at full resolution alive
        parts["VAE encode (no latent cache)"] = 4 * 128 * H * W * b * min(batch_size, 16)
    parts["margin (10%)"] = 0.1 * sum(parts.values())
    settings = dict(shape=shape, method=method, batch_size=batch_size, resolution=(H, W),
                    mixed_precision=mixed_precision,
                    gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank,
                    sharding=sharding, num_processes=n, ema=ema, eight_bit=eight_bit, gan=gan)
    return MemoryPlan(settings, parts)


def plan_for_recipe(recipe, num_processes: int = 1) -> MemoryPlan:
    """The plan of a full-tier recipe (``PDRecipe``, ``LCMRecipe``, ``DMD2Recipe``)."""
    shape = resolve_shape(recipe.model_id, recipe.tiny_kind)
    per = max(1, recipe.batch_size // num_processes)
    return plan_memory(shape, recipe.method, per, recipe.resolution, recipe.mixed_precision,
                       recipe.gradient_checkpointing, recipe.lora_rank,
                       num_processes=num_processes, ema=recipe.ema_decay is not None,
                       gan=getattr(recipe, "gan_weight", 0) > 0,
                       w_embed=recipe.w_range is not None,
                       latent_cache=recipe.latent_cache is not None)


def fitting_settings(shape: str, method: str, gpu_gib: float, batch_size: int = 1,
                     num_processes: int = 1, **kw) -> list[MemoryPlan]:
    """The settings (checkpointing, LoRA rank 0 / 64, 8-bit AdamW, sharding) whose plan fits a
    ``gpu_gib`` GPU, the least compromising first (full weights before LoRA, no sharding first)."""
    out = []
    for lora in (0, 64):
        for ckpt in (False, True):
            for eight_bit in (False, True):
                for sharding in (("none", "zero1", "fsdp") if num_processes > 1 else ("none",)):
                    plan = plan_memory(shape, method, batch_size, lora_rank=lora,
                                       gradient_checkpointing=ckpt, eight_bit=eight_bit,
                                       sharding=sharding, num_processes=num_processes, **kw)
                    if plan.fits(gpu_gib):
                        out.append(plan)
    return out




def memory_report(recipe, num_processes: int = 1) -> str:
    """The plan of a recipe as text, and whether it fits this machine's GPU (if any); a note
    instead when the model's architecture is unknown (a hub id not cached as a folder)."""
    try:
        plan = plan_for_recipe(recipe, num_processes)
    except (ValueError, OSError) as e:
        return f"memory plan: not available ({e})"
    text = str(plan)
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gib = props.total_memory / GiB
        text += (f"\n  this GPU ({props.name}, {gib:.0f} GiB): "
                 + ("fits" if plan.fits(gib) else "does NOT fit: see fitting_settings(...)"))
    return text


__all__ = ["ACTIVATIONS", "MemoryPlan", "activation_bytes_per_pixel", "architecture",
           "fitting_settings", "memory_report", "plan_for_recipe", "plan_memory",
           "resolve_shape"]
