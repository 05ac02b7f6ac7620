"""Figures of the teaching notebooks (``ddil_lab.teach`` computes, this module draws).

Every function returns a ``matplotlib.figure.Figure`` made without pyplot, so a notebook cell
shows it exactly once, headless runs can save it, and nothing accumulates in pyplot's registry.
Source colours follow the paper's Figure 2: forward (data) blue, teacher green, student red,
mixed orange.
"""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from . import teach
from .plots import density2d, mode_histogram, scatter2d, step_curves
from .rollout import SOURCES

SOURCE_COLORS = {"forward": "C0", "teacher": "C2", "student": "C3", "mixed": "C1"}
_SHORT = {"beta_frwd": "frwd", "beta_teacher_bckwrd": "tch", "beta_student_bckwrd": "stu",
          "beta_mixed": "mix"}


def _lim(schedule, t: int) -> float:
    """A view that holds q_t: the data scaled by alpha(t) plus 2.5 sigma(t) of noise."""
    if t < 0:
        return 1.2
    return max(1.2, 0.9 * float(schedule.alpha(t)) + 2.5 * float(schedule.sigma(t)))


def _shade(ax, backend, t: int, lim: float, label=None, cache: dict | None = None):
    """``plots.density2d`` of q_t (data density for t < 0), computed once per (t, lim, label)
    and copied to further panels through ``cache``."""
    key = (int(t), round(lim, 4), label)
    if cache is not None and key in cache:
        src = cache[key]
        ax.imshow(src.get_array(), origin="lower", extent=src.get_extent(), cmap=src.get_cmap(),
                  alpha=src.get_alpha())
        return ax
    density2d(backend.gmm, ax, None if t < 0 else t, backend.schedule, lim=lim, label=label)
    if cache is not None:
        cache[key] = ax.images[-1]
    return ax


def _pick(x, cond, label, n):
    """The states of class ``label`` (all when label or cond is None), at most n of them."""
    if label is not None and cond is not None:
        x = x[torch.as_tensor(cond) == label]
    return x[:n]


