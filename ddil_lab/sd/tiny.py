"""Tiny random Stable Diffusion pipelines, built offline, for tests and the ``model_id="tiny"``
notebooks.

``make_tiny_pipeline(folder, kind)`` writes a complete diffusers pipeline folder (UNet, VAE, CLIP
text encoder(s), tokenizer(s), scheduler, ``model_index.json``) with random weights, in the same
layout as ``runwayml/stable-diffusion-v1-5`` ("sd15") or ``segmind/SSD-1B`` / SDXL ("sdxl"), so
that everything downstream runs through the real ``from_pretrained`` code paths. Shapes are tiny
(8x8x4 latents, 16x16 images, width-32 text encoders): a forward pass takes milliseconds.

The tokenizer is a byte-level CLIP BPE without merges, built here from the 256 byte symbols
(each also with the end-of-word suffix ``</w>``) and the two special tokens: it encodes any text,
one token per byte, and needs no download.
"""

from __future__ import annotations

import os

import torch

KINDS = ("sd15", "sdxl")
LATENT, TEXT_WIDTH, MAX_LEN = 8, 32, 77  # latent side, text encoder width, tokens per prompt


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode symbol table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_tokenizer(max_length: int = MAX_LEN):
    """A byte-level ``CLIPTokenizer`` with 514 tokens and no merges (no download)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    symbols = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(symbols)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _text_config(tok, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kw = dict(projection_dim=projection_dim) if projection_dim else {}
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=TEXT_WIDTH, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2,
                          max_position_embeddings=MAX_LEN,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **kw)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         sample_size=2 * LATENT)


def _unet(kind: str):
    from diffusers import UNet2DConditionModel

    kw = dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
              block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=(2, 4),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    if kind == "sd15":
        return UNet2DConditionModel(cross_attention_dim=TEXT_WIDTH, **kw)
    # SDXL: cross-attention over both encoders' hidden states (concatenated), plus the pooled
    # embedding of encoder 2 and six size/crop "time ids", each embedded in 8 dims.
    return UNet2DConditionModel(cross_attention_dim=2 * TEXT_WIDTH, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,
                                transformer_layers_per_block=(1, 2), **kw)


def _scheduler(kind: str):
    """The scheduler each real checkpoint ships (SD1.5: PNDM; SDXL / SSD-1B: Euler)."""
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", steps_offset=1)
    if kind == "sd15":
        return PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)
    return EulerDiscreteScheduler(timestep_spacing="leading", **common)


def tiny_pipeline(kind: str = "sd15", seed: int = 0):
    """Build (in memory) a tiny random ``StableDiffusionPipeline`` ("sd15") or
    ``StableDiffusionXLPipeline`` ("sdxl")."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    parts = dict(unet=_unet(kind), vae=_vae(), scheduler=_scheduler(kind), tokenizer=tok,
                 text_encoder=CLIPTextModel(_text_config(tok)))
    if kind == "sd15":
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    encoder_2 = CLIPTextModelWithProjection(_text_config(tok, projection_dim=TEXT_WIDTH))
    return StableDiffusionXLPipeline(**parts, text_encoder_2=encoder_2,
                                     tokenizer_2=tiny_tokenizer(),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def make_tiny_pipeline(folder: str | os.PathLike, kind: str = "sd15", seed: int = 0) -> str:
    """Write a tiny random SD1.5-shaped ("sd15") or SDXL / SSD-1B-shaped ("sdxl") diffusers
    pipeline into ``folder`` with ``save_pretrained`` and return the folder (as a str).

    Load it back like a real checkpoint: ``DiffusionPipeline.from_pretrained(folder)`` or
    ``SDBackend(folder)``. The same seed always gives the same weights.
    """
    folder = os.fspath(folder)
    tiny_pipeline(kind, seed).save_pretrained(folder, safe_serialization=True)
    return folder
