"""The Method contract shared by PD, LCM and DMD2."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..diffusion import NO_THRESHOLD, timesteps
from ..rollout import States, StateSpec
from ..sampling import DDIMPolicy, Trajectory, sample
from ..validation import check_bool, check_int, fail


class Method:
    """Base class. Subclasses set ``name``, build their modules in ``setup`` and yield losses.

    :param n_steps: the student's number of inference steps (grid ``timesteps(n_steps)``).
    :param reflected: threshold x0 estimates to the backend's data support where the paper does
        ("reflected diffusion distillation"); off by default.

    ``nfe["teacher_target"]`` counts the teacher evaluations the method's own targets cost
    (PD's substeps, LCM's solver step, DMD2's real score), separately from the rollouts the
    StateSampler pays for (its ``nfe["teacher"]``). Convention, the sampler's too: one call of
    the teacher Denoiser on a batch of B states counts B, whatever the Denoiser runs inside
    (a guided ``CFG`` teacher counts once per state, although it runs its network twice).
    """

    name = "method"

    def __init__(self, n_steps: int = 4, reflected: bool = False):
        check_int("n_steps", n_steps, 1)
        check_bool("reflected", reflected)
        self.n_steps, self.reflected = n_steps, reflected

    # ---- building ----
    def setup(self, backend) -> None:
        """Create the student (and any critic / target) from the backend."""
        self.backend = backend
        self.schedule = backend.schedule
        self.T = backend.schedule.T
        if self.n_steps > self.T:
            fail("n_steps", self.n_steps, f"an int in [1, T={self.T}] (the teacher's steps)")
        self.grid = timesteps(self.n_steps, self.T)
        self.th = backend.support if (self.reflected and backend.support) else NO_THRESHOLD
        self.teacher = backend.teacher
        self.student = backend.make_student()
        self.nfe = {"teacher_target": 0}

    def counted_teacher_x0(self, x_t, t, cond=None):
        """``teacher_x0`` for the method's own targets, counted in ``nfe["teacher_target"]``."""
        self.nfe["teacher_target"] += x_t.shape[0]
        return self.teacher_x0(x_t, t, cond)

    def trainable(self) -> dict[str, nn.Module]:
        """Modules to optimise, by optimizer group (each group gets its own optimizer)."""
        return {"student": self.student}

    def modules(self) -> dict[str, nn.Module]:
        """Every module whose state a checkpoint must hold."""
        return dict(self.trainable())

    def teacher_x0(self, x_t, t, cond=None):
        """The (thresholded) teacher estimate; every method thresholds the teacher."""
        return self.th(self.teacher(x_t, t, cond))

    # ---- what the sampler needs ----
    def student_policy(self, student):
        return DDIMPolicy(student, self.schedule)

    def spec(self) -> StateSpec:
        return StateSpec(forward_t=self.grid, grids=[self.grid],
                         student_policy=self.student_policy, teacher=self.teacher_x0)

    # ---- training ----
    def losses(self, states: States) -> Iterator[tuple[str, torch.Tensor, dict]]:
        """Yield ``(group, per_sample_loss (B,), logs)`` in update order; the train loop steps the
        optimizer of ``group`` after each."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every training step (e.g. to update an EMA target)."""

    # ---- inference ----
    @torch.no_grad()
    def sample(self, x_T, cond=None, student=None, **kw) -> Trajectory:
        """Sample with the (given or trained) student the way it runs at inference."""
        student = self.student if student is None else student
        return sample(self.student_policy(student), x_T, self.grid, cond, schedule=self.schedule,
                      **kw)

    def config(self) -> dict:
        return {k: v for k, v in vars(self).items()
                if isinstance(v, (int, float, str, bool, tuple, list, type(None)))}


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(1)
