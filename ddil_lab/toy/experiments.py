"""Toy experiments: the named settings of the DDIL results table and the exact evaluation of a
few-step student (DDIL paper, Tables 2/3, at toy scale).

The arms (``ddil_lab.train.arms``: baseline, ddil, reflected, ddil+reflected) are trained per
named setting and evaluated exactly here.

Two things the evaluation keeps apart (``evaluate_student``):

- *train/inference mismatch* (``shift_t``): at each student timestep t, how unlikely the
  states the student visits at inference are under the forward marginal q_t(x | c), which is
  what forward-only training draws from (``metrics.covariate_shift``, nats; 0 = no shift);
- *drift of the student from the teacher* (``drift_t``): sliced W1 (x1e3, class by class)
  between the student's states and the teacher's own states at the same t, the teacher walking
  the 32-step grid (``metrics.state_distance``). Two teacher draws give its noise floor.

Under guidance the two differ: the guided teacher itself leaves q_t(x | c), so a student can be
far from q_t (large shift) while staying on the teacher's path (small drift).

Typical use in a notebook::

    from ddil_lab.toy import make_backend, make_reference, evaluate_student
    from ddil_lab.train import train_arm
    backend = make_backend("guided")                   # ring8_cond, exact teacher, CFG w = 6
    ref = make_reference(backend, n=4000)
    runs = train_arm(backend, "pd", "ddil", seeds=(0, 1, 2), steps=400, batch_size=256)
    rows = [evaluate_student(run, backend, ref) for run in runs]   # dicts of metrics
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backend import Backend
from .backend import Toy2dBackend
from ..diffusion import NO_THRESHOLD, timesteps
from ..metrics import mmd, sliced_wasserstein, state_distance
from .metrics import covariate_shift, mode_stats, nll, per_class
from ..rollout import StateSampler
from ..sampling import DDIMPolicy, Trajectory, sample
from ..train.arms import ARMS, METHODS, EnsembleBackend, MemberView, train_arm

SW_PROJECTIONS = 64  # sliced-W1 directions; plenty in 2D, and 4x cheaper than the default 256

# Named settings: (mixture, classifier-free guidance scale of the teacher).
SETTINGS = {
    "ring8": ("ring8", 1.0),
    "guided": ("ring8_cond", 6.0),
    "grid25": ("grid25", 1.0),
    "imbalanced": ("imbalanced", 1.0),
    "guided12": ("ring12_cond3", 6.0),  # the regime map's 12-mode, 3-class ring (std 0.04)
}


# ---------------------------------------------------------------- settings

def make_backend(setting: str, teacher: str = "exact", guidance: float | None = None,
                 init_steps: int = 3000, dim: int = 2, hidden: int = 128,
                 student_init: str = "pretrained") -> Toy2dBackend:
    """The toy backend of a named setting (see ``SETTINGS``); ``guidance`` overrides the
    setting's CFG scale (e.g. ``make_backend("guided", guidance=3.0)``); ``hidden`` is the
    width of the MLP students start from (and of the MLP teacher, if teacher="mlp");
    ``student_init``: "pretrained" (that MLP) or "random"."""
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r} is not one of {tuple(SETTINGS)}")
    mixture, w = SETTINGS[setting]
    return Toy2dBackend(mixture, teacher=teacher, guidance=w if guidance is None else guidance,
                        dim=dim, init_steps=init_steps, hidden=hidden, student_init=student_init)


# ---------------------------------------------------------------- reference and evaluation

class TeacherSampler:
    """The backend's teacher as a sampler with ``.sample(x_T, cond)``: DDIM on ``grid``,
    walking the ``fine_steps`` grid inside each step (``fine_steps=None``: plain few-step
    DDIM); ``threshold`` clamps its x0 (the reflected teacher)."""

    def __init__(self, backend, grid, fine_steps: int | None = 32, threshold=NO_THRESHOLD):
        self.backend, self.grid = backend, [int(t) for t in grid]
        self.policy = DDIMPolicy(backend.teacher, backend.schedule, threshold, fine_steps)

    def sample(self, x_T, cond=None) -> Trajectory:
        return sample(self.policy, x_T, self.grid, cond, schedule=self.backend.schedule)


@dataclass
class Reference:
    """The common evaluation set: students start from ``x_T`` with labels ``cond``; the
    teacher's own trajectory (``teacher``, from independent noise, same labels) gives the
    reference states at every student timestep and the reference samples; ``teacher2`` is a
    second teacher draw (the noise floor of every distance); ``fwd[i]`` are forward states
    x_t ~ q_t(x | c) at ``grid[i]`` with the same labels (what forward-only training sees)."""
    grid: list[int]
    x_T: torch.Tensor
    cond: torch.Tensor | None
    teacher: Trajectory
    teacher2: Trajectory
    hist: torch.Tensor = field(default=None)  # the teacher's mode histogram
    fwd: list = field(default_factory=list)
    cache: dict = field(default_factory=dict, repr=False)  # metric terms of the teacher's side


def balanced_labels(num_classes: int, n: int) -> torch.Tensor:
    """n class labels, each class ``n // num_classes`` or one more times (in order 0, 1, ...)."""
    return torch.arange(n) % num_classes


