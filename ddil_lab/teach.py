"""Teaching helpers behind the notebooks in ``notebooks/``: covariate shift, mode loss, the
sources of training states and reflected distillation, on the exact toy tier (DDIL paper,
Sec. 3.2 and 4). Notebooks call these functions and ``ddil_lab.teach_plots``, nothing else of
their own, so the tests reach every line a lecturer shows.

Paper terms used throughout:
    q_t(x | c)       forward marginal at timestep t: what forward-only training draws x_t from
    trajectory       the states x_t a policy visits on the student grid, e.g. {999, 749, 500, 250}
    covariate shift  the states a student meets at inference leave the states it trained on
    reachable modes  the modes the teacher reaches when it continues a state x_t to t = -1;
                     their histogram per step shows where diversity is lost (Sec. 3.3)
    sources          forward / teacher / student / mixed (``rollout.SOURCES``), DDIL's priors
    reflected        x0 estimates clamped to the data support [-1, 1]^d (Sec. 4.1)

Students are trained as in the toy table (``ddil_lab.toy_experiments.train_arm``: the seeds of
an arm as one batched ensemble), so the notebooks and the table agree on every arm.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .denoiser import CFG
from .diffusion import NO_THRESHOLD, Threshold, timesteps
from .metrics import covariate_shift, mmd, mode_stats, nll, state_distance
from .rollout import SOURCES, States, StateSampler
from .sampling import DDIMPolicy, Trajectory, sample
from .toy_experiments import (
    EnsembleBackend,
    MemberView,
    Reference,
    TeacherSampler,
    make_reference,
    train_arm,
)

# ---------------------------------------------------------------- running a notebook

def setup(threads: int = 1, seed: int = 0) -> None:
    """One intra-op thread (toy tensors are tiny: ~30x faster on a busy 2-core machine) and a
    seed."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def _show_png(path_or_fig, dpi: int = 90) -> None:
    """Display a PNG file, or a figure rendered to PNG, in a notebook (whatever matplotlib
    backend is active; nothing outside IPython)."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is None:
        return
    if isinstance(path_or_fig, str):
        display(Image(filename=path_or_fig))
        return
    import io
    buf = io.BytesIO()
    path_or_fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    display(Image(data=buf.getvalue()))


def _scalar_items(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _scalar_items(v, key + "/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield key, float(v)


class Recorder:
    """What a notebook run leaves behind for readers and tests: figures as PNG files and
    scalar metrics in ``metrics.json`` under ``out_dir``.

    ``rec.figure("name", fig)`` saves the figure and shows the saved PNG;
    ``rec.log(prefix, {...})`` adds scalars (nested dicts are flattened as ``a/b``, non-scalars
    are dropped); ``rec.save()`` writes ``metrics.json``: ``{"metrics": {name: value},
    "figures": {name: png path}}``.
    """

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        os.makedirs(out_dir, exist_ok=True)
        self.metrics: dict[str, float] = {}
        self.paths: dict[str, str] = {}  # figure name -> PNG

    def figure(self, name: str, fig, dpi: int = 90) -> None:
        """Save ``fig`` as ``name.png`` and show that PNG (rendered once: the same file the
        tests read; its path is ``self.paths[name]``)."""
        path = os.path.join(self.out_dir, f"{name}.png")
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        self.image(name, path)

    def image(self, name: str, path: str) -> None:
        """Show an existing PNG (e.g. a figure the toy table wrote) and list it as a figure
        of this run under ``name``."""
        self.paths[name] = path
        _show_png(path)

    def log(self, prefix: str, values: dict) -> None:
        for k, v in _scalar_items(values, f"{prefix}/" if prefix else ""):
            self.metrics[k] = v

    def save(self) -> str:
        """Write ``metrics.json``, with the run's wall and CPU seconds so far (``run/*``)."""
        self.metrics["run/wall_s"] = time.perf_counter() - self._t0
        self.metrics["run/cpu_s"] = time.process_time() - self._c0
        path = os.path.join(self.out_dir, "metrics.json")
        with open(path, "w") as f:
            json.dump({"metrics": self.metrics, "figures": self.paths}, f, indent=1,
                      allow_nan=True)
        return path


