"""Progressive Distillation (Salimans & Ho, 2022), as a feedback for DDIL.

The student takes one DDIM step t -> s where the teacher takes k. The x0 target is the one
that makes the student's single DDIM step land exactly where the teacher's k steps land:

    x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t
    =>  x0_tgt = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

Loss in x0 space with the truncated-SNR weight max(SNR(t), 1) (or in v space). Direct
distillation: a teacher with k = 8 substeps teaches a 4-step student. Progressive halving
(32 -> 16 -> 8 -> 4): k = 2, and each stage's student teaches the next (``train.progressive``).
"""

from __future__ import annotations

import torch

from ..diffusion import _bcast, substeps, timesteps
from ..sampling import DDIMPolicy
from ..validation import check_callable, check_choice, check_int, fail
from .base import Method, per_sample_mean


def check_grid(n_steps: int, k: int, T: int = 1000) -> None:
    """PD's teacher walks the (n_steps * k)-step grid inside each student step: that grid must
    exist (n_steps * k <= T) and contain every point of the student's n_steps-step grid.
    Raises ``ConfigError`` naming ``n_steps`` or ``substeps``."""
    if n_steps > T:
        fail("n_steps", n_steps, f"an int in [1, T={T}] (the teacher's steps)")
    if n_steps * k > T:
        fail("substeps", k, f"n_steps * substeps <= T={T}",
             f"with n_steps={n_steps} the teacher would need a {n_steps * k}-step grid")
    grid = timesteps(n_steps, T).tolist()
    for i, t in enumerate(grid):
        s = grid[i + 1] if i + 1 < len(grid) else -1
        try:
            substeps(t, s, n_steps, k, T)
        except ValueError as e:
            fail("substeps", k, f"a substeps whose {n_steps * k}-step teacher grid contains "
                 f"every point of the {n_steps}-step student grid {grid}", str(e))


class PD(Method):
    """:param substeps: teacher DDIM steps per student step (2 for one halving stage).
    :param teacher: a teacher denoiser to use instead of the backend's (progressive stages).
    :param space: "x0" (weight max(SNR, 1)) or "v".

    Teacher cost of the target: ``substeps`` teacher DDIM steps per state, i.e.
    ``nfe["teacher_target"]`` grows by batch x substeps per training step."""

    name = "pd"

    def __init__(self, n_steps: int = 4, substeps: int = 2, reflected: bool = False,
                 teacher=None, space: str = "x0"):
        super().__init__(n_steps, reflected)
        check_int("substeps", substeps, 1)
        check_choice("space", space, ("x0", "v"))
        check_callable("teacher", teacher, "a teacher denoiser (x_t, t, cond) -> x0", none=True)
        self.substeps, self.space, self._teacher_override = substeps, space, teacher

    def setup(self, backend):
        check_grid(self.n_steps, self.substeps, backend.schedule.T)  # before the student is made
        super().setup(backend)
        if self._teacher_override is not None:
            self.teacher = self._teacher_override
        grid = self.grid.tolist()
        self.next_t = {t: (grid[i + 1] if i + 1 < len(grid) else -1) for i, t in enumerate(grid)}
        fine = DDIMPolicy(None, self.schedule, fine_steps=self.n_steps * self.substeps
                          if self.substeps > 1 else None)
        # (n_steps, substeps + 1): the teacher's timesteps from each grid time to the next
        self.walks = torch.tensor([fine.points(u, self.next_t[u]) for u in grid])
        T = backend.schedule.T  # row of each timestep in ``walks`` (-1: not on the grid)
        self.row = torch.full((T,), -1, dtype=torch.long)
        self.row[self.grid] = torch.arange(len(grid))

    def spec(self):
        sp = super().spec()
        sp.teacher_substeps = self.substeps
        return sp

    @torch.no_grad()
    def target(self, x_t, t, cond=None):
        """(x0_tgt, x_s): the x0 that makes one student DDIM step t -> s land on the teacher's
        x_s after ``substeps`` DDIM steps. ``t``: one grid time, or one per state (B,): states
        at different grid times walk their teacher steps together, one teacher call per
        substep for the whole batch."""
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).expand(B)
        i = self.row.to(t.device)[t.clamp(0, len(self.row) - 1)]
        grid = self.grid.to(t.device)
        if not torch.equal(grid[i], t):  # off the grid (a row of -1 never matches)
            bad = t[grid[i] != t][0].item()
            raise ValueError(f"PD got a state at t={bad}, not on its {self.n_steps}-step grid")
        walk = self.walks.to(x_t.device)[i]  # (B, substeps + 1): from each state's t to its s
        x = x_t
        for j in range(walk.shape[1] - 1):
            x0 = self.counted_teacher_x0(x, walk[:, j], cond)
            x = self.schedule.ddim_step(x, x0, walk[:, j], walk[:, j + 1])
        S, s = self.schedule, walk[:, -1]
        r = _bcast(S.sigma(s) / S.sigma(t), x)
        x0_tgt = (x - r * x_t) / (_bcast(S.alpha(s), x) - r * _bcast(S.alpha(t), x))
        return x0_tgt.float(), x

    def losses(self, states):
        x0_tgt, _ = self.target(states.x_t, states.t, states.cond)  # all grid times at once
        x0 = self.student(states.x_t, states.t, states.cond)
        S = self.schedule
        if self.space == "x0":
            w = S.snr(states.t).clamp_min(1.0)
            loss = w * per_sample_mean((x0 - x0_tgt) ** 2)
        else:
            v, v_tgt = (S.v_from_x0(states.x_t.float(), states.t, y) for y in (x0, x0_tgt))
            loss = per_sample_mean((v - v_tgt) ** 2)
        yield "student", loss, {}