def make_reference(backend, n: int = 4000, n_steps: int = 4, seed: int = 1234,
                   fine_steps: int = 32, balanced: bool = True) -> Reference:
    """Draw the evaluation noise and labels and the (guided) ``fine_steps``-step teacher's
    trajectories along the ``n_steps`` student grid. ``balanced``: every class gets the same
    number of labels (per-class metrics are then equally precise), else labels follow the
    mixture's class prior."""
    g = torch.Generator().manual_seed(seed)
    grid = timesteps(n_steps, backend.schedule.T).tolist()
    gmm = getattr(backend, "gmm", None)
    if balanced and gmm is not None and gmm.labels is not None:
        cond = balanced_labels(gmm.num_classes, n)
    else:
        cond = backend.sample_cond(n, g)
    x_T = backend.sample_noise(n, g)
    teach = TeacherSampler(backend, grid, fine_steps)
    t1 = teach.sample(backend.sample_noise(n, g), cond)
    t2 = teach.sample(backend.sample_noise(n, g), cond)
    hist = torch.tensor(mode_stats(t1.sample, backend.gmm)["hist"], dtype=torch.float64)
    g_fwd = torch.Generator().manual_seed(seed + 1)  # its own stream: the draws above stay put
    x0 = backend.gmm.sample(n, g_fwd, label=cond)[0] if cond is not None else \
        backend.gmm.sample(n, g_fwd)[0]
    fwd = [backend.schedule.q_sample(x0, torch.full((n,), t), torch.randn(x0.shape,
                                                                          generator=g_fwd))
           for t in grid]
    return Reference(grid, x_T, cond, t1, t2, hist, fwd)


def evaluate_trajectory(traj: Trajectory, backend, ref: Reference, per_step: bool = True) -> dict:
    """All metrics of one trajectory started from ``ref.x_T`` with labels ``ref.cond``:
    sample quality (NLL under the true (conditional) mixture; MMD (x1e3; the unbiased MMD^2
    estimate, which can be slightly negative when two sets match) and sliced W1 (x1e3) to the
    teacher's samples, per class against that class's own teacher samples and averaged over
    classes; coverage, mode-weight TV to the teacher's histogram (``tv``) and to the true
    (within-class) weights (``tv_data``), the off-mode fraction against every mode
    (``off_mode``) and, for conditional mixtures, against the sample's own class's modes
    (``off_mode_class``)) and, unless ``per_step=False``, at each grid timestep t:

    - ``shift_t{t}``: covariate shift vs q_t(x | c) in nats (``metrics.covariate_shift``);
    - ``gap_t{t}``: sliced W1 x1e3 between the states and forward states of q_t(x | c) (the same
      train/inference mismatch as a distance: the nats shift is a cross-entropy, and it barely
      sees states that are *more* concentrated than q_t, as guided ones are);
    - ``drift_t{t}``: sliced W1 x1e3 to the teacher's own states (drift from the teacher);

    with their sums (``shift_sum`` sums |shift_t|: the shift is negative where states are more
    concentrated than q_t, positive where they sit off it)."""
    gmm, S, c = backend.gmm, backend.schedule, ref.cond
    x = traj.sample
    ms = mode_stats(x, gmm, label=c)
    hist = torch.tensor(ms["hist"], dtype=torch.float64)
    sw = lambda a, b, cache=None: sliced_wasserstein(a, b, n_proj=SW_PROJECTIONS,  # noqa: E731
                                                     cache=cache)
    y = ref.teacher.sample  # the teacher's side of MMD and SW is computed once per reference
    out = {"nll": nll(x, gmm, label=c),
           "mmd_x1e3": 1e3 * per_class(mmd, x, y, c, c, cache=ref.cache.setdefault("mmd", {})),
           "sw_x1e3": 1e3 * per_class(sw, x, y, c, c, cache=ref.cache.setdefault("sw", {})),
           "coverage": ms["coverage"], "tv": float(0.5 * (hist - ref.hist).abs().sum()),
           "tv_data": ms["tv"], "off_mode": ms["off_mode"], "hist": ms["hist"]}
    if "off_mode_class" in ms:
        out["off_mode_class"] = ms["off_mode_class"]
    if not per_step:
        return out
    for i, t in enumerate(ref.grid):
        out[f"shift_t{t}"] = covariate_shift(traj.xs[i], t, gmm, S, label=c)
        out[f"drift_t{t}"] = 1e3 * state_distance(traj.xs[i], ref.teacher.xs[i], c, c,
                                                  n_proj=SW_PROJECTIONS)
        if ref.fwd:
            out[f"gap_t{t}"] = 1e3 * state_distance(traj.xs[i], ref.fwd[i], c, c,
                                                    n_proj=SW_PROJECTIONS)
    out["shift_sum"] = sum(abs(out[f"shift_t{t}"]) for t in ref.grid)  # signed terms may cancel
    out["drift_sum"] = sum(out[f"drift_t{t}"] for t in ref.grid)
    if ref.fwd:
        out["gap_sum"] = sum(out[f"gap_t{t}"] for t in ref.grid)
    return out


