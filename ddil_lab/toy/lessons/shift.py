"""Lesson 01, covariate shift (DDIL paper, Sec. 3.2): how far the states a few-step student
visits at inference are from the forward states q_t it was trained on, step by step, next to the
(guided) teacher's own states; and the figures that show it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from matplotlib.figure import Figure

from ...metrics import mmd, state_distance
from ...sampling import Trajectory
from ...train.arms import MemberView
from ..experiments import Reference, TeacherSampler, make_reference
from ..metrics import covariate_shift, mode_stats, nll
from ..plots import density2d, scatter2d, step_curves
from .common import (
    forward_gaps,
    forward_states,
    label_title,
    member_cond,
    pick,
    plot_limit,
    shade_density,
    states_at,
    teacher_trajectory,
    train_students,
    training_states,
)


@torch.no_grad()
def pd_step_error(view: MemberView, x_t, t: int, cond) -> float:
    """RMS distance between one PD student DDIM step t -> s from x_t and the teacher's substep
    walk from the same x_t (the PD target, ``PD.target``): how wrong the student's move is at
    these states."""
    m = view.method
    c = member_cond(view, cond, x_t.shape[0])
    s = m.next_t[int(t)]
    _, x_s = m.target(x_t, int(t), c)
    tt = torch.full((x_t.shape[0],), int(t))
    x_s_student = m.schedule.ddim_step(x_t, m.student(x_t, tt, c), int(t), s)
    return float(((x_s_student - x_s) ** 2).flatten(1).sum(1).mean().sqrt())


def _class_gap(a, ca, b, cb) -> float:
    """Sliced W1 x1e3 between state sets with possibly different label sets (by class of b)."""
    if cb is None:
        return 1e3 * state_distance(a, b)
    total, w = 0.0, 0.0
    for c in torch.unique(cb):
        ia, ib = ca == c, cb == c
        if ia.sum() >= 2 and ib.sum() >= 2:
            p = float(ib.double().mean())
            total, w = total + p * state_distance(a[ia], b[ib]), w + p
    return 1e3 * total / max(w, 1e-12)


def trajectory_metrics(traj: Trajectory, backend, ref: Reference, forward=None,
                       n_ref: int = 20000) -> dict:
    """The toy table's metrics of one trajectory from ``ref.x_T`` (same definitions as
    ``ddil_lab.toy.evaluate_trajectory``, with the size ``n_ref`` of the covariate-shift
    reference as a knob): NLL, MMD (x1e3) to the teacher's samples, coverage, off-mode, TV to
    the teacher's mode histogram, and per student timestep ``shift_t*`` (nats vs q_t(x|c)),
    ``drift_t*`` (W1 x1e3 to the teacher's states) and, given ``forward`` states per step,
    ``gap_t*`` (W1 x1e3 to them)."""
    gmm, S, c = backend.gmm, backend.schedule, ref.cond
    x = traj.sample
    ms = mode_stats(x, gmm)
    hist = torch.tensor(ms["hist"], dtype=torch.float64)
    row = {"nll": nll(x, gmm, label=c), "mmd_x1e3": 1e3 * mmd(x, ref.teacher.sample),
           "coverage": ms["coverage"], "off_mode": ms["off_mode"],
           "tv": float(0.5 * (hist - ref.hist).abs().sum())}
    for i, t in enumerate(ref.grid):
        row[f"shift_t{t}"] = covariate_shift(traj.xs[i], t, gmm, S, label=c, n_ref=n_ref)
        row[f"drift_t{t}"] = 1e3 * state_distance(traj.xs[i], ref.teacher.xs[i], c, c)
        if forward is not None:
            row[f"gap_t{t}"] = 1e3 * state_distance(traj.xs[i], forward[i], c, c)
    return row


@dataclass
class ShiftStudy:
    """Everything notebook 01 shows for one backend.

    trajs        name -> trajectory of seed 0 from the common noise (teacher: 32-step teacher
                 from independent noise; "teacher DDIM-n": the teacher with plain n-step DDIM)
    rows         name -> per-seed metrics: sample quality, per step ``shift_t*`` (nats vs
                 q_t(x|c)), ``gap_t*`` (W1 to forward states), ``drift_t*`` (W1 to the teacher's
                 states), ``train_gap_t*`` (W1 to the arm's own training states), and for PD
                 ``err_fwd_t*`` / ``err_own_t*`` (step error on forward / own states)
    train_states arm -> seed 0's training states (``training_states``)
    forward      forward states of q_t(x|c) per grid step, labels ``ref.cond``
    floor        key -> per draw, per grid step: the same measure between two independent
                 forward draws of the same size (``gap`` etc.: sliced W1; ``shift``: excess
                 -log q_t of forward states), i.e. what a policy on q_t shows by chance
    """
    backend: object
    ref: Reference
    students: dict
    trajs: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)
    train_states: dict = field(default_factory=dict)
    forward: list = field(default_factory=list)
    floor: dict = field(default_factory=dict)

    @property
    def grid(self) -> list[int]:
        return self.ref.grid

    def curve(self, name: str, key: str) -> list[list[float]]:
        """Per-seed curves of a per-step metric (``shift``, ``gap``, ``drift``, ...)."""
        return [[r[f"{key}_t{t}"] for t in self.grid] for r in self.rows[name]]


@torch.no_grad()
def shift_study(backend, method: str = "pd", arms=("baseline", "ddil"), seeds=(0,),
                steps: int = 400, batch_size: int = 256, lr: float = 1e-3, n_steps: int = 4,
                n_eval: int = 2000, method_kw: dict | None = None,
                sampler_kw: dict | None = None, ref_seed: int = 1234,
                students: dict | None = None, progress: bool = True) -> ShiftStudy:
    """Train ``arms`` of ``method`` (or take trained ``students``) and measure, at every
    student timestep, where their inference states sit relative to the forward marginals
    q_t(x|c), to their own training states and to the teacher (see ``ShiftStudy``)."""
    with torch.enable_grad():
        students = students or train_students(backend, method, arms, seeds, steps, batch_size,
                                              lr, n_steps, method_kw, sampler_kw,
                                              progress=progress)
    ref = make_reference(backend, n=n_eval, n_steps=n_steps, seed=ref_seed)
    g = torch.Generator().manual_seed(ref_seed + 1)
    study = ShiftStudy(backend, ref, students,
                       forward=forward_states(backend, ref.grid, ref.cond, n_eval, g))

    def measure(traj):
        return trajectory_metrics(traj, backend, ref, study.forward, n_ref=min(20000, 4 * n_eval))

    study.floor = noise_floor(backend, ref, study.forward, n_draws=8, seed=ref_seed + 2,
                              n_ref=min(20000, 4 * n_eval))

    study.trajs["teacher"] = ref.teacher2
    study.rows["teacher"] = [measure(ref.teacher2)]
    ddim = TeacherSampler(backend, ref.grid, None).sample(ref.x_T, ref.cond)
    study.trajs[f"teacher DDIM-{n_steps}"] = ddim
    study.rows[f"teacher DDIM-{n_steps}"] = [measure(ddim)]
    for arm, views in students.items():
        rows = []
        for k, view in enumerate(views):
            traj = view.sample(ref.x_T, ref.cond)
            row = measure(traj)
            tr = training_states(view, n=n_eval)
            if k == 0:
                study.trajs[arm], study.train_states[arm] = traj, tr
            for i, t in enumerate(ref.grid):
                at = states_at(tr, t)
                row[f"train_gap_t{t}"] = _class_gap(at.x_t, at.cond, traj.xs[i], ref.cond)
                if hasattr(view.method, "target"):  # PD: the step error, where it is made
                    row[f"err_fwd_t{t}"] = pd_step_error(view, study.forward[i], t, ref.cond)
                    row[f"err_own_t{t}"] = pd_step_error(view, traj.xs[i], t, ref.cond)
            for key in ("gap", "train_gap", "drift", "shift"):
                row[f"{key}_sum"] = sum(row.get(f"{key}_t{t}", 0.0) for t in ref.grid)
            rows.append(row)
        study.rows[arm] = rows
    for name in ("teacher", f"teacher DDIM-{n_steps}"):
        for row in study.rows[name]:
            for key in ("gap", "drift", "shift"):
                row[f"{key}_sum"] = sum(row[f"{key}_t{t}"] for t in ref.grid)
    return study


@torch.no_grad()
def noise_floor(backend, ref: Reference, forward: list, n_draws: int = 8, seed: int = 0,
                n_ref: int = 20000) -> dict[str, list[list[float]]]:
    """What the per-step measures give by chance alone: ``n_draws`` fresh forward draws of
    q_t(x|c) (labels ``ref.cond``, the size of a policy's state set) measured like a policy's
    states: sliced W1 x1e3 to ``forward`` (the ``gap`` / ``train_gap`` / ``drift`` floor) and
    the excess -log q_t (``shift``). Returns key -> (draws, steps) lists."""
    g = torch.Generator().manual_seed(seed)
    w1, sh = [], []
    for _ in range(n_draws):
        fresh = forward_states(backend, ref.grid, ref.cond, len(ref.x_T), g)
        w1.append([1e3 * state_distance(x, f, ref.cond, ref.cond) for x, f in zip(fresh, forward)])
        sh.append([covariate_shift(x, t, backend.gmm, backend.schedule, label=ref.cond,
                                   n_ref=n_ref) for x, t in zip(fresh, ref.grid)])
    return {"gap": w1, "train_gap": w1, "drift": w1, "shift": sh}


def states_over_marginals(backend, trajs: dict, cond=None, label=None, train_states=None,
                          n_show: int = 600, size: float = 2.1, paths: int = 25) -> Figure:
    """One row per policy, one column per student timestep (and the final samples): the exact
    forward marginal q_t (grey shading; q_t(x | c=label) for a class-conditional mixture),
    the policy's states at t (colour) and, where ``train_states[name]`` is given, the states
    it was trained on at t (small black dots). The last column draws ``paths`` trajectories
    from noise to sample over the data density."""
    names = list(trajs)
    grid = trajs[names[0]].grid
    S = backend.schedule
    cols = list(grid) + [-1]
    fig = Figure(figsize=(size * (len(cols) + 1), size * len(names) + 0.6), layout="constrained")
    axs = fig.subplots(len(names), len(cols) + 1, squeeze=False)
    cache: dict = {}
    for r, name in enumerate(names):
        tr = trajs[name]
        for c, t in enumerate(cols):
            ax, lim = axs[r, c], plot_limit(S, t)
            shade_density(ax, backend, t, lim, label, cache)
            if train_states and name in train_states and t >= 0:
                ts = states_at(train_states[name], t)
                scatter2d(pick(ts.x_t, ts.cond, label, n_show), ax, color="k", s=5.0,
                          alpha=0.45, lim=lim)
            scatter2d(pick(tr.xs[c], cond, label, n_show), ax, gmm=backend.gmm if t < 0 else None,
                      color=f"C{r}", s=3.0, alpha=0.6, lim=lim)
            if r == 0:
                ax.set_title("sample (t = -1)" if t < 0 else f"t = {t}", fontsize=9)
        axs[r, 0].set_ylabel(name, fontsize=9)
        ax = axs[r, -1]
        shade_density(ax, backend, -1, 1.6, label, cache)
        pts = torch.stack([pick(x, cond, label, paths) for x in tr.xs])  # (steps+1, n, d)
        for j in range(pts.shape[1]):
            ax.plot(pts[:, j, 0], pts[:, j, 1], "-", color=f"C{r}", lw=0.6, alpha=0.6)
        ax.scatter(pts[-1, :, 0], pts[-1, :, 1], s=6, color=f"C{r}", zorder=3)
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_title("paths x_T -> x_0", fontsize=9)
    extra = "\nblack dots: the states that arm was trained on at t" if train_states else ""
    fig.suptitle(f"states at each student timestep (colour) over {label_title(backend, label)} "
                 f"(grey){extra}", fontsize=10)
    return fig


def shift_curves(study, keys=("gap", "train_gap", "drift", "shift"), names=None,
                 size=(3.4, 2.8)) -> Figure:
    """Per-step curves of a ``ShiftStudy`` (mean and +-1 std over seeds), one panel per key:
    ``gap`` distance to forward states of q_t(x|c) (what forward-only training sees),
    ``train_gap`` distance to the arm's own training states, ``drift`` distance to the
    teacher's states, ``shift`` excess -log q_t (nats). The grey band is the noise floor
    (``study.floor``: the same measure between independent forward draws, mean ± 2 std): a
    curve inside it is as close as sampling noise can tell. ``gap`` and ``train_gap`` share
    their y axis (they measure the same kind of distance, to different state sets)."""
    import numpy as np

    titles = {"gap": "gap: to forward states of q_t(x|c)",
              "train_gap": "train_gap: to its own training states",
              "drift": "drift: to the teacher's states",
              "shift": "shift: excess -log q_t(x|c)"}
    units = {"shift": "nats (0 = on q_t)"}
    names = names or list(study.rows)
    fig = Figure(figsize=(size[0] * len(keys), size[1] + 0.6), layout="constrained")
    axs = fig.subplots(1, len(keys), squeeze=False)[0]
    nan = [[float("nan")] * len(study.grid)]  # keeps each policy's colour in every panel
    for ax, key in zip(axs, keys):
        curves = {n: study.curve(n, key) if f"{key}_t{study.grid[0]}" in study.rows[n][0]
                  else nan for n in names}
        if key in study.floor:
            f = np.asarray(study.floor[key], dtype=float)  # (draws, steps)
            mu, sd = f.mean(0), f.std(0, ddof=1) if len(f) > 1 else np.zeros(f.shape[1])
            ax.fill_between(study.grid, mu - 2 * sd, mu + 2 * sd, color="0.6", alpha=0.35,
                            linewidth=0, label="noise floor (±2 sd)")
        step_curves(ax, study.grid, curves, title=titles.get(key, key),
                    ylabel=units.get(key, "sliced W1 x1e3"))
        ax.title.set_fontsize(9)
    pair = [ax for ax, key in zip(axs, keys) if key in ("gap", "train_gap")]
    if len(pair) == 2:  # one scale for the two distances to forward / training states
        lo = min(ax.get_ylim()[0] for ax in pair)
        hi = max(ax.get_ylim()[1] for ax in pair)
        for ax in pair:
            ax.set_ylim(lo, hi)
    handles, labels = axs[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8,
               frameon=False)
    return fig


def step_errors(study, size=(7.6, 3.8)) -> Figure:
    """PD students: RMS error of one student step against the teacher's substep walk, on
    forward states (dashed, open markers) and on the student's own inference states (solid,
    filled), per step; colour: the arm."""
    from matplotlib.lines import Line2D

    arms = [a for a in study.students if f"err_own_t{study.grid[0]}" in study.rows[a][0]]
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    styles = {"err_own": ("-", "o", "full", "on its own inference states"),
              "err_fwd": ((0, (4, 3)), "s", "none", "on forward states (where PD trains)")}
    for i, arm in enumerate(arms):
        for key, (ls, marker, fill, _) in styles.items():
            v = torch.tensor(study.curve(arm, key)).mean(0)
            ax.plot(study.grid, v, linestyle=ls, marker=marker, fillstyle=fill, ms=6, lw=2,
                    color=f"C{i + 2}")
    ax.set_yscale("log")
    ax.set_xlim(max(study.grid) + 30, min(study.grid) - 30)
    ax.set_xlabel("student timestep t")
    ax.set_ylabel("RMS step error (data units)")
    ax.set_title("where the student's step is wrong (mean over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=f"C{i + 2}", lw=6, label=arm) for i, arm in enumerate(arms)]
    handles += [Line2D([], [], color="k", linestyle=ls, marker=m, fillstyle=f, ms=7, lw=2,
                       label=lab) for ls, m, f, lab in styles.values()]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False,
               handlelength=3.5)
    return fig


def teacher_over_marginals(backend, guidance: float = 1.0, n_steps: int = 4, fine: bool = True,
                           label: int | None = 0, n: int = 1000, size: float = 2.3
                           ) -> Figure:
    """The exact teacher at guidance w with n steps (``fine``: walking the 32-step grid inside
    each step; else plain n-step DDIM) over q_t(x | c): its states at each step, and in each
    title the sliced W1 (x1e3) to forward states, i.e. how far guidance or few steps take the
    sampler from where forward-only training looks. Cheap: for sliders. The canvas is the
    same for every ``n_steps`` (five panels wide; more steps make the panels smaller), so a
    slider redraws it at the same size."""
    traj, cond = teacher_trajectory(backend, n_steps, guidance if backend.conditional
                                          else None, 32 if fine else None, n=n)
    gaps = forward_gaps(backend, traj, cond)
    S = backend.schedule
    cols = list(traj.grid) + [-1]
    fig = Figure(figsize=(size * 5, size + 0.9), layout="constrained")  # fixed canvas
    axs = fig.subplots(1, len(cols), squeeze=False)[0]
    for c, (ax, t) in enumerate(zip(axs, cols)):
        lim = plot_limit(S, t)
        density2d(backend.gmm, ax, None if t < 0 else t, S, lim=lim, label=label)
        scatter2d(pick(traj.xs[c], cond, label, n), ax, gmm=backend.gmm if t < 0 else None,
                  color="C2", s=2.5, alpha=0.6, lim=lim,
                  title=(f"t = {t}\nW1 to q_t: {gaps[c]:.0f}" if t >= 0 else "sample\n"))
        ax.title.set_fontsize(8 if len(cols) > 6 else 9)
    kind = "teacher (32-step walk)" if fine else f"teacher, plain {n_steps}-step DDIM"
    fig.suptitle(f"{kind} (green) over {label_title(backend, label, guidance)} (grey); "
                 f"W1: sliced Wasserstein-1 x1e3 to forward states", fontsize=9)
    return fig
