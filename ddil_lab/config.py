"""Validated run configurations: one object per backend, method, state sampler, training and
sampling, read from plain dicts or YAML and checked *before* any heavy work starts (training a
toy teacher, loading Stable Diffusion, reading a data set).

A run configuration is five sections (every key but ``name`` is optional)::

    backend: {name: toy2d, mixture: ring8, teacher: exact, init_steps: 300}
    method:  {name: lcm, n_steps: 4}
    sampler: {beta_frwd: 0.5, beta_student_bckwrd: 0.5}        # StateSampler settings
    train:   {steps: 200, batch_size: 128, lr: 1.0e-3, out_dir: runs/lcm, ckpt_every: 50}
    sample:  {n_steps: 4, threshold: none}                      # how results are sampled

``build(config)`` validates it and returns ``(backend, method, sampler, train_kwargs)`` for
``distill(backend, method, sampler, **train_kwargs)``. Every error is a ``ConfigError`` (a
``ValueError``) that names the parameter (``section.key``), the value and what is allowed.
The method, sampler, train and sample sections are checked by ``ddil_lab.train.settings``; each
backend by its own tier (``check_params`` next to the backend class), imported lazily by name, so
a toy run never imports diffusers. This module sits above the tiers: nothing below imports it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from dataclasses import dataclass, field

from .diffusion import Schedule
from .train.settings import (ConfigError, MethodConfig, SampleConfig, SamplerConfig, TrainConfig,
                             fail)

# name -> (backend class, its settings check), imported lazily: a toy run never imports diffusers
BACKENDS = {"toy2d": ("ddil_lab.toy.backend:Toy2dBackend", "ddil_lab.toy.backend:check_params"),
            "image": ("ddil_lab.image.backend:ImageBackend", "ddil_lab.image.backend:check_params"),
            "sd": ("ddil_lab.sd.backend:SDBackend", "ddil_lab.sd.checks:check_params")}
SECTIONS = ("backend", "method", "sampler", "train", "sample")


def _import(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------
# backend
# ---------------------------------------------------------------------------------------------
@dataclass
class BackendConfig:
    """Which backend (``name`` in ``BACKENDS``) and its constructor parameters."""
    name: str = "toy2d"
    params: dict = field(default_factory=dict)

    @property
    def T(self) -> int:
        """The teacher's number of diffusion steps (1000 unless a toy schedule says otherwise;
        image and sd teachers use T = 1000, and their methods re-check on setup)."""
        sched = self.params.get("schedule")
        return int(sched.get("T", 1000)) if isinstance(sched, dict) else \
            getattr(sched, "T", 1000)

    def validate(self) -> BackendConfig:
        if not (isinstance(self.name, str) and self.name in BACKENDS):
            fail("backend.name", self.name, f"one of {tuple(BACKENDS)}")
        _import(BACKENDS[self.name][1])(dict(self.params))  # the tier's own checks
        return self

    def build(self, accelerator=None):
        """The backend object (the heavy part: teacher training / model loading)."""
        cls = _import(BACKENDS[self.name][0])
        params = dict(self.params)
        if self.name == "toy2d" and isinstance(params.get("schedule"), (dict, str)):
            s = params["schedule"]
            params["schedule"] = Schedule(**s) if isinstance(s, dict) else Schedule(s)
        if accelerator is not None and "device" in inspect.signature(cls).parameters \
                and "device" not in params:
            params["device"] = accelerator.device  # each process on its own GPU
        return cls(**params)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """A whole run: backend, method, sampler, training and sampling settings."""
    backend: BackendConfig = field(default_factory=BackendConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """From plain dicts: ``{"backend": {"name": ..., **params}, "method": {...}, ...}``."""
        if not isinstance(d, dict):
            fail("config", d, f"a mapping with sections {SECTIONS}")
        for k, v in d.items():
            if k not in SECTIONS:
                fail(k, v, f"the sections {SECTIONS}", "not a configuration section")
        for k in SECTIONS:
            if not isinstance(d.get(k) or {}, dict):
                fail(k, d[k], "a mapping of settings")
        sec = {k: dict(d.get(k) or {}) for k in SECTIONS}
        backend = BackendConfig(sec["backend"].pop("name", "toy2d"), sec["backend"])
        method = MethodConfig(sec["method"].pop("name", "pd"), sec["method"])
        return cls(backend, method, SamplerConfig(sec["sampler"]),
                   _dataclass_from(TrainConfig, "train", sec["train"]),
                   _dataclass_from(SampleConfig, "sample", sec["sample"]))

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] = ()) -> RunConfig:
        """From a YAML file (safe loading; duplicate keys and syntax errors are refused), with
        ``section.key=value`` overrides."""
        return cls.from_dict(apply_overrides(read_yaml(path), overrides))

    def to_dict(self) -> dict:
        return {"backend": {"name": self.backend.name, **self.backend.params},
                "method": {"name": self.method.name, **self.method.params},
                "sampler": dict(self.sampler.params),
                "train": self.train.kwargs(), "sample": dataclasses.asdict(self.sample)}

    def validate(self, num_processes: int = 1) -> RunConfig:
        """Check every section (cheap: no teacher is trained and no model is loaded)."""
        self.backend.validate()
        T = self.backend.T
        self.method.validate(T)
        self.sampler.validate()
        self.train.validate(num_processes)
        self.sample.validate(T)
        return self


def _dataclass_from(cls, section: str, d: dict):
    names = [f.name for f in dataclasses.fields(cls)]
    for k, v in d.items():
        if k not in names:
            fail(f"{section}.{k}", v, ", ".join(names), f"not a {section} setting")
    return cls(**d)


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses a key given twice (safe_load keeps the last)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (given twice; which one is meant?)",
                        key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)
    return Loader


def parse_yaml(text: str, what: str, allowed: str):
    """``text`` parsed as YAML; a syntax error or a duplicate key is a ``ConfigError`` naming
    ``what`` and the line."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        fail(what, text if len(text) < 80 else text[:77] + "...", allowed,
             f"not valid YAML{where}: {problem}")


