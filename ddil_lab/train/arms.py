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

Seeds are trained as one batched ensemble (``EnsembleBackend``/``SeedEnsemble``): one
``distill`` call whose conditioning routes each state to its seed's student, so the per-step
overhead is paid once for all seeds. The toy table, the image table and the notebooks all
train their students through ``train_arm``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..backend import Backend
from ..methods import make_method
from ..methods.base import Method
from ..rollout import StateSampler
from ..sampling import Trajectory, take_cond
from .loop import distill

METHODS = ("pd", "lcm", "dmd2")
ARMS = ("baseline", "ddil", "reflected", "ddil+reflected")

# Where DDIL's rollout states come from, per method (paper, Sec. 4.2).
DDIL_SOURCE = {"pd": "beta_mixed", "lcm": "beta_student_bckwrd", "dmd2": "beta_mixed"}


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
                 source: str | None = None) -> StateSampler:
    """The StateSampler of an arm. Without DDIL: forward states only. With DDIL: a fraction
    ``share`` of each batch from rollouts (``source``, default ``DDIL_SOURCE[method]``), the
    rest forward; ``buffer_size`` > 0 reuses rollout states through DAgger's aggregation
    buffer, rolling out ``refresh_size`` new ones every ``refresh_every`` steps."""
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
    return StateSampler(beta_frwd=1.0 - share, **{source: share}, buffer_size=buffer_size,
                        refresh_every=refresh_every, refresh_size=refresh_size)


def make_arm(method: str, arm: str, n_steps: int = 4, method_kw: dict | None = None,
             **sampler_kw) -> tuple[Method, StateSampler]:
    """(Method, StateSampler) of one arm, e.g. ``make_arm("pd", "ddil+reflected")``.
    ``method_kw`` overrides ``method_defaults``; ``sampler_kw`` go to ``make_sampler``."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r} is not one of {ARMS}")
    kw = {**method_defaults(method, n_steps), **(method_kw or {})}
    m = make_method(method, n_steps=n_steps, reflected="reflected" in arm, **kw)
    return m, make_sampler(method, "ddil" in arm, **sampler_kw)


# ---------------------------------------------------------------- seeds as one ensemble

class NFECounter(dict):
    """Rows passed through counted networks, by role. Deep copies share it (an EMA target
    copied from the student keeps counting into the same counter)."""

    def __deepcopy__(self, memo):
        return self


class SeedEnsemble(nn.Module):
    """M independent denoisers called as one: ``cond = {"m": member (B,), "c": the real
    conditioning}`` routes each sample to its member. Summed per-sample losses give each
    member exactly its own gradient, so one optimizer trains M students at once."""

    def __init__(self, members: list[nn.Module], counter: NFECounter, role: str):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.counter, self.role = counter, role

    def forward(self, x_t, t, cond):
        self.counter[self.role] = self.counter.get(self.role, 0) + x_t.shape[0]
        m, c = cond["m"], cond["c"]
        if len(self.members) == 1:
            return self.members[0](x_t, t, c)
        order = torch.argsort(m, stable=True)
        counts = torch.bincount(m, minlength=len(self.members)).tolist()
        outs = [self.members[k](x_t[idx], t[idx], take_cond(c, idx))
                for k, idx in enumerate(order.split(counts)) if len(idx)]
        return torch.cat(outs)[torch.argsort(order)]  # back to the input order


class _Teacher(nn.Module):
    """The base backend's teacher, fed the real conditioning and counted."""

    def __init__(self, teacher, counter: NFECounter):
        super().__init__()
        self.teacher, self.counter = teacher, counter

    def forward(self, x_t, t, cond):
        self.counter["teacher"] = self.counter.get("teacher", 0) + x_t.shape[0]
        return self.teacher(x_t, t, cond["c"])