@torch.no_grad()
def evaluate_student(student, backend, ref: Reference, per_step: bool = True) -> dict:
    """Evaluate anything with ``.sample(x_T, cond) -> Trajectory`` on ``ref.grid`` (a Method,
    a ``MemberView``, a ``TeacherSampler``) from the common noise: see ``evaluate_trajectory``.
    A ``MemberView`` also contributes its training cost (``wall_s``, ``cpu_s``, ``nfe_*``)."""
    grid = getattr(student, "grid", ref.grid)
    grid = grid.tolist() if torch.is_tensor(grid) else list(grid)
    if grid != ref.grid:
        raise ValueError(f"student grid {grid} differs from the reference grid {ref.grid}")
    out = evaluate_trajectory(student.sample(ref.x_T, ref.cond), backend, ref, per_step)
    run = getattr(student, "run", None)
    if run is not None:
        out.update({k: run[k] for k in ("wall_s", "cpu_s", "nfe_teacher", "nfe_student")})
    return out


@torch.no_grad()
def evaluate_members(views, backend, ref: Reference, per_step: bool = True) -> list[dict]:
    """``evaluate_student`` for the ``MemberView``s of one trained ensemble, batched: one
    sampling call for all of them (each member's copy of the evaluation noise and labels
    stacked along the batch, so the ensemble runs them as one network), then each member's
    metrics, the teacher's side of MMD and SW computed once. (Stochastic samplers, LCM's and
    DMD2's, draw their re-noising from one stream for all members, not one after another.)"""
    views = list(views)
    if len({id(v.method) for v in views}) > 1:  # views of different runs: one at a time
        return [evaluate_student(v, backend, ref, per_step) for v in views]
    if not views:
        return []
    if views[0].grid != ref.grid:
        raise ValueError(f"student grid {views[0].grid} differs from the reference grid {ref.grid}")
    n, k = ref.x_T.shape[0], len(views)
    m = torch.tensor([v.member for v in views]).repeat_interleave(n)
    x_T = ref.x_T.repeat(k, *([1] * (ref.x_T.ndim - 1)))
    cond = None if ref.cond is None else ref.cond.repeat(k)
    traj = views[0].method.sample(x_T, {"m": m, "c": cond})
    out = []
    for i, v in enumerate(views):
        part = slice(i * n, (i + 1) * n)
        own = Trajectory(traj.grid, [x[part] for x in traj.xs], [x[part] for x in traj.x0s])
        e = evaluate_trajectory(own, backend, ref, per_step)
        e.update({key: v.run[key] for key in ("wall_s", "cpu_s", "nfe_teacher", "nfe_student")})
        out.append(e)
    return out


