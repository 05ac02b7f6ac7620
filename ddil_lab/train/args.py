"""The checks ``distill`` (and ``progressive``, ``TrainConfig``) makes on its arguments before any
work starts: every one raises ``ConfigError`` naming the parameter, its value and what is allowed.
"""

from __future__ import annotations

import torch

from ..methods.base import Method
from ..rollout import StateSampler
from ..validation import (ConfigError, check_bool, check_choice, check_int, check_number,
                          check_out_dir, fail, is_number)

LR_SCHEDULES = ("constant", "linear", "cosine")
ON_NONFINITE = ("raise", "skip")
MAX_SEED = 2 ** 63 - 1  # torch, NumPy (mod 2**32) and our per-process seeds all take it
MAX_LR = 1.0  # Adam-type optimizers move every weight by about lr per step
BACKEND_NEEDS = ("schedule", "teacher", "has_data", "sample_data", "sample_cond",
                 "sample_noise", "make_student")


def check_distill_args(steps: int = 1000, batch_size: int = 256, lr: float = 1e-4,
                       critic_lr: float | None = None, weight_decay: float = 0.0, warmup: int = 0,
                       lr_schedule: str = "constant", grad_clip: float | None = 1.0,
                       ema_decay: float | None = None, seed: int = 0, out_dir: str | None = None,
                       ckpt_every: int = 0, resume: bool = False, on_nonfinite: str = "raise",
                       eval_every: int = 0, log_every: int = 1, keep_checkpoints: int = 2,
                       num_processes: int = 1, shard_optimizer: bool = False,
                       shared_plan: bool | None = None, fsdp: bool = False, progress: bool = True,
                       callbacks=(), max_consecutive_skips: int = 5,
                       max_skips: int | None = None) -> None:
    """Check ``distill``'s settings before any work starts; raise ``ConfigError`` (a
    ``ValueError``) naming the parameter, its value and what is allowed."""
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    check_int("num_processes", num_processes, 1)
    for name, v in (("lr", lr), ("critic_lr", critic_lr)):
        check_number(name, v, 0.0, MAX_LR, lo_open=True, none=name == "critic_lr",
                     why=f"AdamW moves each weight by about lr per step; above {MAX_LR:g} "
                     "training diverges at once" if is_number(v) and v > MAX_LR else "")
    check_number("weight_decay", weight_decay, 0.0)
    check_int("warmup", warmup, 0)
    check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
    check_number("grad_clip", grad_clip, 0.0, lo_open=True, none=True)
    check_number("ema_decay", ema_decay, 0.0, 1.0, lo_open=True, hi_open=True, none=True,
                 why="0 would be an EMA equal to the student; None turns EMA off"
                 if is_number(ema_decay) and ema_decay == 0 else "")
    check_int("seed", seed, 0, MAX_SEED)
    check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
    for name, v in (("ckpt_every", ckpt_every), ("eval_every", eval_every),
                    ("keep_checkpoints", keep_checkpoints)):
        check_int(name, v, 0)
    check_int("log_every", log_every, 1)
    check_int("max_consecutive_skips", max_consecutive_skips, 0)
    check_int("max_skips", max_skips, 0, none=True)
    check_bool("resume", resume)
    check_bool("progress", progress)
    check_bool("shard_optimizer", shard_optimizer)
    check_bool("shared_plan", shared_plan, none=True)
    check_bool("fsdp", fsdp)
    if not isinstance(callbacks, (tuple, list)) or not all(callable(c) for c in callbacks):
        fail("callbacks", callbacks, "a tuple or list of functions f(step, result)")
    if callbacks and not eval_every:
        fail("eval_every", eval_every, "an int >= 1 when callbacks are given",
             f"the {len(callbacks)} callback(s) run every eval_every steps, so with 0 they "
             "would never run")
    if fsdp and shard_optimizer:
        fail("shard_optimizer", shard_optimizer, "False under FSDP",
             "FSDP already shards the optimizer state (and the parameters and gradients)")
    if fsdp and shared_plan is False:
        fail("shared_plan", shared_plan, "None or True under FSDP",
             "sharded modules are called collectively, so every process must follow one plan")
    if not out_dir and (ckpt_every or resume):
        fail("out_dir", out_dir, "a folder for checkpoints",
             "ckpt_every > 0 or resume=True writes / reads checkpoints")
    if out_dir is not None:
        check_out_dir("out_dir", out_dir)
    if batch_size % num_processes:
        fail("batch_size", batch_size, f"a multiple of num_processes={num_processes}",
             "each process draws an equal share")


def check_parts(backend, method, sampler, optimizer_class=None, accelerator=None) -> None:
    """The objects ``distill`` is given are what it needs (else it would fail with an
    ``AttributeError`` at first use, deep in the run)."""
    if not isinstance(method, Method):
        fail("method", f"<{type(method).__name__}>",
             "a Method (ddil_lab.PD, LCM, DMD2 or a subclass of ddil_lab.methods.Method)")
    if sampler is not None and not isinstance(sampler, StateSampler):
        fail("sampler", f"<{type(sampler).__name__}>",
             "None (forward diffusion only) or a ddil_lab.StateSampler")
    missing = [a for a in BACKEND_NEEDS if not hasattr(backend, a)]
    if missing:
        fail("backend", f"<{type(backend).__name__}>",
             "a backend (the ddil_lab.backend.Backend contract: " + ", ".join(BACKEND_NEEDS) + ")",
             f"it has no {', '.join(missing)}")
    from ..diffusion import Schedule
    if not isinstance(backend.schedule, Schedule):
        fail("backend.schedule", f"<{type(backend.schedule).__name__}>", "a ddil_lab.Schedule")
    if not callable(backend.teacher):
        fail("backend.teacher", f"<{type(backend.teacher).__name__}>",
             "a denoiser (x_t, t, cond) -> x0")
    if optimizer_class is not None and not (isinstance(optimizer_class, type)
                                            and issubclass(optimizer_class, torch.optim.Optimizer)):
        fail("optimizer_class", optimizer_class,
             "None (torch.optim.AdamW) or a torch.optim.Optimizer subclass, called as "
             "cls(params, lr=..., weight_decay=...)")
    if accelerator is not None and not all(hasattr(accelerator, a) for a in
                                           ("process_index", "num_processes", "device")):
        fail("accelerator", f"<{type(accelerator).__name__}>", "None or an accelerate.Accelerator")


__all__ = ["ConfigError", "LR_SCHEDULES", "MAX_LR", "MAX_SEED", "ON_NONFINITE",
           "check_distill_args", "check_parts"]
