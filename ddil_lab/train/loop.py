"""The one train loop: ``distill(backend, method, sampler, steps, ...)``.

It owns what neither the Method nor the StateSampler should: optimizers, the warmup + decay
schedule, gradient clipping, the EMA of the student, checkpoints (safetensors + JSON, resumable
bit for bit on CPU), non-finite checks, the progress bar, the loss history split by state source,
evaluation callbacks, and data-parallel training over several processes (accelerate). Each step:

    states = sampler.sample(backend, spec, student, batch_size / N, step)  # no grad, per process
    for group, loss, logs in method.losses(states):                        # e.g. 10x critic, 1x student
        grad <- mean over processes of grad of loss.mean();  optimizer[group].step()
    method.after_step(); ema.update(student)

Several processes (``accelerator`` from ``accelerate launch``): every process holds the same
modules, draws its own share of the global batch with its own random stream, and the gradients
are averaged across processes before clipping and the optimizer step (what DDP does, done here on
the gradients so that Methods keep calling ``self.student(...)`` directly). Updates are then
identical on every process; only process 0 writes checkpoints, the log and the progress bar.
With accelerate's FSDP config the modules are sharded instead of copied (``ddil_lab.train.fsdp``) and
every process follows one shared plan of rollouts.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..methods.base import Method
from ..rollout import SOURCES, StateSampler
from ..validation import check_bool, check_choice, check_int, check_number, fail
from .args import LR_SCHEDULES, check_distill_args, check_parts
from .checkpoint import CheckpointError, checkpoints, first_nonfinite, load_latest, save_checkpoint
from .fsdp import Sharded, full, full_state, load_module, load_optimizer, local, swap_modules
from .interrupts import Interrupted, StopSignals, signalled
from .processes import (Processes, load_process_state, plan_seed, process_state, rank_seed,
                        seed_everything)
from .resume import apply_settings, backend_identity, check_resumable

LOG_FILE = "history.jsonl"


class NonFiniteError(FloatingPointError):
    """A loss or gradient went non-finite. The message (and the attributes) say where: the
    training step, the method, the optimizer group and term, and the state sources involved."""

    def __init__(self, msg: str, step: int, method: str, term: str, sources: list[str]):
        super().__init__(msg)
        self.step, self.method, self.term, self.sources = step, method, term, sources


class EMA:
    """Exponential moving average of a module's parameters (a frozen copy)."""

    def __init__(self, module: nn.Module, decay: float):
        check_number("ema_decay", decay, 0.0, 1.0, hi_open=True)
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module):
        for p_e, p in zip(self.module.parameters(), module.parameters()):
            p_e.lerp_(p.detach(), 1.0 - self.decay)


