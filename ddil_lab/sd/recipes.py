"""The paper's full-tier recipes (DDIL, Sec. 5 "Training"): PD, LCM and DMD2 on Stable Diffusion,
each with and without DDIL and reflected thresholding, as one validated parameter set
(``PDRecipe``, ``LCMRecipe``, ``DMD2Recipe``) and one runner, ``run_full(recipe)``.

The papermill notebooks ``notebooks/full_{pd,lcm,dmd2}`` and ``experiments/train_full.py`` (YAML
configs, ``accelerate launch``) both build a recipe here, call ``validate()`` (one set of error
messages) and ``run_full``; neither holds logic of its own.

Recipes (defaults are the paper's settings; every value is a parameter):

    PD    eps -> v conversion (the student matches the unguided teacher, loss in v space),
          guidance conditioning (w ~ U[2, 14] fed to a w embedding; the student matches the
          guided teacher), then progressive halving 32 -> 16 -> 8 -> 4 (-> 2) in v space, each
          stage's student teaching the next. Per-stage budgets: 32->16 5K steps, 16->8 6K + 4K,
          8->4 and 4->2 8K + 6K (a stage in two parts restarts the warmup, as the paper does).
          PD+DDIL: mixed teacher/student rollouts. AdamW 1e-5, 500 warmup steps, batch 224.
    LCM   consistency distillation on the 50-step DDIM solver grid, w ~ U[2, 14] embedded, EMA
          target (0.95), Huber loss; LCM+DDIL: states of the student's own 3/4/5-step
          trajectories. 8K steps, batch 360 (60 x 6 GPUs).
    DMD2  SSD-1B (or SD1.5) generator, fake critic updated 10x per generator step, optional GAN
          head on the critic's features, batch 7, 30K steps; DMD2+DDIL: mixed rollouts down to a
          chosen noise level (t = 500); reflected thresholding on teacher, critic and generator.

Matching stages ("v", "gc") are PD with one teacher substep: then the PD target is exactly the
teacher's x0, so the loss is ||v_student - v_teacher||^2 on the ``match_grid`` points.

``model_id="tiny"`` builds a random tiny SD1.5- or SDXL-shaped pipeline (and random tiny data) in
the output folder, so every recipe runs on a CPU in seconds (the tests run the notebooks so).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import ClassVar


from ..hub import OfflineError
from ..rollout import PRIOR_NAMES, PRIOR_SCHEDULES
from ..train.settings import type_errors
from ..train.tracking import check_log_with

METHODS = ("pd", "lcm", "dmd2")
THRESHOLDS = ("none", "static", "dynamic")
PRECISIONS = ("no", "bf16", "fp16")
TINY_KINDS = ("sd15", "sdxl")
LR_SCHEDULES = ("constant", "linear", "cosine")
METRICS = ("auto", "tiny", "required", "none")
TINY_CAPTIONS = ["a photo of a cat", "a red car on a street", "two dogs on a beach",
                 "a bowl of fruit", "a mountain lake at dawn", "a city skyline at night",
                 "a small wooden boat", "a bird on a branch"]


# ---- the recipes ----
@dataclass
class FullRecipe:
    """Settings shared by the three recipes (see the subclasses for each method's defaults).
    Field comments are the parameter help of the notebooks."""

    method: ClassVar[str] = ""
    # ---- model and data ----
    model_id: str = "runwayml/stable-diffusion-v1-5"  # hub id, local pipeline folder, or "tiny"
    tiny_kind: str = "sd15"  # random pipeline shape for model_id "tiny": "sd15" or "sdxl"
    data: str | None = None  # imagefolder (metadata.jsonl), save_to_disk folder or datasets name
    prompts: str | None = None  # prompts file; without data: data-free (teacher rollouts)
    resolution: int | None = None  # training image side in pixels (None: the UNet's native size)
    latent_cache: str | None = None  # .safetensors path: encode the data with the VAE once
    # ---- guidance (w_min equal to w_max: one fixed w; a range: w embedded in the student) ----
    w_min: float = 2.0  # smallest guidance scale w of the teacher
    w_max: float = 14.0  # largest guidance scale w of the teacher
    # ---- the student ----
    n_steps: int = 4  # inference steps of the final student (4: timesteps 999, 749, 500, 250)
    # ---- DDIL: where training states come from (the four priors sum to 1) ----
    ddil: bool = True  # False: the baseline (PD, LCM: forward states; DMD2: backward simulation)
    beta_frwd: float = 0.5  # prior of forward-diffused data states
    beta_teacher_bckwrd: float = 0.0  # prior of teacher rollout states
    beta_student_bckwrd: float = 0.0  # prior of student rollout states
    beta_mixed: float = 0.5  # prior of mixed teacher/student rollout states
    p_student: float = 0.5  # in mixed rollouts, the probability that the student takes a step
    prior_schedule: str = "student_selection"  # "constant" or "student_selection" (ramp)
    ramp_steps: int = 1000  # student selection: from data only to the priors over k steps
    buffer_size: int = 0  # DAgger aggregation buffer per source (0: fresh rollouts)
    refresh_every: int = 1  # with a buffer: roll out new states every k steps
    # ---- reflected thresholding of x0 estimates in latent space ----
    threshold: str = "dynamic"  # "none", "static" (clamp) or "dynamic" (Imagen quantile)
    latent_lo: float = -4.0  # lower end of the latent support
    latent_hi: float = 4.0  # upper end of the latent support
    threshold_ratio: float = 0.995  # dynamic thresholding quantile
    threshold_max: float = 1.5  # dynamic thresholding: largest scale, in support half-widths
    # ---- optimisation (AdamW, warmup, linear schedule) ----
    batch_size: int = 224  # global batch, split over processes
    lr: float = 1e-5  # AdamW learning rate
    warmup: int = 500  # linear warmup steps (each stage and part restarts it)
    lr_schedule: str = "linear"  # after warmup: "constant", "linear" or "cosine" decay
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clipping
    ema_decay: float | None = None  # EMA of the student weights (None: off)
    seed: int = 0  # random seed
    max_steps: int | None = None  # cap on the training steps of every stage (smoke tests)
    # ---- precision and memory ----
    mixed_precision: str = "bf16"  # frozen teacher, VAE, text encoders in "bf16", "fp16" or "no"
    gradient_checkpointing: bool = True  # on the trained UNets
    lora_rank: int = 0  # above 0: train LoRA adapters of this rank instead of all weights
    device: str = "auto"  # "auto" (accelerate's, else cuda if available, else cpu) or a device
    # ---- output, checkpoints, monitoring ----
    out_dir: str = "runs/full"  # run folder: stages, samples, loss plot, pipeline, eval
    resume_from: str | None = None  # a previous run folder: finished stages load, the rest resumes
    ckpt_every: int = 500  # checkpoint every k steps (0: none; stages still save their student)
    keep_stage_checkpoints: bool = False  # keep the optimizer checkpoints of finished stages
    sample_every: int = 500  # sample grid and loss plot every k steps (and at each stage end)
    n_samples: int = 8  # images per sample grid
    log_every: int = 10  # history record every k steps
    log_with: str = "tensorboard"  # run tracking: "tensorboard" (in out_dir), "wandb" or "none"
    progress: bool = True  # progress bars
    # ---- evaluation of the exported pipeline (the paper's protocol) ----
    metrics: str = "auto"  # "auto" (skip metrics without weights), "required", "tiny" or "none"
    eval_captions: str | None = None  # captions file, e.g. COCO 2017 val (None: the prompts)
    n_eval: int = 5000  # images for FID and CLIP score (COCO 2017-5K)
    eval_guidance: float = 8.0  # w for a guidance-conditioned student at inference
    fid_reference: str | None = None  # reference images folder or features file for FID
    clip_model: str = "ViT-g-14"  # open_clip model of the CLIP score
    clip_pretrained: str = "laion2b_s34b_b88k"  # open_clip weights of the CLIP score
    lpips_prompts: int = 50  # LPIPS diversity: prompts (0: skip)
    lpips_seeds: int = 10  # LPIPS diversity: images per prompt
    eval_batch: int = 8  # images per generation batch

    def __post_init__(self):
        if self.mixed_precision is False:  # YAML 1.1 reads an unquoted no as false
            self.mixed_precision = "no"

    # ---- building and checking ----
    @classmethod
    def parameters(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, params: dict, strict: bool = True) -> "FullRecipe":
        """A recipe from a dict of parameters; unknown names raise ValueError (``strict``)."""
        names = set(cls.parameters())
        unknown = sorted(set(params) - names - {"method"})
        if strict and unknown:
            raise ValueError(f"full_{cls.method}: unknown parameter(s) {unknown}; allowed: "
                             f"{sorted(names)}")
        if params.get("method", cls.method) != cls.method:
            raise ValueError(f"method={params['method']!r} given to the {cls.method} recipe")
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @property
    def is_tiny(self) -> bool:
        return self.model_id == "tiny"

    @property
    def reflected(self) -> bool:
        return self.threshold != "none"

    @property
    def w_range(self) -> tuple | None:
        return (self.w_min, self.w_max) if self.w_max > self.w_min else None

    def validate(self, check_paths: bool = True, num_processes: int = 1) -> "FullRecipe":
        """Check every parameter; raise one ValueError naming each bad parameter, its value and
        what is allowed. Types first, then the recipe's own rules, then (once those pass) the
        shared checks of ``ddil_lab.config`` on what each stage hands to ``SDBackend``, the
        method, the ``StateSampler`` and ``distill``. ``check_paths``: also check files, folders
        and that a hub model is cached or downloadable (fails within seconds offline)."""
        errors = type_errors(self)
        if not errors:  # values are only checked once the types are right
            errors = self._value_errors(check_paths)
        if not errors:
            errors = self._config_errors(check_paths, num_processes)
        if errors:
            raise ValueError(f"full_{self.method}: invalid parameters:\n  - "
                             + "\n  - ".join(errors))
        return self

    def _value_errors(self, check_paths: bool) -> list[str]:
        e: list[str] = []

        def need(ok, name, allowed):
            if not ok:
                e.append(f"{name}={getattr(self, name)!r} is not allowed: {allowed}")

        def one_of(name, choices):
            need(getattr(self, name) in choices, name, f"one of {choices}")

        one_of("tiny_kind", TINY_KINDS)
        one_of("threshold", THRESHOLDS)
        one_of("mixed_precision", PRECISIONS)
        one_of("prior_schedule", PRIOR_SCHEDULES)
        one_of("lr_schedule", LR_SCHEDULES)
        one_of("metrics", METRICS)
        try:
            check_log_with(self.log_with)
        except ValueError as err:
            e.append(str(err))
        need(self.model_id.strip() != "", "model_id", "a hub id, a pipeline folder or 'tiny'")
        need(1.0 <= self.w_min <= self.w_max, "w_min",
             f"1 <= w_min <= w_max (w_max={self.w_max})")
        need(self.eval_guidance >= 1.0, "eval_guidance", ">= 1")
        need(1 <= self.n_steps <= 1000, "n_steps", "an int in [1, 1000]")
        for k in ("batch_size", "n_samples", "log_every", "eval_batch", "refresh_every"):
            need(getattr(self, k) >= 1, k, ">= 1")
        for k in ("ramp_steps", "buffer_size", "warmup", "ckpt_every", "sample_every",
                  "lora_rank", "lpips_prompts", "seed"):
            need(getattr(self, k) >= 0, k, ">= 0")
        need(self.lpips_seeds >= 2 or self.lpips_prompts == 0, "lpips_seeds",
             ">= 2 (pairs of images per prompt)")
        need(self.n_eval >= 1, "n_eval", ">= 1")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "None or >= 1")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "a finite number > 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.grad_clip > 0, "grad_clip", "> 0")
        need(self.ema_decay is None or 0 <= self.ema_decay < 1, "ema_decay", "None or in [0, 1)")
        need(0 <= self.p_student <= 1, "p_student", "in [0, 1]")
        need(self.latent_lo < self.latent_hi, "latent_lo", f"< latent_hi ({self.latent_hi})")
        need(0 < self.threshold_ratio <= 1, "threshold_ratio", "in (0, 1]")
        need(self.threshold_max >= 1, "threshold_max", ">= 1")
        need(self.resolution is None or self.resolution >= 8, "resolution", "None or >= 8")
        need(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps", "xpu"),
             "device", "'auto', 'cpu', 'cuda' or 'cuda:<i>'")
        for k in PRIOR_NAMES:
            need(getattr(self, k) >= 0, k, "a prior >= 0")
        if self.ddil:
            total = sum(getattr(self, k) for k in PRIOR_NAMES)
            need(abs(total - 1) < 1e-6, "beta_frwd",
                 f"priors {PRIOR_NAMES} summing to 1 (they sum to {total:g})")
        if self.data is None and self.prompts is None and not self.is_tiny:
            e.append("data=None and prompts=None: give data (images with captions) or prompts "
                     "(a prompts file, for data-free distillation)")
        if self.data is None and self.prompts is not None and self.ddil and self.beta_frwd > 0:
            e.append(f"beta_frwd={self.beta_frwd!r} is not allowed without data: 0 (data-free "
                     "runs use beta_teacher_bckwrd for the marginal instead)")
        if check_paths:
            for k in ("prompts", "eval_captions", "fid_reference"):
                p = getattr(self, k)
                need(p is None or os.path.exists(p), k, "an existing file or folder (not found)")
            need(self.resume_from is None or os.path.isdir(self.resume_from), "resume_from",
                 "None or the folder of a previous run (not found)")
            if self.resume_from is None and os.path.isdir(os.path.join(self.out_dir, "stages")):
                e.append(f"out_dir={self.out_dir!r} is not allowed: it already holds a run; set "
                         f"resume_from={self.out_dir!r} to continue it, or choose a new out_dir")
        e += self._method_errors()
        return e

    def _method_errors(self) -> list[str]:
        return []

    # ---- the shared checks of ddil_lab.config ----
    def backend_params(self, model=None, data=None, prompts=None) -> dict:
        """The ``SDBackend`` keyword arguments of this recipe (model / data / prompts resolved
        by ``prepare_inputs``)."""
        return dict(model=model or self.model_id, data=data if data is not None else self.data,
                    prompts=prompts if prompts is not None else self.prompts,
                    guidance=list(self.w_range) if self.w_range else self.w_min,
                    student_prediction=getattr(self, "space", None),
                    lora_rank=self.lora_rank, mixed_precision=self.mixed_precision,
                    gradient_checkpointing=self.gradient_checkpointing,
                    support="static" if self.threshold == "static" else "dynamic",
                    latent_range=(self.latent_lo, self.latent_hi),
                    threshold_ratio=self.threshold_ratio, threshold_max=self.threshold_max,
                    resolution=self.resolution, latent_cache=self.latent_cache)

    def sampler_params(self, stage: "Stage", has_data: bool) -> dict:
        """The ``StateSampler`` settings of a stage: the recipe's DDIL priors, or the method's
        baseline (PD, LCM: forward states, or teacher rollouts without data; DMD2: its
        backward simulation, the student's own rollouts)."""
        if stage.ddil and self.ddil:
            kw = {**{k: getattr(self, k) for k in PRIOR_NAMES}, "p_student": self.p_student,
                  "prior_schedule": self.prior_schedule, "ramp_steps": self.ramp_steps,
                  "buffer_size": self.buffer_size, "refresh_every": self.refresh_every}
            if stage.kind == "dmd2":  # DMD2+DDIL: rollouts stop at a chosen noise level
                kw["rollout_until"] = self.rollout_t
            return kw
        if stage.kind == "dmd2":
            return {"beta_frwd": 0.0, "beta_student_bckwrd": 1.0}
        return {} if has_data else {"beta_frwd": 0.0, "beta_teacher_bckwrd": 1.0}

    def method_params(self, stage: "Stage") -> dict:
        """The Method's constructor arguments for a stage (without the teacher override)."""
        return {"n_steps": stage.n_steps, "reflected": stage.reflected}

    def train_params(self, stage: "Stage", index: int, out_dir: str | None = None) -> dict:
        """``distill`` keyword arguments of a stage (``out_dir``: its checkpoint folder)."""
        return dict(steps=stage.steps, batch_size=self.batch_size, lr=self.lr,
                    critic_lr=getattr(self, "critic_lr", None), weight_decay=self.weight_decay,
                    warmup=self.warmup, lr_schedule=self.lr_schedule, grad_clip=self.grad_clip,
                    ema_decay=self.ema_decay, seed=self.seed + index,
                    out_dir=out_dir or os.path.join(self.out_dir, "stages", stage.name, "ckpt"),
                    ckpt_every=min(self.ckpt_every, stage.steps) if self.ckpt_every else 0,
                    resume=self.resume_from is not None, eval_every=self.sample_every,
                    progress=self.progress, log_every=self.log_every)

    def _config_errors(self, check_paths: bool, num_processes: int) -> list[str]:
        """Run the run-config checks (``sd.checks`` and ``train.settings``) on every stage's
        backend / method / sampler / train settings; their messages name ``section.key``, shown
        here as the recipe's names."""
        from ..train.settings import ConfigError, MethodConfig, SamplerConfig, TrainConfig
        from .checks import check_params

        errors: list[str] = []

        def run(fn):
            try:
                fn()
            except (ConfigError, OfflineError) as e:
                msg = re.sub(r"^(sampler|backend|method \(\w+\)): ", "", str(e))
                msg = re.sub(r"\b(backend|train|sampler|method)\.(\w+)=", r"\2=", msg)
                msg = msg.replace("model=", "model_id=", 1) if msg.startswith("model=") else msg
                if msg not in errors:
                    errors.append(msg)

        if check_paths and not self.is_tiny:
            run(lambda: check_params(self.backend_params()))
        has_data = self.data is not None or (self.is_tiny and self.prompts is None)
        for i, st in enumerate(self.plan()):
            run(lambda st=st: SamplerConfig(self.sampler_params(st, has_data)).validate())
            run(lambda st=st: MethodConfig(st.kind, self.method_params(st)).validate())
            kw = self.train_params(st, i, out_dir="checked")
            run(lambda kw=kw: TrainConfig(**kw).validate(num_processes))
        return errors

    # ---- what to run ----
    def plan(self) -> list["Stage"]:
        raise NotImplementedError

    def summary(self) -> str:
        tiny_data = self.is_tiny and self.data is None and self.prompts is None
        lines = [f"full_{self.method}: model {self.model_id}"
                 + (f" ({self.tiny_kind})" if self.is_tiny else "")
                 + f", data {'tiny random' if tiny_data else self.data}"
                 + f", prompts {self.prompts}",
                 f"  student: {self.n_steps} steps, guidance "
                 + (f"w ~ U[{self.w_min}, {self.w_max}] (embedded)" if self.w_range
                    else f"w = {self.w_min}")
                 + f", threshold {self.threshold}, precision {self.mixed_precision}",
                 f"  DDIL: {self.ddil}" + (" (" + ", ".join(
                     f"{k}={getattr(self, k)}" for k in PRIOR_NAMES if getattr(self, k)) + ")"
                     if self.ddil else ""),
                 f"  AdamW lr {self.lr}, warmup {self.warmup}, {self.lr_schedule}, "
                 f"batch {self.batch_size}; output {self.out_dir}",
                 "  stages:"]
        for s in self.plan():
            lines.append(f"    {s.name:<14} {s.steps:>6} steps  student {s.n_steps:>3}-step grid"
                         + (f", teacher x{s.substeps}" if s.substeps > 1 else "")
                         + f", teacher={s.teacher}, init={s.init}"
                         + (", DDIL" if s.ddil and self.ddil else ""))
        return "\n".join(lines)


@dataclass(frozen=True)
class Stage:
    """One ``distill`` call of a recipe.

    teacher  "backend" (the guided teacher), "unguided" (the teacher without CFG) or the name of
             an earlier stage, whose final student teaches (frozen)
    init     "teacher" (a fresh student from the teacher's UNet) or an earlier stage's name
    """
    name: str
    kind: str          # "pd", "lcm" or "dmd2": which Method
    n_steps: int       # the student's grid
    substeps: int      # PD: teacher steps per student step
    steps: int
    teacher: str
    init: str
    ddil: bool         # states from the recipe's DDIL priors (else the method's baseline)
    reflected: bool


@dataclass
class PDRecipe(FullRecipe):
    """Progressive distillation + DDIL (paper, Sec. 5 "PD + DDIL")."""
    method: ClassVar[str] = "pd"
    out_dir: str = "runs/full_pd"  # run folder: stages, samples, loss plot, pipeline, eval
    # ---- PD: eps to v conversion, guidance conditioning, progressive halving ----
    start_steps: int = 32  # the teacher's discretisation, halved down to n_steps
    v_steps: int = 4000  # eps to v conversion stage (0: skip)
    gc_steps: int = 6000  # guidance-conditioning stage, w ~ U[w_min, w_max] embedded (0: skip)
    match_grid: int = 256  # timesteps of the v and gc stages (a multiple of start_steps)
    stage_steps: dict = field(default_factory=lambda: {16: [5000], 8: [6000, 4000],
                                                       4: [8000, 6000], 2: [8000, 6000]})
    # ^ steps of each halving stage (key: its student steps), one per part
    space: str = "v"  # loss and student prediction space: "v" or "x0"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.stage_steps, dict):  # YAML / JSON may give string keys
            self.stage_steps = {int(k) if isinstance(k, str) and k.isdigit() else k: v
                                for k, v in self.stage_steps.items()}

    def method_params(self, stage):
        return {"n_steps": stage.n_steps, "substeps": stage.substeps,
                "reflected": stage.reflected, "space": self.space}

    def halving(self) -> list[int]:
        """Student step counts of the halving stages, e.g. [16, 8, 4]."""
        out, n = [], self.start_steps
        while n > self.n_steps:
            n //= 2
            out.append(n)
        return out

    def _method_errors(self):
        e = []
        r, n = self.start_steps, self.n_steps
        if n < 1:  # named by the shared checks (n_steps in [1, 1000]); nothing to halve to
            return e
        if not (r > n and r % n == 0 and ((r // n) & (r // n - 1)) == 0):
            e.append(f"start_steps={r!r} is not allowed: n_steps={n} times a power of two (>= 2)")
        if self.space not in ("v", "x0"):
            e.append(f"space={self.space!r} is not one of ('v', 'x0')")
        for k in ("v_steps", "gc_steps"):
            if getattr(self, k) < 0:
                e.append(f"{k}={getattr(self, k)!r} is not allowed: >= 0")
        if self.match_grid < 1 or self.match_grid % max(r, 1) or self.match_grid > 500:
            e.append(f"match_grid={self.match_grid!r} is not allowed: a multiple of "
                     f"start_steps={r} that is at most 500")
        if not e:
            for m in self.halving():
                parts = self.stage_steps.get(m)
                ok = (isinstance(parts, list) and parts
                      and all(isinstance(p, int) and not isinstance(p, bool) and p >= 1
                              for p in parts))
                if not ok:
                    e.append(f"stage_steps={self.stage_steps!r} is not allowed: needs an entry "
                             f"{m}: [steps, ...] (a list of positive ints, one per part) for "
                             f"every halving stage {self.halving()}")
                    break
        return e

    def plan(self) -> list[Stage]:
        cap = (lambda s: min(s, self.max_steps)) if self.max_steps else (lambda s: s)
        stages, init = [], "teacher"
        if self.v_steps:
            stages.append(Stage("v", "pd", self.match_grid, 1, cap(self.v_steps), "unguided",
                                init, False, False))
            init = "v"
        if self.gc_steps:
            stages.append(Stage("gc", "pd", self.match_grid, 1, cap(self.gc_steps), "backend",
                                init, False, False))
            init = "gc"
        teacher = init if init != "teacher" else "backend"
        for m in self.halving():
            parts = self.stage_steps[m]
            base = f"{2 * m}to{m}"
            for j, steps in enumerate(parts):
                name = base if len(parts) == 1 else f"{base}_part{j + 1}"
                stages.append(Stage(name, "pd", m, 2, cap(steps), teacher, init, True,
                                    self.reflected))
                init = name
            teacher = init
        return stages


@dataclass
class LCMRecipe(FullRecipe):
    """Latent consistency distillation + DDIL (paper, Sec. 5 "LCM + DDIL")."""
    method: ClassVar[str] = "lcm"
    out_dir: str = "runs/full_lcm"  # run folder: stages, samples, loss plot, pipeline, eval
    beta_frwd: float = 0.5  # prior of forward-diffused data states
    beta_student_bckwrd: float = 0.5  # prior of student rollout states
    beta_mixed: float = 0.0  # prior of mixed teacher/student rollout states
    batch_size: int = 360  # global batch, split over processes (60 x 6 GPUs)
    # ---- LCM: consistency distillation ----
    steps: int = 8000  # training steps
    solver_steps: int = 50  # the teacher's DDIM solver grid
    skip: int = 1  # solver-grid points per consistency step
    target_ema: float = 0.95  # EMA decay of the consistency target
    loss: str = "huber"  # "huber" or "l2"
    huber_c: float = 0.001  # Huber constant c
    ddil_steps: list = field(default_factory=lambda: [3, 4, 5])  # step counts of student rollouts

    def _method_errors(self):
        e = []
        if self.steps < 1:
            e.append(f"steps={self.steps!r} is not allowed: >= 1")
        if self.loss not in ("huber", "l2"):
            e.append(f"loss={self.loss!r} is not one of ('huber', 'l2')")
        if not 2 <= self.solver_steps <= 1000:
            e.append(f"solver_steps={self.solver_steps!r} is not allowed: in [2, 1000]")
        elif not 1 <= self.skip < self.solver_steps:
            e.append(f"skip={self.skip!r} is not allowed: in [1, solver_steps)")
        if not 0 <= self.target_ema < 1:
            e.append(f"target_ema={self.target_ema!r} is not allowed: in [0, 1)")
        if self.huber_c <= 0:
            e.append(f"huber_c={self.huber_c!r} is not allowed: > 0")
        if not self.ddil_steps or not all(isinstance(k, int) and k >= 1 for k in self.ddil_steps):
            e.append(f"ddil_steps={self.ddil_steps!r} is not allowed: a list of ints >= 1")
        return e

    def method_params(self, stage):
        return {"n_steps": stage.n_steps, "reflected": stage.reflected,
                "solver_steps": self.solver_steps, "skip": self.skip,
                "ema_decay": self.target_ema, "loss": self.loss, "huber_c": self.huber_c,
                "ddil_steps": tuple(self.ddil_steps)}

    def plan(self) -> list[Stage]:
        steps = min(self.steps, self.max_steps) if self.max_steps else self.steps
        return [Stage("lcm", "lcm", self.n_steps, 1, steps, "backend", "teacher", True,
                      self.reflected)]


@dataclass
class DMD2Recipe(FullRecipe):
    """DMD2 + DDIL on SSD-1B (paper, Sec. 5 "DMD2 + DDIL")."""
    method: ClassVar[str] = "dmd2"
    model_id: str = "segmind/SSD-1B"  # hub id, local pipeline folder, or "tiny"
    tiny_kind: str = "sdxl"  # random pipeline shape for model_id "tiny": "sd15" or "sdxl"
    w_min: float = 8.0  # smallest guidance scale w of the teacher (the real score)
    w_max: float = 8.0  # largest guidance scale w of the teacher (the real score)
    beta_frwd: float = 0.0  # prior of forward-diffused data states
    beta_student_bckwrd: float = 0.5  # prior of student rollout states
    beta_mixed: float = 0.5  # prior of mixed teacher/student rollout states
    prior_schedule: str = "constant"  # "constant" or "student_selection" (ramp)
    batch_size: int = 7  # global batch, split over processes
    out_dir: str = "runs/full_dmd2"  # run folder: stages, samples, loss plot, pipeline, eval
    # ---- DMD2: distribution matching with a fake critic ----
    steps: int = 30000  # generator updates
    critic_steps: int = 10  # fake-critic updates per generator update
    critic_lr: float | None = None  # critic learning rate (None: lr)
    gan_weight: float = 0.0  # GAN head on the critic's features: generator loss weight (0: off)
    gan_critic_weight: float = 1.0  # GAN head: critic loss weight
    tau_min: float = 0.02  # distribution matching at tau in [tau_min, tau_max] x T
    tau_max: float = 0.98  # distribution matching at tau in [tau_min, tau_max] x T
    rollout_t: int = 500  # DDIL: rollouts stop at this noise level (0: the whole grid)

    def _method_errors(self):
        e = []
        if self.steps < 1:
            e.append(f"steps={self.steps!r} is not allowed: >= 1")
        if self.critic_steps < 1:
            e.append(f"critic_steps={self.critic_steps!r} is not allowed: >= 1")
        if self.critic_lr is not None and self.critic_lr <= 0:
            e.append(f"critic_lr={self.critic_lr!r} is not allowed: None or > 0")
        if self.gan_weight < 0:
            e.append(f"gan_weight={self.gan_weight!r} is not allowed: >= 0")
        if self.gan_weight > 0 and self.data is None and not self.is_tiny:
            e.append(f"gan_weight={self.gan_weight!r} is not allowed without data: 0 (the GAN "
                     "head compares real and generated latents)")
        if not 0 <= self.tau_min < self.tau_max <= 1:
            e.append(f"tau_min={self.tau_min!r} is not allowed: 0 <= tau_min < tau_max <= 1 "
                     f"(tau_max={self.tau_max})")
        if not 0 <= self.rollout_t <= 999:
            e.append(f"rollout_t={self.rollout_t!r} is not allowed: in [0, 999]")
        return e

    def method_params(self, stage):
        return {"n_steps": stage.n_steps, "reflected": stage.reflected,
                "critic_steps": self.critic_steps, "tau_range": (self.tau_min, self.tau_max),
                "gan_weight": self.gan_weight, "gan_critic_weight": self.gan_critic_weight}

    def plan(self) -> list[Stage]:
        steps = min(self.steps, self.max_steps) if self.max_steps else self.steps
        return [Stage("dmd2", "dmd2", self.n_steps, 1, steps, "backend", "teacher", True,
                      self.reflected)]


RECIPES: dict[str, type[FullRecipe]] = {"pd": PDRecipe, "lcm": LCMRecipe, "dmd2": DMD2Recipe}


def make_recipe(method: str, **params) -> FullRecipe:
    """The recipe of ``method`` ("pd", "lcm", "dmd2") with the given parameters (unvalidated)."""
    if method not in RECIPES:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    return RECIPES[method].from_dict(params)


def from_namespace(method: str, namespace: dict) -> FullRecipe:
    """The recipe built from the variables of a namespace (a notebook's ``globals()`` after its
    papermill parameters cell), validated."""
    cls = RECIPES.get(method)
    if cls is None:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    return cls.from_dict({k: namespace[k] for k in cls.parameters() if k in namespace}).validate()


def load_config(path: str | os.PathLike, check_paths: bool = False, **overrides) -> FullRecipe:
    """A validated recipe from a YAML file with ``method: pd | lcm | dmd2`` and parameters."""
    import yaml

    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict) or "method" not in cfg:
        raise ValueError(f"{path}: a recipe config is a mapping with 'method' (one of {METHODS})")
    cfg.update(overrides)
    method = cfg.pop("method")
    return make_recipe(method, **cfg).validate(check_paths=check_paths)


__all__ = ["DMD2Recipe", "FullRecipe", "LCMRecipe", "METHODS", "PDRecipe", "RECIPES", "Stage",
           "from_namespace", "load_config", "make_recipe"]