def markdown_table(rows: dict[str, dict], keys, fmt: str = "{:.3g}") -> str:
    """A Markdown table, one row per name; a value given as a list of seeds shows as
    mean ± std."""
    def cell(v):
        if isinstance(v, (list, tuple)):
            v = [float(x) for x in v]
            if len(v) > 1:
                mu = sum(v) / len(v)
                sd = math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1))
                return f"{fmt.format(mu)} ± {fmt.format(sd)}"
            v = v[0]
        return fmt.format(v) if isinstance(v, (int, float)) else str(v)
    lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r.get(k, float("nan"))) for k in keys) + " |"
              for name, r in rows.items()]
    return "\n".join(lines)


def seed_lists(rows: list[dict]) -> dict:
    """Per-seed metric dicts -> one dict of lists (scalars only), for tables and logging."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
    return {k: [r[k] for r in rows] for k in keys}


def seed_mean(rows: list[dict]) -> dict:
    """Per-seed metric dicts -> their mean (scalars only)."""
    return {k: sum(v) / len(v) for k, v in seed_lists(rows).items()}


def toy_table():
    """The toy table's script, ``experiments/toy_table.py`` next to this package, imported as a
    module wherever the notebook runs from. Its ``run(out, quick=True, **overrides)`` trains
    every arm, writes ``table.md``, CSVs and figures under ``out``, and returns them."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


# ---------------------------------------------------------------- states and marginals

def guided_teacher(backend, guidance: float):
    """The backend's teacher at another classifier-free guidance scale w (exact mixtures:
    free); w = 1 is the plain conditional teacher."""
    if guidance == 1.0 or not backend.conditional:
        return backend.cond_teacher
    return CFG(backend.cond_teacher, guidance)


