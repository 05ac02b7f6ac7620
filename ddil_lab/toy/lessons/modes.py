"""Lesson 02, mode loss (DDIL paper, Sec. 3.3): which modes stay reachable from the states a
policy visits at each step (the teacher continues each state to t = -1), per method and arm."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from matplotlib.figure import Figure

from ...sampling import DDIMPolicy, Trajectory
from ...train.arms import MemberView
from ..experiments import TeacherSampler, make_reference
from ..plots import mode_histogram
from .common import plot_limit, shade_density, step_labels
from .shift import trajectory_metrics


@torch.no_grad()
def reached_modes(backend, x_t, t: int, cond=None, fine_steps: int = 32, teacher=None,
                  off_mode_sigma: float = 4.0) -> torch.Tensor:
    """The mode each state x_t leads to when the teacher continues it: DDIM on the
    ``fine_steps`` grid from t down to t = -1 (t = -1: the state itself), then the nearest
    component; K (one past the last mode) for end points further than ``off_mode_sigma``
    (Mahalanobis) from every mode. Shape (B,), integers in [0, K]."""
    if int(t) >= 0:
        pol = DDIMPolicy(teacher or backend.teacher, backend.schedule, fine_steps=fine_steps)
        x_t = pol.step(x_t, int(t), -1, cond)[0]
    k, dist = backend.gmm.assign(x_t)
    return torch.where(dist <= off_mode_sigma, k, torch.full_like(k, backend.gmm.K))


@torch.no_grad()
def reachable_modes(backend, traj: Trajectory, cond=None, fine_steps: int = 32,
                    teacher=None, off_mode_sigma: float = 4.0) -> torch.Tensor:
    """Which modes are still reachable at each step of a trajectory (paper, Sec. 3.3: diversity
    lost at an early step cannot come back later).

    Row i (i < len(grid)): the histogram of ``reached_modes`` of the states at ``grid[i]``
    over the K modes plus a last column for off-mode end points. The last row is the policy's
    own samples. Shape (len(grid) + 1, K + 1), rows sum to 1.
    """
    K = backend.gmm.K
    rows = []
    for x, t in zip(traj.xs, traj.grid + [-1]):
        k = reached_modes(backend, x, t, cond, fine_steps, teacher, off_mode_sigma)
        rows.append(torch.bincount(k, minlength=K + 1).double() / len(k))
    return torch.stack(rows)


def mode_summary(hist: torch.Tensor, ref: torch.Tensor | None = None,
                 min_frac: float = 0.005) -> dict[str, list[float]]:
    """Per row of ``reachable_modes``: ``effective_modes`` (exp of the entropy of the on-mode
    histogram: K for a uniform spread, 1 for a single mode), ``reached`` (modes holding at least
    ``min_frac`` of the samples), ``off_mode``, and ``tv`` to ``ref`` (an on-mode histogram,
    e.g. the teacher's samples; by default the first row's)."""
    on = hist[:, :-1]
    p = on / on.sum(1, keepdim=True).clamp_min(1e-12)
    ent = -(p * p.clamp_min(1e-12).log()).sum(1)
    ref = p[0] if ref is None else (ref[:-1] if len(ref) == hist.shape[1] else ref)
    ref = ref / ref.sum()
    return {"effective_modes": ent.exp().tolist(),
            "reached": (on >= min_frac).sum(1).double().tolist(),
            "off_mode": hist[:, -1].tolist(),
            "tv": (0.5 * (p - ref[None]).abs().sum(1)).tolist()}


def seed_summary(summaries: list[dict]) -> dict[str, list[float]]:
    """Per-seed ``mode_summary`` dicts -> per step, the mean over seeds of each key and, as
    ``<key>_sd``, the seeds' std (0 for one seed)."""
    out = {}
    for key in summaries[0]:
        v = torch.tensor([s[key] for s in summaries], dtype=torch.float64)  # (seeds, steps)
        out[key] = v.mean(0).tolist()
        out[f"{key}_sd"] = (v.std(0) if len(v) > 1 else torch.zeros(v.shape[1])).tolist()
    return out


def policy_colors(names) -> dict[str, str]:
    """One colour per policy, the same in every figure of a study (teacher rows first)."""
    return {name: f"C{i}" for i, name in enumerate(names)}


@dataclass
class ModeStudy:
    """Notebook 02's results: ``hists[name]`` (mean over seeds) and ``per_seed[name]`` (list) of
    ``reachable_modes``; ``summary[name]`` the mean over seeds of each seed's ``mode_summary``
    against the teacher's samples (``<key>_sd``: the seeds' std), the one value the figures,
    the table and the text all show; ``trajs[name]`` seed 0's trajectory (labels ``cond``); ``rows[name]``
    per-seed sample metrics (``trajectory_metrics``) and mode-loss summaries."""
    backend: object
    grid: list
    cond: object = None
    fine_steps: int = 32
    trajs: dict = field(default_factory=dict)
    hists: dict = field(default_factory=dict)
    per_seed: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)


