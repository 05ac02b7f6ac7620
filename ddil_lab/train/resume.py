"""What a run is, as recorded in its checkpoints, and what a resumed run may change.

A resumed run never mixes settings silently. Per setting (``config`` of ``meta.json``):

- **refused** (``MUST_MATCH``; the message names both values): the method and its settings, the
  sampler and its priors, the batch size, the seed, the number of processes, the shared plan,
  the optimizer class, EMA on / off, the backend (``backend_identity``: its class, its own
  ``identity()`` if it has one, the schedule, and the teacher's x0 on a fixed probe batch, so
  another mixture, guidance or teacher network is caught), and the architecture of every
  module (the shapes of the student, critic, target: another width is named, not a torch
  size-mismatch);
- **applied on purpose** (``APPLIED``): ``steps``, ``lr``, ``critic_lr``, ``weight_decay``,
  ``warmup``, ``lr_schedule``, ``grad_clip``, ``ema_decay`` (its value), ``on_nonfinite`` and
  the skip bounds take the resumed run's values from the resumed step on (the optimizer's lr
  and weight decay are set to them, the schedule is recomputed for them), with a warning, and
  every change is recorded in ``meta.json`` under ``resumes`` (step, checkpoint, old and new
  value) and in ``DistillResult.resumes``;
- **free**: ``fsdp`` and ``shard_optimizer`` (a checkpoint holds the full state either way), and
  the bookkeeping settings that are not part of the config (``ckpt_every``,
  ``keep_checkpoints``, ``log_every``, ``eval_every``, ``progress``).
"""

from __future__ import annotations

import hashlib

import torch

from .checkpoint import CheckpointError
from .processes import rng_state, set_rng_state

MUST_MATCH = ("method", "method_config", "sampler", "priors", "batch_size", "seed",
              "num_processes", "shared_plan", "optimizer", "backend")
APPLIED = ("steps", "lr", "critic_lr", "weight_decay", "warmup", "lr_schedule", "grad_clip",
           "ema_decay", "on_nonfinite", "max_consecutive_skips", "max_skips")
PROBE_RTOL = 1e-3  # the teacher probe may differ by float order on another device