def _label_title(backend, label, guidance=None) -> str:
    if label is None or not backend.conditional:
        return "q_t(x)"
    w = backend.guidance if guidance is None else guidance
    return f"q_t(x | c={label}), guidance w={w:g}"


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
    fig = Figure(figsize=(size * (len(cols) + 1), size * len(names) + 0.4))
    axs = fig.subplots(len(names), len(cols) + 1, squeeze=False)
    cache: dict = {}
    for r, name in enumerate(names):
        tr = trajs[name]
        for c, t in enumerate(cols):
            ax, lim = axs[r, c], _lim(S, t)
            _shade(ax, backend, t, lim, label, cache)
            if train_states and name in train_states and t >= 0:
                ts = teach.states_at(train_states[name], t)
                scatter2d(_pick(ts.x_t, ts.cond, label, n_show), ax, color="k", s=1.0,
                          alpha=0.35, lim=lim)
            scatter2d(_pick(tr.xs[c], cond, label, n_show), ax, gmm=backend.gmm if t < 0 else None,
                      color=f"C{r}", s=2.5, alpha=0.6, lim=lim)
            if r == 0:
                ax.set_title("sample (t = -1)" if t < 0 else f"t = {t}", fontsize=9)
        axs[r, 0].set_ylabel(name, fontsize=9)
        ax = axs[r, -1]
        _shade(ax, backend, -1, 1.6, label, cache)
        pts = torch.stack([_pick(x, cond, label, paths) for x in tr.xs])  # (steps+1, n, d)
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
    extra = "; black dots: the states it was trained on" if train_states else ""
    fig.suptitle(f"states at each student timestep over {_label_title(backend, label)}{extra}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def shift_curves(study, keys=("gap", "train_gap", "drift", "shift"), names=None,
                 size=(3.4, 2.8)) -> Figure:
    """Per-step curves of a ``ShiftStudy`` (mean and +-1 std over seeds), one panel per key:
    ``gap`` distance to forward states of q_t(x|c) (what forward-only training sees),
    ``train_gap`` distance to the arm's own training states, ``drift`` distance to the
    teacher's states, ``shift`` excess -log q_t (nats)."""
    labels = {"gap": "to forward states q_t(x|c)\n(sliced W1 x1e3)",
              "train_gap": "to its own training states\n(sliced W1 x1e3)",
              "drift": "to the teacher's states\n(sliced W1 x1e3)",
              "shift": "excess -log q_t(x|c) (nats)"}
    names = names or list(study.rows)
    fig = Figure(figsize=(size[0] * len(keys), size[1]))
    axs = fig.subplots(1, len(keys), squeeze=False)[0]
    nan = [[float("nan")] * len(study.grid)]  # keeps each policy's colour in every panel
    for ax, key in zip(axs, keys):
        curves = {n: study.curve(n, key) if f"{key}_t{study.grid[0]}" in study.rows[n][0]
                  else nan for n in names}
        step_curves(ax, study.grid, curves, title=labels.get(key, key))
    axs[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def step_errors(study, size=(4.0, 2.8)) -> Figure:
    """PD students: RMS error of one student step against the teacher's substep walk, on
    forward states (dashed) and on the student's own inference states (solid), per step."""
    arms = [a for a in study.students if f"err_own_t{study.grid[0]}" in study.rows[a][0]]
    fig = Figure(figsize=size)
    ax = fig.subplots()
    for i, arm in enumerate(arms):
        for key, style in (("err_own", "-"), ("err_fwd", "--")):
            v = torch.tensor(study.curve(arm, key)).mean(0)
            where = "own states" if key == "err_own" else "forward states"
            ax.plot(study.grid, v, style, marker="o", ms=3, color=f"C{i + 2}",
                    label=f"{arm}, {where}")
    ax.set_yscale("log")
    ax.set_xlim(max(study.grid) + 30, min(study.grid) - 30)
    ax.set_xlabel("student timestep t")
    ax.set_ylabel("RMS step error")
    ax.set_title("where the student's step is wrong", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def teacher_over_marginals(backend, guidance: float = 1.0, n_steps: int = 4, fine: bool = True,
                           label: int | None = 0, n: int = 1000, size: float = 2.3) -> Figure:
    """The exact teacher at guidance w with n steps (``fine``: walking the 32-step grid inside
    each step; else plain n-step DDIM) over q_t(x | c): its states at each step, and in each
    title the sliced W1 (x1e3) to forward states, i.e. how far guidance or few steps take the
    sampler from where forward-only training looks. Cheap: for sliders."""
    traj, cond = teach.teacher_trajectory(backend, n_steps, guidance if backend.conditional
                                          else None, 32 if fine else None, n=n)
    gaps = teach.forward_gaps(backend, traj, cond)
    S = backend.schedule
    cols = list(traj.grid) + [-1]
    fig = Figure(figsize=(size * len(cols), size + 0.5))
    axs = fig.subplots(1, len(cols), squeeze=False)[0]
    for c, (ax, t) in enumerate(zip(axs, cols)):
        lim = _lim(S, t)
        density2d(backend.gmm, ax, None if t < 0 else t, S, lim=lim, label=label)
        scatter2d(_pick(traj.xs[c], cond, label, n), ax, gmm=backend.gmm if t < 0 else None,
                  color="C2", s=2.5, alpha=0.6, lim=lim,
                  title=(f"t = {t}\nW1 to q_t: {gaps[c]:.0f}" if t >= 0 else "sample"))
    kind = "teacher (32-step walk)" if fine else f"teacher, plain {n_steps}-step DDIM"
    fig.suptitle(f"{kind} over {_label_title(backend, label, guidance)}", fontsize=10)
    fig.tight_layout()
    return fig


def sample_panels(samples: dict, backend, cond=None, size: float = 2.2, n_max: int = 2000,
                  ncols: int = 0) -> Figure:
    """One scatter panel per policy's samples (coloured by class when ``cond`` is given),
    ``ncols`` per row (0: all in one row)."""
    names = list(samples)
    ncols = ncols or len(names)
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(size * ncols, (size + 0.3) * nrows))
    axs = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axs[len(names):]:
        ax.axis("off")
    for ax, name in zip(axs, names):
        x = samples[name][:n_max]
        if cond is None:
            scatter2d(x, ax, gmm=backend.gmm, title=name)
            continue
        lab = torch.as_tensor(cond)[:n_max]
        for i, c in enumerate(torch.unique(lab).tolist()):
            scatter2d(x[lab == c], ax, gmm=backend.gmm if i == 0 else None, color=f"C{i}",
                      title=name)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- mode loss

def _step_labels(grid):
    return [f"t={t}" for t in grid] + ["sample"]


def reachable_heatmaps(study, names=None, size=(2.6, 2.4)) -> Figure:
    """One heatmap per policy: rows are the steps of its trajectory (noise at the top, its
    samples at the bottom), columns the modes (and off-mode); colour is the fraction of states
    whose teacher continuation lands in that mode. A column fading out downwards is a mode the
    policy stopped reaching at that step."""
    names = names or list(study.hists)
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(size[0] * ncols + 1.0, size[1] * nrows + 0.3), layout="constrained")
    axs = fig.subplots(nrows, ncols, squeeze=False)
    vmax = max(float(h[:, :-1].max()) for h in study.hists.values())
    im = None
    for ax in axs.flat[len(names):]:
        ax.axis("off")
    K = study.backend.gmm.K
    for i, (ax, name) in enumerate(zip(axs.flat, names)):
        im = ax.imshow(study.hists[name].numpy(), aspect="auto", cmap="viridis", vmin=0,
                       vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_yticks(range(len(study.grid) + 1))
        ax.set_yticklabels(_step_labels(study.grid) if i % ncols == 0 else [], fontsize=7)
        ax.set_xticks(range(K + 1))
        ax.set_xticklabels([str(k) for k in range(K)] + ["off"], fontsize=6)
        if i >= len(names) - ncols:
            ax.set_xlabel("mode reached by the teacher", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axs.ravel().tolist(), shrink=0.8, label="fraction of states")
    return fig


def reach_map(study, name: str, step: int = 1, n_show: int = 1500, size: float = 3.0
              ) -> Figure:
    """Where each state leads: the states of policy ``name`` (seed 0) at student step ``step``
    (0 = x_T, len(grid) = its samples) over q_t, coloured by the mode the teacher reaches from
    them (grey: off-mode), and the histogram of those modes against the teacher's samples.
    For a dropdown and a slider."""
    b, grid = study.backend, study.grid
    step = max(0, min(int(step), len(grid)))
    t = grid[step] if step < len(grid) else -1
    x = study.trajs[name].xs[step]
    k = teach.reached_modes(b, x, t, study.cond, study.fine_steps)
    K = b.gmm.K
    fig = Figure(figsize=(size * 2.2, size))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    lim = _lim(b.schedule, t)
    _shade(ax, b, t, lim)
    cmap = __import__("matplotlib").colormaps["tab10"]
    colors = [cmap(int(j) % 10) if j < K else (0.6, 0.6, 0.6, 1.0) for j in k[:n_show].tolist()]
    xs = x[:n_show].detach().float()
    ax.scatter(xs[:, 0], xs[:, 1], s=4, c=colors, linewidths=0, alpha=0.8)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    where = f"t = {t}" if t >= 0 else "the end (samples)"
    ax.set_title(f"{name}: states at {where}", fontsize=9)
    h = torch.bincount(k, minlength=K + 1).double() / len(k)
    ref = study.hists["teacher"][-1]
    bx.bar(range(K + 1), h.numpy(), color=[cmap(j % 10) for j in range(K)] + [(0.6,) * 3])
    bx.scatter(range(K + 1), ref.numpy(), marker="_", s=200, color="k", zorder=3,
               label="teacher's samples")
    bx.set_xticks(range(K + 1))
    bx.set_xticklabels([str(j) for j in range(K)] + ["off"], fontsize=7)
    bx.set_title("modes the teacher reaches from them", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    return fig


def effective_modes(study, names=None, size=(3.6, 2.8)) -> Figure:
    """Per step: the effective number of reachable modes (exp entropy) and the total variation
    between the reachable-mode histogram and the teacher's samples, one line per policy."""
    names = names or list(study.summary)
    fig = Figure(figsize=(size[0] * 2, size[1]))
    axs = fig.subplots(1, 2)
    x = list(range(len(study.grid) + 1))
    for i, name in enumerate(names):
        s = study.summary[name]
        style = "--" if name.startswith("teacher") else "-"
        axs[0].plot(x, s["effective_modes"], style, marker="o", ms=3, color=f"C{i}", label=name)
        axs[1].plot(x, s["tv"], style, marker="o", ms=3, color=f"C{i}", label=name)
    for ax, title in zip(axs, ("effective reachable modes (exp entropy)",
                               "TV to the teacher's mode weights")):
        ax.set_xticks(x)
        ax.set_xticklabels(_step_labels(study.grid), fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axs[0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def final_mode_bars(study, names=None, size=(7.5, 2.6)) -> Figure:
    """Mode frequencies of the final samples per policy (mean and std over seeds) against the
    teacher's samples."""
    names = names or [n for n in study.per_seed if not n.startswith("teacher")]
    fig = Figure(figsize=size)
    ax = fig.subplots()
    hists = {n: torch.stack([h[-1, :-1] for h in study.per_seed[n]]) for n in names}
    mode_histogram(ax, hists, weights=study.hists["teacher"][-1, :-1],
                   title="where the samples land (black: the 32-step teacher)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- sources of training states

def _source_scatter(ax, states, t, lim, n_show=400, gmm=None):
    at = teach.states_at(states, t)
    for i, src in enumerate(SOURCES):
        x = at.x_t[at.source == i][:n_show]
        if len(x):
            scatter2d(x, ax, color=SOURCE_COLORS[src], s=3, alpha=0.6, lim=lim, label=src)
    if gmm is not None:
        scatter2d(torch.empty(0, 2), ax, gmm=gmm, lim=lim)


def sources_over_training(snapshots, backend, grid, max_rows: int = 4, size: float = 2.1
                          ) -> Figure:
    """Training states as training proceeds, coloured by source (forward blue, teacher green,
    student red, mixed orange): one row per snapshot (``teach.StateSnapshots``), one column per
    student timestep, with the priors in force at that step."""
    snaps = snapshots.snapshots if hasattr(snapshots, "snapshots") else snapshots
    if len(snaps) > max_rows:
        idx = [round(i * (len(snaps) - 1) / (max_rows - 1)) for i in range(max_rows)]
        snaps = [snaps[i] for i in idx]
    S = backend.schedule
    fig = Figure(figsize=(size * len(grid), size * len(snaps) + 0.5))
    axs = fig.subplots(len(snaps), len(grid), squeeze=False)
    cache: dict = {}
    for r, (step, st, pri) in enumerate(snaps):
        for c, t in enumerate(grid):
            ax = axs[r, c]
            _shade(ax, backend, t, _lim(S, t), None, cache)
            _source_scatter(ax, st, t, _lim(S, t))
            if r == 0:
                ax.set_title(f"t = {t}", fontsize=9)
        short = [f"{_SHORT[k]} {v:.2f}" for k, v in pri.items()]
        axs[r, 0].set_ylabel(f"step {step}\n{' '.join(short[:2])}\n{' '.join(short[2:])}",
                             fontsize=7)
    _source_legend(fig, axs[0, 0])
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def source_fractions(snapshots, size=(4.0, 2.6)) -> Figure:
    """Stacked fractions of each source in the training batches over training steps."""
    fr = snapshots.source_fractions()
    steps = [s for s, _, _ in snapshots.snapshots]
    fig = Figure(figsize=size)
    ax = fig.subplots()
    ax.stackplot(steps, [fr[s] for s in SOURCES], labels=SOURCES,
                 colors=[SOURCE_COLORS[s] for s in SOURCES], alpha=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction of the batch")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def source_losses(result, window: int = 20, size=(4.0, 2.6)) -> Figure:
    """The student's training loss split by the source of the states (moving average over
    ``window`` steps): how wrong the student is, as it learns, on each kind of state."""
    curves = teach.source_loss_curves(result, window)
    fig = Figure(figsize=size)
    ax = fig.subplots()
    for src, (steps, vals) in curves.items():
        ax.plot(steps, vals, color=SOURCE_COLORS[src], label=src)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{result.method.name} loss (avg of {window})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def source_preview(run, backend, beta_frwd=0.25, beta_teacher_bckwrd=0.25,
                   beta_student_bckwrd=0.25, beta_mixed=0.25, p_student=0.5, n=300,
                   size: float = 2.3) -> Figure:
    """What the StateSampler would feed a trained student (``run``: a ``DistillResult`` or a
    toy-table ``MemberView``) with these priors and mixed-rollout probability
    (``teach.preview_sources``): states per timestep coloured by source. For sliders."""
    st = teach.preview_sources(run, beta_frwd, beta_teacher_bckwrd, beta_student_bckwrd,
                               beta_mixed, p_student, n)
    grid = run.method.grid.tolist()
    S = backend.schedule
    fig = Figure(figsize=(size * len(grid), size + 0.6))
    axs = fig.subplots(1, len(grid), squeeze=False)[0]
    for ax, t in zip(axs, grid):
        density2d(backend.gmm, ax, t, S, lim=_lim(S, t))
        _source_scatter(ax, st, t, _lim(S, t))
        ax.set_title(f"t = {t}", fontsize=9)
    counts = torch.bincount(st.source, minlength=len(SOURCES)).tolist()
    fig.suptitle("training states by source (count): " + ", ".join(
        f"{s} {c}" for s, c in zip(SOURCES, counts)) + f"; p_student={p_student:.2f}",
        fontsize=9)
    _source_legend(fig, axs[0])
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def _source_legend(fig, ax):
    handles = [ax.scatter([], [], color=SOURCE_COLORS[s], label=s) for s in SOURCES]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)


# ---------------------------------------------------------------- reflected distillation

def _box(ax, lo=-1.0, hi=1.0):
    ax.add_patch(Rectangle((lo, lo), hi - lo, hi - lo, fill=False, ls="--", lw=0.8, color="k"))


def teacher_x0(backend, guidance: float = 6.0, thresholding: bool = True, n_steps: int = 4,
               n: int = 1000, size: float = 2.4) -> Figure:
    """The (guided) teacher's x0 estimates at the states of its own trajectory, per step:
    raw (red) and, with ``thresholding``, clamped to the data support [-1, 1]^2 (blue, the
    reflected teacher); titles give the fraction of raw estimates outside the support. For
    sliders."""
    traj, cond = teach.teacher_trajectory(backend, n_steps, guidance if backend.conditional
                                          else None, n=n)
    teacher = teach.guided_teacher(backend, guidance) if backend.conditional else backend.teacher
    fig = Figure(figsize=(size * len(traj.grid), size + 0.5))
    axs = fig.subplots(1, len(traj.grid), squeeze=False)[0]
    lim = 0.0
    raws = []
    for x, t in zip(traj.xs, traj.grid):
        with torch.no_grad():
            raws.append(teacher(x, torch.full((x.shape[0],), int(t)), cond))
        lim = max(lim, float(raws[-1].abs().quantile(0.99)))
    lim = max(1.3, 1.1 * lim)
    for ax, raw, t in zip(axs, raws, traj.grid):
        scatter2d(raw, ax, color="C3", s=3, alpha=0.5, lim=lim, label="raw")
        if thresholding:
            scatter2d(backend.support(raw), ax, gmm=backend.gmm, color="C0", s=3, alpha=0.5,
                      lim=lim, label="thresholded")
        _box(ax)
        ax.set_title(f"t = {t}: {100 * teach.outside_support(raw):.0f}% outside", fontsize=9)
    axs[0].legend(fontsize=7, loc="lower left", markerscale=3)
    fig.suptitle(f"teacher x0 estimates along its trajectory (w={guidance:g}); dashed: support",
                 fontsize=10)
    fig.tight_layout()
    return fig


def target_scatter(report: dict, size: float = 2.6, n_max: int = 1500) -> Figure:
    """Each method's regression targets on teacher-trajectory states, without (red) and with
    (blue) reflected distillation, with the fraction outside the support in the legend."""
    names = list(report)
    fig = Figure(figsize=(size * len(names), size + 0.4))
    axs = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axs, names):
        plain, refl = report[name]["plain"], report[name]["reflected"]
        lim = max(1.3, 1.1 * float(plain["targets"].abs().quantile(0.99)))
        for d, color, lab in ((plain, "C3", "plain"), (refl, "C0", "reflected")):
            scatter2d(d["targets"][:n_max], ax, color=color, s=2, alpha=0.4, lim=lim,
                      label=f"{lab}: {100 * d['outside']:.0f}% out")
        _box(ax)
        ax.set_title(f"{name} targets", fontsize=9)
        ax.legend(fontsize=6, loc="lower left", markerscale=3)
    fig.tight_layout()
    return fig


def stability(runs: dict, key: str = "loss/student", size=(3.4, 2.6)) -> Figure:
    """Loss curves (top, ``key`` from the history, one thin line per seed) and sample quality
    during training (bottom: MMD x1e3 to the teacher, one line per seed), one column per arm."""
    arms = list(runs)
    fig = Figure(figsize=(size[0] * len(arms), size[1] * 2))
    axs = fig.subplots(2, len(arms), squeeze=False, sharey="row")
    for c, arm in enumerate(arms):
        for i, r in enumerate(runs[arm]):
            steps = [h["step"] for h in r["history"] if key in h]
            vals = [h[key] for h in r["history"] if key in h]
            axs[0, c].plot(steps, vals, lw=0.7, color=f"C{i}", alpha=0.8, label=f"seed {r['seed']}")
            axs[1, c].plot(r["eval_steps"], r["mmd"], marker="o", ms=2, lw=0.8, color=f"C{i}")
        axs[0, c].set_title(f"{arm}: {key}", fontsize=9)
        axs[0, c].set_yscale("log")
        axs[1, c].set_title(f"{arm}: MMD x1e3 to teacher", fontsize=9)
        axs[1, c].set_xlabel("training step")
        for ax in axs[:, c]:
            ax.grid(alpha=0.3)
    axs[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return fig
