"""Full-size Stable Diffusion pipelines with random weights, from the published configs.

    python -m ddil_lab.sd.random_pipeline --shape {sd15,ssd1b,sdxl} --out DIR [--dtype bf16]

writes a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``
(and ``text_encoder_2/``), tokenizers, ``scheduler/``; safetensors weights) with the architecture
of ``runwayml/stable-diffusion-v1-5`` ("sd15"), ``segmind/SSD-1B`` ("ssd1b") or
``stabilityai/stable-diffusion-xl-base-1.0`` ("sdxl") and random weights. It loads through the
same ``SDBackend(folder)`` / ``from_pretrained`` path a downloaded checkpoint takes, so real
shapes, dtypes, gradient checkpointing, LoRA, SDXL's time ids and the memory budget can be
exercised without the weights. Random weights sample noise, not images.

The configs below are the published ones (the architecture keys of each checkpoint's
``config.json``; keys equal to the library defaults are left out). Parameter counts (checked by
``tests/test_full_size.py`` on the meta device, no memory):

    UNet          SD1.5 859,520,964; SDXL 2,567,463,684 (both the published counts exactly);
                  SSD-1B 1,331,334,404 (published: "1.3B"; the layout below is the one
                  ComfyUI's model detection reads off the real checkpoint's weights)
    VAE           83,653,863 (SD1.5 and SDXL share the architecture; SDXL's scaling 0.13025)
    text encoder  CLIP ViT-L/14 123,060,480; SDXL's second, OpenCLIP ViT-bigG/14 with its
                  projection, 694,659,840

The tokenizer is built locally (``tiny.tiny_tokenizer``: byte-level CLIP BPE, one token per byte,
no download); its ids all lie inside the real 49408-token embedding tables, so prompts encode,
but not into the token ids of the real vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

from ..validation import check_int, check_out_dir, cli_exit, fail

SHAPES = ("sd15", "ssd1b", "sdxl")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCAB = 49408  # CLIP's BPE vocabulary (embedding rows)

# ---- the published configs ----
_SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"],
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
    act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
_SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
# SSD-1B: SDXL's UNet with transformer stacks cut unevenly (down 2, 4 layers per attention;
# up, deepest first: 4-4-10 at 1280 channels and 2-1-1 at 640) and a mid block of one ResNet
# without attention (diffusers' "UNetMidBlock2D"), as ComfyUI's model detection reads it off
# the segmind/SSD-1B weights (transformer_depth [0,0,2,2,4,4], output [0,0,0,1,1,2,10,4,4],
# middle -1). Not checked against the checkpoint's own config.json (no download here).
_SSD1B_UNET = {**_SDXL_UNET, "transformer_layers_per_block": [1, 2, 4],
               "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], [1, 1, 1]],
               "mid_block_type": "UNetMidBlock2D"}

_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", norm_num_groups=32)
_SD15_VAE = {**_VAE, "sample_size": 512, "scaling_factor": 0.18215}
_SDXL_VAE = {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

_CLIP_L = dict(vocab_size=VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
               projection_dim=768)
_CLIP_BIGG = dict(vocab_size=VOCAB, hidden_size=1280, intermediate_size=5120,
                  num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                  hidden_act="gelu", projection_dim=1280)

_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", steps_offset=1)

CONFIGS = {
    "sd15": {"pipeline": "StableDiffusionPipeline", "unet": _SD15_UNET, "vae": _SD15_VAE,
             "text_encoder": _CLIP_L,
             "scheduler": ("PNDMScheduler", dict(_SCHEDULER, skip_prk_steps=True,
                                                 set_alpha_to_one=False))},
    "ssd1b": {"pipeline": "StableDiffusionXLPipeline", "unet": _SSD1B_UNET, "vae": _SDXL_VAE,
              "text_encoder": _CLIP_L, "text_encoder_2": _CLIP_BIGG,
              "scheduler": ("EulerDiscreteScheduler", dict(_SCHEDULER, timestep_spacing="leading",
                                                           interpolation_type="linear"))},
    "sdxl": {"pipeline": "StableDiffusionXLPipeline", "unet": _SDXL_UNET, "vae": _SDXL_VAE,
             "text_encoder": _CLIP_L, "text_encoder_2": _CLIP_BIGG,
             "scheduler": ("EulerDiscreteScheduler", dict(_SCHEDULER, timestep_spacing="leading",
                                                          interpolation_type="linear"))},
}
# published parameter counts (UNet exact for SD1.5 and SDXL)
PUBLISHED_UNET = {"sd15": 859_520_964, "ssd1b": 1.3e9, "sdxl": 2_567_463_684}


def _check_shape(shape: str):
    if shape not in CONFIGS:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build modules directly in ``dtype`` (an SDXL UNet in fp32 would need 10 GB first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_component(shape: str, name: str, tokenizer=None, device: str = "cpu",
                    dtype: torch.dtype = torch.float32):
    """One random module of a full-size pipeline: ``name`` in unet, vae, text_encoder,
    text_encoder_2. ``device="meta"`` allocates nothing (parameter counting, planning)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _check_shape(shape)
    cfg = CONFIGS[shape]
    if name not in cfg or name in ("pipeline", "scheduler"):
        raise ValueError(f"{shape} has no module {name!r}")
    with torch.device(device), _default_dtype(dtype):
        if name == "unet":
            return UNet2DConditionModel(**cfg["unet"])
        if name == "vae":
            return AutoencoderKL(**cfg["vae"])
        ids = {}
        if tokenizer is not None:  # pooled output reads the eos position of our tokenizer
            ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        text_cfg = CLIPTextConfig(**cfg[name], **ids)
        cls = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
        return cls(text_cfg)


