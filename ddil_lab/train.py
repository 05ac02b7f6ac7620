"""The one train loop: ``distill(backend, method, sampler, steps, ...)``.

It owns what neither the Method nor the StateSampler should: optimizers, the warmup + decay
schedule, gradient clipping, the EMA of the student, checkpoints (safetensors + JSON, resumable
bit for bit on CPU), the progress bar, the loss history split by state source, and evaluation
callbacks. Each step:

    states = sampler.sample(backend, spec, student, batch_size, step)    # no grad
    for group, loss, logs in method.losses(states):                        # e.g. 10x critic, 1x student
        optimizer[group] <- grad of loss.mean()
    method.after_step(); ema.update(student)
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .distill.base import Method
from .rollout import SOURCES, States, StateSampler

LR_SCHEDULES = ("constant", "linear", "cosine")


class NonFiniteError(FloatingPointError):
    """A loss or gradient went non-finite; the message says where."""


class EMA:
    """Exponential moving average of a module's parameters (a frozen copy)."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in [0, 1)")
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module):
        for p_e, p in zip(self.module.parameters(), module.parameters()):
            p_e.lerp_(p.detach(), 1.0 - self.decay)


def lr_lambda(kind: str, warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then constant / linear decay / cosine decay to 0."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={kind!r} is not one of {LR_SCHEDULES}")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        frac = (step - warmup) / max(1, steps - warmup)
        return 1.0 - frac if kind == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return f


@dataclass
class DistillResult:
    method: Method
    sampler: StateSampler
    history: list = field(default_factory=list)
    ema: EMA | None = None
    out_dir: str | None = None
    wall_time: float = 0.0

    @property
    def student(self) -> nn.Module:
        """The EMA student if EMA is on, else the raw student."""
        return self.ema.module if self.ema is not None else self.method.student

    def losses(self, key: str = "loss/student") -> list[float]:
        return [h[key] for h in self.history if key in h]


def _states_to_state(states: States) -> dict:
    return {"x_t": states.x_t, "t": states.t, "cond": states.cond, "source": states.source}


