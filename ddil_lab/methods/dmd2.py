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

Two options from DMD2's predecessor and its recipe (off / as in DMD2 by default):

- ``regression_weight`` > 0: DMD's regression loss (Yin et al., 2024a), w_reg ||G(x_t, t) - y||^2
  on a fixed set of pairs (x_t, y), y the teacher's deterministic DDIM solution from x_t to 0
  (``regression_steps`` steps over the whole range). Pairs are drawn at every grid time t from
  forward-diffused data (``regression_pairs`` per time; at t = T that is pure noise, DMD's own
  one-step case), once, when the method is set up; their teacher calls count in
  ``nfe["teacher_target"]``. The loss anchors each step of G to the teacher's ODE map, which
  the distribution-matching gradient alone leaves free (any map with the right marginal).
- ``critic_init="random"``: the fake critic starts from fresh weights (the teacher's
  architecture re-initialised) instead of a copy of the teacher's network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..denoiser import cat_cond
from ..diffusion import _bcast, timesteps
from ..sampling import ConsistencyPolicy, DDIMPolicy, sample, take_cond
from ..validation import check_choice, check_int, check_number, fail, is_number
from .base import Method, per_sample_mean


class DMD2(Method):
    """:param critic_steps: fake-critic updates per generator update (10 in the paper).
    :param tau_range: fraction of T where the distribution-matching gradient is taken.
    :param gan_weight: weight of the GAN term in the generator loss (0: off).
    :param gan_critic_weight: weight of the GAN classification loss of the critic head.
    :param regression_weight: weight of DMD's regression loss on teacher ODE pairs (0: off).
    :param regression_pairs: pairs per grid time (drawn once, at setup).
    :param regression_steps: DDIM steps of the teacher over [0, T] for the pairs' targets
        (a multiple of ``n_steps``).
    :param dm_weight: weight of the distribution-matching term (0 with a regression weight: the
        regression loss alone, a plain knowledge-distillation baseline).
    :param critic_init: "teacher" (a copy of the teacher's network, DMD2's) or "random".
    :param norm_floor: lower bound of the normaliser mean|x - x0_real|. With reflection the
        generator's x and the teacher's x0 can meet on a corner of the support; the
        normaliser then collapses and |g| explodes (seen on the toy tier: losses near 1e13).

    Teacher cost: one (guided) real-score call per generator sample and step, so
    ``nfe["teacher_target"]`` grows by the batch size per training step (the fake critic is
    not the teacher and is not counted)."""

    name = "dmd2"

    def __init__(self, n_steps: int = 4, reflected: bool = False, critic_steps: int = 10,
                 tau_range: tuple = (0.02, 0.98), gan_weight: float = 0.0,
                 gan_critic_weight: float = 1.0, norm_floor: float = 1e-2,
                 regression_weight: float = 0.0, regression_pairs: int = 1024,
                 regression_steps: int = 32, critic_init: str = "teacher",
                 dm_weight: float = 1.0):
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
        check_number("regression_weight", regression_weight, 0.0)
        check_int("regression_pairs", regression_pairs, 1)
        check_int("regression_steps", regression_steps, 1)
        if regression_steps % n_steps:
            fail("regression_steps", regression_steps, f"a multiple of n_steps={n_steps}")
        check_choice("critic_init", critic_init, ("teacher", "random"))
        check_number("dm_weight", dm_weight, 0.0)
        if dm_weight == 0 and regression_weight == 0:
            fail("dm_weight", dm_weight, "> 0 unless regression_weight > 0",
                 "with both terms off the generator gets no loss")
        self.dm_weight = dm_weight
        self.regression_weight, self.regression_pairs = regression_weight, regression_pairs
        self.regression_steps, self.critic_init = regression_steps, critic_init
        self.critic_steps, self.tau_range = critic_steps, tuple(tau_range)
        self.gan_weight, self.gan_critic_weight = gan_weight, gan_critic_weight
        self.norm_floor = norm_floor

    def setup(self, backend):
        T = backend.schedule.T
        if int(T * self.tau_range[1]) <= int(T * self.tau_range[0]):
            fail("tau_range", self.tau_range, f"a range that holds a timestep of T={T}")
        super().setup(backend)
        self.critic = (backend.make_random_critic() if self.critic_init == "random"
                       else backend.make_critic())
        if self.regression_weight > 0 and not backend.has_data:
            fail("regression_weight", self.regression_weight, "0 for a backend without data",
                 "the regression pairs start from forward-diffused data states")
        self.pairs = self.regression_set(backend) if self.regression_weight > 0 else None
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

    @torch.no_grad()
    def regression_set(self, backend) -> dict:
        """{x_t, t, cond, y}: ``regression_pairs`` forward-diffused data states per grid time t
        and the teacher's DDIM solution y from each to t = 0 on the ``regression_steps`` grid
        (the points of that grid at or below t; every grid time is on it)."""
        fine = timesteps(self.regression_steps, self.T).tolist()
        policy = DDIMPolicy(self.counted_teacher_x0, self.schedule)
        xs, ts, conds, ys = [], [], None, []
        for t in self.grid.tolist():
            x0, c = backend.sample_data(self.regression_pairs)
            tv = torch.full((len(x0),), t, device=x0.device)
            x_t = self.schedule.q_sample(x0, tv, torch.randn_like(x0))
            y = sample(policy, x_t, [u for u in fine if u <= t], c, schedule=self.schedule).sample
            xs.append(x_t), ts.append(tv), ys.append(y)
            conds = c if conds is None else cat_cond(conds, c)
        return {"x_t": torch.cat(xs), "t": torch.cat(ts), "cond": conds, "y": torch.cat(ys)}

    def regression_loss(self, n: int) -> torch.Tensor:
        """||G(x_t, t) - y||^2 (per-sample mean) on ``n`` pairs drawn from the regression set."""
        x_t, t, cond, y = (self.pairs[k] for k in ("x_t", "t", "cond", "y"))
        idx = torch.randint(0, len(x_t), (n,), device=x_t.device)
        out = self.th(self.student(x_t[idx], t[idx], take_cond(cond, idx)))
        return per_sample_mean((out - y[idx]) ** 2)

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
        loss = self.dm_weight * 0.5 * per_sample_mean((x - (x - g).detach()) ** 2)
        logs = {}
        if self.gan_head is not None:
            x_tau_g = self.schedule.q_sample(x, tau, torch.randn_like(x))
            gan = F.softplus(-self._gan_logit(x_tau_g, tau, cond))
            loss = loss + self.gan_weight * gan
            logs["gan_gen"] = float(gan.detach().mean())
        if self.pairs is not None:
            reg = self.regression_loss(len(x))
            loss = loss + self.regression_weight * reg
            logs["regression"] = float(reg.detach().mean())
        yield "student", loss, logs
