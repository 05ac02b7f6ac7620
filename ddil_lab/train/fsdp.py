"""Fully sharded students (FSDP2: torch's ``fully_shard``) for ``distill`` under accelerate.

Data-parallel training (the default) keeps a full copy of the student, its gradients and its
AdamW moments on every process: 16 bytes a parameter, about 42 GB for an SDXL UNet before any
activation. With an accelerate config that asks for FSDP (``distributed_type: FSDP``,
``fsdp_version: 2``, see ``experiments/configs/accelerate_fsdp.yaml``) ``distill`` shards every
module it trains or keeps (student, DMD2 critic and GAN head, LCM target, the EMA copy): each
process holds 1/N of their parameters, gradients and optimizer state, gathers a module's
parameters when it is called and reduce-scatters the gradients after backward.

Each call of a sharded module is a collective, so every process must call it the same number of
times in the same order. ``distill`` therefore draws the batch's structure (states per source,
rollout grid, which samples the student moves in a mixed step) from a plan shared by all
processes (``StateSampler.sample(plan=...)``); noise and data stay per process.

accelerate itself only turns FSDP on for GPUs; the settings are read from what ``accelerate
launch`` exports (``ACCELERATE_USE_FSDP``, ``FSDP_*``), so the same config file also shards on
CPU processes (gloo), which is how the tests run it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..validation import ConfigError
from .checkpoint import map_tensors

WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")


@dataclass
class FSDPSettings:
    """How modules are sharded.

    :param reshard_after_forward: free the gathered parameters after each call (ZeRO-3; less
        memory) or keep them until backward (ZeRO-2 style; fewer all-gathers).
    :param wrap_classes: class names that become their own FSDP unit (gathered one at a time),
        e.g. ``("BasicTransformerBlock", "ResnetBlock2D")`` for a diffusers UNet.
    :param min_num_params: with no ``wrap_classes``: submodules holding at least this many not
        yet wrapped parameters become units (0: only the whole module is one unit).
    """
    reshard_after_forward: bool = True
    wrap_classes: tuple[str, ...] = ()
    min_num_params: int = 0


def _flag(value: str) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "full_shard")


def settings_from(accelerator) -> FSDPSettings | None:
    """The FSDP settings of an accelerate run, or None when it does not ask for FSDP."""
    if accelerator is None:
        return None
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    env = os.environ.get
    if kind != "FSDP" and not _flag(env("ACCELERATE_USE_FSDP", "false")):
        return None
    plugin = getattr(accelerator.state, "fsdp_plugin", None) if kind == "FSDP" else None

    def setting(env_name, attr, default):
        if env_name in os.environ:
            return env(env_name)
        return getattr(plugin, attr, default) if plugin is not None else default

    version = int(setting("FSDP_VERSION", "fsdp_version", 1) or 1)
    if version != 2:
        raise ConfigError(f"fsdp_version={version} is not allowed: distill shards with FSDP2 "
                         "(torch fully_shard); allowed: fsdp_version: 2 in the accelerate config "
                         "(see experiments/configs/accelerate_fsdp.yaml)")
    for env_name, what in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                           ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing")):
        if _flag(env(env_name, "false")):
            raise ConfigError(f"{what}=true is not supported by distill; allowed: false "
                             "(for activation memory use the backend's gradient checkpointing)")
    policy = str(env("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")).upper()
    if policy not in WRAP_POLICIES:
        raise ConfigError(f"fsdp_auto_wrap_policy={policy!r} is not allowed; allowed: "
                         f"{WRAP_POLICIES}")
    classes = setting("FSDP_TRANSFORMER_CLS_TO_WRAP", "transformer_cls_names_to_wrap", ()) or ()
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    min_params = int(setting("FSDP_MIN_NUM_PARAMS", "min_num_params", 0) or 0)
    return FSDPSettings(
        reshard_after_forward=_flag(setting("FSDP_RESHARD_AFTER_FORWARD",
                                            "reshard_after_forward", True)),
        wrap_classes=tuple(classes) if policy == "TRANSFORMER_BASED_WRAP" else (),
        min_num_params=min_params if policy == "SIZE_BASED_WRAP" else 0)


# ---- tensors ----
def _dtensor():
    from torch.distributed.tensor import DTensor
    return DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor; any other tensor as it is."""
    return t.to_local() if isinstance(t, _dtensor()) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a sharded one: every process must call it)."""
    return t.full_tensor() if isinstance(t, _dtensor()) else t


def full_state(obj):
    """A nested state (dicts / lists / tensors) with every sharded tensor gathered to the CPU,
    in a fixed order (collective)."""
    return map_tensors(obj, lambda t: t.full_tensor().cpu() if isinstance(t, _dtensor()) else t)


def like(value: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a checkpoint, laid out like ``live`` (this process's shard of it if
    ``live`` is sharded; no communication: every process read the same file)."""
    if not isinstance(live, _dtensor()):
        return value
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(value.to(live.device), live.device_mesh, live.placements,
                             src_data_rank=None)


