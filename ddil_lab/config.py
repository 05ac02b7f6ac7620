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
Checks that a constructor already makes cheaply are reused by calling it (method and
StateSampler constructors, ``rollout.validate_priors``, ``diffusion.substeps``, ``Threshold``,
``Schedule``); backends are imported lazily by name, so a toy run never imports diffusers.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import json
import os
from dataclasses import dataclass, field

from .diffusion import THRESHOLDS, Schedule, Threshold, substeps, timesteps
from .distill import METHODS
from .rollout import StateSampler
from .train import check_distill_args

BACKENDS = {"toy2d": "ddil_lab.backends.toy2d:Toy2dBackend",
            "image": "ddil_lab.backends.image:ImageBackend",
            "sd": "ddil_lab.backends.sd:SDBackend"}
SECTIONS = ("backend", "method", "sampler", "train", "sample")
# image shapes of the image backend's named data sets (what a teacher checkpoint must match)
IMAGE_SHAPES = {"digits": (1, 16, 16), "cifar10": (3, 32, 32)}


class ConfigError(ValueError):
    """A setting is not allowed; the message names the parameter, its value and what is."""


def _fail(param: str, value, allowed: str, why: str = ""):
    raise ConfigError(f"{param}={value!r} is not allowed{': ' + why if why else ''}; "
                      f"allowed: {allowed}")


def _reuse(section: str, fn, *args, **kw):
    """Run a constructor / check we do not own and re-raise its ValueError as a ConfigError
    with the section named (its message already names the parameter and value)."""
    try:
        return fn(*args, **kw)
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError) as e:  # OSError: a missing file
        raise ConfigError(f"{section}: {e}") from e