def distill(backend, method: Method, sampler: StateSampler | None = None, steps: int = 1000,
            batch_size: int = 256, lr: float = 1e-4, critic_lr: float | None = None,
            weight_decay: float = 0.0, warmup: int = 0, lr_schedule: str = "constant",
            grad_clip: float | None = 1.0, ema_decay: float | None = None, seed: int = 0,
            out_dir: str | None = None, ckpt_every: int = 0, resume: bool = False,
            on_nonfinite: str = "raise", callbacks: tuple = (), eval_every: int = 0,
            progress: bool = True, log_every: int = 1) -> DistillResult:
    """Distil ``backend.teacher`` into a student with ``method``, on states from ``sampler``.

    :param sampler: where states come from; None = forward diffusion only (no DDIL).
    :param steps: training steps (one student update each; DMD2 adds critic updates).
    :param lr, critic_lr: AdamW learning rates of the student and of any critic group.
    :param warmup, lr_schedule: linear warmup steps, then "constant", "linear" or "cosine".
    :param ema_decay: EMA of the student (None: off; ``result.student`` is then the raw one).
    :param out_dir: where checkpoints go; ``ckpt_every`` > 0 writes one every k steps and at the
        end; ``resume=True`` continues from the latest checkpoint in out_dir.
    :param on_nonfinite: "raise" (stop, keep the last good checkpoint) or "skip" (skip the
        update, count it in the history).
    :param callbacks: functions ``f(step, result)`` called every ``eval_every`` steps.
    """
    from tqdm.auto import tqdm

    sampler = sampler or StateSampler()
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive int")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite={on_nonfinite!r} is not one of ('raise', 'skip')")
    if (ckpt_every or resume) and not out_dir:
        raise ValueError("ckpt_every / resume need out_dir (a folder for checkpoints)")
    sampler.check_backend(backend)

    torch.manual_seed(seed)
    method.setup(backend)
    spec = method.spec()
    groups = method.trainable()
    opts = {g: torch.optim.AdamW(m.parameters(), lr=(critic_lr or lr) if g != "student" else lr,
                                 weight_decay=weight_decay)
            for g, m in groups.items()}
    scheds = {g: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(lr_schedule, warmup, steps))
              for g, o in opts.items()}
    result = DistillResult(method, sampler, out_dir=out_dir)
    result.ema = EMA(method.student, ema_decay) if ema_decay else None
    config = {"method": method.name, "method_config": method.config(), "steps": steps,
              "batch_size": batch_size, "lr": lr, "critic_lr": critic_lr, "seed": seed,
              "priors": sampler.priors, "ema_decay": ema_decay}

    def state() -> dict:
        st = {"modules": {k: m.state_dict() for k, m in method.modules().items()},
              "opt": {g: o.state_dict() for g, o in opts.items()},
              "rng": torch.get_rng_state(),
              "buffer": {k: _states_to_state(v) for k, v in sampler.buffer.items()}}
        if result.ema is not None:
            st["ema"] = result.ema.module.state_dict()
        return st

    start = 0
    ckpt = latest_checkpoint(out_dir) if (resume and out_dir) else None
    if ckpt is not None:
        st, meta = load_checkpoint(ckpt)
        for k, m in method.modules().items():
            m.load_state_dict(st["modules"][k])
        for g, o in opts.items():
            o.load_state_dict(st["opt"][g])
        for s in scheds.values():
            s.last_epoch = meta["step"] - 1
            s.step()
        if result.ema is not None:
            result.ema.module.load_state_dict(st["ema"])
        sampler.buffer = {k: States(**v) for k, v in st["buffer"].items()}
        sampler.nfe.update(meta.get("nfe", {}))
        torch.set_rng_state(st["rng"])
        result.history = meta["history"]
        start = meta["step"]

    def checkpoint(step):
        save_checkpoint(out_dir, step, state(), {"config": config, "history": result.history,
                                                 "nfe": dict(sampler.nfe)})

    bar = tqdm(range(start, steps), desc=f"{method.name}{'+ddil' if sampler.is_ddil else ''}",
               disable=not progress, initial=start, total=steps)
    t0 = time.time()
    for step in bar:
        states = sampler.sample(backend, spec, method.student, batch_size, step)
        rec: dict = {"step": step + 1}
        for group, loss, logs in method.losses(states):
            if not torch.isfinite(loss).all():
                bad = sorted({SOURCES[int(s)] for s in states.source[~torch.isfinite(loss)]})
                msg = (f"non-finite {group} loss at step {step + 1} of {method.name} "
                       f"(state sources: {', '.join(bad)})")
                if on_nonfinite == "raise":
                    raise NonFiniteError(msg + "; the last good checkpoint is kept")
                rec["skipped"] = rec.get("skipped", 0) + 1
                continue
            opts[group].zero_grad(set_to_none=True)
            loss.mean().backward()
            params = [p for p in groups[group].parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
            if not torch.isfinite(norm):
                msg = f"non-finite {group} gradient at step {step + 1} of {method.name}"
                if on_nonfinite == "raise":
                    raise NonFiniteError(msg + "; the last good checkpoint is kept")
                rec["skipped"] = rec.get("skipped", 0) + 1
                continue
            opts[group].step()
            rec[f"loss/{group}"] = float(loss.detach().mean())
            if group == "student":
                for i, src in enumerate(SOURCES):
                    m = states.source == i
                    if m.any():
                        rec[f"source/{src}"] = float(loss.detach()[m].mean())
            rec.update({f"{group}/{k}": v for k, v in logs.items()})
        for s in scheds.values():
            s.step()
        method.after_step()
        if result.ema is not None:
            result.ema.update(method.student)
        rec["lr"] = scheds["student"].get_last_lr()[0]
        rec["nfe/teacher"], rec["nfe/student"] = sampler.nfe["teacher"], sampler.nfe["student"]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            result.history.append(rec)
        if "loss/student" in rec:
            bar.set_postfix(loss=f"{rec['loss/student']:.4g}")
        if ckpt_every and ((step + 1) % ckpt_every == 0 or step + 1 == steps):
            checkpoint(step + 1)
        if eval_every and (step + 1) % eval_every == 0:
            for cb in callbacks:
                cb(step + 1, result)
    result.wall_time = time.time() - t0
    return result


def progressive(backend, start: int = 32, end: int = 4, steps_per_stage: int | list = 500,
                sampler_factory: Callable[[], StateSampler] | None = None, reflected: bool = False,
                **kw) -> list[DistillResult]:
    """Progressive distillation: halve the steps start -> start/2 -> ... -> end. Stage one's
    teacher is the backend's teacher walking the ``start``-step grid; each later stage's teacher
    is the previous stage's student (DDIM on its own grid), and the new student starts from it."""
    from .distill.pd import PD

    ratio = start // end if end > 0 else 0
    if end < 1 or start <= end or start % end or ratio & (ratio - 1):
        raise ValueError(f"start={start} must be end={end} times a power of two")
    stages = [start >> i for i in range(1, ratio.bit_length())]  # e.g. 16, 8, 4
    budgets = steps_per_stage if isinstance(steps_per_stage, list) else [steps_per_stage] * len(stages)
    if len(budgets) != len(stages):
        raise ValueError(f"steps_per_stage has {len(budgets)} entries for stages {stages}")
    results, teacher = [], None
    for n, steps in zip(stages, budgets):
        view = backend if teacher is None else _StudentInit(backend, teacher)
        method = PD(n_steps=n, substeps=2, reflected=reflected, teacher=teacher)
        res = distill(view, method, sampler_factory() if sampler_factory else None,
                      steps=steps, **kw)
        results.append(res)
        teacher = copy.deepcopy(res.student).eval().requires_grad_(False)
    return results


class _StudentInit:
    """A backend view whose make_student() starts from a given network (progressive stages)."""

    def __init__(self, base, init: nn.Module):
        self.base, self.init = base, init

    def __getattr__(self, name):
        return getattr(self.base, name)

    def make_student(self):
        return copy.deepcopy(self.init).train().requires_grad_(True)