def read_yaml(path) -> dict:
    """A run configuration file: a YAML mapping of sections."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        fail("config", path, "an existing YAML file", "the file does not exist")
    with open(path) as f:
        text = f.read()
    try:
        d = parse_yaml(text, "config", f"a YAML mapping with sections {SECTIONS}")
    except ConfigError as e:  # name the file, not its text
        raise ConfigError(f"config={os.fspath(path)!r} is not allowed: "
                          f"{str(e).split(' is not allowed: ', 1)[-1]}") from e
    d = {} if d is None else d
    if not isinstance(d, dict):
        fail("config", os.fspath(path), f"a YAML mapping with sections {SECTIONS}",
             f"its top level is a {type(d).__name__}")
    return d


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """``["train.steps=100", "method.name=lcm"]`` applied to a config dict (values parsed as
    YAML, so numbers, booleans, lists and null work)."""
    if d is not None and not isinstance(d, dict):
        fail("config", d, f"a mapping with sections {SECTIONS}")
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
        fail("overrides", overrides, "a list of 'section.key=value' strings")
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in (d or {}).items()}
    for o in overrides:
        key, sep, value = o.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            fail("override", o, "section.key=value, e.g. train.steps=100")
        if section not in SECTIONS:
            fail("override", o, f"a key of the sections {SECTIONS}, e.g. train.steps=100",
                 f"{section!r} is not a configuration section")
        if not isinstance(d.setdefault(section, {}), dict):
            fail(section, d[section], "a mapping of settings")
        d[section][name] = parse_yaml(value, key, "a YAML value, e.g. 100, 1.0e-3, true, "
                                      "null, [3, 4], cosine")
    return d


def as_config(config) -> RunConfig:
    """A ``RunConfig`` from a RunConfig, a dict, or a YAML path."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return RunConfig.from_yaml(os.fspath(config))
    return RunConfig.from_dict(config)


def build(config, accelerator=None):
    """Validate ``config`` and build ``(backend, method, sampler, train_kwargs)``; then
    ``distill(backend, method, sampler, **train_kwargs)`` runs it. With an ``accelerator``, the
    batch is checked against its number of processes, the backend is placed on its device (if it
    takes one) and ``train_kwargs`` carries it."""
    cfg = as_config(config)
    cfg.validate(accelerator.num_processes if accelerator is not None else 1)
    backend = cfg.backend.build(accelerator)
    kw = cfg.train.kwargs()
    if accelerator is not None:
        kw["accelerator"] = accelerator
    return backend, cfg.method.build(), cfg.sampler.build(), kw


def check(params: dict) -> RunConfig:
    """Validate a config dict and return it as a ``RunConfig`` (for a notebook's first cells)."""
    return as_config(params).validate()


__all__ = ["BACKENDS", "BackendConfig", "ConfigError", "MethodConfig", "RunConfig",
           "SampleConfig", "SamplerConfig", "TrainConfig", "apply_overrides", "as_config",
           "build", "check", "parse_yaml", "read_yaml"]
