"""Validated settings of the parts every run has: the method, the StateSampler, the train loop
and how results are sampled. Every error is a ``ConfigError`` (a ``ValueError``; the class is
defined in the core, ``ddil_lab.validation``, so methods and the sampler raise it too, and is
re-exported here) that names the parameter (``section.key``), the value and what is allowed.
Checks that a constructor already makes cheaply are reused by calling it (method and
StateSampler constructors, ``rollout.validate_priors``, ``methods.pd.check_grid``,
``Threshold``). Each tier checks its own backend's settings (``check_params`` beside its
backend) with the helpers here; the whole run config (``ddil_lab.config``) puts the sections
together.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import re
from dataclasses import dataclass, field

from ..diffusion import THRESHOLDS, Threshold, timesteps
from ..methods import METHODS
from ..methods.pd import check_grid
from ..rollout import StateSampler
from ..validation import ConfigError, fail, is_int
from .args import check_distill_args


def reuse(section: str, fn, *args, **kw):
    """Run a constructor / check we do not own and re-raise its ValueError as a ConfigError
    with the section named (its message already names the parameter and value)."""
    try:
        return fn(*args, **kw)
    except ConfigError as e:
        msg = str(e)
        if msg.startswith(section.split(".")[0]):  # already names its section
            raise
        raise ConfigError(f"{section}.{msg}" if re.match(r"\w+=", msg) else
                          f"{section}: {msg}") from e
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


def _prefixed(section: str, fn, *args, **kw):
    """Run a constructor / check of ours whose ConfigError starts with "name=value" and name
    the section: "method.substeps=29 is not allowed ..."."""
    try:
        return fn(*args, **kw)
    except ConfigError as e:
        raise ConfigError(f"{section}.{e}") from e


@dataclass
class MethodConfig:
    """Which method (``name`` in ``distill.METHODS``) and its constructor parameters."""
    name: str = "pd"
    params: dict = field(default_factory=dict)

    def validate(self, T: int = 1000) -> MethodConfig:
        if not (isinstance(self.name, str) and self.name in METHODS):
            fail("method.name", self.name, f"one of {tuple(METHODS)}")
        cls = METHODS[self.name]
        check_names("method", self.params, cls, self.name, skip=("teacher",))
        m = _prefixed("method", cls, **self.params)  # the constructor's own checks
        if m.n_steps > T:
            fail("method.n_steps", m.n_steps, f"an int in [1, T={T}] (the teacher's steps)")
        if self.name == "pd":
            _prefixed("method", check_grid, m.n_steps, m.substeps, T)
        if self.name == "lcm":
            if m.solver_steps > T:
                fail("method.solver_steps", m.solver_steps, f"an int in [2, T={T}]")
            if any(n > T for n in m.ddil_steps):
                fail("method.ddil_steps", list(m.ddil_steps), f"ints in [1, T={T}]")
        return self

    def build(self):
        return METHODS[self.name](**self.params)


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
        return _prefixed("sampler", StateSampler, **self.params)  # validate_priors and friends


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
    max_consecutive_skips: int = 5
    max_skips: int | None = None

    def validate(self, num_processes: int = 1) -> TrainConfig:
        _prefixed("train", check_distill_args, **self.kwargs(), num_processes=num_processes)
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
        if not (isinstance(self.threshold, str) and self.threshold in THRESHOLDS):
            fail("sample.threshold", self.threshold, f"one of {THRESHOLDS}")
        if self.n_steps is not None and not (is_int(self.n_steps) and 1 <= self.n_steps <= T):
            fail("sample.n_steps", self.n_steps, f"None (the method's) or an int in [1, {T}]")
        if self.timesteps is not None:
            ts = list(self.timesteps) if isinstance(self.timesteps, (list, tuple)) else None
            if not ts or not all(is_int(t) for t in ts):
                fail("sample.timesteps", self.timesteps, f"a non-empty list of ints in [0, {T - 1}]")
            out = [t for t in ts if not 0 <= t <= T - 1]
            if out:
                fail("sample.timesteps", ts, f"ints in [0, {T - 1}], strictly decreasing",
                      f"timestep {out[0]} is out of range")
            if any(a <= b for a, b in itertools.pairwise(ts)):
                fail("sample.timesteps", ts, "a strictly decreasing list (e.g. [999, 749, 500, 250])")
        if not (is_int(self.num_samples) and self.num_samples >= 1):
            fail("sample.num_samples", self.num_samples, "a positive int")
        if not (is_int(self.seed) and 0 <= self.seed < 2 ** 63):
            fail("sample.seed", self.seed, "an int in [0, 2**63 - 1]")
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
           "check_names", "fail", "is_int", "reuse", "type_errors"]  # ConfigError: one class