@torch.no_grad()
def teacher_probe(backend, teacher, n: int = 4) -> dict:
    """Summary of the teacher's x0 on a fixed probe batch (its own generator; every global
    random stream is restored afterwards, so a run is the same with or without the probe)."""
    saved = rng_state()
    try:
        g = torch.Generator().manual_seed(20240601)
        x = backend.sample_noise(n, g)
        cond = backend.sample_cond(n, g)
        T = backend.schedule.T
        t = torch.tensor([T - 1, (3 * T) // 4, T // 2, T // 10], device=x.device)[:n]
        x0 = teacher(x, t, cond).detach().double()
    finally:
        set_rng_state(saved)
    return {"shape": list(x0.shape), "mean": float(x0.mean()),
            "abs_mean": float(x0.abs().mean()), "std": float(x0.std())}


def backend_identity(backend, teacher) -> dict:
    """What the backend is, for the checkpoint: class, its own ``identity()`` if it defines one
    (a JSON-able dict of its settings), the schedule, and the teacher probe."""
    own = backend.identity() if callable(getattr(backend, "identity", None)) else None
    S = backend.schedule
    return {"class": type(getattr(backend, "base", backend)).__name__, "identity": own,
            "schedule": {"kind": S.kind, "T": S.T, "alpha_bar_sha256": hashlib.sha256(
                S.alpha_bar.double().numpy().tobytes()).hexdigest()},
            "teacher_probe": teacher_probe(backend, teacher)}


def _same_backend(a, b) -> bool:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return a == b
    pa, pb = a.get("teacher_probe"), b.get("teacher_probe")
    if {k: v for k, v in a.items() if k != "teacher_probe"} != \
            {k: v for k, v in b.items() if k != "teacher_probe"}:
        return False
    if not (isinstance(pa, dict) and isinstance(pb, dict)) or pa.get("shape") != pb.get("shape"):
        return pa == pb
    scale = max(abs(pa.get("abs_mean", 0)), abs(pb.get("abs_mean", 0)), 1e-12)
    return all(isinstance(pa.get(k), float) and isinstance(pb.get(k), float)
               and abs(pa[k] - pb[k]) <= PROBE_RTOL * scale for k in ("mean", "abs_mean", "std"))


def _refuse(path, what):
    raise CheckpointError(f"cannot resume from {path}: {what}; resume with the same settings, or "
                          "use a new out_dir (or resume=False) to start a new run")


def _shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items() if torch.is_tensor(v)}


def check_resumable(path: str, meta: dict, config: dict, state: dict, modules: dict,
                    groups, has_ema: bool, world: int) -> dict:
    """Refuse a checkpoint of another run (``MUST_MATCH``, module architectures, the state's
    structure); return the ``APPLIED`` settings that change, ``{name: [old, new]}``."""
    old = meta["config"]
    for key in MUST_MATCH:
        if key not in old:
            _refuse(path, f"its config does not record {key!r} (written by an older version of "
                          "ddil_lab), so it cannot be checked to be this run")
        same = _same_backend(old[key], config[key]) if key == "backend" else old[key] == config[key]
        if not same:
            _refuse(path, f"it was written by a run with {key}={old[key]!r}, this run has "
                          f"{key}={config[key]!r}")
    if has_ema != ("ema" in state):
        _refuse(path, f"it was written {'without' if has_ema else 'with'} an EMA (ema_decay="
                      f"{old.get('ema_decay')!r}), this run has ema_decay={config['ema_decay']!r}")
    saved = state.get("modules")
    if not isinstance(saved, dict) or set(saved) != set(modules):
        _refuse(path, f"it holds the modules {sorted(saved) if isinstance(saved, dict) else saved}"
                      f", this run trains {sorted(modules)}")
    for name, m in {**modules, **({"ema": None} if has_ema else {})}.items():
        live = m if m is not None else modules["student"]  # the EMA is a copy of the student
        want = _shapes(live.state_dict())
        got = _shapes(saved[name] if m is not None else state["ema"])
        if got != want:
            k = next((k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)))
            _refuse(path, f"its {name} has another architecture: {k} is "
                          f"{got.get(k, 'missing')} there and {want.get(k, 'missing')} in this "
                          "run (another width or depth?)")
    for part in ("opt", "sched"):
        if not isinstance(state.get(part), dict) or set(state[part]) != set(groups):
            _refuse(path, f"its {part} state is for the groups {state.get(part)!r:.80}, this run "
                          f"has {sorted(groups)}")
    procs = state.get("processes")
    if not isinstance(procs, list) or len(procs) != world:
        _refuse(path, f"it holds the state of {len(procs) if isinstance(procs, list) else 0} "
                      f"process(es), this run has {world}")
    return {k: [old.get(k), config[k]] for k in APPLIED if old.get(k) != config[k]}


def apply_settings(opts: dict, scheds: dict, lr: float, critic_lr, weight_decay: float):
    """After loading optimizer and scheduler states: this run's lr and weight decay (a
    checkpoint's param groups and base lrs would otherwise keep the old ones)."""
    for g, o in opts.items():
        base = lr if g == "student" else (critic_lr or lr)
        for pg in o.param_groups:
            pg["weight_decay"], pg["initial_lr"] = weight_decay, base
        s = scheds[g]
        s.base_lrs = [base] * len(o.param_groups)
        for pg, b, lam in zip(o.param_groups, s.base_lrs, s.lr_lambdas):
            pg["lr"] = b * lam(s.last_epoch)  # the lr of this step under this run's schedule
        s._last_lr = [pg["lr"] for pg in o.param_groups]


__all__ = ["APPLIED", "MUST_MATCH", "apply_settings", "backend_identity", "check_resumable",
           "teacher_probe"]