def lr_lambda(kind: str, warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then constant / linear decay / cosine decay to 0."""
    check_choice("lr_schedule", kind, LR_SCHEDULES)

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
    skipped: int = 0  # updates skipped because a loss or gradient was non-finite
    skipped_steps: int = 0  # steps in which at least one update was skipped
    resumes: list = field(default_factory=list)  # settings changed on resume (meta "resumes")
    checkpoints: list = field(default_factory=list)  # checkpoint folders this process wrote
    resumed_from: str | None = None  # the checkpoint this run continued from
    last_checkpoint: str | None = None  # the newest checkpoint of this run (any process)
    rank: int = 0
    num_processes: int = 1
    sharded: bool = False  # trained with FSDP (the modules here are gathered again)
    local_params: int = 0  # trainable parameter elements this process held while training

    @property
    def student(self) -> nn.Module:
        """The EMA student if EMA is on, else the raw student."""
        return self.ema.module if self.ema is not None else self.method.student

    def losses(self, key: str = "loss/student") -> list[float]:
        return [h[key] for h in self.history if key in h]


def _jsonable(x):
    return json.loads(json.dumps(x))


# ---------------------------------------------------------------------------------------------
# non-finite losses and gradients
# ---------------------------------------------------------------------------------------------
def _sources(source: torch.Tensor) -> list[str]:
    return [SOURCES[i] for i in sorted(set(source.tolist()))]


def _kind(x: torch.Tensor) -> str:
    return "nan" if torch.isnan(x).any() else "inf"


def _loss_fault(loss, states, group, logs) -> tuple[str, str, list[str]]:
    """(what, term, sources) of a non-finite loss on this process."""
    bad = ~torch.isfinite(loss)
    if not bad.any():
        return "the loss went non-finite on another process", f"{group} loss", []
    srcs = _sources(states.source[bad] if bad.shape == states.source.shape else states.source)
    terms = [f"{k}={v}" for k, v in logs.items()
             if isinstance(v, float) and not math.isfinite(v)]
    what = (f"the {group} loss is non-finite ({_kind(loss)}) in {int(bad.sum())} of {bad.numel()} "
            f"samples, on states from source(s): {', '.join(srcs)}"
            + (f"; non-finite terms: {', '.join(terms)}" if terms else ""))
    return what, f"{group} loss", srcs


def _grad_fault(module: nn.Module, states, group) -> tuple[str, str, list[str]]:
    """(what, term, sources) of a non-finite gradient, naming the first bad parameter."""
    name = next((n for n, p in module.named_parameters()
                 if p.grad is not None and not torch.isfinite(local(p.grad)).all()), "?")
    srcs = _sources(states.source)
    grad = dict(module.named_parameters()).get(name)
    kind = _kind(local(grad.grad)) if grad is not None and grad.grad is not None else "nan/inf"
    what = (f"the {group} gradient is non-finite ({kind}) in parameter {name!r}; the batch held "
            f"states from source(s): {', '.join(srcs)}")
    return what, f"{group} gradient", srcs


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def distill(backend, method: Method, sampler: StateSampler | None = None, steps: int = 1000,
            batch_size: int = 256, lr: float = 1e-4, critic_lr: float | None = None,
            weight_decay: float = 0.0, warmup: int = 0, lr_schedule: str = "constant",
            grad_clip: float | None = 1.0, ema_decay: float | None = None, seed: int = 0,
            out_dir: str | None = None, ckpt_every: int = 0, resume: bool = False,
            on_nonfinite: str = "raise", callbacks: tuple = (), eval_every: int = 0,
            progress: bool = True, log_every: int = 1, keep_checkpoints: int = 2,
            shard_optimizer: bool = False, accelerator=None,
            optimizer_class=None, shared_plan: bool | None = None,
            max_consecutive_skips: int = 5, max_skips: int | None = None,
            desc: str | None = None) -> DistillResult:
    """Distil ``backend.teacher`` into a student with ``method``, on states from ``sampler``.

    Every argument is checked before any work starts (``ConfigError``, a ``ValueError``, naming
    the parameter, its value and what is allowed).

    :param sampler: where states come from; None = forward diffusion only (no DDIL).
    :param steps: training steps (one student update each; DMD2 adds critic updates).
    :param batch_size: the global batch: with N processes each draws batch_size / N states.
    :param lr, critic_lr: AdamW learning rates of the student and of any critic group (in
        (0, 1]).
    :param warmup, lr_schedule: linear warmup steps, then "constant", "linear" or "cosine".
    :param ema_decay: EMA of the student, in (0, 1) (None: off; ``result.student`` is then the
        raw one).
    :param out_dir: where checkpoints and the log (``history.jsonl``) go; ``ckpt_every`` > 0
        writes a checkpoint every k steps and at the end (the newest ``keep_checkpoints`` are
        kept); ``resume=True`` continues from the newest good checkpoint in out_dir, bit for bit.
        A resumed run refuses a checkpoint of another run and applies changed optimizer
        settings on purpose, with a warning, recording them (``ddil_lab.train.resume``).
    :param on_nonfinite: "raise" (stop with ``NonFiniteError`` naming the step, method, term and
        state sources; the newest checkpoint is kept) or "skip" (skip that update, count it in
        ``result.skipped`` and the step's ``history`` entry). Skipping is bounded: more than
        ``max_consecutive_skips`` steps in a row with a skipped update, or more than
        ``max_skips`` such steps in all (None: max(10, steps // 10)), stop the run with
        ``NonFiniteError``. A checkpoint is never written from a non-finite state.
    :param callbacks: functions ``f(step, result)`` called every ``eval_every`` steps (which
        must then be >= 1; on process 0 only; under FSDP on every process, since calling the
        sharded student is a collective).
    :param optimizer_class: the optimizer (default ``torch.optim.AdamW``), e.g.
        ``bitsandbytes.optim.AdamW8bit`` for 8-bit Adam; a ``torch.optim.Optimizer`` subclass
        called as ``cls(params, lr=..., weight_decay=...)``.
    :param shard_optimizer: with several processes, each keeps the AdamW moments of only its
        share of the parameters (ZeRO stage 1, ``ZeroRedundancyOptimizer``): the memory that lets
        SDXL-size students (and DMD2's critic) train on 80 GB GPUs. Checkpoints hold the full
        optimizer state either way, so a run may resume with the other setting.
    :param accelerator: an ``accelerate.Accelerator`` for runs under ``accelerate launch``
        (several processes: gradients averaged across them, see the module docstring). With an
        FSDP config the trained and kept modules are sharded (``ddil_lab.train.fsdp``); the result
        then holds ordinary, gathered modules again.
    :param shared_plan: draw each batch's structure (states per source, rollout grid, mixed-step
        choices) from a stream shared by all processes (seeded by seed and step) instead of each
        process's own. None: only under FSDP, which needs it.
    :param desc: the progress bar's label (None: the method's name, ``+ddil`` with rollouts).

    ``history`` counts network evaluations (per state; a guided teacher call counts once):
    ``nfe/teacher`` and ``nfe/student`` in the sampler's rollouts, ``nfe/teacher_target`` in
    the method's own targets (PD: substeps per state; LCM and DMD2: one per state).
    """
    from tqdm.auto import tqdm

    check_parts(backend, method, sampler, optimizer_class, accelerator)
    procs = Processes(accelerator)
    check_distill_args(
        steps=steps, batch_size=batch_size, lr=lr, critic_lr=critic_lr, weight_decay=weight_decay,
        warmup=warmup, lr_schedule=lr_schedule, grad_clip=grad_clip, ema_decay=ema_decay,
        seed=seed, out_dir=out_dir, ckpt_every=ckpt_every, resume=resume,
        on_nonfinite=on_nonfinite, eval_every=eval_every, log_every=log_every,
        keep_checkpoints=keep_checkpoints, num_processes=procs.world,
        shard_optimizer=shard_optimizer, shared_plan=shared_plan, fsdp=procs.fsdp is not None,
        progress=progress, callbacks=callbacks, max_consecutive_skips=max_consecutive_skips,
        max_skips=max_skips)
    if desc is not None and not isinstance(desc, str):
        fail("desc", desc, "None or a string (the progress bar's label)")
    sampler = sampler or StateSampler()
    shared_plan = procs.fsdp is not None if shared_plan is None else shared_plan
    skip_limit = max_skips if max_skips is not None else max(10, steps // 10)
    sampler.check_backend(backend)
    local_batch = batch_size // procs.world

    seed_everything(seed)
    method.setup(backend)
    spec = method.spec()
    sampler.check_spec(spec)
    groups = method.trainable()
    procs.broadcast_modules(method.modules())
    ema = EMA(method.student, ema_decay) if ema_decay is not None else None
    sharded = None
    if procs.fsdp is not None:  # parameters are replaced by shards: collect them afterwards
        sharded = Sharded(list(method.modules().values()) + ([ema.module] if ema else []),
                          procs.fsdp)
    trainable = {g: [p for p in m.parameters() if p.requires_grad] for g, m in groups.items()}
    opts = {g: procs.adamw(trainable[g], lr=(critic_lr or lr) if g != "student" else lr,
                           weight_decay=weight_decay, shard=shard_optimizer, cls=optimizer_class)
            for g in groups}
    scheds = {g: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(lr_schedule, warmup, steps))
              for g, o in opts.items()}
    result = DistillResult(method, sampler, out_dir=out_dir, rank=procs.rank,
                           num_processes=procs.world, sharded=sharded is not None,
                           local_params=sum(local(p).numel() for ps in trainable.values()
                                            for p in ps))
    result.ema = ema
    if procs.rank > 0:  # each process draws its own share of the batch
        seed_everything(rank_seed(seed, procs.rank))
    checkpointing = bool(out_dir) and bool(ckpt_every or resume)
    config = _jsonable({
        "method": method.name, "method_config": method.config(),
        "sampler": {k: v for k, v in vars(sampler).items()
                    if isinstance(v, (int, float, str, bool, type(None)))},
        "steps": steps, "batch_size": batch_size, "lr": lr, "critic_lr": critic_lr,
        "weight_decay": weight_decay, "warmup": warmup, "lr_schedule": lr_schedule,
        "grad_clip": grad_clip, "on_nonfinite": on_nonfinite,
        "max_consecutive_skips": max_consecutive_skips, "max_skips": max_skips,
        "seed": seed, "priors": sampler.priors, "ema_decay": ema_decay,
        "num_processes": procs.world, "shared_plan": shared_plan,
        "fsdp": procs.fsdp is not None, "shard_optimizer": shard_optimizer,
        "optimizer": (optimizer_class or torch.optim.AdamW).__qualname__,
        # the backend's identity costs one teacher call on a probe batch: only when it is kept
        "backend": backend_identity(backend, method.teacher) if checkpointing else None})

    def shared_state() -> dict:  # identical on every process
        st = {"modules": {k: m.state_dict() for k, m in method.modules().items()},
              "opt": {g: o.state_dict() for g, o in opts.items()},
              "sched": {g: s.state_dict() for g, s in scheds.items()}}
        if result.ema is not None:
            st["ema"] = result.ema.module.state_dict()
        return st

    start, consecutive = 0, 0
    found = load_latest(out_dir) if (resume and out_dir) else None
    if found is not None:
        path, st, meta = found
        changed = check_resumable(path, meta, config, st, method.modules(), groups,
                                  result.ema is not None, procs.world)
        for k, m in method.modules().items():
            load_module(m, st["modules"][k])
        for g, o in opts.items():
            load_optimizer(o, st["opt"][g])
        for g, s in scheds.items():
            s.load_state_dict(st["sched"][g])
        apply_settings(opts, scheds, lr, critic_lr, weight_decay)  # this run's, on purpose
        if result.ema is not None:
            load_module(result.ema.module, st["ema"])
        device = next(method.student.parameters()).device  # where states live in this run
        load_process_state(sampler, method, st["processes"][procs.rank], device)
        result.history, result.skipped = meta["history"], meta["skipped"]
        result.skipped_steps = meta.get("skipped_steps", 0)
        consecutive = meta.get("consecutive_skips", 0)
        result.resumes = list(meta.get("resumes", []))
        result.resumed_from = result.last_checkpoint = path
        start = meta["step"]
        if procs.is_main:
            print(f"distill: resumed from step {start} in folder {out_dir} ({path})",
                  file=sys.stderr, flush=True)
        if changed:
            result.resumes.append({"step": start, "from": path, "changed": changed})
            # extending a constant-schedule run changes nothing that is already trained
            quiet = set(changed) == {"steps"} and lr_schedule == "constant"
            if procs.is_main and not quiet:
                warnings.warn(f"resuming {path} at step {start} with changed settings, applied "
                              "from this step on and recorded in the checkpoints' meta.json "
                              "('resumes'): " + ", ".join(f"{k}: {a!r} -> {b!r}"
                                                          for k, (a, b) in changed.items()),
                              stacklevel=2)
    if start == 0 and ckpt_every and procs.is_main and checkpoints(out_dir):
        warnings.warn(f"out_dir={out_dir!r} holds checkpoints of an earlier run; this run's "
                      "will sit beside them. Pass resume=True to continue that run, or use a "
                      "new out_dir.", stacklevel=2)
    if not procs.same_everywhere(start):
        raise CheckpointError(f"the processes found different checkpoints to resume from in "
                              f"out_dir={out_dir!r} (this one: step {start}); out_dir must be on "
                              "a file system that every process shares")

    def checkpoint(step):
        procs.consolidate(opts.values())
        per_process = procs.gather_states(process_state(sampler, method))
        shared = full_state(shared_state()) if sharded is not None else None  # collective
        bad = None
        if procs.is_main:
            shared = shared_state() if shared is None else shared
            bad = first_nonfinite({**shared, "processes": per_process})
        flag = torch.tensor([int(bad is not None)], device=procs.device)
        if procs.all_reduce(flag, "max").item():  # every process stops, none writes
            kept = result.last_checkpoint or "none was written"
            raise NonFiniteError(
                f"step {step} of {method.name}: the state to checkpoint holds NaN or inf "
                f"(first: {bad or 'on process 0'}); not written, so no checkpoint holds a "
                f"non-finite state (newest checkpoint: {kept})", step, method.name,
                "checkpoint state", [])
        if procs.is_main:
            path = save_checkpoint(out_dir, step, {**shared, "processes": per_process},
                                   {"config": config, "history": result.history,
                                    "skipped": result.skipped,
                                    "skipped_steps": result.skipped_steps,
                                    "consecutive_skips": consecutive,
                                    "resumes": result.resumes}, keep=keep_checkpoints)
            result.checkpoints.append(path)
        procs.barrier()
        result.last_checkpoint = os.path.join(out_dir, f"step_{step:07d}")

    log = _open_log(out_dir, result.history, start > 0) if (out_dir and procs.is_main) else None
    desc = desc if desc is not None else f"{method.name}{'+ddil' if sampler.is_ddil else ''}"
    bar = tqdm(range(start, steps), desc=desc,
               disable=not (progress and procs.is_main), initial=start, total=steps)
    t0 = time.time()
    stop = StopSignals(checkpointing)  # SIGINT / SIGTERM: checkpoint this step, then stop
    try:
        stop.__enter__()
        for step in bar:
            plan = torch.Generator().manual_seed(plan_seed(seed, step)) if shared_plan else None
            states = sampler.sample(backend, spec, method.student, local_batch, step, plan=plan)
            rec: dict = {"step": step + 1}
            for group, loss, logs in method.losses(states):
                loss_d = loss.detach()
                stats = _loss_stats(loss_d, states.source, procs)
                if stats[0] > 0:  # some sample's loss is non-finite, on this or another process
                    _nonfinite(_loss_fault(loss_d, states, group, logs), step, method,
                               on_nonfinite, result, rec)
                    continue
                opts[group].zero_grad(set_to_none=True)
                loss.mean().backward()
                params = procs.average_gradients(trainable[group])
                norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
                norm = float(full(norm))  # a sharded norm (FSDP) is gathered
                if not math.isfinite(norm):
                    _nonfinite(_grad_fault(groups[group], states, group), step, method,
                               on_nonfinite, result, rec)
                    continue
                rec[f"grad_norm/{group}"] = norm  # before clipping (tracked runs plot it)
                opts[group].step()
                _record(rec, group, loss_d, states.source if sampler.is_ddil else None, stats,
                        procs.world)
                rec.update({f"{group}/{k}": v for k, v in procs.mean_logs(logs).items()})
            for s in scheds.values():
                s.step()
            method.after_step()
            if result.ema is not None:
                result.ema.update(method.student)
            consecutive = consecutive + 1 if "skipped" in rec else 0
            result.skipped_steps += "skipped" in rec
            if (step + 1) % log_every == 0 or step + 1 == steps:
                rec["lr"] = scheds["student"].get_last_lr()[0]
                nfe = [sampler.nfe["teacher"], sampler.nfe["student"],
                       method.nfe["teacher_target"]]
                if procs.world > 1:
                    nfe = procs.all_reduce(torch.tensor(nfe, dtype=torch.long,
                                                        device=procs.device)).tolist()
                rec["nfe/teacher"], rec["nfe/student"], rec["nfe/teacher_target"] = nfe
                result.history.append(rec)
                if log is not None:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
            if consecutive > max_consecutive_skips or result.skipped_steps > skip_limit:
                _too_many_skips(step, method, result, consecutive, max_consecutive_skips,
                                skip_limit)
            if "loss/student" in rec and not bar.disable:
                bar.set_postfix(loss=f"{rec['loss/student']:.4g}")
            written = ckpt_every and ((step + 1) % ckpt_every == 0 or step + 1 == steps)
            if written:
                checkpoint(step + 1)
            if eval_every and (step + 1) % eval_every == 0 and (procs.is_main or sharded is not None):
                for cb in callbacks:
                    cb(step + 1, result)
            if signalled(stop, procs):
                if not written:
                    checkpoint(step + 1)  # the same atomic save as the periodic ones
                name = signal.Signals(stop.signum or signal.SIGINT).name
                raise Interrupted(f"{name}: {method.name} stopped after step {step + 1} of "
                                  f"{steps}; checkpoint {result.last_checkpoint} written, resume "
                                  "with resume=True (train_toy.py: --resume)", step + 1,
                                  result.last_checkpoint, stop.signum or signal.SIGINT)
    finally:
        stop.__exit__()
        if log is not None:
            log.close()
        bar.close()
    result.wall_time = time.time() - t0
    if sharded is not None:  # hand back ordinary modules with the gathered weights
        plain = sharded.unshard()
        swap_modules(method, plain)
        if result.ema is not None:
            swap_modules(result.ema, plain)
    return result


def _too_many_skips(step, method, result, consecutive, max_consecutive, limit):
    good = result.last_checkpoint
    kept = (f"the newest checkpoint {good} is kept (it may already hold weights that were "
            "diverging: it was finite, not necessarily good)") if good else \
        "no checkpoint was written"
    what = (f"{consecutive} steps in a row" if consecutive > max_consecutive else
            f"{result.skipped_steps} steps in all")
    raise NonFiniteError(
        f"step {step + 1} of {method.name}: updates were skipped for non-finite values in "
        f"{what} (max_consecutive_skips={max_consecutive}, max_skips={limit}; "
        f"{result.skipped} updates skipped). Stopped: the run is diverging (a smaller lr, "
        f"grad_clip or a resume from an earlier checkpoint may help); {kept}",
        step + 1, method.name, "skipped updates", [])


def _loss_stats(loss: torch.Tensor, source: torch.Tensor, procs: Processes):
    """[non-finite count, sum, count, per-source sums (4), per-source counts (4)], summed over
    processes. One process: ``(1 if any sample's loss is non-finite else 0,)`` (logging then
    uses ``loss.mean()``)."""
    if procs.world == 1:
        return (0 if bool(torch.isfinite(loss).all()) else 1,)
    bad = (~torch.isfinite(loss)).sum()
    per = loss.reshape(len(loss), -1).double().mean(1) if loss.ndim else loss.double().reshape(1)
    src = source if len(source) == len(per) else torch.zeros(len(per), dtype=torch.long)
    src = src.to(per.device)
    sums = torch.zeros(len(SOURCES), dtype=torch.float64, device=per.device).index_add_(0, src, per)
    counts = torch.bincount(src, minlength=len(SOURCES)).double()
    stats = torch.cat([bad.double().reshape(1), per.sum().reshape(1),
                       torch.tensor([float(len(per))], dtype=torch.float64, device=per.device),
                       sums, counts]).to(procs.device)
    return procs.all_reduce(stats)


def _record(rec: dict, group: str, loss: torch.Tensor, source: torch.Tensor, stats, world: int):
    """Log the loss (its mean over the global batch) and, for the student, per state source
    (``source`` None: every state is forward-diffused)."""
    n = len(SOURCES)
    if world == 1:
        rec[f"loss/{group}"] = float(loss.mean())
    else:
        rec[f"loss/{group}"] = float(stats[1] / stats[2])
    if group != "student":
        return
    if world == 1 and source is None:
        rec[f"source/{SOURCES[0]}"] = rec[f"loss/{group}"]
        return
    if world == 1:  # per-source sums and counts in two calls, read back at once
        per = loss.reshape(len(loss), -1).mean(1) if loss.ndim else loss.reshape(1)
        src = source if len(source) == len(per) else torch.zeros(len(per), dtype=torch.long)
        src = src.to(per.device)
        sums = per.new_zeros(n, dtype=torch.float64).index_add_(0, src, per.double()).tolist()
        counts = torch.bincount(src, minlength=n).tolist()
        stats = [None] * 3 + sums + counts
    for i, src in enumerate(SOURCES):
        if stats[3 + n + i] > 0:
            rec[f"source/{src}"] = float(stats[3 + i] / stats[3 + n + i])


def _nonfinite(fault, step, method, on_nonfinite, result, rec):
    what, term, sources = fault
    if on_nonfinite == "raise":
        good = result.last_checkpoint
        kept = (f"the newest checkpoint {good} is kept (finite, but it may already hold "
                "weights that were diverging)") if good else "no checkpoint was written"
        raise NonFiniteError(f"step {step + 1} of {method.name}: {what}. Stopped; {kept} "
                             "(on_nonfinite='skip' skips such updates instead)",
                             step + 1, method.name, term, sources)
    rec["skipped"] = rec.get("skipped", 0) + 1
    rec.setdefault("skipped_terms", []).append(term)
    result.skipped += 1


def _open_log(out_dir: str, history: list, resumed: bool):
    """The run's log ``out_dir/history.jsonl``; on resume, rewritten from the checkpoint's
    history first (steps logged after that checkpoint are replayed by the resumed run)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOG_FILE)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in (history if resumed else []))
    os.replace(path + ".tmp", path)
    return open(path, "a")


def progressive(backend, start: int = 32, end: int = 4, steps_per_stage: int | list = 500,
                sampler_factory: Callable[[], StateSampler] | None = None, reflected: bool = False,
                **kw) -> list[DistillResult]:
    """Progressive distillation: halve the steps start -> start/2 -> ... -> end. Stage one's
    teacher is the backend's teacher walking the ``start``-step grid; each later stage's teacher
    is the previous stage's student (DDIM on its own grid), and the new student starts from it.
    With ``out_dir``, stage n checkpoints to ``out_dir/stage_<n>``; ``**kw`` are ``distill``'s
    settings, all checked before the first stage starts."""
    from ..methods.pd import PD

    check_int("start", start, 2)
    check_int("end", end, 1)
    ratio = start // end
    if start <= end or start % end or ratio & (ratio - 1):
        fail("start", start, f"end={end} times a power of two >= 2 (e.g. {end * 8})")
    stages = [start >> i for i in range(1, ratio.bit_length())]  # e.g. 16, 8, 4
    budgets = steps_per_stage if isinstance(steps_per_stage, list) else [steps_per_stage] * len(stages)
    if len(budgets) != len(stages):
        fail("steps_per_stage", steps_per_stage, f"an int or a list of {len(stages)} ints, one "
             f"per stage {stages}")
    for b in budgets:
        check_int("steps_per_stage", b, 1)
    if not (sampler_factory is None or callable(sampler_factory)):
        fail("sampler_factory", sampler_factory, "None or a function () -> StateSampler")
    check_bool("reflected", reflected)
    known = set(inspect.signature(distill).parameters) - {"backend", "method", "sampler", "steps"}
    for k, v in kw.items():
        if k not in known:
            fail(k, v, ", ".join(sorted(known)), "not a distill parameter (steps come from "
                 "steps_per_stage)" if k == "steps" else "not a distill parameter")
    checked = {k: v for k, v in kw.items()
               if k in inspect.signature(check_distill_args).parameters}
    for b in budgets:  # every stage's settings, before the first stage trains
        check_distill_args(steps=b, **checked)
    out_dir = kw.pop("out_dir", None)
    results, teacher, init = [], None, None
    for n, steps in zip(stages, budgets):
        view = backend if init is None else _StudentInit(backend, init)
        method = PD(n_steps=n, substeps=2, reflected=reflected, teacher=teacher)
        # each stage has its own folder: a resumed progressive run loads finished stages
        stage_dir = os.path.join(out_dir, f"stage_{n}") if out_dir else None
        res = distill(view, method, sampler_factory() if sampler_factory else None,
                      steps=steps, out_dir=stage_dir, **kw)
        results.append(res)
        teacher = copy.deepcopy(res.student).eval().requires_grad_(False)
        init = copy.deepcopy(res.method.student)  # keeps which parameters train (e.g. LoRA)
        init.load_state_dict(res.student.state_dict())
    return results


class _StudentInit:
    """A backend view whose make_student() starts from a given network (progressive stages)."""

    def __init__(self, base, init: nn.Module):
        self.base, self.init = base, init

    def __getattr__(self, name):
        return getattr(self.base, name)

    def make_student(self):
        return copy.deepcopy(self.init).train()