@torch.no_grad()
def mode_study(backend, students: dict[str, list[MemberView]], n_eval: int = 2000,
               n_steps: int = 4, fine_steps: int = 32, ref_seed: int = 1234,
               progress: bool = True) -> ModeStudy:
    """Reachable modes per step for the teacher (walking the ``fine_steps`` grid), the
    teacher's plain n-step DDIM and every trained student (``students``: name -> seeds), all
    from the same noise x_T and labels, so every policy starts from the same reachable modes
    and the teacher's samples from that noise are the reference of every ``tv``."""
    ref = make_reference(backend, n=n_eval, n_steps=n_steps, seed=ref_seed)
    study = ModeStudy(backend, ref.grid, ref.cond, fine_steps)
    runs = {"teacher": [TeacherSampler(backend, ref.grid, fine_steps).sample(ref.x_T, ref.cond)],
            f"teacher DDIM-{n_steps}": [TeacherSampler(backend, ref.grid, None)
                                        .sample(ref.x_T, ref.cond)]}
    for name, views in students.items():
        runs[name] = [v.sample(ref.x_T, ref.cond) for v in views]
    from tqdm.auto import tqdm
    teacher_ref = None
    for name, trajs in tqdm(runs.items(), desc="reachable modes", disable=not progress):
        hs = [reachable_modes(backend, tr, ref.cond, fine_steps) for tr in trajs]
        study.per_seed[name] = hs
        study.hists[name] = torch.stack(hs).mean(0)
        if teacher_ref is None:
            teacher_ref = study.hists[name][-1]
        study.summary[name] = seed_summary([mode_summary(h, teacher_ref) for h in hs])
        study.trajs[name] = trajs[0]
        study.rows[name] = [trajectory_metrics(tr, backend, ref, n_ref=min(20000, 4 * n_eval))
                            for tr in trajs]
        for r, h in zip(study.rows[name], hs):
            s = mode_summary(h, teacher_ref)
            r["effective_modes_final"] = s["effective_modes"][-1]
            r["effective_modes_min"] = min(s["effective_modes"])
            r["tv_first_step"] = s["tv"][1] if len(s["tv"]) > 1 else s["tv"][0]
    return study


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
        ax.set_yticklabels(step_labels(study.grid) if i % ncols == 0 else [], fontsize=7)
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
    k = reached_modes(b, x, t, study.cond, study.fine_steps)
    K = b.gmm.K
    fig = Figure(figsize=(size * 2.2, size))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    lim = plot_limit(b.schedule, t)
    shade_density(ax, b, t, lim)
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
    bx.set_xlabel("mode", fontsize=8)
    bx.set_ylabel("fraction of states", fontsize=8)
    bx.legend(fontsize=7)
    fig.tight_layout()
    return fig


def effective_modes(study, names=None, size=(3.6, 2.8)) -> Figure:
    """Per step: the effective number of reachable modes (exp entropy) and the total variation
    between the reachable-mode histogram and the teacher's samples, one line per policy (mean
    and std over seeds, the values of ``mode_loss_rows``; the legend sits beside the panels,
    off the lines; each policy keeps its colour in ``final_mode_bars``)."""
    names = names or list(study.summary)
    colors = policy_colors(study.summary)
    fig = Figure(figsize=(size[0] * 2 + 1.8, size[1]), layout="constrained")
    axs = fig.subplots(1, 2)
    x = list(range(len(study.grid) + 1))
    for name in names:
        s = study.summary[name]
        style = "--" if name.startswith("teacher") else "-"
        for ax, key in zip(axs, ("effective_modes", "tv")):
            ax.errorbar(x, s[key], yerr=s[f"{key}_sd"], fmt=style, marker="o", ms=3,
                        capsize=2, color=colors[name], label=name)
    titles = ("effective reachable modes (mean ± std over seeds)",
              "distance to the teacher's mode weights")
    for ax, title, ylabel in zip(axs, titles, ("exp(entropy), modes", "total variation")):
        ax.set_xticks(x)
        ax.set_xticklabels(step_labels(study.grid), fontsize=7)
        ax.set_xlabel("step of the trajectory (noise -> samples)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axs[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7, frameon=False)
    return fig


def final_mode_bars(study, names=None, size=(8.6, 2.8)) -> Figure:
    """Mode frequencies of the final samples per policy (mean and std over seeds) against the
    teacher's samples, in the colours of ``effective_modes``; the legend sits beside the bars."""
    names = names or [n for n in study.per_seed if not n.startswith("teacher")]
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    hists = {n: torch.stack([h[-1, :-1] for h in study.per_seed[n]]) for n in names}
    colors = policy_colors(study.summary)  # the colours of the effective-modes figure
    mode_histogram(ax, hists, weights=study.hists["teacher"][-1, :-1],
                   title="where the samples land (black: the 32-step teacher)",
                   colors=[colors[n] for n in names])
    ax.set_ylabel("fraction of samples")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7, frameon=False)
    return fig


