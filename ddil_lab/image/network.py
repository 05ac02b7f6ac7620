"""The image tier's network: a small ``diffusers.UNet2DModel`` called as ``net(x_t, t, cond)``,
its layouts (``SMALL_NET``, ``DIGITS_NET``, ``CIFAR_NET``, ``TINY_NET``), and the guidance-scale
embedding of guidance-conditioned students (``UNet.add_w_embedding``)."""

from __future__ import annotations

import torch
from torch import nn


# ---------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------
DIGITS_NET = dict(channels=(32, 64, 64), layers_per_block=1, attention=(False, False, False),
                  norm_groups=8, dropout=0.0)
"""About 1.1M parameters; 16x16 -> 8x8 -> 4x4; a usable digits teacher in a few CPU minutes."""

SMALL_NET = dict(channels=(16, 32, 32), layers_per_block=1, attention=(False, False, False),
                 norm_groups=8, dropout=0.0)
"""About 0.27M parameters, 5x faster than ``DIGITS_NET``: the laptop default (notebook 05, the
image table). Trained unconditionally for 600 steps (about 2 min on an idle core) its 32-step
samples are near the data in classifier-feature FID (docs/image.md)."""

TINY_NET = dict(channels=(8, 16), layers_per_block=1, attention=(False, False), norm_groups=4)
"""A few thousand parameters: for quick runs and tests only (not a usable teacher)."""

CIFAR_NET = dict(channels=(128, 256, 256, 256), layers_per_block=2,
                 attention=(False, True, False, False), norm_groups=32, dropout=0.1)
"""The DDPM CIFAR-10 layout (Ho et al. 2020; ~36M parameters), attention at 16x16."""


class UNet(nn.Module):
    """``diffusers.UNet2DModel`` called as ``net(x_t, t, cond)``.

    ``cond`` is None or class labels (B,); with ``num_classes`` > 0 the label embedding has one
    extra learned "null" class used for label -1 and for None (classifier-free guidance).
    The raw output has the shape of x_t and is whatever the network was trained to predict.

    :param channels: output channels of each resolution level (each level but the last halves
        the resolution).
    :param attention: per level, whether it has self-attention blocks.
    """

    # Seed ensembles (``train.ensemble``) run these member by member on their stacked weights:
    # under vmap the mid block's attention has no batching rule on CPU, and a step of 3 members
    # x 32 digits measured 6-9% slower (SMALL_NET 213 vs 201 ms, DIGITS_NET 540 vs 496 ms).
    ensemble_vmap = False

    def __init__(self, sample_size: int, in_channels: int, num_classes: int = 0,
                 channels=(32, 64, 64), layers_per_block: int = 1, attention=None,
                 norm_groups: int = 8, dropout: float = 0.0, w_embed_dim: int = 0):
        from diffusers import UNet2DModel

        super().__init__()
        channels = tuple(int(c) for c in channels)
        attention = tuple(attention) if attention is not None else (False,) * len(channels)
        if len(attention) != len(channels):
            raise ValueError(f"attention={attention} needs one flag per level of "
                             f"channels={channels}")
        if any(c % norm_groups for c in channels):
            raise ValueError(f"every entry of channels={channels} must be divisible by "
                             f"norm_groups={norm_groups}")
        self.config = dict(sample_size=sample_size, in_channels=in_channels,
                           num_classes=num_classes, channels=list(channels),
                           layers_per_block=layers_per_block, attention=list(attention),
                           norm_groups=norm_groups, dropout=dropout)
        self.num_classes = num_classes
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=channels, layers_per_block=layers_per_block,
            down_block_types=down, up_block_types=up, norm_num_groups=norm_groups,
            dropout=dropout, attention_head_dim=min(channels[0], 32),
            num_class_embeds=num_classes + 1 if num_classes else None)
        self.w_embed_dim = 0
        if w_embed_dim:
            self.add_w_embedding(w_embed_dim)

    def add_w_embedding(self, dim: int = 64) -> UNet:
        """Add a guidance-scale input in place (``GuidanceEmbedding``, zero-initialised: outputs
        unchanged until it trains); the network then reads ``cond = {"y": labels, "w": w}``."""
        if not self.num_classes:
            raise ValueError("a w-embedding needs a class-conditional UNet (num_classes > 0)")
        if not self.w_embed_dim:
            self.unet.class_embedding = GuidanceEmbedding(self.unet.class_embedding, dim)
            self.w_embed_dim = self.config["w_embed_dim"] = int(dim)
        return self

    def _labels(self, x_t, cond):
        """The UNet's ``class_labels``: labels (B,), -1 or None -> the null class; with a
        w-embedding, rows (label, w) (B, 2). ``cond`` is None, labels, or {"y": labels, "w": w}."""
        if not self.num_classes:
            return None
        c = cond["y"] if isinstance(cond, dict) else cond
        c = torch.full((x_t.shape[0],), -1, device=x_t.device) if c is None else c
        y = torch.where(c < 0, self.num_classes, c).long()
        if not self.w_embed_dim:
            return y
        if not (isinstance(cond, dict) and "w" in cond):
            raise ValueError("a guidance-conditioned UNet needs cond = {'y': labels, 'w': w}")
        w = torch.as_tensor(cond["w"], device=x_t.device).float().expand(x_t.shape[0])
        return torch.stack([y.float(), w], 1)

    def forward(self, x_t, t, cond=None):
        return self.unet(x_t, t, class_labels=self._labels(x_t, cond)).sample

    def features(self, x_t, t, cond=None) -> torch.Tensor:
        """The mid-block activations (B, C_mid, h, w), e.g. for DMD2's optional GAN head.
        (Runs the whole UNet and keeps the mid block's output.)"""
        out = {}
        hook = self.unet.mid_block.register_forward_hook(lambda m, i, o: out.update(h=o))
        try:
            self.unet(x_t, t, class_labels=self._labels(x_t, cond))
        finally:
            hook.remove()
        return out["h"]


class GuidanceEmbedding(nn.Module):
    """Class embedding plus a guidance-scale embedding, for guidance-conditioned students (the
    paper's PD protocol after Meng et al. 2023; LCM's w-embedding): a zero-initialised linear
    projection of the sinusoidal embedding of (w - 1) (diffusers'
    ``get_guidance_scale_embedding``, as ``sd.guidance_embedding``) is added to the class
    embedding, which UNet2DModel adds to the time embedding. Input: rows (label, w) (B, 2)."""

    def __init__(self, classes: nn.Embedding, dim: int = 64):
        super().__init__()
        self.classes, self.dim = classes, int(dim)
        self.proj = nn.Linear(self.dim, classes.embedding_dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, yw):  # (B, 2) -> (B, time_embed_dim)
        from diffusers.models.embeddings import get_timestep_embedding

        w_emb = get_timestep_embedding((yw[:, 1] - 1.0) * 1000.0, self.dim,
                                       flip_sin_to_cos=False, downscale_freq_shift=1)
        return self.classes(yw[:, 0].long()) + self.proj(w_emb.to(self.proj.weight.dtype))
