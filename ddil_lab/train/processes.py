"""Several processes and the per-process state of a run (used by ``ddil_lab.train.loop``).

``Processes`` is what the loop needs from accelerate: rank, world size and a few collectives
(gradient averaging in buckets, broadcasts, gathering per-process state for a checkpoint). The
rest saves and restores what each process owns: every RNG stream, the aggregation buffer and
the NFE counters, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from ..rollout import States, StateSampler
from ..validation import ConfigError
from .checkpoint import flatten_state, map_tensors, unflatten_state, unshare
from .fsdp import settings_from


# ---------------------------------------------------------------------------------------------
# several processes
# ---------------------------------------------------------------------------------------------
def plan_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s shared plan (the same on every process; nothing to save)."""
    return (seed * 1_000_003 + step + 1) % (2 ** 63)


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of process ``rank`` > 0 (process 0 keeps the stream seeded by ``seed``,
    so a one-process run is the same as a run without accelerate)."""
    return (seed + 0x9E3779B97F4A7C15 * rank) % (2 ** 63)


class Processes:
    """What the loop needs from accelerate: rank, number of processes and a few collectives over
    the process group ``accelerate launch`` set up. Without an accelerator (or with one process)
    every collective is a no-op."""

    def __init__(self, accelerator=None):
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")
        self.is_main = self.rank == 0
        self.fsdp = None  # FSDPSettings when the modules are sharded
        if self.world > 1:
            kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
            if kind in ("DEEPSPEED", "MEGATRON_LM", "XLA"):
                raise ConfigError(f"accelerate distributed_type={kind} is not supported by "
                                 "distill; allowed: MULTI_GPU / MULTI_CPU (data-parallel, "
                                 "experiments/configs/accelerate_ddp.yaml) or FSDP "
                                 "(experiments/configs/accelerate_fsdp.yaml); see docs/robust.md")
            self.fsdp = settings_from(accelerator)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
            dist.all_reduce(t, op=ops[op])
        return t

    def adamw(self, params: list, lr: float, weight_decay: float, shard: bool = False,
              cls=None):
        """AdamW (or ``cls``) over ``params``; with ``shard`` and several processes, ZeRO-1: each
        process keeps the moments of its share of the parameters and broadcasts its updates."""
        cls = cls or torch.optim.AdamW
        if shard and self.world > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            return ZeroRedundancyOptimizer(params, optimizer_class=cls, lr=lr,
                                           weight_decay=weight_decay)
        return cls(params, lr=lr, weight_decay=weight_decay)

    def consolidate(self, optimizers):
        """Collect sharded optimizer states on process 0 (before it writes a checkpoint)."""
        for o in optimizers:
            if hasattr(o, "consolidate_state_dict"):
                o.consolidate_state_dict(to=0)

    def average_gradients(self, params: list) -> list:
        """Average the gradients of ``params`` over processes (in place); return the parameters
        that have a gradient on any process (a missing one counts as zero). Sharded (FSDP)
        parameters arrive averaged: their backward reduce-scatters the gradients."""
        if self.world == 1 or self.fsdp is not None:
            return [p for p in params if p.grad is not None]
        import torch.distributed as dist
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                           device=self.device)
        live = [p for p, h in zip(params, self.all_reduce(has, "max").tolist()) if h]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in live]):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= self.world
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
        return live

    def mean_logs(self, logs: dict) -> dict:
        """The numbers a method logged, averaged over processes (each saw its share)."""
        keys = [k for k, v in logs.items() if isinstance(v, (int, float))]
        if self.world == 1 or not keys:
            return logs
        t = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=self.device)
        return {**logs, **dict(zip(keys, (self.all_reduce(t) / self.world).tolist()))}

    def same_everywhere(self, value: int) -> bool:
        """Whether every process holds the same int."""
        if self.world == 1:
            return True
        t = self.all_reduce(torch.tensor([value, -value], device=self.device), "max")
        return int(t[0]) == value == -int(t[1])

    def broadcast_modules(self, modules: dict):
        """Make every process start from process 0's weights (as DDP does)."""
        if self.world == 1:
            return
        import torch.distributed as dist
        with torch.no_grad():
            for m in modules.values():
                for t in list(m.parameters()) + list(m.buffers()):
                    dist.broadcast(t.data, src=0)

    def gather_states(self, state: dict) -> list[dict] | None:
        """Every process's ``state`` (nested tensors / plain values) on process 0, None elsewhere.
        Sent as safetensors bytes with a JSON skeleton: nothing is pickled."""
        if self.world == 1:
            return [state]
        import torch.distributed as dist
        from safetensors.torch import load as st_load
        from safetensors.torch import save as st_save
        tensors: dict = {}
        skeleton = flatten_state("r", state, tensors)
        head = json.dumps(skeleton).encode()
        blob = len(head).to_bytes(8, "little") + head + st_save(unshare(tensors))
        size = torch.tensor([len(blob)], dtype=torch.long, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        n = int(max(sizes))
        buf = torch.zeros(n, dtype=torch.uint8)
        buf[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        buf = buf.to(self.device)
        bufs = [torch.empty_like(buf) for _ in range(self.world)] if self.is_main else None
        dist.gather(buf, bufs, dst=0)
        if not self.is_main:
            return None
        states = []
        for b, s in zip(bufs, sizes):
            raw = bytes(b[:int(s)].cpu().numpy())
            k = int.from_bytes(raw[:8], "little")
            states.append(unflatten_state(json.loads(raw[8:8 + k]), st_load(raw[8 + k:])))
        return states

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()


def _buckets(grads: list, max_numel: int = 2 ** 25) -> list[list]:
    """Group gradients by dtype/device into buckets of at most ~max_numel elements."""
    out, cur, n = [], [], 0
    for g in grads:
        if cur and (n + g.numel() > max_numel or g.dtype != cur[0].dtype
                    or g.device != cur[0].device):
            out.append(cur)
            cur, n = [], 0
        cur.append(g)
        n += g.numel()
    return out + ([cur] if cur else [])


# ---------------------------------------------------------------------------------------------
# per-process state: RNG streams, aggregation buffer, NFE counters
# ---------------------------------------------------------------------------------------------
def _states_to_state(states: States) -> dict:
    return {"x_t": states.x_t, "t": states.t, "cond": states.cond, "source": states.source}


def rng_state() -> dict:
    """Every random stream a run draws from: torch (CPU and CUDA), Python's and NumPy's."""
    version, mt, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64),
                       "gauss": gauss},
            "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)}}


def set_rng_state(st: dict) -> None:
    """Restore the streams saved by ``rng_state``."""
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    py = st["python"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    nps = st["numpy"]
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"],
                         nps["has_gauss"], nps["gauss"]))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and NumPy's global stream."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


def process_state(sampler: StateSampler, method) -> dict:
    return {"rng": rng_state(), "nfe": dict(sampler.nfe), "method_nfe": dict(method.nfe),
            "buffer": {k: _states_to_state(v) for k, v in sampler.buffer.items()}}


def load_process_state(sampler: StateSampler, method, st: dict, device) -> None:
    """Restore the buffer (onto ``device``, where the run keeps its states), NFE counters (the
    sampler's and the method's) and every RNG stream of this process."""
    sampler.buffer = {k: States(**map_tensors(v, lambda t: t.to(device)))
                      for k, v in st["buffer"].items()}
    sampler.nfe.update(st["nfe"])
    method.nfe.update(st["method_nfe"])
    set_rng_state(st["rng"])
