"""Lesson 03, where training states come from (DDIL paper, Sec. 4.2): the toy table in its
quick setting, the training states of an arm by source as training proceeds, and the loss by
source."""

from __future__ import annotations

import copy
import os

import torch
from matplotlib.figure import Figure

from ...rollout import SOURCES, States, StateSampler
from ..plots import density2d, scatter2d
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


def table_verdicts(rows: list[dict], setting: str | None = None, key: str = "mmd_x1e3"
                   ) -> list[str]:
    """One ``notebook.verdict`` line per method and arm against that method's baseline."""
    from ...notebook import verdict
    setting = setting or rows[0]["setting"]
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["setting"] == setting and r["method"] != "teacher":
            by.setdefault(f"{r['method']} {r['arm']}", []).append(r)
    return [verdict(by, f"{name.split()[0]} baseline", name, key) for name in by
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
                  callbacks=(snap,), eval_every=snapshot_every, progress=progress)
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


def _source_scatter(ax, states, t, lim, n_show=400, gmm=None):
    at = states_at(states, t)
    for i, src in enumerate(SOURCES):
        x = at.x_t[at.source == i][:n_show]
        if len(x):
            scatter2d(x, ax, color=SOURCE_COLORS[src], s=3, alpha=0.6, lim=lim, label=src)
    if gmm is not None:
        scatter2d(torch.empty(0, 2), ax, gmm=gmm, lim=lim)


def snapshot_by_source(snapshots, backend, grid, snapshot: int = -1, n_show: int = 400,
                       size: float = 2.0) -> Figure:
    """Small multiples of one snapshot of the training states (``StateSnapshots``): one row
    per source (forward blue, teacher green, student red, mixed orange), one column per
    student timestep, each over the grey forward marginal q_t. Sources with no states in the
    snapshot are left empty. For a slider over ``snapshot`` (an index; -1 the last)."""
    snaps = snapshots.snapshots if hasattr(snapshots, "snapshots") else snapshots
    step, st, pri = snaps[int(snapshot)]
    S = backend.schedule
    fig = Figure(figsize=(size * len(grid) + 0.8, size * len(SOURCES) + 0.5),
                 layout="constrained")
    axs = fig.subplots(len(SOURCES), len(grid), squeeze=False)
    cache: dict = {}
    for r, src in enumerate(SOURCES):
        frac = float((st.source == r).double().mean())
        for c, t in enumerate(grid):
            ax, lim = axs[r, c], plot_limit(S, t)
            shade_density(ax, backend, t, lim, None, cache)
            at = states_at(st, t)
            x = at.x_t[at.source == r][:n_show]
            scatter2d(x, ax, color=SOURCE_COLORS[src], s=3, alpha=0.6, lim=lim)
            if r == 0:
                ax.set_title(f"t = {t}", fontsize=9)
        axs[r, 0].set_ylabel(f"{src}\n{100 * frac:.0f}% of states", fontsize=8,
                             color=SOURCE_COLORS[src])
    short = ", ".join(f"{PRIOR_SHORT[k]} {v:.2f}" for k, v in pri.items())
    fig.suptitle(f"training states at training step {step}, one row per source, over q_t (grey); "
                 f"priors {short}", fontsize=9)
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
                   beta_student_bckwrd=0.25, beta_mixed=0.25, p_student=0.5, n=300,
                   size: float = 2.3) -> Figure:
    """What the StateSampler would feed a trained student (``run``: a ``DistillResult`` or a
    toy-table ``MemberView``) with these priors and mixed-rollout probability
    (``preview_sources``): states per timestep coloured by source. For sliders."""
    st = preview_sources(run, beta_frwd, beta_teacher_bckwrd, beta_student_bckwrd,
                               beta_mixed, p_student, n)
    grid = run.method.grid.tolist()
    S = backend.schedule
    fig = Figure(figsize=(size * len(grid), size + 0.6))
    axs = fig.subplots(1, len(grid), squeeze=False)[0]
    for ax, t in zip(axs, grid):
        density2d(backend.gmm, ax, t, S, lim=plot_limit(S, t))
        _source_scatter(ax, st, t, plot_limit(S, t))
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