def parameter_counts(shape: str) -> dict[str, int]:
    """Parameters per module of the full-size ``shape``, counted on the meta device."""
    _check_shape(shape)
    return {k: sum(p.numel() for p in build_component(shape, k, device="meta").parameters())
            for k in ("unet", "vae", "text_encoder", "text_encoder_2") if k in CONFIGS[shape]}


def random_pipeline(shape: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A full-size ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` in memory, random
    weights in ``dtype`` (SD1.5 fp32: 4.3 GB; SDXL fp32: 14 GB)."""
    import diffusers

    from .tiny import tiny_tokenizer

    _check_shape(shape)
    cfg = CONFIGS[shape]
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    sched_cls, sched_kw = cfg["scheduler"]
    parts = dict(unet=build_component(shape, "unet", dtype=dtype),
                 vae=build_component(shape, "vae", dtype=dtype),
                 text_encoder=build_component(shape, "text_encoder", tok, dtype=dtype),
                 tokenizer=tok, scheduler=getattr(diffusers, sched_cls)(**sched_kw))
    pipe_cls = getattr(diffusers, cfg["pipeline"])
    if "text_encoder_2" not in cfg:
        return pipe_cls(**parts, safety_checker=None, feature_extractor=None,
                        requires_safety_checker=False)
    return pipe_cls(**parts, text_encoder_2=build_component(shape, "text_encoder_2", tok,
                                                            dtype=dtype),
                    tokenizer_2=tiny_tokenizer(), force_zeros_for_empty_prompt=True,
                    add_watermarker=False)


def check_out(folder: str, param: str = "out") -> list[str]:
    """``folder`` can take a new pipeline: a new or empty folder, or one holding a pipeline
    (returns the names it holds: the components listed in its model_index.json and that file,
    which ``clear_pipeline`` removes). A file, or a non-empty folder without a pipeline (someone's
    other files), is refused."""
    import json

    check_out_dir(param, folder)
    if not os.path.isdir(folder) or not os.listdir(folder):
        return []
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        fail(param, folder, "a new or empty folder, or one holding a pipeline (it is replaced)",
             f"it holds other files ({', '.join(sorted(os.listdir(folder))[:5])}) and no "
             "model_index.json")
    with open(index, encoding="utf-8") as f:
        listed = [k for k, v in json.load(f).items() if not k.startswith("_") and
                  isinstance(v, list)]
    return ["model_index.json"] + [k for k in listed if os.path.isdir(os.path.join(folder, k))]


def clear_pipeline(folder: str, names: list[str]) -> None:
    """Remove an earlier pipeline's components (``check_out``'s names) from ``folder``, so none
    of them (e.g. SDXL's ``text_encoder_2/``) is left beside the new pipeline's."""
    import shutil

    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def make_random_pipeline(folder: str | os.PathLike, shape: str = "sd15", seed: int = 0,
                         dtype: str | torch.dtype = "fp32") -> str:
    """Write a full-size random pipeline of ``shape`` into ``folder`` (safetensors) and return
    the folder. ``dtype`` "bf16" / "fp16" halves the disk and memory (SDXL: 7 GB instead of 14).
    A pipeline already in ``folder`` is replaced as a whole: its components are removed (after
    the new pipeline is built, before it is written), so no stale one stays beside the new."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {tuple(DTYPES)}")
        dtype = DTYPES[dtype]
    folder = os.fspath(folder)
    old = check_out(folder, "folder")
    pipe = random_pipeline(shape, seed, dtype)
    if old:
        print(f"replacing the pipeline in {folder} (removing {', '.join(old)})", flush=True)
        clear_pipeline(folder, old)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, choices=SHAPES)
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                   help="weights dtype on disk (fp32: what a student is initialised from)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    check_out(a.out, "--out")  # before anything is built
    check_int("--seed", a.seed, 0)
    counts = parameter_counts(a.shape)
    print(f"{a.shape}: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()),
          flush=True)
    out = make_random_pipeline(a.out, a.shape, a.seed, a.dtype)
    print(f"wrote {out}")
    return out


__all__ = ["CONFIGS", "PUBLISHED_UNET", "SHAPES", "build_component", "check_out",
           "clear_pipeline", "make_random_pipeline", "parameter_counts", "random_pipeline"]

if __name__ == "__main__":
    raise SystemExit(cli_exit(main, "python -m ddil_lab.sd.random_pipeline"))