def load_module(module: nn.Module, state: dict) -> None:
    """``module.load_state_dict(state)`` for a plain or sharded module."""
    live = module.state_dict()
    module.load_state_dict({k: like(v, live[k]) if k in live and torch.is_tensor(v) else v
                            for k, v in state.items()})


def load_optimizer(opt, state: dict) -> None:
    """``opt.load_state_dict(state)``; moments of sharded parameters become shards."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if any(isinstance(p, _dtensor()) for p in params):
        state = dict(state, state={
            k: {n: like(v, params[int(k)]) if torch.is_tensor(v) and v.shape == params[int(k)].shape
                else v for n, v in s.items()}
            for k, s in state["state"].items()})
    opt.load_state_dict(state)


# ---- modules ----
def _units(root: nn.Module, s: FSDPSettings) -> list[nn.Module]:
    """Submodules that become their own FSDP unit, children before parents: the classes named in
    the settings (or, by size, ``min_num_params``), and every module with a ``features`` method
    (called directly by DMD2's GAN head, so it must gather its own parameters)."""
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> int:  # parameters below m not yet in a unit
        n = sum(p.numel() for p in m.parameters(recurse=False))
        for c in m.children():
            n += visit(c)
        wrap = m is not root and n > 0 and (
            type(m).__name__ in s.wrap_classes or callable(getattr(m, "features", None))
            or (not s.wrap_classes and s.min_num_params > 0 and n >= s.min_num_params))
        if wrap:
            out.append(m)
            return 0
        return n

    visit(root)
    return out


def shard(module: nn.Module, s: FSDPSettings) -> None:
    """Shard ``module`` in place over the default process group."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    units = _units(module, s)
    for m in units + [module]:
        fully_shard(m, reshard_after_forward=s.reshard_after_forward)
    for m in units + [module]:
        if callable(getattr(m, "features", None)):
            register_fsdp_forward_method(m, "features")


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are on the meta device (no memory and
    no copy of the weights, which may fill a GPU)."""
    memo: dict = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


class Sharded:
    """Modules sharded for training, each with a parameter-free template of its plain self, so
    that ``unshard`` can hand back ordinary modules (for sampling, export, ``result.student``)."""

    def __init__(self, modules, s: FSDPSettings):
        self.pairs: list[tuple[nn.Module, nn.Module]] = []
        seen: set[int] = set()
        for m in modules:
            for part in (m.values() if isinstance(m, nn.ModuleDict) else [m]):
                if id(part) in seen:
                    continue
                seen.add(id(part))
                template = _meta_copy(part)
                shard(part, s)
                self.pairs.append((part, template))

    @torch.no_grad()
    def unshard(self) -> dict[int, nn.Module]:
        """{id(sharded module): an ordinary module with the gathered weights} (collective)."""
        out = {}
        for m, template in self.pairs:
            device = next(iter(local(p) for p in m.parameters())).device
            plain = template.to_empty(device=device)
            for name, p in m.named_parameters():
                plain.get_parameter(name).copy_(full(p))
            for name, b in m.named_buffers():
                plain.get_buffer(name).copy_(b)
            for a, b in zip(plain.modules(), m.modules()):
                a.training = b.training
            out[id(m)] = plain
        return out


def swap_modules(obj, plain: dict[int, nn.Module]) -> None:
    """Point ``obj``'s attributes that hold a sharded module at its plain copy."""
    for k, v in list(vars(obj).items()):
        if id(v) in plain:
            setattr(obj, k, plain[id(v)])
