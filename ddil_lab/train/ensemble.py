"""Many students trained as one network: the seed (and cell) ensembles of the experiments.

A comparison of arms trains M small students (seeds x cells) under the same budget. Running
them one by one pays the per-step overhead M times; running them as M separate modules in one
``distill`` call still pays M small forwards, backwards and optimizer updates per step. Here the
M members are *one* module whose parameters are stacked: member k's weight ``W`` is row k of a
(M, ...) tensor, and the members' networks run as one batched computation
(``torch.func.vmap`` over ``functional_call``), with each sample routed to its member by the
conditioning ``cond = {"m": member (B,), "c": the real conditioning}``.

What stays exact:

- initialisation: each member is built as before (under its own seed) and then stacked, so its
  starting weights are bitwise those of the member trained alone;
- gradients: the loss is a sum over samples, so the gradient of row k of a stacked tensor is
  member k's own gradient (no coupling; gradient clipping of the joint norm would couple them,
  which is why ``train_arm`` leaves it off);
- updates: AdamW is elementwise, so stepping the stacked tensors is stepping each member.

Members with different architectures (e.g. student widths 32 and 128 in one map ensemble) are
stacked in separate groups. The teacher side (``EnsembleTeacher``) calls one shared teacher once
per batch; guided teachers around one conditional denoiser share one call per batch with the
conditional and unconditional halves stacked.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

from ..backend import Backend
from ..denoiser import CFG, _Param, cat_cond
from ..methods.base import Method
from ..sampling import Trajectory, take_cond


class NFECounter(dict):
    """Rows passed through counted networks, by role. Deep copies share it (an EMA target
    copied from the student keeps counting into the same counter)."""

    def __deepcopy__(self, memo):
        return self


def _key(name: str) -> str:  # a parameter name as an attribute name (no dots allowed)
    return name.replace(".", "/")


def _signature(member: nn.Module) -> tuple:
    """What must agree for members to be stacked: module types, tensor names, shapes, dtypes."""
    net = member.net if isinstance(member, _Param) else member
    return (type(member), type(net),
            tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in net.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype) for n, b in net.named_buffers()))


class StackedMembers(nn.Module):
    """Members of one architecture as stacked tensors, run with ``vmap``.

    A member that is a Denoiser adapter (``PredV(net)``, ...) has its network batched and its
    output converted to x0 afterwards, in one call for all rows; any other module is batched
    whole. ``template`` keeps the structure (on the meta device: it holds no weights). A network
    with a method ``forward_stacked(params, x, t, c)`` (the toy ``MLP``) runs that instead of
    ``vmap`` (the same computation as batched matmuls). A network whose class sets
    ``ensemble_vmap = False`` (one that ``vmap`` runs slower than a loop, e.g.
    attention without a batching rule) is called member by member on its slices of the same
    stacked tensors instead."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        first = members[0]
        self.adapter = isinstance(first, _Param)
        nets = [m.net if self.adapter else m for m in members]
        template = copy.deepcopy(first).to("meta")
        object.__setattr__(self, "template", template)  # not a submodule: no weights, no state
        self.names = [n for n, _ in nets[0].named_parameters()]
        self.buffer_names = [n for n, _ in nets[0].named_buffers()]
        for n in self.names:
            ps = [net.get_parameter(n) for net in nets]
            stacked = torch.stack([p.detach() for p in ps])
            self.register_parameter(_key(n), nn.Parameter(stacked, ps[0].requires_grad))
        for n in self.buffer_names:
            self.register_buffer(_key(n), torch.stack([net.get_buffer(n) for net in nets]))
        self.size = len(members)

    def _net(self):
        return self.template.net if self.adapter else self.template

    def forward(self, x, t, c, members: torch.Tensor | None = None):
        """x (M, n, ...), t (M, n), c: a conditioning with leading dims (M, n) -> (M, n, ...);
        ``members`` (M,): which members the M blocks are for (None: all, in order)."""
        pick = (lambda v: v) if members is None else (lambda v: v.index_select(0, members))
        params = {n: pick(getattr(self, _key(n))) for n in self.names}
        buffers = {n: pick(getattr(self, _key(n))) for n in self.buffer_names}
        net = self._net()

        def one(p, b, x, t, c):
            return functional_call(net, (p, b), (x, t, c))
        c_dims = tree_map(lambda v: 0 if torch.is_tensor(v) and v.ndim >= 2 else None, c)
        if hasattr(net, "forward_stacked") and not self.buffer_names:
            out = net.forward_stacked(params, x, t, c)  # the network's own batched form
        elif getattr(net, "ensemble_vmap", True):
            out = vmap(one, in_dims=(0, 0, 0, 0, c_dims), randomness="different")(
                params, buffers, x, t, c)
        else:
            take = lambda tree, j: tree_map(lambda v: v[j], tree)  # noqa: E731
            c_j = lambda j: tree_map(lambda v, d: v[j] if d == 0 else v, c, c_dims)  # noqa: E731
            out = torch.stack([one(take(params, j), take(buffers, j), x[j], t[j], c_j(j))
                               for j in range(x.shape[0])])
        if self.adapter:  # the parameterisation's conversion, on all rows at once
            M, n = x.shape[:2]
            out = self.template.convert(x.reshape(M * n, *x.shape[2:]), t.reshape(-1),
                                        out.reshape(M * n, *out.shape[2:]))
            out = out.reshape(M, n, *out.shape[1:])
        return out

    def member(self, j: int) -> nn.Module:
        """Member j as a standalone module (a copy of its weights)."""
        mod = copy.deepcopy(self.template).to_empty(device=getattr(self, _key(self.names[0])).device)
        net = mod.net if self.adapter else mod
        with torch.no_grad():
            for n in self.names:
                net.get_parameter(n).copy_(getattr(self, _key(n))[j])
            for n in self.buffer_names:
                net.get_buffer(n).copy_(getattr(self, _key(n))[j])
        return mod.train(self.training)