class EnsembleBackend(Backend):
    """A backend view that trains ``members`` students (and critics) as one ``SeedEnsemble``;
    every conditioning it hands out is ``{"m": member, "c": base conditioning}``. With
    members=1 it is the base backend plus network-evaluation counting."""

    def __init__(self, base: Backend, members: int = 1):
        if not isinstance(members, int) or members < 1:
            raise ValueError(f"members={members!r} must be a positive int")
        self.base, self.members = base, members
        self.counter = NFECounter()
        self.schedule, self.support, self.shape = base.schedule, base.support, base.shape
        self.has_data = base.has_data
        self.teacher = _Teacher(base.teacher, self.counter)

    def _wrap(self, c, n):
        return {"m": torch.arange(n) % self.members, "c": c}

    def sample_data(self, n, generator=None):
        x0, c = self.base.sample_data(n, generator)
        return x0, self._wrap(c, n)

    def sample_cond(self, n, generator=None):
        return self._wrap(self.base.sample_cond(n, generator), n)

    def sample_noise(self, n, generator=None):
        return self.base.sample_noise(n, generator)

    def make_student(self):
        return SeedEnsemble([self.base.make_student() for _ in range(self.members)],
                            self.counter, "student")

    def make_critic(self):
        return SeedEnsemble([self.base.make_critic() for _ in range(self.members)],
                            self.counter, "critic")


class MemberView:
    """One trained student of an ensemble run: ``.sample(x_T, cond)`` samples it the way it
    runs at inference (its method's policy on its grid), with the base conditioning."""

    def __init__(self, method: Method, member: int, seed: int, run: dict):
        self.method, self.member, self.seed, self.run = method, member, seed, run

    @property
    def grid(self) -> list[int]:
        return self.method.grid.tolist()

    def sample(self, x_T, cond=None) -> Trajectory:
        m = torch.full((x_T.shape[0],), self.member, dtype=torch.long)
        return self.method.sample(x_T, {"m": m, "c": cond})


def train_arm(backend: Backend, method: str, arm: str, seeds=(0, 1, 2), steps: int = 300,
              batch_size: int = 256, lr: float = 1e-3, n_steps: int = 4, ensemble: bool = True,
              method_kw: dict | None = None, sampler_kw: dict | None = None,
              grad_clip: float | None = None, progress: bool = False,
              **distill_kw) -> list[MemberView]:
    """Train one arm for every seed and return one ``MemberView`` per seed.

    ensemble=True trains all seeds in one ``distill`` call (batch ``len(seeds) * batch_size``,
    each member seeing its own ``batch_size`` states per step on average; seeds[0] seeds the
    run); ensemble=False runs ``distill`` once per seed. Each view's ``run`` dict holds the
    training wall and CPU seconds (of the whole call, shared by an ensemble's members), the
    network evaluations per training sample (``nfe_teacher``, ``nfe_student``: student, EMA
    target and critic), and the history. Buffer sizes in ``sampler_kw`` are per member.
    ``grad_clip`` is off by default: clipping the joint gradient norm would couple the members,
    while without it each member's AdamW update is the one it would get alone (Adam does not
    see the 1/M scale of the ensemble's mean loss).
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    groups = [seeds] if ensemble else [[s] for s in seeds]
    views = []
    for group in groups:
        M = len(group)
        skw = dict(sampler_kw or {})
        for k in ("buffer_size", "refresh_size"):
            skw[k] = skw.get(k, 0) * M
        m, sampler = make_arm(method, arm, n_steps, method_kw, **skw)
        view = EnsembleBackend(backend, M)
        wall, cpu = time.perf_counter(), time.process_time()
        res = distill(view, m, sampler, steps=steps, batch_size=batch_size * M, lr=lr,
                      grad_clip=grad_clip, seed=group[0], progress=progress, **distill_kw)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        per = steps * batch_size * M
        run = {"wall_s": wall, "cpu_s": cpu, "members": M, "history": res.history,
               "sampler": sampler,
               "nfe_teacher": view.counter.get("teacher", 0) / per,
               "nfe_student": (view.counter.get("student", 0)
                               + view.counter.get("critic", 0)) / per}
        views += [MemberView(res.method, k, s, run) for k, s in enumerate(group)]
    return views


__all__ = ["ARMS", "DDIL_SOURCE", "METHODS", "EnsembleBackend", "MemberView", "NFECounter",
           "SeedEnsemble", "make_arm", "make_sampler", "method_defaults", "train_arm"]
