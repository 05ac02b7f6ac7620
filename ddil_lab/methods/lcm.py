"""Consistency distillation as in Latent Consistency Models (Song et al. 2023; Luo et al. 2023).

Consistency function (LCM's boundary parameterisation, timestep scaling s = 10, sigma_data = 0.5):

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t),
    c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),  c_out(t) = s t / sqrt((s t)^2 + sigma_data^2)

so c_skip(0) = 1 and c_out(0) = 0: f is the identity at t = 0. Loss at a state x_t:

    x_{t'} = DDIM_teacher(x_t, t -> t' = t - skip * T / N)      (one solver step, guided teacher)
    L = d(f_theta(x_t, t), sg(f_ema(x_{t'}, t')))               (Huber with c = 0.001, or L2)

on the N = 50-point solver grid t in {19, 39, ..., 999}, with f_ema an EMA (decay 0.95) of f_theta.
Students sample by multistep consistency sampling. LCM+DDIL (paper, Sec. 4.2): the same loss also
on states of the student's own multistep trajectories with a random 3, 4 or 5 steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..diffusion import NO_THRESHOLD, _bcast, timesteps
from ..sampling import ConsistencyPolicy
from ..validation import check_choice, check_int, check_number, fail, is_int
from .base import Method, per_sample_mean


class ConsistencyFn(nn.Module):
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t) around an x0 denoiser; itself a
    Denoiser (its output is an x0 estimate). ``threshold`` applies to x0_hat (target copies)."""

    def __init__(self, denoiser: nn.Module, sigma_data: float = 0.5, scaling: float = 10.0,
                 threshold=NO_THRESHOLD):
        super().__init__()
        self.denoiser, self.sigma_data, self.scaling, self.threshold = (
            denoiser, sigma_data, scaling, threshold)

    def boundary(self, t: torch.Tensor):
        st = self.scaling * t.float().clamp_min(0)
        c_skip = self.sigma_data ** 2 / (st ** 2 + self.sigma_data ** 2)
        c_out = st / (st ** 2 + self.sigma_data ** 2).sqrt()
        return c_skip, c_out

    def forward(self, x_t, t, cond=None):
        c_skip, c_out = self.boundary(t)
        x0 = self.threshold(self.denoiser(x_t, t, cond))
        return _bcast(c_skip, x0) * x_t.float() + _bcast(c_out, x0) * x0


class LCM(Method):
    """:param solver_steps: N, the teacher's DDIM solver grid (50).
    :param skip: k, solver-grid points per consistency step (t' = t - k T/N).
    :param ema_decay: decay of the target network (0.95 as in LCM).
    :param loss: "huber" (c = ``huber_c``) or "l2".
    :param ddil_steps: inference step counts of the student rollouts used by LCM+DDIL.

    Teacher cost of the target: one (guided) teacher DDIM step per state, so
    ``nfe["teacher_target"]`` grows by the batch size per training step."""

    name = "lcm"

    def __init__(self, n_steps: int = 4, reflected: bool = False, solver_steps: int = 50,
                 skip: int = 1, ema_decay: float = 0.95, loss: str = "huber",
                 huber_c: float = 1e-3, sigma_data: float = 0.5, timestep_scaling: float = 10.0,
                 ddil_steps: tuple = (3, 4, 5)):
        super().__init__(n_steps, reflected)
        check_int("solver_steps", solver_steps, 2)
        check_int("skip", skip, 1, solver_steps - 1)
        check_number("ema_decay", ema_decay, 0.0, 1.0, hi_open=True)
        check_choice("loss", loss, ("huber", "l2"))
        check_number("huber_c", huber_c, 0.0, lo_open=True)
        check_number("sigma_data", sigma_data, 0.0, lo_open=True)
        check_number("timestep_scaling", timestep_scaling, 0.0, lo_open=True)
        if not (isinstance(ddil_steps, (tuple, list)) and ddil_steps
                and all(is_int(n) and n >= 1 for n in ddil_steps)):
            fail("ddil_steps", ddil_steps, "a non-empty list of ints >= 1 (student step counts)")
        self.solver_steps, self.skip, self.ema_decay = solver_steps, skip, ema_decay
        self.loss_kind, self.huber_c = loss, huber_c
        self.sigma_data, self.timestep_scaling, self.ddil_steps = sigma_data, timestep_scaling, tuple(ddil_steps)

    def setup(self, backend):
        T = backend.schedule.T
        if self.solver_steps > T:
            fail("solver_steps", self.solver_steps, f"an int in [2, T={T}]")
        for n in self.ddil_steps:
            if n > T:
                fail("ddil_steps", list(self.ddil_steps), f"ints in [1, T={T}]")
        super().setup(backend)
        self.student = ConsistencyFn(self.student, self.sigma_data, self.timestep_scaling)
        self.target = copy.deepcopy(self.student).requires_grad_(False)
        self.target.threshold = self.th  # the consistency target is thresholded (reflected)
        T, N = self.T, self.solver_steps
        self.solver_t = torch.arange(1, N + 1) * (T // N) - 1  # 19, 39, ..., 999

    def modules(self):
        return {"student": self.student, "target": self.target}

    def student_policy(self, student):
        return ConsistencyPolicy(student, self.schedule)

    def spec(self):
        sp = super().spec()
        sp.forward_t = self.solver_t
        sp.grids = [timesteps(n, self.T) for n in self.ddil_steps]
        return sp

    def distance(self, a, b):
        if self.loss_kind == "l2":
            return per_sample_mean((a - b) ** 2)
        return per_sample_mean(((a - b) ** 2 + self.huber_c ** 2).sqrt() - self.huber_c)

    @torch.no_grad()
    def consistency_target(self, x_t, t, cond=None) -> torch.Tensor:
        """f_ema(x_{t'}, t'): one (thresholded) teacher DDIM step t -> t' = t - skip * T/N on
        the solver grid, then the EMA target network."""
        t_prev = (t - self.skip * (self.T // self.solver_steps)).clamp_min(0)
        x0_teacher = self.counted_teacher_x0(x_t, t, cond)
        x_prev = self.schedule.ddim_step(x_t.float(), x0_teacher, t, t_prev)
        return self.target(x_prev, t_prev, cond)

    def losses(self, states):
        x_t, t, cond = states.x_t, states.t, states.cond
        target = self.consistency_target(x_t, t, cond)
        pred = self.student(x_t, t, cond)
        yield "student", self.distance(pred, target), {}

    @torch.no_grad()
    def after_step(self):
        for p_t, p in zip(self.target.parameters(), self.student.parameters()):
            p_t.lerp_(p.detach(), 1.0 - self.ema_decay)