def small_modes(study, frac: float = 0.5) -> list[int]:
    """The modes holding less than ``frac`` of the largest mode's share of the teacher's
    samples (the modes a mode-seeking policy is expected to drop first)."""
    w = study.hists["teacher"][-1, :-1]
    return (w < frac * w.max()).nonzero().squeeze(1).tolist()


def mode_loss_rows(study, names=None) -> dict[str, dict[str, list[float]]]:
    """Per policy and seed, what the mode-loss story rests on: effective reachable modes at the
    first step after x_T, at the lowest step and at the samples, and the share of samples in
    the ``small_modes`` (the teacher's share is the target). For ``markdown_table``."""
    small = small_modes(study)
    out = {}
    for name in names or list(study.per_seed):
        rows = {"eff. modes, first step": [], "eff. modes, lowest": [],
                "eff. modes, samples": [], "small-mode share %": []}
        for h in study.per_seed[name]:
            e = mode_summary(h)["effective_modes"]
            rows["eff. modes, first step"].append(e[1] if len(e) > 1 else e[0])
            rows["eff. modes, lowest"].append(min(e))
            rows["eff. modes, samples"].append(e[-1])
            rows["small-mode share %"].append(100 * float(h[-1, small].sum()))
        out[name] = rows
    return out


def findings(study, loss_rows: dict, dmd2: str = "dmd2 backward", ddil: str = "dmd2 ddil"
             ) -> tuple[str, dict]:
    """What notebook 02's run shows, as a Markdown template and the values that fill it (for
    ``notebook.fill``): per step, the effective reachable modes of ``dmd2`` and the teacher
    (the figure's values: means over seeds), the small-mode share and off-mode share of the
    samples (the table's), and the same for ``ddil`` and the other students. Policies missing
    from the study are left out."""
    def mean(v):
        return sum(v) / len(v)
    s, grid = study.summary, study.grid
    small = "small-mode share %"
    vals: dict = {"teacher_eff": s["teacher"]["effective_modes"][-1],
                  "teacher_small": mean(loss_rows["teacher"][small])}
    lines = []
    if dmd2 in s:
        e = s[dmd2]["effective_modes"]
        steps = ", ".join(f"{{dmd2_e{i}:.1f}}" for i in range(1, len(grid)))
        at = ", ".join(f"t = {t}" for t in grid[1:])
        vals.update({f"dmd2_e{i}": e[i] for i in range(1, len(grid))})
        vals.update(dmd2_eff=e[-1], dmd2_small=mean(loss_rows[dmd2][small]),
                    dmd2_off=100 * s[dmd2]["off_mode"][-1])
        lines.append(f"- **{dmd2}**: {steps} effective reachable modes at {at}, then "
                     "{dmd2_eff:.1f} in its samples (the 32-step teacher: {teacher_eff:.1f}); "
                     "{dmd2_small:.0f}% of its samples in the small modes (teacher: "
                     "{teacher_small:.0f}%), {dmd2_off:.0f}% off every mode.")
    if ddil in s:
        vals.update(ddil_eff=s[ddil]["effective_modes"][-1],
                    ddil_small=mean(loss_rows[ddil][small]),
                    ddil_off=100 * s[ddil]["off_mode"][-1])
        lines.append(f"- **{ddil}**: " + "{ddil_eff:.1f} effective modes in its samples, "
                     "{ddil_small:.0f}% in the small modes, {ddil_off:.0f}% off every mode.")
    others = [n for n in s if not n.startswith(("teacher", "dmd2"))]
    if others:
        parts = []
        for i, n in enumerate(others):
            vals[f"o{i}_eff"] = s[n]["effective_modes"][-1]
            vals[f"o{i}_small"] = mean(loss_rows[n][small])
            parts.append(f"{n} {{o{i}_eff:.1f}} ({{o{i}_small:.0f}}%)")
        lines.append("- the other students, effective modes in their samples (small-mode "
                     "share): " + ", ".join(parts) + ".")
    ddim = next((n for n in s if n.startswith("teacher DDIM")), None)
    if ddim:
        vals.update(ddim_eff=s[ddim]["effective_modes"][-1],
                    ddim_small=mean(loss_rows[ddim][small]))
        lines.append(f"- {ddim} (the untrained student): " + "{ddim_eff:.1f} effective modes "
                     "in its samples, {ddim_small:.0f}% in the small modes.")
    return "**What this run shows** (means over seeds):\n\n" + "\n".join(lines), vals