def reference_rows(backend, ref: Reference) -> dict[str, dict]:
    """Metrics of the teacher itself on the same evaluation set: a second 32-step draw (the
    noise floor), plain 4-step DDIM (what distillation must beat) and the reflected 32-step
    teacher (what reflected arms are taught)."""
    rows = {"teacher 32-step (2nd draw)": evaluate_trajectory(ref.teacher2, backend, ref),
            f"teacher DDIM {len(ref.grid)}-step": evaluate_student(
                TeacherSampler(backend, ref.grid, None), backend, ref)}
    if backend.support:
        rows["teacher 32-step reflected"] = evaluate_student(
            TeacherSampler(backend, ref.grid, 32, backend.support), backend, ref)
    return rows


@torch.no_grad()
def support_violations(backend, ref: Reference, seed: int = 0) -> dict:
    """Where reflected distillation acts. At each student timestep t, the fraction of the
    teacher's x0 estimates that the backend's support threshold would change, on the teacher's
    own 32-step states (``outside_t{t}``) and on forward states x_t ~ q_t(x | c) with the same
    labels (``outside_fwd_t{t}``, what forward-only training feeds it), and the mean |x0| of the
    latter (``x0_abs_fwd_t{t}``; guided targets at forward states can be far off the data).
    0 everywhere: reflection is a no-op for this teacher."""
    g = torch.Generator().manual_seed(seed)
    n = ref.x_T.shape[0]
    x0_data = backend.gmm.sample(n, g, label=ref.cond)[0] if ref.cond is not None else \
        backend.gmm.sample(n, g)[0]
    out = {}
    for i, t in enumerate(ref.grid):
        tt = torch.full((n,), t, dtype=torch.long)
        x_fwd = backend.schedule.q_sample(x0_data, tt, torch.randn(x0_data.shape, generator=g))
        for key, x in (("outside", ref.teacher.xs[i]), ("outside_fwd", x_fwd)):
            x0 = backend.teacher(x, tt, ref.cond)
            out[f"{key}_t{t}"] = float((backend.support(x0) != x0).flatten(1).any(1).double().mean())
        out[f"x0_abs_fwd_t{t}"] = float(x0.abs().mean())
    return out


def training_state_mismatch(run_view: MemberView, backend, ref: Reference,
                            n: int = 4000) -> dict:
    """``train_gap_t{t}``: sliced W1 (x1e3, class by class) at each grid timestep between the
    states this arm *trains* on (its StateSampler's sources and priors, drawn fresh with the
    trained student, at the inference grid) and the states the student visits at inference.
    Forward-only training: the distance from q_t(x | c) samples; DDIL: from the forward/rollout
    mix it trains on."""
    method, k = run_view.method, run_view.member
    base = run_view.run.get("sampler")
    priors = dict(base.priors) if base is not None else {"beta_frwd": 1.0}
    view = EnsembleBackend(backend, 1)
    spec = method.spec()
    spec.forward_t, spec.grids = method.grid, [method.grid]  # compare on the inference grid
    sampler = StateSampler(**priors)
    student = _Member(method.student, k)
    traj = run_view.sample(ref.x_T, ref.cond)
    out = {}
    states = sampler.sample(view, spec, student, n * len(ref.grid))
    for i, t in enumerate(ref.grid):
        sel = states.t == t
        c_tr = states.cond["c"][sel] if states.cond["c"] is not None else None
        if int(sel.sum()) < 2:
            continue
        out[f"train_gap_t{t}"] = 1e3 * _class_distance(states.x_t[sel], c_tr, traj.xs[i], ref.cond)
    return out


def _class_distance(a, ca, b, cb):
    """state_distance with possibly different label sets; classes missing from a are skipped."""
    if ca is None:
        return state_distance(a, b, n_proj=SW_PROJECTIONS)
    total, w = 0.0, 0.0
    for c in torch.unique(cb):
        ia, ib = ca == c, cb == c
        if ia.sum() < 2 or ib.sum() < 2:
            continue
        p = float(ib.double().mean())
        total, w = total + p * state_distance(a[ia], b[ib], n_proj=SW_PROJECTIONS), w + p
    return total / max(w, 1e-12)


class _Member(nn.Module):
    """A trained ensemble student seen as a single-member network (for fresh rollouts)."""

    def __init__(self, student, member: int):
        super().__init__()
        self.student, self.member = student, member

    def forward(self, x_t, t, cond):
        m = torch.full((x_t.shape[0],), self.member, dtype=torch.long)
        return self.student(x_t, t, {"m": m, "c": cond["c"]})


