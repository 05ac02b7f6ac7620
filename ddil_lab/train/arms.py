"""Named experiment arms and seeds trained as one batched ensemble (any backend).

An *arm* is a distillation method (PD, LCM, DMD2) with or without DDIL (states also from
rollouts) and with or without reflected distillation (x0 clamped to the data support):

    baseline         forward-diffused states only
    ddil             half forward, half rollouts (PD, DMD2: mixed teacher/student rollouts;
                     LCM: the student's own 3/4/5-step trajectories, as in the paper)
    reflected        baseline + x0 estimates clamped to the support [-1, 1]: the teacher's in
                     every method, also LCM's consistency target and DMD2's generator and
                     critic (DMD2 then also samples and rolls out clamped)
    ddil+reflected   both

Seeds are trained as one batched ensemble (``EnsembleBackend``/``SeedEnsemble`` in
``ddil_lab.train.ensemble``: the members' parameters stacked, their networks run as one batched
computation): one ``distill`` call whose conditioning routes each state to its seed's student,
so the per-step cost is that of one network over all seeds' states. Each member's student is built under its own seed, so a
randomly initialised student's weights follow the run seed (and the baseline and DDIL arms of
one seed start from the same weights). Several *cells* that share their data (e.g. one mixture
under several guidance scales, student widths or initialisations) train as one ensemble too
(``train_cells``). The toy table, the regime map, the image table and the notebooks all train
their students through ``train_arm`` / ``train_cells``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..backend import Backend
from ..methods import make_method
from ..methods.base import Method
from ..rollout import States, StateSampler
from .ensemble import EnsembleBackend, MemberView, NFECounter, SeedEnsemble  # noqa: F401
from .loop import distill

METHODS = ("pd", "lcm", "dmd2")
ARMS = ("baseline", "ddil", "reflected", "ddil+reflected")

# Where DDIL's rollout states come from, per method (paper, Sec. 4.2).
DDIL_SOURCE = {"pd": "beta_mixed", "lcm": "beta_student_bckwrd", "dmd2": "beta_mixed"}


# DMD2's toy recipe (issue 25, docs/dmd2.md): DMD's regression loss on teacher ODE pairs at
# weight 10 is what made toy DMD2 a good sampler (w 1: SW 129 -> 49 at 1000 steps x batch 64;
# ratio to the teacher's own second draw 5.7 -> 2.2, 1.8 at 3000 steps); critic settings
# mattered little once it was on. DMD2's class default stays the paper's (no regression).
DMD2_TOY_RECIPE = {"critic_steps": 5, "regression_weight": 10.0}


def method_defaults(method: str, n_steps: int = 4) -> dict:
    """The method settings the table uses: PD taught by the 32-step teacher (32/n substeps per
    student step), DMD2 with 5 critic updates per generator update, LCM as in the paper."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if method == "pd":
        if 32 % n_steps:
            raise ValueError(f"n_steps={n_steps} must divide 32 for PD (teacher on the 32-step grid)")
        return {"substeps": 32 // n_steps}
    return {"critic_steps": 5} if method == "dmd2" else {}


def make_sampler(method: str, ddil: bool, share: float = 0.5, buffer_size: int = 0,
                 refresh_every: int = 10, refresh_size: int = 0,
                 source: str | None = None, prior_schedule: str = "constant",
                 ramp_steps: int = 0, p_student: float = 0.5,
                 renoise: bool = False, rollout_until: int = -1) -> StateSampler:
    """The StateSampler of an arm. Without DDIL: forward states only. With DDIL: a fraction
    ``share`` of each batch from rollouts (``source``, default ``DDIL_SOURCE[method]``), the
    rest forward; ``buffer_size`` > 0 reuses rollout states through DAgger's aggregation
    buffer, rolling out ``refresh_size`` new ones every ``refresh_every`` steps;
    ``prior_schedule="student_selection"`` starts on data only and ramps to these priors over
    ``ramp_steps`` training steps (the paper's protocol); ``p_student``: the student's share of
    the steps of a mixed rollout; ``renoise=True``: ``RenoisedRolloutSampler`` (rollout states
    re-noised to the method's own forward timesteps); ``rollout_until``: rollout states only
    at grid times >= this (DMD2+DDIL in the paper rolls out to t = 500; -1: all)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if not ddil:
        return StateSampler()
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share={share} must be in (0, 1]")
    source = source or DDIL_SOURCE[method]
    allowed = ("beta_teacher_bckwrd", "beta_student_bckwrd", "beta_mixed")
    if source not in allowed:
        raise ValueError(f"source={source!r} is not one of {allowed}")
    cls = RenoisedRolloutSampler if renoise else StateSampler
    return cls(beta_frwd=1.0 - share, **{source: share}, buffer_size=buffer_size,
               refresh_every=refresh_every, refresh_size=refresh_size,
               prior_schedule=prior_schedule, ramp_steps=ramp_steps, p_student=p_student,
               rollout_until=rollout_until)


class RenoisedRolloutSampler(StateSampler):
    """DDIL's rollouts, re-noised onto the method's training timesteps: each rollout state x_t
    is mapped to the rolled-out policy's x0 estimate (the student's, for student and mixed
    rollouts; the teacher's for teacher rollouts), which is diffused again to a timestep drawn
    uniformly from ``spec.forward_t``, x_t' = alpha(t') x0_hat + sigma(t') eps.

    The states keep the distribution of training timesteps forward states have (LCM: the 50
    solver times, not the ~10 points of the 3/4/5-step grids) while their x0 comes from where
    the policy actually goes, which separates "train on the policy's states" from "train at
    other timesteps" (issue 14, item 8). One extra network call per state."""

    @torch.no_grad()
    def backward(self, backend, spec, student, source, n, plan=None) -> States:
        st = super().backward(backend, spec, student, source, n, plan)
        den = spec.teacher if source == "teacher" else student
        x0 = den(st.x_t, st.t, st.cond)
        self.nfe["teacher" if source == "teacher" else "student"] += len(st)
        t = spec.forward_t[torch.randint(0, len(spec.forward_t), (len(st),))].to(st.x_t.device)
        x_t = backend.schedule.q_sample(x0.to(st.x_t.dtype), t, torch.randn_like(st.x_t))
        return States(x_t, t, st.cond, st.source)


@dataclass
class Budget:
    """The training budget every arm of a comparison shares: gradient steps, states per step
    per seed, AdamW learning rate, its schedule (linear warmup, then constant / linear /
    cosine), gradient clipping (None: off, so ensemble members update exactly as alone) and
    the learning rate of DMD2's fake critic."""
    steps: int = 300
    batch_size: int = 256
    lr: float = 1e-3
    lr_schedule: str = "constant"
    warmup: int = 0
    grad_clip: float | None = None
    critic_lr: float | None = None  # DMD2's critic (None: lr)

    def describe(self) -> str:
        clip = "no clipping" if self.grad_clip is None else f"grad-norm clip {self.grad_clip:g}"
        warm = f", {self.warmup} warmup steps" if self.warmup else ""
        critic = "" if self.critic_lr is None else f", critic lr {self.critic_lr:g}"
        return (f"{self.steps} steps x batch {self.batch_size} per seed, AdamW lr {self.lr:g} "
                f"({self.lr_schedule}{warm}){critic}, {clip}")

    def train_kw(self) -> dict:
        """The keywords of ``train_arm`` / ``train_cells``."""
        return asdict(self)


def make_arm(method: str, arm: str, n_steps: int = 4, method_kw: dict | None = None,
             **sampler_kw) -> tuple[Method, StateSampler]:
    """(Method, StateSampler) of one arm, e.g. ``make_arm("pd", "ddil+reflected")``.
    ``method_kw`` overrides ``method_defaults``; ``sampler_kw`` go to ``make_sampler``."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r} is not one of {ARMS}")
    kw = {**method_defaults(method, n_steps), **(method_kw or {})}
    m = make_method(method, n_steps=n_steps, reflected="reflected" in arm, **kw)
    return m, make_sampler(method, "ddil" in arm, **sampler_kw)


def train_arm(backend: Backend, method: str, arm: str, seeds=(0, 1, 2), steps: int = 300,
              batch_size: int = 256, lr: float = 1e-3, n_steps: int = 4, ensemble: bool = True,
              method_kw: dict | None = None, sampler_kw: dict | None = None,
              grad_clip: float | None = None, progress: bool = False, desc: str | None = None,
              **distill_kw) -> list[MemberView]:
    """Train one arm for every seed and return one ``MemberView`` per seed.

    ensemble=True trains all seeds in one ``distill`` call (batch ``len(seeds) * batch_size``,
    each member seeing its own ``batch_size`` states per step on average; seeds[0] seeds the
    run, and member k's student is built under seed seeds[k]); ensemble=False runs ``distill``
    once per seed. Each view's ``run`` dict holds the training wall and CPU seconds (of the
    whole call, shared by an ensemble's members), the network evaluations per training sample
    (``nfe_teacher``, ``nfe_student``: student, EMA target and critic), and the history.
    ``sampler_kw`` go to ``make_sampler`` (buffer sizes are per member; ``prior_schedule`` and
    ``ramp_steps`` set the student-selection ramp; ``source``, ``share``, ``renoise``).
    ``grad_clip`` is off by default: clipping the joint gradient norm would couple the members,
    while without it each member's AdamW update is the one it would get alone (Adam does not
    see the 1/M scale of the ensemble's mean loss). Other keywords (``lr_schedule``,
    ``warmup``, ...) go to ``distill``; ``Budget.train_kw()`` gives the shared ones. ``desc``
    labels the progress bar (with ``ensemble=False`` and several seeds, each run's label adds
    its seed); None: ``distill``'s default.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    groups = [seeds] if ensemble else [[s] for s in seeds]
    views = []
    for group in groups:
        label = f"{desc} seed {group[0]}" if desc is not None and len(groups) > 1 else desc
        views += train_cells([backend], method, arm, group, steps, batch_size, lr, n_steps,
                             method_kw, sampler_kw, grad_clip, progress, desc=label,
                             **distill_kw)[0]
    return views


def train_cells(backends: list, method: str, arm: str, seeds=(0, 1, 2), steps: int = 300,
                batch_size: int = 256, lr: float = 1e-3, n_steps: int = 4,
                method_kw: dict | None = None, sampler_kw: dict | None = None,
                grad_clip: float | None = None, progress: bool = False,
                desc: str | None = None, **distill_kw) -> list[list[MemberView]]:
    """Train one arm for every (cell, seed) in one ``distill`` call and return, per cell, one
    ``MemberView`` per seed. ``backends`` are the cells: they must share their data (the first
    one's ``sample_data`` feeds every member) and may differ in the teacher (e.g. its guidance
    scale: guided teachers around one conditional denoiser share its calls) and in the student
    they make (width, initialisation, parameterisation). Members are ordered cell-major; member
    (i, s) is built under seed s, so cell i's seed s is paired across arms. ``desc``: the
    progress bar's label (None: ``distill``'s default). See ``train_arm``."""
    seeds, backends = list(seeds), list(backends)
    if not seeds or not backends:
        raise ValueError("train_cells needs at least one backend and one seed")
    M = len(backends) * len(seeds)
    skw = dict(sampler_kw or {})
    for k in ("buffer_size", "refresh_size"):
        skw[k] = skw.get(k, 0) * M
    m, sampler = make_arm(method, arm, n_steps, method_kw, **skw)
    view = EnsembleBackend(backends[0], M, seeds=seeds * len(backends),
                           bases=[b for b in backends for _ in seeds])
    wall, cpu = time.perf_counter(), time.process_time()
    res = distill(view, m, sampler, steps=steps, batch_size=batch_size * M, lr=lr,
                  grad_clip=grad_clip, seed=seeds[0], progress=progress, desc=desc,
                  **distill_kw)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    per = steps * batch_size * M
    run = {"wall_s": wall, "cpu_s": cpu, "members": M, "history": res.history,
           "sampler": sampler,
           "nfe_teacher": view.counter.get("teacher", 0) / per,
           "nfe_student": (view.counter.get("student", 0)
                           + view.counter.get("critic", 0)) / per}
    return [[MemberView(res.method, i * len(seeds) + k, s, run) for k, s in enumerate(seeds)]
            for i in range(len(backends))]


__all__ = ["ARMS", "DDIL_SOURCE", "DMD2_TOY_RECIPE", "METHODS", "Budget", "EnsembleBackend", "MemberView",
           "NFECounter", "RenoisedRolloutSampler", "SeedEnsemble", "make_arm", "make_sampler",
           "method_defaults", "train_arm", "train_cells"]
