"""The StateSampler: where DDIL's training states x_t come from (DDIL, Sec. 4, Algorithm 1).

Each training state is drawn from one of four sources, chosen per sample with the priors

    forward  beta_frwd             q_sample of data x0 at a timestep the method trains on
    teacher  beta_teacher_bckwrd   the teacher's backward rollout from noise (DDIM)
    student  beta_student_bckwrd   the student's own rollout, as it samples at inference
    mixed    beta_mixed            each step taken by teacher or student at random (DAgger)

Backward states are the states at the student's grid points (x_T included: the pure noise the
student meets first at inference is itself not a forward state). A rollout of m trajectories
yields m x n states, so every state of every trajectory is used. An optional aggregation
buffer (DAgger's dataset aggregation) keeps visited states and is refreshed every k steps, so
rollouts are not paid for on every batch. Every state carries its source tag.

The sampler never knows which loss it feeds: the Method only tells it, through a ``StateSpec``,
at which timesteps it trains and how the student and teacher move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import DDIMPolicy, MixedPolicy, take_cond
from .validation import check_choice, check_int, check_number, fail

SOURCES = ("forward", "teacher", "student", "mixed")
PRIOR_NAMES = ("beta_frwd", "beta_teacher_bckwrd", "beta_student_bckwrd", "beta_mixed")
PRIOR_SCHEDULES = ("constant", "student_selection")


@dataclass
class StateSpec:
    """What a Method needs from the sampler (set by the method, read by the sampler).

    forward_t      (m,) timesteps at which forward states are drawn (uniformly)
    grids          student inference grids for backward rollouts (one is picked per rollout)
    student_policy (student denoiser) -> policy, how the student moves at inference
    teacher        the teacher denoiser (x0, thresholded as the method wants)
    teacher_substeps  teacher DDIM steps per student step in teacher/mixed rollouts
    """
    forward_t: torch.Tensor
    grids: list[torch.Tensor]
    student_policy: Callable
    teacher: Callable
    teacher_substeps: int = 1


@dataclass
class States:
    """A batch of training states. ``source`` holds indices into ``SOURCES``."""
    x_t: torch.Tensor
    t: torch.Tensor
    cond: object
    source: torch.Tensor

    def __len__(self):
        return self.x_t.shape[0]

    def take(self, idx) -> "States":
        return States(self.x_t[idx], self.t[idx], take_cond(self.cond, idx), self.source[idx])

    @staticmethod
    def cat(parts: list["States"]) -> "States":
        parts = [p for p in parts if len(p)]
        return States(torch.cat([p.x_t for p in parts]), torch.cat([p.t for p in parts]),
                      _cat_cond([p.cond for p in parts]), torch.cat([p.source for p in parts]))


def _cat_cond(conds):
    if conds[0] is None:
        return None
    if isinstance(conds[0], dict):
        return {k: _cat_cond([c[k] for c in conds]) for k in conds[0]}
    if torch.is_tensor(conds[0]) and conds[0].ndim > 0:
        return torch.cat(conds)
    return conds[0]


def validate_priors(priors: dict) -> dict:
    """The four source priors (missing ones are 0): non-negative finite numbers summing to 1."""
    for k, v in priors.items():
        if k not in PRIOR_NAMES:
            fail(k, v, f"the priors {PRIOR_NAMES}", "not a source prior")
        check_number(k, v, 0.0)
    total = sum(priors.values())
    if abs(total - 1.0) > 1e-6:
        fail("priors", dict(priors), f"non-negative numbers {PRIOR_NAMES} that sum to 1",
             f"they sum to {total:g}, the priors must sum to 1")
    return {k: float(priors.get(k, 0.0)) for k in PRIOR_NAMES}


@dataclass
class StateSampler:
    """Draws batches of training states from the four sources (see module docstring).

    :param beta_frwd, beta_teacher_bckwrd, beta_student_bckwrd, beta_mixed: source priors
        (non-negative, sum to 1). The defaults (all forward) are plain, non-DDIL distillation.
    :param p_student: in mixed rollouts, the probability that the student takes a step.
    :param prior_schedule: "constant", or "student_selection" (the paper's protocol: start on
        data only and move linearly to the given priors over ``ramp_steps`` training steps).
    :param buffer_size: states kept per backward source (0: fresh rollouts for every batch).
    :param refresh_every: with a buffer, roll out ``refresh_size`` new states every k steps.
    :param rollout_until: backward states only at grid timesteps >= this (DMD2+DDIL rolls out
        "to a chosen noise level", e.g. 500); -1: every grid point.
    """
    beta_frwd: float = 1.0
    beta_teacher_bckwrd: float = 0.0
    beta_student_bckwrd: float = 0.0
    beta_mixed: float = 0.0
    p_student: float = 0.5
    prior_schedule: str = "constant"
    ramp_steps: int = 0
    buffer_size: int = 0
    refresh_every: int = 1
    refresh_size: int = 0
    rollout_until: int = -1
    nfe: dict = field(default_factory=lambda: {"teacher": 0, "student": 0})

    def __post_init__(self):
        self.priors = validate_priors({k: getattr(self, k) for k in PRIOR_NAMES})
        check_number("p_student", self.p_student, 0.0, 1.0)
        check_choice("prior_schedule", self.prior_schedule, PRIOR_SCHEDULES)
        for k in ("ramp_steps", "buffer_size", "refresh_size"):
            check_int(k, getattr(self, k), 0)
        check_int("refresh_every", self.refresh_every, 1)
        check_int("rollout_until", self.rollout_until, -1)
        if not (isinstance(self.nfe, dict) and set(self.nfe) == {"teacher", "student"}):
            fail("nfe", self.nfe, "the counters {'teacher': int, 'student': int} (leave it out)")
        self.buffer: dict[str, States] = {}

    @property
    def is_ddil(self) -> bool:
        return self.priors["beta_frwd"] < 1.0

    def priors_at(self, step: int) -> dict:
        """The priors in force at a training step (the student-selection ramp, if any)."""
        if self.prior_schedule == "constant" or self.ramp_steps == 0:
            return dict(self.priors)
        frac = min(1.0, step / self.ramp_steps)
        return {k: frac * v + (1 - frac) * (k == "beta_frwd") for k, v in self.priors.items()}

    def check_backend(self, backend) -> None:
        if not backend.has_data and self.priors["beta_frwd"] > 0:
            fail("beta_frwd", self.priors["beta_frwd"], "0, with beta_teacher_bckwrd > 0: "
                 "teacher rollouts stand in for the data",
                 "beta_frwd must be 0 for a data-free backend (no data to diffuse)")
        T = backend.schedule.T
        if self.rollout_until > T - 1:
            fail("rollout_until", self.rollout_until, f"an int in [-1, T-1={T - 1}]",
                 "no timestep of the schedule is that noisy")

    def check_spec(self, spec: StateSpec) -> None:
        """Every rollout grid the method may pick keeps a state at or above ``rollout_until``
        (checked before training, not at the first rollout)."""
        uses_rollouts = any(self.priors[k] > 0 for k in PRIOR_NAMES[1:])
        for grid in spec.grids if uses_rollouts else []:
            if not (grid >= self.rollout_until).any():
                fail("rollout_until", self.rollout_until,
                     f"an int <= {int(grid.max())}, the noisiest point of the method's "
                     f"{len(grid)}-step rollout grid {grid.tolist()}",
                     "it leaves no grid timestep to roll out to")

    # ---- the sources ----
    def forward(self, backend, spec: StateSpec, n: int) -> States:
        x0, cond = backend.sample_data(n)
        t = spec.forward_t[torch.randint(0, len(spec.forward_t), (n,))].to(x0.device)
        x_t = backend.schedule.q_sample(x0, t, torch.randn_like(x0))
        return States(x_t, t, cond, torch.zeros(n, dtype=torch.long, device=x0.device))

    def _counted(self, den, who):
        def f(x, t, cond=None):
            self.nfe[who] += x.shape[0]
            return den(x, t, cond)
        return f

    @torch.no_grad()
    def backward(self, backend, spec: StateSpec, student, source: str, n: int,
                 plan: torch.Generator | None = None) -> States:
        """n states from rollouts of ``source`` ("teacher", "student" or "mixed"), taken at the
        grid points of ceil(n / len(grid)) trajectories. ``plan``: see ``sample``."""
        full = spec.grids[int(torch.randint(0, len(spec.grids), (), generator=plan))]
        grid = full[full >= self.rollout_until]  # stop the rollout at the chosen noise level
        if len(grid) == 0:
            fail("rollout_until", self.rollout_until, f"an int <= {int(full.max())}",
                 "it leaves no grid timestep to roll out to")
        m = math.ceil(n / len(grid))
        cond = backend.sample_cond(m)
        x = backend.sample_noise(m)
        k = spec.teacher_substeps
        teach = DDIMPolicy(self._counted(spec.teacher, "teacher"), backend.schedule,
                           fine_steps=len(full) * k if k > 1 else None)
        stud = spec.student_policy(self._counted(student, "student"))
        policy = {"teacher": teach, "student": stud,
                  "mixed": MixedPolicy(teach, stud, self.p_student, generator=plan)}[source]
        xs = []
        for i, t in enumerate(grid.tolist()):
            xs.append(x)
            if i + 1 < len(grid):  # the step after the last state is not needed
                x, _ = policy.step(x, t, int(grid[i + 1]), cond)
        x_t = torch.cat(xs)  # (n_grid * m, ...), grid-major
        t = grid.to(x.device).repeat_interleave(m)
        states = States(x_t, t, _cat_cond([cond] * len(grid)),
                        torch.full((len(x_t),), SOURCES.index(source), device=x.device))
        return states.take(torch.randperm(len(x_t), device=x.device)[:n])

    # ---- a batch ----
    def sample(self, backend, spec: StateSpec, student, n: int, step: int = 0,
               plan: torch.Generator | None = None) -> States:
        """A batch of n states; the number from each source is multinomial(n, priors).

        ``plan``: the random stream for the batch's *structure* (how many states per source,
        which rollout grid, which samples the student moves in a mixed step); None: torch's
        global stream. Processes that share a plan run the same sequence of student and teacher
        calls, which sharded (FSDP) students need: each call is a collective. Noise and data
        still come from each process's own stream."""
        priors = self.priors_at(step)
        if priors["beta_frwd"] == 1.0:  # forward diffusion only: nothing to draw
            return self.forward(backend, spec, n)
        p = torch.tensor([priors[k] for k in PRIOR_NAMES])
        counts = torch.multinomial(p, n, replacement=True, generator=plan)
        counts = torch.bincount(counts, minlength=4).tolist()
        parts = [self.forward(backend, spec, counts[0])] if counts[0] else []
        for src, c in zip(SOURCES[1:], counts[1:]):
            if c == 0:
                continue
            if self.buffer_size:
                self._refresh(backend, spec, student, src, step, plan)
                buf = self.buffer[src]
                parts.append(buf.take(torch.randint(0, len(buf), (c,), device=buf.x_t.device)))
            else:
                parts.append(self.backward(backend, spec, student, src, c, plan))
        return States.cat(parts)

    def fill(self, backend, spec: StateSpec, student, step: int = 0,
             plan: torch.Generator | None = None) -> list[str]:
        """Roll out now the buffer of every backward source with a prior > 0 that has none yet
        (otherwise the first batch that draws from a source does it); returns those sources.
        Benchmarks call it before timing, so the one-off fill does not land in a timed step."""
        todo = [src for k, src in zip(PRIOR_NAMES[1:], SOURCES[1:])
                if self.buffer_size and self.priors[k] > 0 and src not in self.buffer]
        for src in todo:
            self._refresh(backend, spec, student, src, step, plan)
        return todo

    def _refresh(self, backend, spec, student, src, step, plan=None):
        fresh = src not in self.buffer
        if fresh or step % self.refresh_every == 0:
            size = self.buffer_size if fresh else (self.refresh_size or self.buffer_size // 4)
            new = self.backward(backend, spec, student, src, size, plan)
            old = self.buffer.get(src)
            buf = new if old is None else States.cat([new, old])
            self.buffer[src] = buf.take(torch.arange(min(len(buf), self.buffer_size)))