# ---------------------------------------------------------------- one setting, all arms

@dataclass
class SettingResult:
    """Everything one setting of the table produced: per-seed metric rows (teacher reference
    rows have method "teacher"), the reference, seed 0's samples per arm, per-step shift and
    drift per arm (lists over seeds), and mode histograms per arm (lists over seeds)."""
    setting: str
    backend: Backend
    ref: Reference
    rows: list = field(default_factory=list)
    samples: dict = field(default_factory=dict)
    per_step: dict = field(default_factory=dict)
    hists: dict = field(default_factory=dict)


def run_setting(backend, setting: str = "", methods=METHODS, arms=ARMS, seeds=(0, 1, 2),
                steps: int = 300, batch_size: int = 256, lr: float = 1e-3, n_steps: int = 4,
                n_eval: int = 4000, ensemble: bool = True, method_kw: dict | None = None,
                sampler_kw: dict | None = None, train_gap: bool = False,
                progress: bool = True, **distill_kw) -> SettingResult:
    """Train and evaluate every (method, arm) of one setting on a common reference.

    ``method_kw`` maps a method name to its keyword overrides (e.g. {"dmd2": {"critic_steps":
    5}}); ``sampler_kw`` goes to ``make_sampler`` (buffer sizes per seed); ``train_gap`` adds
    ``training_state_mismatch`` to each row. Other keywords go to ``distill``.
    """
    from tqdm.auto import tqdm

    for key, vals, allowed in (("methods", methods, METHODS), ("arms", arms, ARMS)):
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise ValueError(f"{key}={list(vals)!r}: each must be one of {allowed}")
    ref = make_reference(backend, n_eval, n_steps)
    res = SettingResult(setting, backend, ref)
    for name, r in reference_rows(backend, ref).items():
        res.rows.append({"setting": setting, "method": "teacher", "arm": name, "seed": "", **r})
    res.samples["teacher 32-step"] = ref.teacher.sample
    bar = tqdm([(m, a) for m in methods for a in arms], desc=setting or "arms",
               disable=not progress)
    for method, arm in bar:
        bar.set_postfix_str(f"{method} {arm}")
        views = train_arm(backend, method, arm, seeds, steps, batch_size, lr, n_steps, ensemble,
                          method_kw=(method_kw or {}).get(method), sampler_kw=sampler_kw,
                          **distill_kw)
        evals = []
        for v in views:
            e = evaluate_student(v, backend, ref)
            if train_gap:
                e.update(training_state_mismatch(v, backend, ref, n=min(n_eval, 2000)))
            evals.append(e)
            res.rows.append({"setting": setting, "method": method, "arm": arm, "seed": v.seed,
                             **e})
        res.samples[f"{method} {arm}"] = views[0].sample(ref.x_T, ref.cond).sample
        res.per_step[(method, arm)] = {k: [[e[f"{k}_t{t}"] for t in ref.grid] for e in evals]
                                       for k in ("shift", "gap", "drift")}
        res.hists[(method, arm)] = [e["hist"] for e in evals]
    return res


