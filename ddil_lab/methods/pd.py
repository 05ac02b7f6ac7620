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

from ..diffusion import substeps
from ..sampling import DDIMPolicy, take_cond
from .base import Method, per_sample_mean


class PD(Method):
    """:param substeps: teacher DDIM steps per student step (2 for one halving stage).
    :param teacher: a teacher denoiser to use instead of the backend's (progressive stages).
    :param space: "x0" (weight max(SNR, 1)) or "v"."""

    name = "pd"

    def __init__(self, n_steps: int = 4, substeps: int = 2, reflected: bool = False,
                 teacher=None, space: str = "x0"):
        super().__init__(n_steps, reflected)
        if not isinstance(substeps, int) or substeps < 1:
            raise ValueError(f"substeps={substeps!r} must be a positive int")
        if space not in ("x0", "v"):
            raise ValueError(f"space={space!r} is not one of ('x0', 'v')")
        self.substeps, self.space, self._teacher_override = substeps, space, teacher

    def setup(self, backend):
        super().setup(backend)
        if self._teacher_override is not None:
            self.teacher = self._teacher_override
        grid = self.grid.tolist()
        self.next_t = {t: (grid[i + 1] if i + 1 < len(grid) else -1) for i, t in enumerate(grid)}
        for t, s in self.next_t.items():  # fails early if the teacher grid does not refine ours
            substeps(t, s, self.n_steps, self.substeps, self.T)

    def spec(self):
        sp = super().spec()
        sp.teacher_substeps = self.substeps
        return sp

    @torch.no_grad()
    def target(self, x_t, t: int, cond=None):
        """(x0_tgt, x_s): the x0 that makes one student DDIM step t -> s land on the teacher's
        x_s after ``substeps`` DDIM steps."""
        s = self.next_t[t]
        teacher = DDIMPolicy(self.teacher_x0, self.schedule,
                             fine_steps=self.n_steps * self.substeps if self.substeps > 1 else None)
        x_s, _ = teacher.step(x_t, t, s, cond)
        S = self.schedule
        r = S.sigma(s) / S.sigma(t)
        x0_tgt = (x_s - r * x_t) / (S.alpha(s) - r * S.alpha(t))
        return x0_tgt.float(), x_s

    def losses(self, states):
        x0_tgt = torch.empty_like(states.x_t, dtype=torch.float32)
        for t in states.t.unique().tolist():  # the teacher walks one grid interval per group
            if t not in self.next_t:
                raise ValueError(f"PD got a state at t={t}, not on its {self.n_steps}-step grid")
            idx = (states.t == t).nonzero().squeeze(1)
            x0_tgt[idx], _ = self.target(states.x_t[idx], t, take_cond(states.cond, idx))
        x0 = self.student(states.x_t, states.t, states.cond)
        S = self.schedule
        if self.space == "x0":
            w = S.snr(states.t).clamp_min(1.0)
            loss = w * per_sample_mean((x0 - x0_tgt) ** 2)
        else:
            v, v_tgt = (S.v_from_x0(states.x_t.float(), states.t, y) for y in (x0, x0_tgt))
            loss = per_sample_mean((v - v_tgt) ** 2)
        yield "student", loss, {}

