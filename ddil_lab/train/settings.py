"""Validated settings of the parts every run has: the method, the StateSampler, the train loop
and how results are sampled. Every error is a ``ConfigError`` (a ``ValueError``) that names the
parameter (``section.key``), the value and what is allowed. Checks that a constructor already
makes cheaply are reused by calling it (method and StateSampler constructors,
``rollout.validate_priors``, ``diffusion.substeps``, ``Threshold``). Each tier checks its own
backend's settings (``check_params`` beside its backend) with the helpers here; the whole run
config (``ddil_lab.config``) puts the sections together.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
from dataclasses import dataclass, field

from ..diffusion import THRESHOLDS, Threshold, substeps, timesteps
from ..methods import METHODS
from ..rollout import StateSampler
from .loop import check_distill_args


class ConfigError(ValueError):
    """A setting is not allowed; the message names the parameter, its value and what is."""


def fail(param: str, value, allowed: str, why: str = ""):
    raise ConfigError(f"{param}={value!r} is not allowed{': ' + why if why else ''}; "
                      f"allowed: {allowed}")


def reuse(section: str, fn, *args, **kw):
    """Run a constructor / check we do not own and re-raise its ValueError as a ConfigError
    with the section named (its message already names the parameter and value)."""
    try:
        return fn(*args, **kw)
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError) as e:  # OSError: a missing file
        raise ConfigError(f"{section}: {e}") from e


def check_names(section: str, given: dict, target, owner: str, skip=()):
    """Every key of ``given`` must be a parameter of ``target`` (a callable's signature)."""
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # takes **kwargs: anything may be valid
    allowed = [n for n, p in params.items() if n not in ("self", *skip)
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for k, v in given.items():
        if k not in allowed:
            fail(f"{section}.{k}", v, ", ".join(allowed), f"not a parameter of {owner}")


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class MethodConfig:
    """Which method (``name`` in ``distill.METHODS``) and its constructor parameters."""
    name: str = "pd"
    params: dict = field(default_factory=dict)

    def validate(self, T: int = 1000) -> MethodConfig:
        if self.name not in METHODS:
            fail("method.name", self.name, f"one of {tuple(METHODS)}")
        cls = METHODS[self.name]
        check_names("method", self.params, cls, self.name, skip=("teacher",))
        m = reuse(f"method ({self.name})", cls, **self.params)  # the constructor's own checks
        if m.n_steps > T:
            fail("method.n_steps", m.n_steps, f"an int in [1, T={T}] (the teacher's steps)")
        if self.name == "pd":
            _check_pd_grid(m.n_steps, m.substeps, T)
        if self.name == "lcm":
            if not is_int(m.solver_steps) or not 2 <= m.solver_steps <= T:
                fail("method.solver_steps", m.solver_steps, f"an int in [2, T={T}]")
            for n in m.ddil_steps:
                if not (is_int(n) and 1 <= n <= T):
                    fail("method.ddil_steps", list(m.ddil_steps), f"ints in [1, T={T}]")
        return self

    def build(self):
        return METHODS[self.name](**self.params)


def _check_pd_grid(n: int, k: int, T: int):
    """PD's teacher walks the (n*k)-step grid inside each student step: it must exist and
    contain every point of the student's n-step grid (``diffusion.substeps`` checks that)."""
    if n * k > T:
        fail("method.substeps", k, f"n_steps * substeps <= T={T}",
              f"with n_steps={n} the teacher would need a {n * k}-step grid")
    grid = timesteps(n, T).tolist()
    for i, t in enumerate(grid):
        s = grid[i + 1] if i + 1 < len(grid) else -1
        try:
            substeps(t, s, n, k, T)
        except ValueError as e:
            fail("method.substeps", k, f"a substeps whose {n * k}-step teacher grid contains "
                  f"every point of the {n}-step student grid {grid}", str(e))


@dataclass
class SamplerConfig:
    """``StateSampler`` settings (source priors, prior schedule, aggregation buffer)."""
    params: dict = field(default_factory=dict)

    def validate(self) -> SamplerConfig:
        allowed = [f.name for f in dataclasses.fields(StateSampler) if f.name != "nfe"]
        for k, v in self.params.items():
            if k not in allowed:
                fail(f"sampler.{k}", v, ", ".join(allowed), "not a StateSampler setting")
        self.build()
        return self

    def build(self) -> StateSampler:
        return reuse("sampler", StateSampler, **self.params)  # validate_priors and friends


@dataclass
class TrainConfig:
    """``distill(...)`` settings (see its docstring)."""
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-4
    critic_lr: float | None = None
    weight_decay: float = 0.0
    warmup: int = 0
    lr_schedule: str = "constant"
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    seed: int = 0
    out_dir: str | None = None
    ckpt_every: int = 0
    resume: bool = False
    on_nonfinite: str = "raise"
    eval_every: int = 0
    progress: bool = True
    log_every: int = 1
    keep_checkpoints: int = 2
    shard_optimizer: bool = False
    shared_plan: bool | None = None

    def validate(self, num_processes: int = 1) -> TrainConfig:
        kw = self.kwargs()
        kw.pop("progress")
        try:
            check_distill_args(**kw, num_processes=num_processes)
        except ValueError as e:  # its messages start with "name=value"
            raise ConfigError(f"train.{e}") from e
        return self

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SampleConfig:
    """How a trained student is sampled for evaluation: ``n_steps`` (default: the method's) or
    an explicit descending ``timesteps`` grid, and the x0 ``threshold`` mode."""
    n_steps: int | None = None
    timesteps: list | None = None
    threshold: str = "none"
    num_samples: int = 2000
    seed: int = 0

    def validate(self, T: int = 1000) -> SampleConfig:
        if self.threshold not in THRESHOLDS:
            fail("sample.threshold", self.threshold, f"one of {THRESHOLDS}")
        if self.n_steps is not None and not (is_int(self.n_steps) and 1 <= self.n_steps <= T):
            fail("sample.n_steps", self.n_steps, f"None (the method's) or an int in [1, {T}]")
        if self.timesteps is not None:
            ts = list(self.timesteps)
            if not ts or not all(is_int(t) for t in ts):
                fail("sample.timesteps", ts, f"a non-empty list of ints in [0, {T - 1}]")
            out = [t for t in ts if not 0 <= t <= T - 1]
            if out:
                fail("sample.timesteps", ts, f"ints in [0, {T - 1}], strictly decreasing",
                      f"timestep {out[0]} is out of range")
            if any(a <= b for a, b in itertools.pairwise(ts)):
                fail("sample.timesteps", ts, "a strictly decreasing list (e.g. [999, 749, 500, 250])")
        if not (is_int(self.num_samples) and self.num_samples >= 1):
            fail("sample.num_samples", self.num_samples, "a positive int")
        return self

    def grid(self, method_n_steps: int, T: int = 1000):
        """The descending timestep grid to sample on."""
        import torch
        if self.timesteps is not None:
            return torch.tensor(self.timesteps, dtype=torch.long)
        return timesteps(self.n_steps or method_n_steps, T)

    def make_threshold(self, lo: float = -1.0, hi: float = 1.0) -> Threshold:
        return Threshold(self.threshold, lo, hi)


def type_errors(obj) -> list[str]:
    """Parameters whose value does not have the annotated type (int is accepted for float)."""
    errors = []
    for f in dataclasses.fields(obj):
        v, ann = getattr(obj, f.name), str(f.type)
        allowed = [a.strip() for a in ann.split("|")]
        ok = (v is None and "None" in allowed) or any(_is_type(v, a) for a in allowed)
        if not ok:
            errors.append(f"{f.name}={v!r} is not allowed: must be {ann}")
    return errors


_PLAIN_TYPES = {"str": str, "dict": dict, "list": list}


def _is_type(v, ann: str) -> bool:
    if ann == "bool":
        return isinstance(v, bool)
    if ann == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if ann == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    t = _PLAIN_TYPES.get(ann)
    return t is not None and isinstance(v, t)

__all__ = ["ConfigError", "MethodConfig", "SampleConfig", "SamplerConfig", "TrainConfig",
           "check_names", "fail", "is_int", "reuse", "type_errors"]