def forward_states(backend, grid, cond=None, n: int | None = None,
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Forward-diffused states x_t ~ q_t(x | c), one batch per timestep of ``grid``: with the
    labels ``cond``, or n unconditional ones. The states forward-only training uses."""
    n = len(cond) if cond is not None else n
    out = []
    for t in grid:
        x0, _, _ = backend.gmm.sample(n, generator, label=cond)
        eps = torch.randn(x0.shape, generator=generator)
        out.append(backend.schedule.q_sample(x0, torch.full((n,), int(t)), eps))
    return out


@torch.no_grad()
def teacher_trajectory(backend, n_steps: int = 4, guidance: float | None = None,
                       fine_steps: int | None = 32, n: int = 1000, seed: int = 0,
                       threshold: Threshold = NO_THRESHOLD):
    """(trajectory, cond) of the exact teacher on the ``n_steps`` grid, walking the
    ``fine_steps`` grid inside each step (None: plain few-step DDIM, the untrained student);
    ``guidance`` overrides the backend's CFG scale."""
    g = torch.Generator().manual_seed(seed)
    cond, x_T = backend.sample_cond(n, g), backend.sample_noise(n, g)
    teacher = backend.teacher if guidance is None else guided_teacher(backend, guidance)
    pol = DDIMPolicy(teacher, backend.schedule, threshold, fine_steps)
    return sample(pol, x_T, timesteps(n_steps, backend.schedule.T), cond,
                  schedule=backend.schedule), cond


def forward_gaps(backend, traj: Trajectory, cond, seed: int = 0) -> list[float]:
    """Sliced W1 (x1e3, class by class) between a trajectory's states and fresh forward states
    of q_t(x | c) at each grid timestep: how far inference leaves forward-only training."""
    g = torch.Generator().manual_seed(seed)
    fwd = forward_states(backend, traj.grid, cond, traj.xs[0].shape[0], g)
    return [1e3 * state_distance(x, f, cond, cond) for x, f in zip(traj.xs, fwd)]


# ---------------------------------------------------------------- students and their states

# Arms by name: the toy table's (``toy_experiments.ARMS``) and one more, "backward": the
# student's own rollouts only, which is DMD2's "backward simulation" (and ImagineFlash's).
ARM_RECIPES = {
    "baseline": ("baseline", {}),
    "ddil": ("ddil", {}),
    "reflected": ("reflected", {}),
    "ddil+reflected": ("ddil+reflected", {}),
    "backward": ("ddil", {"share": 1.0, "source": "beta_student_bckwrd"}),
}


def train_students(backend, method: str, arms=("baseline", "ddil"), seeds=(0,), steps: int = 400,
                   batch_size: int = 256, lr: float = 1e-3, n_steps: int = 4,
                   method_kw: dict | None = None, sampler_kw: dict | None = None,
                   **distill_kw) -> dict[str, list[MemberView]]:
    """Train several arms of one method, the seeds of each as one ensemble (the toy table's
    ``train_arm``): ``arm name -> [one MemberView per seed]``. Arms are names in
    ``ARM_RECIPES``, or a dict ``label -> (toy table arm, sampler_kw)``."""
    if not isinstance(arms, dict):
        unknown = [a for a in arms if a not in ARM_RECIPES]
        if unknown:
            raise ValueError(f"arms {unknown} are not in {tuple(ARM_RECIPES)}")
        arms = {a: ARM_RECIPES[a] for a in arms}
    out = {}
    for label, (arm, skw) in arms.items():
        out[label] = train_arm(backend, method, arm, seeds=tuple(seeds), steps=steps,
                               batch_size=batch_size, lr=lr, n_steps=n_steps,
                               method_kw=method_kw, sampler_kw={**(sampler_kw or {}), **skw},
                               **distill_kw)
    return out


def train_methods(backend, plan: dict, method_kw: dict | None = None,
                  sampler_kw: dict | None = None, **kw) -> dict[str, list[MemberView]]:
    """``train_students`` for several methods: ``plan`` maps a method to its arms, e.g.
    ``{"pd": ["baseline", "ddil"], "dmd2": ["backward", "ddil"]}``; ``method_kw`` maps a
    method to its settings. Returns ``"method arm" -> seeds``, e.g. ``"pd ddil"``."""
    out = {}
    for method, arms in plan.items():
        res = train_students(backend, method, arms, method_kw=(method_kw or {}).get(method),
                             sampler_kw=sampler_kw, **kw)
        out.update({f"{method} {arm}": views for arm, views in res.items()})
    return out


def member_cond(view: MemberView, cond, n: int) -> dict:
    """The ensemble conditioning that routes n samples with labels ``cond`` to this seed."""
    return {"m": torch.full((n,), view.member, dtype=torch.long), "c": cond}


class _OneMember(nn.Module):
    """An ensemble network seen as one seed's network (conditioning ``{"m", "c"}``)."""

    def __init__(self, net, member: int):
        super().__init__()
        self.net, self.member = net, member

    def forward(self, x_t, t, cond):
        return self.net(x_t, t, {"m": torch.full((x_t.shape[0],), self.member), "c": cond["c"]})


def _arm_parts(run):
    """(method, sampler, backend to draw with, student network) of a trained arm: a toy-table
    ``MemberView`` (one seed of an ensemble) or a plain ``DistillResult``."""
    if isinstance(run, MemberView):
        return (run.method, run.run["sampler"], EnsembleBackend(run.method.backend.base, 1),
                _OneMember(run.method.student, run.member))
    return run.method, run.sampler, run.method.backend, run.method.student


@torch.no_grad()
def training_states(run, n: int = 2000, priors: dict | None = None,
                    p_student: float | None = None, step: int | None = None) -> States:
    """n states per grid timestep drawn the way an arm draws its training states (its
    StateSampler's priors, at ``step`` of its prior schedule, or the final priors) with the
    trained student, on the student's inference grid. ``run`` is a ``MemberView`` (one seed
    of a toy-table ensemble) or a ``DistillResult``; ``priors`` / ``p_student`` override the
    arm's (what-if previews). The result's ``cond`` holds the class labels (or None)."""
    method, base, view, student = _arm_parts(run)
    pri = dict(priors if priors is not None else
               (base.priors_at(step) if step is not None else base.priors))
    sampler = StateSampler(**pri, p_student=base.p_student if p_student is None else p_student)
    spec = copy.copy(method.spec())
    spec.forward_t, spec.grids = method.grid, [method.grid]
    st = sampler.sample(view, spec, student, n * len(method.grid))
    return States(st.x_t, st.t, _labels(st.cond), st.source)


def _labels(cond):
    """The class labels of a conditioning (the ensemble's ``{"m", "c"}`` or plain)."""
    return cond["c"] if isinstance(cond, dict) and "c" in cond else cond


def states_at(states: States, t: int) -> States:
    """The states of a batch at one timestep."""
    return states.take((states.t == int(t)).nonzero().squeeze(1))


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
    ``toy_experiments.evaluate_trajectory``, with the size ``n_ref`` of the covariate-shift
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
    """
    backend: object
    ref: Reference
    students: dict
    trajs: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)
    train_states: dict = field(default_factory=dict)
    forward: list = field(default_factory=list)

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
                students: dict | None = None) -> ShiftStudy:
    """Train ``arms`` of ``method`` (or take trained ``students``) and measure, at every
    student timestep, where their inference states sit relative to the forward marginals
    q_t(x|c), to their own training states and to the teacher (see ``ShiftStudy``)."""
    with torch.enable_grad():
        students = students or train_students(backend, method, arms, seeds, steps, batch_size,
                                              lr, n_steps, method_kw, sampler_kw)
    ref = make_reference(backend, n=n_eval, n_steps=n_steps, seed=ref_seed)
    g = torch.Generator().manual_seed(ref_seed + 1)
    study = ShiftStudy(backend, ref, students,
                       forward=forward_states(backend, ref.grid, ref.cond, n_eval, g))

    def measure(traj):
        return trajectory_metrics(traj, backend, ref, study.forward, n_ref=min(20000, 4 * n_eval))

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


def verdict(rows: dict, a: str, b: str, key: str = "mmd_x1e3", lower_is_better: bool = True
            ) -> str:
    """One honest sentence comparing arm ``b`` with arm ``a`` on a metric over seeds: the
    change of the mean, in units of its standard error (from the seeds' spread). Within 1 SE:
    no difference; 1-2 SE: suggestive; above 2 SE: clear. One seed: no error bar."""
    va, vb = [r[key] for r in rows[a]], [r[key] for r in rows[b]]
    ma, mb = sum(va) / len(va), sum(vb) / len(vb)
    if len(va) > 1 and len(vb) > 1:
        sa = sum((x - ma) ** 2 for x in va) / (len(va) - 1)
        sb = sum((x - mb) ** 2 for x in vb) / (len(vb) - 1)
        se = math.sqrt(sa / len(va) + sb / len(vb))
    else:
        se = float("nan")
    word = "better" if ((mb < ma) if lower_is_better else (mb > ma)) else "worse"
    d = abs(mb - ma)
    if math.isnan(se):
        tail = "one seed only: no error bar; rerun with more seeds before concluding"
    elif d <= se:
        tail = f"within 1 standard error ({se:.3g}): no difference"
    elif d <= 2 * se:
        tail = f"{d / se:.1f} standard errors ({se:.3g}): suggestive, not clear"
    else:
        tail = f"{d / se:.1f} standard errors ({se:.3g}): clear"
    return (f"{key}: {a} {ma:.3g} -> {b} {mb:.3g}, {word} by {d:.3g} "
            f"({len(va)} vs {len(vb)} seeds); {tail}.")


# ---------------------------------------------------------------- mode loss along the trajectory

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


@dataclass
class ModeStudy:
    """Notebook 02's results: ``hists[name]`` (mean over seeds) and ``per_seed[name]`` (list) of
    ``reachable_modes``; ``summary[name]`` the ``mode_summary`` of the mean histogram, against
    the teacher's samples; ``trajs[name]`` seed 0's trajectory (labels ``cond``); ``rows[name]``
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
               n_steps: int = 4, fine_steps: int = 32, ref_seed: int = 1234) -> ModeStudy:
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
    teacher_ref = None
    for name, trajs in runs.items():
        hs = [reachable_modes(backend, tr, ref.cond, fine_steps) for tr in trajs]
        study.per_seed[name] = hs
        study.hists[name] = torch.stack(hs).mean(0)
        if teacher_ref is None:
            teacher_ref = study.hists[name][-1]
        study.summary[name] = mode_summary(study.hists[name], teacher_ref)
        study.trajs[name] = trajs[0]
        study.rows[name] = [trajectory_metrics(tr, backend, ref, n_ref=min(20000, 4 * n_eval))
                            for tr in trajs]
        for r, h in zip(study.rows[name], hs):
            s = mode_summary(h, teacher_ref)
            r["effective_modes_final"] = s["effective_modes"][-1]
            r["effective_modes_min"] = min(s["effective_modes"])
            r["tv_first_step"] = s["tv"][1] if len(s["tv"]) > 1 else s["tv"][0]
    return study


# ---------------------------------------------------------------- sources of training states

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
        self.snapshots.append((step, States(st.x_t.clone(), st.t.clone(), _labels(st.cond),
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
    from .toy_experiments import make_arm
    from .train import distill
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


# ---------------------------------------------------------------- reflected distillation

def outside_support(x0: torch.Tensor, lo: float = -1.0, hi: float = 1.0, tol: float = 1e-4
                    ) -> float:
    """Fraction of x0 estimates with any coordinate outside the box [lo, hi]^d (beyond a
    float tolerance ``tol``)."""
    return float(((x0 < lo - tol) | (x0 > hi + tol)).flatten(1).any(1).double().mean())


@torch.no_grad()
def teacher_x0_along(backend, traj: Trajectory, cond, threshold: Threshold = NO_THRESHOLD
                     ) -> list[torch.Tensor]:
    """The teacher's x0 estimates at the states of a trajectory, one tensor per grid step."""
    return [threshold(backend.teacher(x, torch.full((x.shape[0],), int(t)), cond))
            for x, t in zip(traj.xs, traj.grid)]


@torch.no_grad()
def method_targets(method, states: States) -> torch.Tensor:
    """What a method regresses its student output onto at these states (x0 space), with its
    own ``reflected`` setting: PD the x0 that lands where the teacher lands; LCM the EMA
    target f_ema(x_{t'}, t') after one teacher DDIM step; DMD2 the point x - g its generator is
    pulled to. ``method`` must be set up (``method.setup(backend)``)."""
    x_t, t, cond = states.x_t, states.t, states.cond
    name = method.name
    if name == "pd":
        out = torch.empty_like(x_t, dtype=torch.float32)
        for tv in t.unique().tolist():
            idx = (t == tv).nonzero().squeeze(1)
            c = None if cond is None else cond[idx]
            out[idx] = method.target(x_t[idx], tv, c)[0]
        return out
    if name == "lcm":
        return method.consistency_target(x_t, t, cond)
    if name == "dmd2":
        x = method.th(method.student(x_t, t, cond)).float()
        g, _, _ = method.dm_gradient(x, cond)
        return x - g
    raise ValueError(f"no target for method {name!r}")


@torch.no_grad()
def target_report(backend, methods=("pd", "lcm", "dmd2"), n_steps: int = 4, n: int = 2000,
                  seed: int = 0, method_kw: dict | None = None) -> dict[str, dict]:
    """For each method, without and with ``reflected``: its targets (``method_targets``) on
    states of the (guided) teacher's trajectory, before any training (students and critics as
    they start). Returns ``{"pd": {"plain": {...}, "reflected": {...}}, ...}`` with
    ``outside`` (fraction of targets off the support), ``max_abs``, ``rms`` and ``pull_rms``
    (RMS distance from the student's current output to the target: the size of the update it
    asks for), and the tensors ``targets`` and ``t``."""
    from .toy_experiments import make_arm
    traj, cond = teacher_trajectory(backend, n_steps, n=n, seed=seed)
    grid = traj.grid
    states = States(torch.cat(traj.xs[:len(grid)]),
                    torch.tensor(grid).repeat_interleave(n),
                    None if cond is None else cond.repeat(len(grid)),
                    torch.full((n * len(grid),), SOURCES.index("teacher")))
    out = {}
    for name in methods:
        out[name] = {}
        for arm in ("baseline", "reflected"):
            torch.manual_seed(seed)
            m, _ = make_arm(name, arm, n_steps, (method_kw or {}).get(name))
            m.setup(backend)
            torch.manual_seed(seed)  # the same re-noising draws with and without reflection
            tg = method_targets(m, states)
            now = m.th(m.student(states.x_t, states.t, states.cond)).float()
            out[name]["reflected" if arm == "reflected" else "plain"] = {
                "outside": outside_support(tg), "max_abs": float(tg.abs().max()),
                "rms": float(tg.pow(2).mean().sqrt()),
                "pull_rms": float((tg - now).pow(2).sum(1).mean().sqrt()),
                "targets": tg, "t": states.t}
    return out


class EvalTracker:
    """A ``distill`` callback recording, every ``eval_every`` steps, the MMD (x1e3) between
    the student's samples and reference samples (e.g. the 32-step teacher's), from a fixed
    noise: sample quality as training proceeds, for stability plots. Keeps the RNG intact."""

    def __init__(self, backend, ref: Reference, n: int = 500):
        self.backend, self.n = backend, n
        self.x_T, self.ref = ref.x_T[:n], ref.teacher.sample[:n]
        self.cond = None if ref.cond is None else ref.cond[:n]
        self.steps: list[int] = []
        self.mmd: list[float] = []

    @torch.no_grad()
    def __call__(self, step: int, result) -> None:
        rng = torch.get_rng_state()
        method = result.method
        cond = self.cond
        if isinstance(method.backend, EnsembleBackend):
            cond = {"m": torch.zeros(self.n, dtype=torch.long), "c": self.cond}
            counter = dict(method.backend.counter)
        x = method.sample(self.x_T, cond).sample
        if isinstance(method.backend, EnsembleBackend):
            method.backend.counter.clear()
            method.backend.counter.update(counter)
        torch.set_rng_state(rng)
        self.steps.append(step)
        v = 1e3 * mmd(x, self.ref) if torch.isfinite(x).all() else float("nan")
        self.mmd.append(v)


def stability_runs(backend, method: str = "dmd2", arms=("baseline", "reflected"),
                   seeds=(0, 1, 2), steps: int = 300, batch_size: int = 8, lr: float = 1e-3,
                   n_steps: int = 4, eval_every: int = 25, n_eval: int = 500,
                   method_kw: dict | None = None, on_nonfinite: str = "skip"
                   ) -> dict[str, list[dict]]:
    """Train each arm once per seed (separate runs, so each seed has its own loss curve) and
    track sample quality every ``eval_every`` steps.

    Returns ``arm -> [{"seed", "history", "eval_steps", "mmd", "final_mmd", "skipped",
    "max_loss", "raw_outside"}]``: ``max_loss`` is the largest generator loss logged,
    ``raw_outside`` the fraction of the trained student's *unthresholded* x0 estimates, along
    its own trajectories, that lie off the support (a reflected student only ever shows the
    clamped ones). Non-finite updates are skipped and counted (``on_nonfinite="skip"``), so
    an unstable run shows instead of stopping."""
    ref = make_reference(backend, n=n_eval, n_steps=n_steps)
    out = {}
    for arm in arms:
        runs = []
        for s in seeds:
            tracker = EvalTracker(backend, ref, n_eval)
            view = train_arm(backend, method, arm, seeds=(s,), steps=steps,
                             batch_size=batch_size, lr=lr, n_steps=n_steps,
                             method_kw=method_kw, callbacks=(tracker,), eval_every=eval_every,
                             on_nonfinite=on_nonfinite)[0]
            hist = view.run["history"]
            losses = [h["loss/student"] for h in hist if "loss/student" in h]
            runs.append({"seed": s, "history": hist, "eval_steps": tracker.steps,
                         "mmd": tracker.mmd,
                         "final_mmd": tracker.mmd[-1] if tracker.mmd else float("nan"),
                         "skipped": sum(h.get("skipped", 0) for h in hist),
                         "max_loss": max(losses) if losses else float("nan"),
                         "raw_outside": raw_outside(view, backend, ref)})
        out[arm] = runs
    return out


@torch.no_grad()
def raw_outside(view: MemberView, backend, ref: Reference) -> float:
    """Fraction of a trained student's raw (unthresholded) x0 estimates off the support, at
    the states of its own trajectories from ``ref.x_T``."""
    traj = view.sample(ref.x_T, ref.cond)
    m, n = view.method, ref.x_T.shape[0]
    c = member_cond(view, ref.cond, n)
    raw = [m.student(x, torch.full((n,), int(t)), c) for x, t in zip(traj.xs, traj.grid)]
    return outside_support(torch.cat(raw))


# ---------------------------------------------------------------- widgets with a static fallback

def _control(name: str, spec, value):
    import ipywidgets as w
    style = {"description_width": "initial"}
    if isinstance(spec, w.ValueWidget):
        return spec
    if isinstance(value, bool) or spec is bool:
        return w.Checkbox(value=bool(value), description=name, style=style)
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(v, str) for v in spec):
        return w.Dropdown(options=list(spec), value=value, description=name, style=style)
    if isinstance(spec, tuple) and len(spec) in (2, 3):
        lo, hi = spec[0], spec[1]
        if all(isinstance(v, int) for v in spec) and isinstance(value, int):
            return w.IntSlider(value=value, min=lo, max=hi, step=spec[2] if len(spec) == 3 else 1,
                               description=name, style=style, continuous_update=False)
        return w.FloatSlider(value=float(value), min=lo, max=hi,
                             step=spec[2] if len(spec) == 3 else (hi - lo) / 20,
                             description=name, style=style, continuous_update=False)
    raise ValueError(f"control {name}={spec!r}: give (min, max[, step]), a list of strings, "
                     f"bool, or an ipywidgets widget")


class Explorer:
    """A figure with controls: ``draw(**values) -> Figure``.

    ``static()`` draws the figure for the starting ``values`` (shown as a plain PNG, it stays in
    headless runs, exported notebooks and viewers without widgets). Where ipywidgets renders,
    ``show()`` adds the ``controls``; moving one redraws the figure below them. ``fixed``
    keywords are passed to every draw.
    """

    def __init__(self, draw: Callable, controls: dict, values: dict, **fixed):
        self.draw, self.controls, self.values, self.fixed = draw, controls, dict(values), fixed
        self.widgets: dict = {}
        self.output = None
        self.redraws = 0

    def static(self):
        return self.draw(**self.values, **self.fixed)

    def _update(self, _change=None):
        self.values.update({k: wd.value for k, wd in self.widgets.items()})
        self.output.clear_output(wait=True)
        with self.output:
            _show_png(self.draw(**self.values, **self.fixed))
        self.redraws += 1

    def show(self, enabled: bool = True):
        """Display the controls (returns the box, or None when disabled or without ipywidgets)."""
        if not enabled:
            return None
        try:
            import ipywidgets as w
            from IPython.display import display
        except ImportError:  # no widgets: the static figure is all there is
            return None
        self.widgets = {k: _control(k, spec, self.values[k]) for k, spec in self.controls.items()}
        self.output = w.Output()
        for wd in self.widgets.values():
            wd.observe(self._update, names="value")
        controls = w.HBox(list(self.widgets.values()), layout=w.Layout(flex_flow="row wrap"))
        box = w.VBox([controls, self.output])
        display(box)
        return box


def explore(draw: Callable, controls: dict, values: dict, recorder: Recorder | None = None,
            name: str | None = None, widgets: bool = True, **fixed) -> None:
    """Draw ``draw(**values, **fixed)`` as a static figure and show it (through the recorder,
    which saves it as ``name``), then, if ``widgets``, show ``controls`` (``name -> (min, max,
    step)``, a list of choices, or bool) that redraw it (see ``Explorer``)."""
    ex = Explorer(draw, controls, values, **fixed)
    fig = ex.static()
    if recorder is not None and name:
        recorder.figure(name, fig)
    else:
        _show_png(fig)
    ex.show(widgets)


__all__ = [
    "ARM_RECIPES",
    "EvalTracker",
    "Explorer",
    "ModeStudy",
    "Recorder",
    "ShiftStudy",
    "StateSnapshots",
    "explore",
    "forward_gaps",
    "forward_states",
    "guided_teacher",
    "markdown_table",
    "member_cond",
    "method_targets",
    "mode_study",
    "mode_summary",
    "outside_support",
    "pd_step_error",
    "preview_sources",
    "raw_outside",
    "reachable_modes",
    "reached_modes",
    "run_toy_table",
    "seed_lists",
    "seed_mean",
    "setup",
    "shift_study",
    "source_loss_curves",
    "sources_run",
    "stability_runs",
    "states_at",
    "table_metrics",
    "target_report",
    "teacher_trajectory",
    "teacher_x0_along",
    "toy_table",
    "train_methods",
    "train_students",
    "training_states",
    "trajectory_metrics",
    "verdict",
]