def save_figures(res: SettingResult, out: str, tag: str | None = None) -> list[str]:
    """Write ``samples_<tag>.png`` (seed 0 per arm, coloured by class),
    ``steps_<tag>.png`` (covariate shift, gap to q_t and drift per student timestep, mean +-
    std over seeds, the teacher's second draw dashed) and ``modes_<tag>.png`` (mode histograms, the
    teacher's as ticks) under ``out``; returns the paths."""
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import plots

    tag = tag or res.setting or "setting"
    os.makedirs(out, exist_ok=True)
    ref, gmm = res.ref, res.backend.gmm
    methods = list(dict.fromkeys(m for m, _ in res.per_step))
    n_arms = len({a for _, a in res.per_step})
    paths = [os.path.join(out, f"{k}_{tag}.png") for k in ("samples", "steps", "modes")]

    panels = []  # one row per method: the teacher, then the arms
    for m in methods:
        panels.append(("teacher 32-step", res.samples["teacher 32-step"]))
        panels += [(k, x) for k, x in res.samples.items() if k.startswith(m + " ")]
    fig = plots.sample_grid(panels, gmm, labels=ref.cond, ncols=n_arms + 1,
                            suptitle=f"{tag}: samples of seed 0 (colour: class)")
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    floor = evaluate_trajectory(ref.teacher2, res.backend, ref)
    fig, axs = plt.subplots(3, len(methods), figsize=(3.8 * len(methods), 9.2), squeeze=False)
    for j, m in enumerate(methods):
        for i, (key, ylabel) in enumerate((("shift", "covariate shift vs q_t (nats)"),
                                           ("gap", "distance to q_t states (SW x1e3)"),
                                           ("drift", "drift to teacher states (SW x1e3)"))):
            curves = {a: v[key] for (mm, a), v in res.per_step.items() if mm == m}
            plots.step_curves(axs[i, j], ref.grid, curves, ylabel, title=f"{m} ({tag})",
                              reference={"teacher, 2nd draw": [floor[f"{key}_t{t}"]
                                                               for t in ref.grid]})
    axs[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)

    fig, axs = plt.subplots(1, len(methods), figsize=(4.4 * len(methods), 3.1), squeeze=False)
    for j, m in enumerate(methods):
        plots.mode_histogram(axs[0, j], {a: h for (mm, a), h in res.hists.items() if mm == m},
                             weights=ref.hist, title=f"{m} ({tag}); ticks: teacher")
    axs[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------- aggregation

def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), ignoring NaNs."""
    v = [float(x) for x in values if not math.isnan(float(x))]
    if not v:
        return math.nan, math.nan
    mu = sum(v) / len(v)
    sd = math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mu, sd


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228}  # two-sided 95% Student t quantiles by degrees of freedom


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval, ignoring NaNs (NaN width for a
    single value)."""
    n = sum(1 for x in values if not math.isnan(float(x)))
    mu, sd = mean_std(values)
    return mu, (T95.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else math.nan)


def _num(v) -> float:
    """A metric from a row (a float, or a CSV string; missing -> NaN)."""
    return math.nan if v is None or v == "" else float(v)


def paired_deltas(rows: list[dict], keys, base_arm: str = "baseline") -> list[dict]:
    """Per (setting, method, arm != base_arm): the mean over seeds of arm - base_arm (paired by
    seed: same training seed, same evaluation noise), ``key_ci`` the half-width of its 95%
    Student-t interval, and ``key_sig`` True where that interval excludes 0."""
    index = {(r["setting"], r["method"], r["arm"], str(r["seed"])): r for r in rows
             if r["method"] != "teacher"}
    out = []
    for setting, method, arm in dict.fromkeys((k[0], k[1], k[2]) for k in index):
        if arm == base_arm:
            continue
        pairs = [(r, index.get((setting, method, base_arm, seed)))
                 for (s_, m_, a_, seed), r in index.items() if (s_, m_, a_) == (setting, method, arm)]
        pairs = [(a, b) for a, b in pairs if b is not None]
        if not pairs:
            continue
        d = {"setting": setting, "method": method, "arm": arm, "seeds": len(pairs)}
        for k in keys:
            mu, ci = mean_ci([_num(a.get(k)) - _num(b.get(k)) for a, b in pairs])
            d[k], d[f"{k}_ci"], d[f"{k}_sig"] = mu, ci, bool(not math.isnan(ci) and abs(mu) > ci)
        out.append(d)
    return out


def summarise(rows: list[dict], keys, by=("setting", "method", "arm")) -> list[dict]:
    """Group per-seed rows by ``by`` and give ``key`` and ``key_std`` for every key."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[b] for b in by), []).append(r)
    out = []
    for gk, rs in groups.items():
        s = dict(zip(by, gk))
        s["seeds"] = len(rs)
        for k in keys:
            s[k], s[f"{k}_std"] = mean_std(r.get(k, math.nan) for r in rs)
        out.append(s)
    return out


__all__ = ["SETTINGS", "Reference", "SettingResult", "TeacherSampler", "balanced_labels",
           "evaluate_student",
           "evaluate_members", "evaluate_trajectory", "make_backend", "make_reference", "mean_std", "paired_deltas",
           "reference_rows", "run_setting", "save_figures", "summarise", "support_violations",
           "training_state_mismatch"]


def write_csv(path: str, records: list[dict], skip=()) -> str:
    """Records as one CSV: the union of their keys (but ``skip``) in first-seen order, blanks
    where a record lacks a key; returns ``path``."""
    keys = list(dict.fromkeys(k for r in records for k in r if k not in skip))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    return path
