"""One calling convention for every model: ``denoiser(x_t, t, cond=None) -> x0_hat``.

A network predicts whatever it was trained to predict (eps for SD1.5, v for SD2 or a PD
student, x0 for a toy MLP); a small wrapper converts it to x0, the common currency in which
the PD target, the consistency function, DMD2's scores and thresholding are written.
Conversions run in float32 even when the network runs in bf16/fp16: at t = 999, alpha is
about 0.07 and x0 from eps divides by it.

Networks wrapped here are called as ``net(x_t, t, cond)`` with t an integer tensor (B,).
Guidance is a wrapper too (``CFG``), never a flag inside a model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .diffusion import Schedule
from .validation import ConfigError


class _Param(nn.Module):
    """Base: holds the network and the schedule used for the conversion. ``convert(x_t, t,
    out)`` turns the network's raw output into x0 (a batched ensemble runs the networks of
    many members at once and converts their outputs in one call)."""

    def __init__(self, net: nn.Module, schedule: Schedule):
        super().__init__()
        self.net, self.schedule = net, schedule

    def raw(self, x_t, t, cond=None) -> torch.Tensor:
        return self.net(x_t, t, cond).float()

    def forward(self, x_t, t, cond=None):
        return self.convert(x_t, t, self.raw(x_t, t, cond))


class PredX0(_Param):
    """The network predicts x0 directly."""

    def convert(self, x_t, t, out):
        return out.float()


class PredEps(_Param):
    """The network predicts eps: x0 = (x_t - sigma eps) / alpha."""

    def convert(self, x_t, t, out):
        return self.schedule.x0_from_eps(x_t.float(), t, out.float())


class PredV(_Param):
    """The network predicts v = alpha eps - sigma x0: x0 = alpha x_t - sigma v."""

    def convert(self, x_t, t, out):
        return self.schedule.x0_from_v(x_t.float(), t, out.float())


PARAMETERISATIONS = {"x0": PredX0, "eps": PredEps, "v": PredV}


def wrap(net: nn.Module, schedule: Schedule, prediction: str) -> nn.Module:
    """Wrap a network by what it predicts ("x0", "eps" or "v")."""
    if prediction not in PARAMETERISATIONS:
        raise ConfigError(f"prediction={prediction!r} is not one of {tuple(PARAMETERISATIONS)}")
    return PARAMETERISATIONS[prediction](net, schedule)


class CFG(nn.Module):
    """Classifier-free guidance around a conditional denoiser.

    x0_w = x0_u + w (x0_c - x0_u). x0 is affine in eps for a fixed x_t, so this equals the usual
    eps-space guidance eps_u + w (eps_c - eps_u). ``uncond(cond)`` builds the unconditional
    input (default: None). ``w`` is a float, or None to read a per-sample scale from
    ``cond["w"]`` (guidance-conditioned students are taught at w ~ U[w_min, w_max]).
    """

    def __init__(self, denoiser: nn.Module, w: float | None,
                 uncond: Callable = lambda cond: None):
        super().__init__()
        self.denoiser, self.w, self.uncond = denoiser, w, uncond

    def forward(self, x_t, t, cond=None):
        w = self.w if self.w is not None else cond["w"]
        if cond is None or (isinstance(w, (int, float)) and w == 1.0):
            return self.denoiser(x_t, t, cond)
        x0_c = self.denoiser(x_t, t, cond)
        x0_u = self.denoiser(x_t, t, self.uncond(cond))
        if torch.is_tensor(w):
            w = w.reshape(w.shape + (1,) * (x_t.ndim - w.ndim)).float()
        return x0_u + w * (x0_c - x0_u)


def cat_cond(a, b):
    """Two conditionings (None, tensors, or dicts of them) stacked along the batch; non-batch
    entries (scalars, None) are taken from ``a``."""
    if isinstance(a, dict):
        return {k: cat_cond(v, b[k]) for k, v in a.items()}
    if torch.is_tensor(a) and a.ndim and torch.is_tensor(b):
        return torch.cat([a, b])
    return a


class BatchedCFG(CFG):
    """``CFG`` with the conditional and unconditional halves in one network call, as diffusers'
    pipelines do it: the same x0_u + w (x0_c - x0_u), half the calls. ``uncond(cond)`` must
    return a conditioning of the same structure as ``cond`` (e.g. labels -1 for "no class", an
    empty prompt's embedding); a None conditioning is called unguided."""

    def forward(self, x_t, t, cond=None):
        w = self.w if self.w is not None else cond["w"]
        if cond is None or (isinstance(w, (int, float)) and w == 1.0):
            return self.denoiser(x_t, t, cond)
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).expand(B)
        both = cat_cond(self.uncond(cond), cond)
        x0_u, x0_c = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        if torch.is_tensor(w):
            w = w.reshape(w.shape + (1,) * (x_t.ndim - w.ndim)).float()
        return x0_u + w * (x0_c - x0_u)


def no_class(cond):
    """The unconditional input of a class-label conditioning: label -1 everywhere."""
    return torch.full_like(cond, -1)