class _Block:
    """Rows ``order`` of a batch (sorted by member ``k``, at position ``pos`` within their
    member) laid out as an (M, n, ...) block, zero-padded where a member has fewer rows."""

    def __init__(self, order, k, pos, M: int, n: int):
        self.order, self.k, self.pos, self.M, self.n = order, k, pos, M, n

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        out = v.new_zeros((self.M, self.n, *v.shape[1:]))
        out[self.k, self.pos] = v[self.order]
        return out


class SeedEnsemble(nn.Module):
    """M independent denoisers called as one: ``cond = {"m": member (B,), "c": the real
    conditioning}`` routes each sample to its member. The members are stacked by architecture
    (``StackedMembers``) and each group runs as one batched network; summed per-sample losses
    give each member exactly its own gradient, so one optimizer trains M students at once.
    ``member(k)`` returns member k as a standalone module."""

    def __init__(self, members: list[nn.Module], counter: NFECounter, role: str):
        super().__init__()
        sigs = [_signature(m) for m in members]
        kinds = list(dict.fromkeys(sigs))
        self.groups = nn.ModuleList(StackedMembers([m for m, s in zip(members, sigs) if s == u])
                                    for u in kinds)
        group = torch.tensor([kinds.index(s) for s in sigs])
        local = torch.tensor([sigs[:k].count(s) for k, s in enumerate(sigs)])
        self.register_buffer("group_of", group, persistent=False)
        self.register_buffer("local", local, persistent=False)
        self.size, self.counter, self.role = len(members), counter, role

    def member(self, k: int) -> nn.Module:
        return self.groups[int(self.group_of[k])].member(int(self.local[k]))

    def forward(self, x_t, t, cond):
        self.counter[self.role] = self.counter.get(self.role, 0) + x_t.shape[0]
        m, c = cond["m"], cond["c"]
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        out = None
        for g, stack in enumerate(self.groups):
            rows = None if len(self.groups) == 1 else \
                (self.group_of.to(m.device)[m] == g).nonzero().squeeze(1)
            if rows is not None and not len(rows):
                continue
            k = self.local.to(m.device)[m if rows is None else m[rows]]
            order = torch.argsort(k, stable=True)
            if rows is not None:
                order = rows[order]  # rows of x_t, sorted by member
            ks = k.sort(stable=True).values
            counts = torch.bincount(ks, minlength=stack.size)
            pos = torch.arange(len(ks), device=ks.device) - (torch.cumsum(counts, 0) - counts)[ks]
            present = None
            if bool((counts == 0).any()):  # run only the members that have rows
                present = counts.nonzero().squeeze(1)
                ks = ((counts > 0).cumsum(0) - 1)[ks]
            block = _Block(order, ks, pos, len(counts) if present is None else len(present),
                           int(counts.max()))
            c_g = tree_map(lambda v, b=block: b(v) if torch.is_tensor(v) and v.ndim else v, c)
            y = stack(block(x_t), block(t), c_g, present)[ks, pos]  # rows sorted by member
            if rows is None:
                return y.new_empty(y.shape).index_copy(0, order, y)  # back to the input order
            out = y.new_zeros((x_t.shape[0], *y.shape[1:])) if out is None else out
            out = out.index_copy(0, order, y)
        return out


