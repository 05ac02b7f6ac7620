"""DMD2 (Yin et al., 2024): distribution matching with a fake critic, as a feedback for DDIL.

A few-step generator G (the student) maps a state x_t on its grid {999, 749, 500, 250} to a
sample x = G(x_t, t). At a random tau in [0.02 T, 0.98 T], x is re-noised, x_tau = q(x, tau),
and the frozen teacher ("real score") and the fake critic (a copy of the teacher trained to
denoise generator samples) give x0 estimates. The generator's gradient is their difference,

    g = (x0_fake - x0_real) / mean|x - x0_real|,     L_G = 0.5 ||x - sg(x - g)||^2,

so dL_G/dx = g. The critic is updated ``critic_steps`` times per generator step (two time-scale
rule) with the denoising loss on detached generator samples. Optional GAN head on the critic's
features with softplus (non-saturating) losses. DMD2's "backward simulation" (generator inputs
from its own rollouts) is the sampler with beta_student_bckwrd = 1; DMD2+DDIL uses mixed
rollouts. Reflected: teacher, critic and generator x0 are thresholded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import _bcast
from ..sampling import ConsistencyPolicy
from ..validation import check_int, check_number, fail, is_number
from .base import Method, per_sample_mean


class DMD2(Method):
    """:param critic_steps: fake-critic updates per generator update (10 in the paper).
    :param tau_range: fraction of T where the distribution-matching gradient is taken.
    :param gan_weight: weight of the GAN term in the generator loss (0: off).
    :param gan_critic_weight: weight of the GAN classification loss of the critic head.
    :param norm_floor: lower bound of the normaliser mean|x - x0_real|. With reflection the
        generator's x and the teacher's x0 can meet on a corner of the support; the
        normaliser then collapses and |g| explodes (seen on the toy tier: losses near 1e13).

    Teacher cost: one (guided) real-score call per generator sample and step, so
    ``nfe["teacher_target"]`` grows by the batch size per training step (the fake critic is
    not the teacher and is not counted)."""

    name = "dmd2"

    def __init__(self, n_steps: int = 4, reflected: bool = False, critic_steps: int = 10,
                 tau_range: tuple = (0.02, 0.98), gan_weight: float = 0.0,
                 gan_critic_weight: float = 1.0, norm_floor: float = 1e-2):
        super().__init__(n_steps, reflected)
        check_int("critic_steps", critic_steps, 1)
        if not (isinstance(tau_range, (tuple, list)) and len(tau_range) == 2
                and all(is_number(v) for v in tau_range)
                and 0.0 <= tau_range[0] < tau_range[1] <= 1.0):
            fail("tau_range", tau_range, "two numbers lo, hi with 0 <= lo < hi <= 1 "
                 "(fractions of T)")
        check_number("gan_weight", gan_weight, 0.0)
        check_number("gan_critic_weight", gan_critic_weight, 0.0)
        check_number("norm_floor", norm_floor, 0.0, lo_open=True)
        self.critic_steps, self.tau_range = critic_steps, tuple(tau_range)
        self.gan_weight, self.gan_critic_weight = gan_weight, gan_critic_weight
        self.norm_floor = norm_floor

    def setup(self, backend):
        T = backend.schedule.T
        if int(T * self.tau_range[1]) <= int(T * self.tau_range[0]):
            fail("tau_range", self.tau_range, f"a range that holds a timestep of T={T}")
        super().setup(backend)
        self.critic = backend.make_critic()
        self.gan_head = None
        if self.gan_weight > 0:
            feats = getattr(getattr(self.critic, "net", None), "features", None)
            if feats is None:
                fail("gan_weight", self.gan_weight, "0 for this backend",
                     "a GAN head needs a critic whose network has .features(x, t, cond)")
            with torch.no_grad():  # one probe batch gives the feature width
                x, c = backend.sample_noise(2), backend.sample_cond(2)
                t = torch.full((2,), self.T // 2, device=x.device)
                width = feats(x, t, c).flatten(1).shape[1]
            self.gan_head = nn.Linear(width, 1).to(x.device)

    def trainable(self):
        groups = {"student": self.student, "critic": self.critic}
        if self.gan_head is not None:
            groups["critic"] = nn.ModuleDict({"critic": self.critic, "gan_head": self.gan_head})
        return groups

    def modules(self):
        return self.trainable()

    def student_policy(self, student):
        """Consistency sampling with the generator's x0 thresholded as in training (reflected):
        the clamp passes no gradient outside the support, so an unclamped sampler would show raw
        outputs that drifted out of it unpenalised (measured on the toy tier: 70-90% of guided
        samples outside [-1, 1])."""
        return ConsistencyPolicy(student, self.schedule, self.th)

    def _gan_logit(self, x_tau, tau, cond):
        return self.gan_head(self.critic.net.features(x_tau, tau, cond).flatten(1)).squeeze(1)

    def _tau(self, n, device, lo=None, hi=None):
        lo = int(self.T * self.tau_range[0]) if lo is None else lo
        hi = int(self.T * self.tau_range[1]) if hi is None else hi
        return torch.randint(lo, hi, (n,), device=device)

    def critic_loss(self, x, cond):
        """Denoising loss of the fake critic on detached generator samples (v-space weight)."""
        tau = self._tau(len(x), x.device, 0, self.T)
        x_tau = self.schedule.q_sample(x, tau, torch.randn_like(x))
        err = (self.critic(x_tau, tau, cond) - x) ** 2 / _bcast(self.schedule.sigma(tau) ** 2, x)
        loss, logs = per_sample_mean(err), {}
        if self.gan_head is not None and self.backend.has_data:
            real, _ = self.backend.sample_data(len(x))
            real_tau = self.schedule.q_sample(real, tau, torch.randn_like(real))
            gan = (F.softplus(self._gan_logit(x_tau, tau, cond))
                   + F.softplus(-self._gan_logit(real_tau, tau, cond)))
            loss = loss + self.gan_critic_weight * gan
            logs["gan_critic"] = float(gan.detach().mean())
        return loss, logs

    def dm_gradient(self, x, cond):
        """g = (x0_fake - x0_real) / mean|x - x0_real| at a random tau (no grad)."""
        with torch.no_grad():
            tau = self._tau(len(x), x.device)
            x_tau = self.schedule.q_sample(x, tau, torch.randn_like(x))
            x0_real = self.counted_teacher_x0(x_tau, tau, cond)
            x0_fake = self.th(self.critic(x_tau, tau, cond))
            norm = per_sample_mean((x - x0_real).abs()).clamp_min(self.norm_floor)
            return (x0_fake - x0_real) / _bcast(norm, x), x_tau, tau

    def losses(self, states):
        x_t, t, cond = states.x_t, states.t, states.cond
        with torch.no_grad():
            x_fake = self.th(self.student(x_t, t, cond)).float()
        for _ in range(self.critic_steps):
            loss, logs = self.critic_loss(x_fake, cond)
            yield "critic", loss, logs
        x = self.th(self.student(x_t, t, cond))
        g, x_tau, tau = self.dm_gradient(x.detach(), cond)
        loss = 0.5 * per_sample_mean((x - (x - g).detach()) ** 2)
        logs = {}
        if self.gan_head is not None:
            x_tau_g = self.schedule.q_sample(x, tau, torch.randn_like(x))
            gan = F.softplus(-self._gan_logit(x_tau_g, tau, cond))
            loss = loss + self.gan_weight * gan
            logs["gan_gen"] = float(gan.detach().mean())
        yield "student", loss, logs
