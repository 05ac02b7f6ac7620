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
from .common import PRIOR_SHORT, SOURCE_COLORS, labels_of, plot_limit, shade_density, states_at, training_states


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


def run_toy_table(out: str, quick: bool = True, **overrides) -> dict:
    """Run the toy table (``toy_table().run``) quietly: its printed table is returned in
    ``result["markdown"]`` instead, and the notebook's matplotlib backend, which the table's
    figure writer switches to Agg, is restored afterwards."""
    import contextlib
    import io

    import matplotlib
    backend = matplotlib.get_backend()
    with contextlib.redirect_stdout(io.StringIO()):
        result = toy_table().run(out, quick=quick, progress=False, **overrides)
    if matplotlib.get_backend() != backend:
        matplotlib.use(backend)
    return result


def table_metrics(summary: list[dict], keys=("nll", "mmd_x1e3", "coverage", "tv", "off_mode",
                                             "shift_sum", "drift_sum")) -> dict:
    """The toy table's summary rows (``run(...)["summary"]``) as ``{"setting/method/arm":
    {key: mean over seeds}}`` for the given metric keys, ready for ``Recorder.log``."""
    return {f"{r['setting']}/{r['method']}/{r['arm']}": {k: r[k] for k in keys if k in r}
            for r in summary}


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
                n_snapshot: int = 1000, seed: int = 0):
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
                  callbacks=(snap,), eval_every=snapshot_every, progress=False)
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


def sources_over_training(snapshots, backend, grid, max_rows: int = 4, size: float = 2.1
                          ) -> Figure:
    """Training states as training proceeds, coloured by source (forward blue, teacher green,
    student red, mixed orange): one row per snapshot (``StateSnapshots``), one column per
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
            shade_density(ax, backend, t, plot_limit(S, t), None, cache)
            _source_scatter(ax, st, t, plot_limit(S, t))
            if r == 0:
                ax.set_title(f"t = {t}", fontsize=9)
        short = [f"{PRIOR_SHORT[k]} {v:.2f}" for k, v in pri.items()]
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
    curves = source_loss_curves(result, window)
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