def _check_names(section: str, given: dict, target, owner: str, skip=()):
    """Every key of ``given`` must be a parameter of ``target`` (a callable's signature)."""
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # takes **kwargs: anything may be valid
    allowed = [n for n, p in params.items() if n not in ("self", *skip)
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for k, v in given.items():
        if k not in allowed:
            _fail(f"{section}.{k}", v, ", ".join(allowed), f"not a parameter of {owner}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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
        if self.name not in BACKENDS:
            _fail("backend.name", self.name, f"one of {tuple(BACKENDS)}")
        _check_names("backend", self.params, _import(BACKENDS[self.name]),
                     f"the {self.name} backend")
        _BACKEND_CHECKS[self.name](dict(self.params))
        return self

    def build(self, accelerator=None):
        """The backend object (the heavy part: teacher training / model loading)."""
        cls = _import(BACKENDS[self.name])
        params = dict(self.params)
        if self.name == "toy2d" and isinstance(params.get("schedule"), (dict, str)):
            s = params["schedule"]
            params["schedule"] = Schedule(**s) if isinstance(s, dict) else Schedule(s)
        if accelerator is not None and "device" in inspect.signature(cls).parameters \
                and "device" not in params:
            params["device"] = accelerator.device  # each process on its own GPU
        return cls(**params)


def _check_toy2d(p: dict):
    from .backends.toy2d import make_mixture

    sched = p.get("schedule")
    if isinstance(sched, dict):
        _reuse("backend.schedule", Schedule, **sched)
    elif isinstance(sched, str):
        _reuse("backend.schedule", Schedule, sched)
    gmm = _reuse("backend", make_mixture, p.get("mixture", "ring8"), p.get("dim", 2))
    teacher = p.get("teacher", "exact")
    if teacher not in ("exact", "mlp"):
        _fail("backend.teacher", teacher, "'exact' (closed form) or 'mlp' (trained here)")
    g = p.get("guidance", 1.0)
    if not (isinstance(g, (int, float)) and g >= 1.0):
        _fail("backend.guidance", g, "a number >= 1 (1 = no guidance)")
    if g != 1.0 and gmm.labels is None:
        _fail("backend.guidance", g, "1.0 for this mixture, or a class-conditional mixture "
              "such as 'ring8_cond'", f"mixture {gmm.name!r} has no classes to guide")
    for k in ("init_steps", "hidden"):
        if k in p and not (_is_int(p[k]) and p[k] >= 1):
            _fail(f"backend.{k}", p[k], "a positive int")


def _check_image(p: dict):
    from .backends.image import DATASETS, read_teacher_config

    data = p.get("data", "digits")
    if isinstance(data, str):
        if data not in DATASETS:
            _fail("backend.data", data, f"one of {DATASETS} (or an ImageData object)")
        if data == "cifar10":
            root = p.get("root")
            if root is None:
                _fail("backend.root", root, "the folder that holds cifar-10-batches-py/")
            if p.get("download") is False and not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
                _fail("backend.root", root, "a folder holding cifar-10-batches-py/ (or "
                      "download=True)", "the data folder does not exist")
        shape = IMAGE_SHAPES.get(data)
    else:
        shape = tuple(getattr(data, "shape", ()))
    teacher = p.get("teacher")
    if isinstance(teacher, (str, os.PathLike)):
        if not os.path.isdir(teacher):
            _fail("backend.teacher", str(teacher), "a teacher checkpoint folder written by "
                  "image.train_teacher, or None to train one", "the folder does not exist")
        cfg = _reuse("backend.teacher", read_teacher_config, teacher)
        if shape and tuple(cfg.get("data_shape", shape)) != tuple(shape):
            _fail("backend.teacher", str(teacher), f"a teacher trained on images of shape {shape}",
                  f"it was trained on images of shape {tuple(cfg['data_shape'])}, "
                  f"but data={data!r} has images of shape {tuple(shape)}")
    g = p.get("guidance", 1.0)
    if not (isinstance(g, (int, float)) and g >= 1.0):
        _fail("backend.guidance", g, "a number >= 1 (1 = no guidance)")
    if "teacher_steps" in p and not (_is_int(p["teacher_steps"]) and p["teacher_steps"] >= 1):
        _fail("backend.teacher_steps", p["teacher_steps"], "a positive int")


def _looks_like_path(s: str) -> bool:
    """A local path rather than a hub id 'org/name' (which has exactly one '/')."""
    return (os.path.isabs(s) or s.startswith((".", "~")) or s.count("/") > 1
            or os.sep != "/" and os.sep in s or os.path.exists(s))


def _vae_factor(model: str) -> int:
    """Image pixels per latent pixel: 2 ** (VAE levels - 1), read from a local folder (8 for
    SD1.5 / SDXL)."""
    try:
        with open(os.path.join(model, "vae", "config.json")) as f:
            return 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    except (OSError, KeyError, ValueError, TypeError):
        return 8


def _check_sd(p: dict):
    from .backends.sd import DIFFUSERS_PREDICTION, MIXED_PRECISION
    from .data_t2i import read_captions
    from .hub import OfflineError, require_download

    model = p.get("model")
    local = None
    if model is None:
        _fail("backend.model", model, "a hub id such as 'runwayml/stable-diffusion-v1-5', a "
              "local diffusers pipeline folder, or a loaded pipeline")
    if isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
        if _looks_like_path(model):
            path = os.path.expanduser(model)
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                _fail("backend.model", model, "a diffusers pipeline folder (with "
                      "model_index.json) or a hub id 'org/name'",
                      "the folder does not exist" if not os.path.isdir(path)
                      else "the folder holds no model_index.json")
            local = path
        else:  # a hub id: cached, or downloadable now (fails within seconds offline)
            from huggingface_hub import try_to_load_from_cache
            if not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
                try:
                    require_download(f"diffusers pipeline {model!r}")
                except OfflineError as e:
                    raise OfflineError(f"backend.model={model!r}: {e}") from None
    data, prompts = p.get("data"), p.get("prompts")
    if data is None and prompts is None:
        _fail("backend.data", data, "images with captions (an imagefolder, a save_to_disk "
              "folder or a datasets name), or give backend.prompts for data-free distillation")
    if isinstance(data, (str, os.PathLike)) and _looks_like_path(os.fspath(data)):
        d = os.path.expanduser(os.fspath(data))
        if not os.path.isdir(d):
            _fail("backend.data", os.fspath(data), "an existing imagefolder (images + "
                  "metadata.jsonl), a datasets.save_to_disk folder, or a datasets name",
                  "the data folder does not exist")
    if isinstance(prompts, (str, os.PathLike)):
        if not os.path.isfile(prompts):
            _fail("backend.prompts", os.fspath(prompts), "a .txt / .jsonl / .json prompts file "
                  "or a list of prompts", "the file does not exist")
        _reuse(f"backend.prompts={os.fspath(prompts)!r}", read_captions, prompts)
    elif prompts is not None and not (isinstance(prompts, (list, tuple)) and len(prompts)):
        _fail("backend.prompts", prompts, "a prompts file or a non-empty list of prompts")
    support = p.get("support", "dynamic")
    if support not in ("static", "dynamic"):
        _fail("backend.support", support, "'static' or 'dynamic' (the latent thresholding mode)")
    mp = p.get("mixed_precision", "no")
    if mp not in MIXED_PRECISION:
        _fail("backend.mixed_precision", mp, f"one of {tuple(MIXED_PRECISION)}")
    sp = p.get("student_prediction")
    if sp is not None and sp not in DIFFUSERS_PREDICTION:
        _fail("backend.student_prediction", sp, f"None or one of {tuple(DIFFUSERS_PREDICTION)}")
    res = p.get("resolution")
    factor = _vae_factor(local) if local else 8
    if res is not None and not (_is_int(res) and res > 0 and res % factor == 0):
        _fail("backend.resolution", res, f"a positive multiple of the VAE factor {factor} "
              "(images are resized and cropped to resolution x resolution)")
    g = p.get("guidance", 7.5)
    if isinstance(g, (list, tuple)):
        if not (len(g) == 2 and all(isinstance(v, (int, float)) for v in g) and 1 <= g[0] <= g[1]):
            _fail("backend.guidance", list(g), "a number >= 1 or a range [w_min, w_max] with "
                  "1 <= w_min <= w_max")
    elif not (isinstance(g, (int, float)) and g >= 1):
        _fail("backend.guidance", g, "a number >= 1 (1 = no guidance) or a range [w_min, w_max]")
    lr_ = p.get("lora_rank", 0)
    if not (_is_int(lr_) and lr_ >= 0):
        _fail("backend.lora_rank", lr_, "an int >= 0 (0: train all weights)")
    cache = p.get("latent_cache")
    if cache is not None and not str(cache).endswith(".safetensors"):
        _fail("backend.latent_cache", cache, "None or a path ending in .safetensors")


_BACKEND_CHECKS = {"toy2d": _check_toy2d, "image": _check_image, "sd": _check_sd}


# ---------------------------------------------------------------------------------------------
# method, sampler, training, sampling
# ---------------------------------------------------------------------------------------------
@dataclass
class MethodConfig:
    """Which method (``name`` in ``distill.METHODS``) and its constructor parameters."""
    name: str = "pd"
    params: dict = field(default_factory=dict)

    def validate(self, T: int = 1000) -> MethodConfig:
        if self.name not in METHODS:
            _fail("method.name", self.name, f"one of {tuple(METHODS)}")
        cls = METHODS[self.name]
        _check_names("method", self.params, cls, self.name, skip=("teacher",))
        m = _reuse(f"method ({self.name})", cls, **self.params)  # the constructor's own checks
        if m.n_steps > T:
            _fail("method.n_steps", m.n_steps, f"an int in [1, T={T}] (the teacher's steps)")
        if self.name == "pd":
            _check_pd_grid(m.n_steps, m.substeps, T)
        if self.name == "lcm":
            if not _is_int(m.solver_steps) or not 2 <= m.solver_steps <= T:
                _fail("method.solver_steps", m.solver_steps, f"an int in [2, T={T}]")
            for n in m.ddil_steps:
                if not (_is_int(n) and 1 <= n <= T):
                    _fail("method.ddil_steps", list(m.ddil_steps), f"ints in [1, T={T}]")
        return self

    def build(self):
        return METHODS[self.name](**self.params)


def _check_pd_grid(n: int, k: int, T: int):
    """PD's teacher walks the (n*k)-step grid inside each student step: it must exist and
    contain every point of the student's n-step grid (``diffusion.substeps`` checks that)."""
    if n * k > T:
        _fail("method.substeps", k, f"n_steps * substeps <= T={T}",
              f"with n_steps={n} the teacher would need a {n * k}-step grid")
    grid = timesteps(n, T).tolist()
    for i, t in enumerate(grid):
        s = grid[i + 1] if i + 1 < len(grid) else -1
        try:
            substeps(t, s, n, k, T)
        except ValueError as e:
            _fail("method.substeps", k, f"a substeps whose {n * k}-step teacher grid contains "
                  f"every point of the {n}-step student grid {grid}", str(e))


@dataclass
class SamplerConfig:
    """``StateSampler`` settings (source priors, prior schedule, aggregation buffer)."""
    params: dict = field(default_factory=dict)

    def validate(self) -> SamplerConfig:
        allowed = [f.name for f in dataclasses.fields(StateSampler) if f.name != "nfe"]
        for k, v in self.params.items():
            if k not in allowed:
                _fail(f"sampler.{k}", v, ", ".join(allowed), "not a StateSampler setting")
        self.build()
        return self

    def build(self) -> StateSampler:
        return _reuse("sampler", StateSampler, **self.params)  # validate_priors and friends


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
            _fail("sample.threshold", self.threshold, f"one of {THRESHOLDS}")
        if self.n_steps is not None and not (_is_int(self.n_steps) and 1 <= self.n_steps <= T):
            _fail("sample.n_steps", self.n_steps, f"None (the method's) or an int in [1, {T}]")
        if self.timesteps is not None:
            ts = list(self.timesteps)
            if not ts or not all(_is_int(t) for t in ts):
                _fail("sample.timesteps", ts, f"a non-empty list of ints in [0, {T - 1}]")
            out = [t for t in ts if not 0 <= t <= T - 1]
            if out:
                _fail("sample.timesteps", ts, f"ints in [0, {T - 1}], strictly decreasing",
                      f"timestep {out[0]} is out of range")
            if any(a <= b for a, b in itertools.pairwise(ts)):
                _fail("sample.timesteps", ts, "a strictly decreasing list (e.g. [999, 749, 500, 250])")
        if not (_is_int(self.num_samples) and self.num_samples >= 1):
            _fail("sample.num_samples", self.num_samples, "a positive int")
        return self

    def grid(self, method_n_steps: int, T: int = 1000):
        """The descending timestep grid to sample on."""
        import torch
        if self.timesteps is not None:
            return torch.tensor(self.timesteps, dtype=torch.long)
        return timesteps(self.n_steps or method_n_steps, T)

    def make_threshold(self, lo: float = -1.0, hi: float = 1.0) -> Threshold:
        return Threshold(self.threshold, lo, hi)


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
            _fail("config", d, f"a mapping with sections {SECTIONS}")
        for k, v in d.items():
            if k not in SECTIONS:
                _fail(k, v, f"the sections {SECTIONS}", "not a configuration section")
        for k in SECTIONS:
            if not isinstance(d.get(k) or {}, dict):
                _fail(k, d[k], "a mapping of settings")
        sec = {k: dict(d.get(k) or {}) for k in SECTIONS}
        backend = BackendConfig(sec["backend"].pop("name", "toy2d"), sec["backend"])
        method = MethodConfig(sec["method"].pop("name", "pd"), sec["method"])
        return cls(backend, method, SamplerConfig(sec["sampler"]),
                   _dataclass_from(TrainConfig, "train", sec["train"]),
                   _dataclass_from(SampleConfig, "sample", sec["sample"]))

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] = ()) -> RunConfig:
        """From a YAML file (``yaml.safe_load``), with ``section.key=value`` overrides."""
        import yaml

        if not os.path.isfile(path):
            _fail("config", path, "an existing YAML file", "the file does not exist")
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        return cls.from_dict(apply_overrides(d, overrides))

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
            _fail(f"{section}.{k}", v, ", ".join(names), f"not a {section} setting")
    return cls(**d)


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """``["train.steps=100", "method.name=lcm"]`` applied to a config dict (values parsed as
    YAML, so numbers, booleans, lists and null work)."""
    import yaml

    d = {k: dict(v) if isinstance(v, dict) else v for k, v in (d or {}).items()}
    for o in overrides:
        key, sep, value = o.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            _fail("override", o, "section.key=value, e.g. train.steps=100")
        if not isinstance(d.setdefault(section, {}), dict):
            _fail(section, d[section], "a mapping of settings")
        d[section][name] = yaml.safe_load(value)
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
           "build", "check"]