class EnsembleTeacher(nn.Module):
    """The members' teachers, fed the real conditioning and counted. One shared teacher is
    called once; members whose teachers guide one conditional denoiser with different scales
    w (``CFG``; an unguided member has w = 1) share one call per batch, with the conditional
    rows and the unconditional copies of the guided rows stacked: x0_u + w_m (x0_c - x0_u) with
    each sample's member's w_m. Other teachers are called on their members' rows."""

    def __init__(self, teachers: list, counter: NFECounter):
        super().__init__()
        self.counter = counter
        self.teacher = teachers[0]  # registered as a submodule, as a single teacher always was
        self.teachers = nn.ModuleList(teachers) if all(isinstance(t, nn.Module) for t in
                                                       teachers) else list(teachers)
        inner = [t.denoiser if isinstance(t, CFG) and t.w is not None else t for t in teachers]
        self.shared = all(t is teachers[0] for t in teachers)
        self.fused = not self.shared and all(i is inner[0] for i in inner)
        if self.fused:
            self.inner = inner[0]
            self.uncond = next(t.uncond for t in teachers if isinstance(t, CFG))
            self.register_buffer("w", torch.tensor(
                [float(t.w) if isinstance(t, CFG) else 1.0 for t in teachers]), persistent=False)

    def forward(self, x_t, t, cond):
        self.counter["teacher"] = self.counter.get("teacher", 0) + x_t.shape[0]
        c = cond["c"]
        if self.shared:
            return self.teacher(x_t, t, c)
        if self.fused:
            B = x_t.shape[0]
            t = torch.as_tensor(t, device=x_t.device).expand(B)
            w = self.w.to(x_t.device)[cond["m"]]
            g = (w != 1.0).nonzero().squeeze(1)  # unguided rows need no unconditional call
            if not len(g):
                return self.inner(x_t, t, c)
            u = self.uncond(take_cond(c, g))
            if u is None:  # an unconditional input that cannot be stacked: two calls
                x0, x0_u = self.inner(x_t, t, c).clone(), self.inner(x_t[g], t[g], None)
            else:
                x0 = self.inner(torch.cat([x_t, x_t[g]]), torch.cat([t, t[g]]), cat_cond(c, u))
                x0, x0_u = x0[:B].clone(), x0[B:]
            x0[g] = x0_u + w[g].reshape(-1, *([1] * (x0.ndim - 1))) * (x0[g] - x0_u)
            return x0
        out = None
        for k, teacher in enumerate(self.teachers):  # rows of each member (groups of one teacher)
            idx = (cond["m"] == k).nonzero().squeeze(1)
            if len(idx):
                y = teacher(x_t[idx], t[idx], take_cond(c, idx))
                out = y.new_empty((x_t.shape[0], *y.shape[1:])) if out is None else out
                out[idx] = y
        return out


class EnsembleBackend(Backend):
    """A backend view that trains ``members`` students (and critics) as one ``SeedEnsemble``;
    every conditioning it hands out is ``{"m": member, "c": base conditioning}``. With
    members=1 it is the base backend plus network-evaluation counting.

    :param seeds: one seed per member: member k's student (and critic) is built under
        ``torch.manual_seed(seeds[k])`` (the global stream is restored afterwards), so random
        initialisations follow the run seed; copies of a pretrained network are unaffected.
    :param bases: one backend per member (cells of a map trained as one ensemble): member k's
        student, critic and teacher come from ``bases[k]``; data, noise, schedule and support
        come from ``base``, which all of them must share.
    """

    def __init__(self, base: Backend, members: int = 1, seeds=None, bases=None):
        if not isinstance(members, int) or members < 1:
            raise ValueError(f"members={members!r} must be a positive int")
        bases = list(bases) if bases is not None else [base] * members
        if len(bases) != members:
            raise ValueError(f"bases has {len(bases)} backends for members={members}")
        if seeds is not None and len(seeds) != members:
            raise ValueError(f"seeds={list(seeds)} must name one seed per member ({members})")
        for b in bases:
            if b.shape != base.shape or b.schedule.T != base.schedule.T:
                raise ValueError("every member backend must share the base's shape and schedule")
        self.base, self.members, self.bases = base, members, bases
        self.seeds = list(seeds) if seeds is not None else None
        self.counter = NFECounter()
        self.schedule, self.support, self.shape = base.schedule, base.support, base.shape
        self.has_data = base.has_data
        self.teacher = EnsembleTeacher([b.teacher for b in bases], self.counter)

    def _wrap(self, c, n):
        return {"m": torch.arange(n) % self.members, "c": c}

    def sample_data(self, n, generator=None):
        x0, c = self.base.sample_data(n, generator)
        return x0, self._wrap(c, n)

    def sample_cond(self, n, generator=None):
        return self._wrap(self.base.sample_cond(n, generator), n)

    def sample_noise(self, n, generator=None):
        return self.base.sample_noise(n, generator)

    def _build(self, k: int, kind: str) -> nn.Module:
        make = getattr(self.bases[k], kind)
        if self.seeds is None:
            return make()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seeds[k])
            return make()

    def make_student(self):
        return SeedEnsemble([self._build(k, "make_student") for k in range(self.members)],
                            self.counter, "student")

    def make_critic(self):
        return SeedEnsemble([self._build(k, "make_critic") for k in range(self.members)],
                            self.counter, "critic")

    def make_random_critic(self):
        return SeedEnsemble([self._build(k, "make_random_critic") for k in range(self.members)],
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


__all__ = ["EnsembleBackend", "EnsembleTeacher", "MemberView", "NFECounter", "SeedEnsemble",
           "StackedMembers"]
