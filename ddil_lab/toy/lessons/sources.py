"""Lesson 03, where training states come from (DDIL paper, Sec. 4.2): the toy table in its
quick setting, the training states of an arm by source as training proceeds, and the loss by
source."""

from __future__ import annotations

import copy
import os

import torch
from matplotlib.figure import Figure

from ...rollout import SOURCES, States, StateSampler
from ..plots import scatter2d
from .common import (
    PRIOR_SHORT,
    SOURCE_COLORS,
    labels_of,
    plot_limit,
    shade_density,
    states_at,
    training_states,
)


def toy_table():
    """The toy table's script, ``experiments/toy_table.py`` next to this package, imported as a
    module wherever the notebook runs from. Its ``run(out, quick=True, **overrides)`` trains
    every arm, writes ``table.md``, CSVs and figures under ``out``, and returns them."""
    import importlib.util
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    path = os.path.join(root, "experiments", "toy_table.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the toy table script is not at {path} (a source checkout "
                                f"of ddil_lab is needed)")
    spec = importlib.util.spec_from_file_location("toy_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_toy_table(out: str, quick: bool = True, progress: bool = True, **overrides) -> dict:
    """Run the toy table (``toy_table().run``) quietly: its printed tables are written to
    ``table.md`` under ``out`` (and returned in ``result["markdown"]``) instead of printed,
    ``progress`` shows one bar per setting, and the notebook's matplotlib backend, which the
    table's figure writer switches to Agg, is restored afterwards."""
    import contextlib
    import io

    import matplotlib
    backend = matplotlib.get_backend()
    with contextlib.redirect_stdout(io.StringIO()):
        result = toy_table().run(out, quick=quick, progress=progress, **overrides)
    if matplotlib.get_backend() != backend:
        matplotlib.use(backend)
    return result


def table_metrics(summary: list[dict], keys=("nll", "mmd_x1e3", "coverage", "tv", "off_mode",
                                             "shift_sum", "drift_sum")) -> dict:
    """The toy table's summary rows (``run(...)["summary"]``) as ``{"setting/method/arm":
    {key: mean over seeds}}`` for the given metric keys, ready for ``Recorder.log``."""
    return {f"{r['setting']}/{r['method']}/{r['arm']}": {k: r[k] for k in keys if k in r}
            for r in summary}


COMPACT = {"nll": ("NLL (nats)", 1.0), "mmd_x1e3": ("MMD² x1e3", 1.0),
           "off_mode": ("off-mode %", 100.0)}
COMPACT_HEADERS = [h for h, _ in COMPACT.values()]


def compact_table(rows: list[dict], setting: str | None = None, keys=COMPACT
                  ) -> dict[str, dict[str, list[float]]]:
    """The toy table's per-seed rows (``run(...)["rows"]``) of one setting as ``"method arm" ->
    {column header: [value per seed]}`` for ``keys`` (``key -> (header, scale)``), ready for
    ``ddil_lab.notebook.markdown_table`` (mean ± std). Teacher rows keep their own names
    (e.g. ``teacher 32-step (2nd draw)``)."""
    setting = setting or rows[0]["setting"]
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r["setting"] != setting:
            continue
        name = r["arm"] if r["method"] == "teacher" else f"{r['method']} {r['arm']}"
        d = out.setdefault(name, {h: [] for h, _ in keys.values()})
        for k, (h, scale) in keys.items():
            d[h].append(float(r[k]) * scale)
    return out


def table_verdicts(rows: list[dict], setting: str | None = None, key: str = "mmd_x1e3",
                   label: str | None = None) -> list[str]:
    """One ``notebook.verdict`` line per method and arm against that method's baseline;
    ``label`` names the metric as the table's header does (e.g. "MMD² x1e3")."""
    from ...notebook import verdict
    setting = setting or rows[0]["setting"]
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["setting"] == setting and r["method"] != "teacher":
            by.setdefault(f"{r['method']} {r['arm']}", []).append(r)
    return [verdict(by, f"{name.split()[0]} baseline", name, key, label=label) for name in by
            if not name.endswith(" baseline") and f"{name.split()[0]} baseline" in by]


class StateSnapshots:
    """A ``distill`` callback that, every ``eval_every`` steps, draws ``n`` training states from
    the run's own StateSampler (its priors at that step of its schedule, the current student)
    and keeps them with their sources, without disturbing the run: the RNG, the sampler's
    buffer and the network-evaluation counters are restored afterwards.

    ``snapshots`` is a list of ``(step, States, priors)``; States.cond holds the labels.
    Use: ``distill(..., callbacks=[snap], eval_every=k)`` or ``train_arm(..., callbacks=...)``.
    """

    def __init__(self, n: int = 1000):
        self.n = n
        self.snapshots: list[tuple[int, States, dict]] = []

    @torch.no_grad()
    def __call__(self, step: int, result) -> None:
        rng = torch.get_rng_state()
        sampler = copy.copy(result.sampler)
        sampler.buffer, sampler.nfe = dict(result.sampler.buffer), dict(result.sampler.nfe)
        backend = result.method.backend
        counter = dict(getattr(backend, "counter", {}))
        st = sampler.sample(backend, result.method.spec(), result.method.student, self.n, step)
        if hasattr(backend, "counter"):
            backend.counter.clear()
            backend.counter.update(counter)
        torch.set_rng_state(rng)
        self.snapshots.append((step, States(st.x_t.clone(), st.t.clone(), labels_of(st.cond),
                                           st.source.clone()),
                               sampler.priors_at(step)))

    def source_fractions(self) -> dict[str, list[float]]:
        """Fraction of each source in every snapshot (``SOURCES`` order), as lists over time."""
        out = {s: [] for s in SOURCES}
        for _, st, _ in self.snapshots:
            counts = torch.bincount(st.source, minlength=len(SOURCES)).double() / len(st)
            for s, c in zip(SOURCES, counts.tolist()):
                out[s].append(c)
        return out


def sources_run(backend, method: str = "pd", priors: dict | None = None, p_student: float = 0.5,
                ramp_steps: int = 0, steps: int = 300, batch_size: int = 256, lr: float = 1e-3,
                n_steps: int = 4, method_kw: dict | None = None, snapshot_every: int = 50,
                n_snapshot: int = 1000, seed: int = 0, progress: bool = True):
    """Distil one student on states from all four sources and watch them as training proceeds.

    ``priors`` are the StateSampler's (``beta_frwd``, ``beta_teacher_bckwrd``,
    ``beta_student_bckwrd``, ``beta_mixed``); ``ramp_steps`` > 0 uses the paper's student
    selection prior (forward states only at first, the given priors after ``ramp_steps``).
    Returns ``(DistillResult, StateSnapshots)``: the history holds the loss split by source
    (``source/<name>``), the snapshots hold ``n_snapshot`` states every ``snapshot_every``
    steps."""
    from ...train import distill, make_arm
    m, _ = make_arm(method, "baseline", n_steps, method_kw)
    sampler = StateSampler(**(priors or {}), p_student=p_student,
                           prior_schedule="student_selection" if ramp_steps else "constant",
                           ramp_steps=ramp_steps)
    snap = StateSnapshots(n_snapshot)
    res = distill(backend, m, sampler, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                  callbacks=(snap,), eval_every=snapshot_every, progress=progress,
                  desc=f"{method}, all four sources, seed {seed}")
    return res, snap


def source_loss_curves(result, window: int = 20) -> dict[str, tuple[list[int], list[float]]]:
    """The student's loss split by state source over training (``source/<name>`` in the
    history), as a moving average over ``window`` logged steps: ``source -> (steps, values)``."""
    out = {}
    for src in SOURCES:
        pts = [(h["step"], h[f"source/{src}"]) for h in result.history if f"source/{src}" in h]
        if not pts:
            continue
        steps, vals = zip(*pts)
        avg = [sum(vals[max(0, i - window + 1):i + 1]) / len(vals[max(0, i - window + 1):i + 1])
               for i in range(len(vals))]
        out[src] = (list(steps), avg)
    return out


def preview_sources(run, beta_frwd: float = 0.25, beta_teacher_bckwrd: float = 0.25,
                    beta_student_bckwrd: float = 0.25, beta_mixed: float = 0.25,
                    p_student: float = 0.5, n: int = 500) -> States:
    """A what-if draw of training states for a trained arm (``MemberView`` or
    ``DistillResult``) with other priors (normalised to sum to 1; all zero means forward only)
    and another mixed-rollout probability: what the StateSampler would feed the student."""
    pri = {"beta_frwd": beta_frwd, "beta_teacher_bckwrd": beta_teacher_bckwrd,
           "beta_student_bckwrd": beta_student_bckwrd, "beta_mixed": beta_mixed}
    total = sum(pri.values())
    pri = {k: v / total for k, v in pri.items()} if total > 0 else {"beta_frwd": 1.0}
    return training_states(run, n=n, priors=pri, p_student=p_student)


CLASS_COLORS = ("tab:purple", "tab:olive", "tab:cyan", "tab:pink", "tab:brown", "tab:gray")


def _states_by_source(fig, states, backend, grid, n_show: int, shares: bool = True):
    """Rows: sources; columns: student timesteps. Each panel: the grey forward marginal q_t,
    the states of that source at t (coloured by class when the states carry labels, else in
    the source's colour) and, for a class-conditional mixture, crosses at the centres of q_t's
    components alpha(t) mu_k in their class's colour, so a reader sees which modes the states
    head for. Returns the axes."""
    S, gmm = backend.schedule, backend.gmm
    mode_labels = getattr(gmm, "labels", None)
    axs = fig.subplots(len(SOURCES), len(grid), squeeze=False)
    cache: dict = {}
    for r, src in enumerate(SOURCES):
        frac = float((states.source == r).double().mean())
        for c, t in enumerate(grid):
            ax, lim = axs[r, c], plot_limit(S, t)
            shade_density(ax, backend, t, lim, None, cache)
            at = states_at(states, t)
            keep = at.source == r
            x = at.x_t[keep][:n_show]
            if at.cond is None:
                scatter2d(x, ax, color=SOURCE_COLORS[src], s=3, alpha=0.6, lim=lim)
            else:
                lab = torch.as_tensor(at.cond)[keep][:n_show]
                for k in torch.unique(lab).tolist():
                    scatter2d(x[lab == k], ax, color=CLASS_COLORS[k % len(CLASS_COLORS)], s=5,
                              alpha=0.8, lim=lim)
            if mode_labels is not None:  # the modes of each class, at t
                centres = float(S.alpha(t)) * gmm.means  # (K, 2)
                for k in torch.unique(mode_labels).tolist():
                    m = centres[mode_labels == k]
                    ax.scatter(m[:, 0], m[:, 1], marker="X", s=40, linewidths=0.6,
                               edgecolors="k", color=CLASS_COLORS[k % len(CLASS_COLORS)],
                               zorder=4)
            if r == 0:
                ax.set_title(f"t = {t}", fontsize=9)
        axs[r, 0].set_ylabel(f"{src}\n{100 * frac:.0f}%" if shares else src, fontsize=8,
                             color=SOURCE_COLORS[src])
    return axs


@torch.no_grad()
def spread(states: States, backend, grid) -> dict[str, dict[int, dict[str, float]]]:
    """Where each source's states sit, per timestep: ``rms`` the root-mean-square distance
    from the origin (the data's centre), ``mode_rms`` the same for the mixture's modes at t
    (alpha(t) mu_k), and, for a class-conditional mixture, ``own`` the fraction of states whose
    nearest mode at t belongs to their own class (chance: one over the number of classes).
    ``source -> t -> {...}``; sources without states at t are left out."""
    S, gmm = backend.schedule, backend.gmm
    mode_labels = getattr(gmm, "labels", None)
    out: dict = {}
    for r, src in enumerate(SOURCES):
        for t in grid:
            at = states_at(states, t)
            keep = at.source == r
            if int(keep.sum()) == 0:
                continue
            x = at.x_t[keep].double()
            centres = float(S.alpha(t)) * gmm.means.double()  # (K, 2)
            row = {"rms": float(x.pow(2).sum(1).mean().sqrt()),
                   "mode_rms": float(centres.pow(2).sum(1).mean().sqrt()), "n": int(keep.sum())}
            if mode_labels is not None and at.cond is not None:
                nearest = torch.cdist(x, centres).argmin(1)
                lab = torch.as_tensor(at.cond)[keep]
                row["own"] = float((mode_labels[nearest] == lab).double().mean())
            out.setdefault(src, {})[int(t)] = row
    return out


def spread_findings(states: States, backend, grid, at=(500, 250)) -> tuple[str, dict]:
    """A Markdown template and its values (for ``notebook.fill``): per source, at the
    timesteps ``at`` (those on the grid), the rms radius of the states against the forward
    states' and the modes', and the share of states nearest a mode of their own class."""
    sp = spread(states, backend, grid)
    ts = [t for t in at if t in [int(g) for g in grid]]
    vals: dict = {}
    lines = []
    for src, rows in sp.items():
        parts = []
        for t in ts:
            if t not in rows:
                continue
            key = f"{src}_{t}"
            vals[f"{key}_rms"] = rows[t]["rms"]
            part = f"t = {t}: radius {{{key}_rms:.2f}}"
            if "own" in rows[t]:
                vals[f"{key}_own"] = 100 * rows[t]["own"]
                part += f", {{{key}_own:.0f}}% nearest a mode of their class"
            parts.append(part)
        if parts:
            lines.append(f"- **{src}** (about {{{src}_n}} states per step): " + "; ".join(parts))
            vals[f"{src}_n"] = rows[next(iter(rows))]["n"]
    modes = "; ".join(f"t = {t}: {{modes_{t}:.2f}}" for t in ts if t in sp.get("forward", {}))
    for t in ts:
        if t in sp.get("forward", {}):
            vals[f"modes_{t}"] = sp["forward"][t]["mode_rms"]
    head = ("**Where the states of this snapshot sit** (rms distance from the data's centre; "
            f"the modes' radius, {modes}):\n\n")
    return head + "\n".join(lines), vals


def _colour_note(backend) -> str:
    if getattr(backend.gmm, "labels", None) is None:
        return "colour: source"
    return "colour: class; X: the modes of each class at t"


def snapshot_by_source(snapshots, backend, grid, snapshot: int = -1, n_show: int = 600,
                       size: float = 1.4) -> Figure:
    """Small multiples of one snapshot of the training states (``StateSnapshots``): one row
    per source (forward, teacher, student, mixed rollouts; the row label gives its share of
    the states), one column per student timestep, each over the grey forward marginal q_t,
    states coloured by class with the modes of each class marked (``_states_by_source``).
    The canvas fits a laptop window under a slider (6.2 x 6.4 in, 560 x 576 px at 90 dpi). For a slider over
    ``snapshot`` (an index; -1 the last)."""
    snaps = snapshots.snapshots if hasattr(snapshots, "snapshots") else snapshots
    step, st, pri = snaps[int(snapshot)]
    fig = Figure(figsize=(size * len(grid) + 0.6, size * len(SOURCES) + 0.8),
                 layout="constrained")
    _states_by_source(fig, st, backend, grid, n_show)
    short = ", ".join(f"{PRIOR_SHORT[k]} {v:.2f}" for k, v in pri.items())
    fig.suptitle(f"training states at step {step}, one row per source, over q_t (grey)\n"
                 f"priors {short}; {_colour_note(backend)}", fontsize=8)
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
    ax.set_ylabel("fraction of the training states")
    ax.set_ylim(0, 1)
    ax.set_title("where the training states come from", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def source_losses(result, window: int = 20, size=(4.0, 2.6)) -> Figure:
    """The student's training loss split by the source of the states (moving average over
    ``window`` steps): how wrong the student is, as it learns, on each kind of state."""
    curves = source_loss_curves(result, window)
    fig = Figure(figsize=size)
    ax = fig.subplots()
    for src, (steps, vals) in curves.items():
        ax.plot(steps, vals, color=SOURCE_COLORS[src], label=src)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{result.method.name} loss (moving avg of {window})")
    ax.set_title("the student's loss by state source", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def source_preview(run, backend, beta_frwd=0.25, beta_teacher_bckwrd=0.25,
                   beta_student_bckwrd=0.25, beta_mixed=0.25, p_student=0.5, n=1000,
                   n_show: int = 600, size: float = 1.4) -> Figure:
    """What the StateSampler would feed a trained student (``run``: a ``DistillResult`` or a
    toy-table ``MemberView``) with these priors and mixed-rollout probability
    (``preview_sources``, ``n`` states per timestep): one row per source, as in
    ``snapshot_by_source``, so the sources never overlap. For sliders."""
    st = preview_sources(run, beta_frwd, beta_teacher_bckwrd, beta_student_bckwrd,
                         beta_mixed, p_student, n)
    grid = run.method.grid.tolist()
    fig = Figure(figsize=(size * len(grid) + 0.6, size * len(SOURCES) + 0.8),
                 layout="constrained")
    _states_by_source(fig, st, backend, grid, n_show)
    counts = torch.bincount(st.source, minlength=len(SOURCES)).tolist()
    fig.suptitle("what the sampler would draw (states per source: " + ", ".join(
        f"{s} {c}" for s, c in zip(SOURCES, counts)) + f")\np_student={p_student:.2f}; "
        f"{_colour_note(backend)}", fontsize=8)
    return fig
