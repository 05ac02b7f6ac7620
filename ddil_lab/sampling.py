"""Policies and the sampler.

A *policy* is how a model moves at inference: ``policy.step(x_t, t, s, cond) -> (x_s, x0_hat)``
takes one step from t to s < t (s = -1 is the clean end). Reverse diffusion is then a Markov
decision process whose states are the x_t (DDIL, Sec. 3), and a rollout is a policy stepping
along a grid of timesteps. Three policies cover the paper:

- ``DDIMPolicy``: deterministic DDIM, optionally with substeps on a finer grid (a teacher
  with 8 steps per student step walks the 8n-step grid inside each student step);
- ``ConsistencyPolicy``: multistep consistency sampling (predict x0, re-noise to s with fresh
  noise), how LCM and DMD2 students sample;
- ``MixedPolicy``: at every step each sample is moved by the teacher's or the student's policy
  at random (the DAgger-style mixed rollout of PD+DDIL and DMD2+DDIL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .diffusion import NO_THRESHOLD, Schedule, Threshold, next_timestep, timesteps
from .validation import ConfigError, check_number


def _tvec(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


class DDIMPolicy:
    """Deterministic DDIM with the given denoiser. ``fine_steps`` (e.g. 32) makes each step t->s
    walk through the points of the ``fine_steps``-step grid that lie strictly between s and t."""

    def __init__(self, denoiser, schedule: Schedule, threshold: Threshold = NO_THRESHOLD,
                 fine_steps: int | None = None):
        self.denoiser, self.schedule, self.threshold = denoiser, schedule, threshold
        self.fine = timesteps(fine_steps, schedule.T).tolist() if fine_steps else []

    def points(self, t: int, s: int) -> list[int]:
        return [t] + [u for u in self.fine if s < u < t] + [s]

    def step(self, x_t, t: int, s: int, cond=None):
        pts = self.points(int(t), int(s))
        x, x0_first = x_t, None
        for a, b in zip(pts[:-1], pts[1:]):
            x0 = self.threshold(self.denoiser(x, _tvec(a, x), cond))
            x0_first = x0 if x0_first is None else x0_first
            x = self.schedule.ddim_step(x, x0, a, b)
        return x, x0_first


class ConsistencyPolicy:
    """Multistep consistency sampling: x0 = f(x_t, t); x_s = alpha_s x0 + sigma_s z, z fresh."""

    def __init__(self, denoiser, schedule: Schedule, threshold: Threshold = NO_THRESHOLD,
                 generator: torch.Generator | None = None):
        self.denoiser, self.schedule, self.threshold = denoiser, schedule, threshold
        self.generator = generator

    def step(self, x_t, t: int, s: int, cond=None):
        x0 = self.threshold(self.denoiser(x_t, _tvec(t, x_t), cond))
        z = torch.randn(x0.shape, generator=self.generator, device=x0.device, dtype=x0.dtype)
        return self.schedule.renoise(x0, _tvec(s, x0), z), x0


def take_cond(cond, idx):
    """Index a conditioning (None, a tensor, or a dict of tensors) along the batch."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: take_cond(v, idx) for k, v in cond.items()}
    if torch.is_tensor(cond) and cond.ndim > 0:
        return cond[idx]
    return cond


class MixedPolicy:
    """At each step, each sample is moved by the student with probability ``p_student``,
    else by the teacher. p_student = 0 (1) is exactly the teacher (student) rollout."""

    def __init__(self, teacher, student, p_student: float = 0.5,
                 generator: torch.Generator | None = None):
        check_number("p_student", p_student, 0.0, 1.0)
        self.teacher, self.student, self.p = teacher, student, p_student
        self.generator = generator
        self.last_mask: torch.Tensor | None = None  # which samples the student moved

    def step(self, x_t, t: int, s: int, cond=None):
        if self.p in (0.0, 1.0):
            self.last_mask = torch.full((x_t.shape[0],), self.p == 1.0, device=x_t.device)
            return (self.student if self.p == 1.0 else self.teacher).step(x_t, t, s, cond)
        u = torch.rand(x_t.shape[0], generator=self.generator, device="cpu").to(x_t.device)
        by_student = u < self.p
        x_s, x0 = torch.empty_like(x_t), torch.empty_like(x_t, dtype=torch.float32)
        for mask, pol in ((by_student, self.student), (~by_student, self.teacher)):
            if mask.any():
                idx = mask.nonzero().squeeze(1)
                xs_i, x0_i = pol.step(x_t[idx], t, s, take_cond(cond, idx))
                x_s[idx], x0[idx] = xs_i.to(x_s.dtype), x0_i.float()
        self.last_mask = by_student
        return x_s, x0


@dataclass
class Trajectory:
    """States of a rollout: ``xs[i]`` is the state at ``grid[i]`` (``xs[0]`` = x_T) and
    ``xs[-1]`` the final sample; ``x0s[i]`` is the x0 estimate made at ``grid[i]``."""
    grid: list[int]
    xs: list[torch.Tensor] = field(default_factory=list)
    x0s: list[torch.Tensor] = field(default_factory=list)

    @property
    def sample(self) -> torch.Tensor:
        return self.xs[-1]


def as_policy(policy_or_denoiser, schedule: Schedule, threshold: Threshold = NO_THRESHOLD):
    """A policy stays a policy; a bare denoiser becomes DDIM with that denoiser."""
    if hasattr(policy_or_denoiser, "step"):
        return policy_or_denoiser
    return DDIMPolicy(policy_or_denoiser, schedule, threshold)


def iter_sample(policy, x_T: torch.Tensor, grid: Sequence[int], cond=None, *,
                schedule: Schedule, threshold: Threshold = NO_THRESHOLD
                ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Roll out from x_T along ``grid`` (descending, e.g. ``timesteps(4)``), yielding
    ``(i, t, x_t, x0_hat)`` before each step and finally ``(n, -1, x_final, x_final)``.

    ``policy`` is a policy, a denoiser (DDIM), or a list of them, one per step.
    """
    grid = [int(t) for t in grid]
    pols = policy if isinstance(policy, (list, tuple)) else [policy] * len(grid)
    if len(pols) != len(grid):
        raise ConfigError(f"policy: got {len(pols)} policies for a grid of {len(grid)} steps; "
                          f"allowed: one policy, or a list of {len(grid)}")
    x = x_T
    for i, t in enumerate(grid):
        x_next, x0 = as_policy(pols[i], schedule, threshold).step(x, t, next_timestep(grid, i), cond)
        yield i, t, x, x0
        x = x_next
    yield len(grid), -1, x, x


@torch.no_grad()
def sample(policy, x_T: torch.Tensor, grid: Sequence[int], cond=None, *, schedule: Schedule,
           threshold: Threshold = NO_THRESHOLD,
           callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None
           ) -> Trajectory:
    """Run ``iter_sample`` to the end and return the ``Trajectory``; ``callback(i, t, x_t,
    x0_hat)`` sees every state on the way (for live plots)."""
    traj = Trajectory(grid=[int(t) for t in grid])
    for i, t, x, x0 in iter_sample(policy, x_T, grid, cond, schedule=schedule,
                                   threshold=threshold):
        if callback is not None:
            callback(i, t, x, x0)
        traj.xs.append(x)
        if t >= 0:
            traj.x0s.append(x0)
    return traj
