"""Lesson 04, reflected distillation (DDIL paper, Sec. 4.1): what clamping x0 to the data support
does to the teacher's estimates, to each method's targets, and to small-batch DMD2."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ...diffusion import NO_THRESHOLD, Threshold
from ...metrics import mmd
from ...rollout import SOURCES, States
from ...sampling import Trajectory
from ...train.arms import EnsembleBackend, MemberView, train_arm
from ..experiments import Reference, make_reference
from ..plots import scatter2d
from .common import bar_label, guided_teacher, member_cond, teacher_trajectory


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
    from ...train import make_arm
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
                   method_kw: dict | None = None, on_nonfinite: str = "skip",
                   progress: bool = True) -> dict[str, list[dict]]:
    """Train each arm once per seed (separate runs, so each seed has its own loss curve) and
    track sample quality every ``eval_every`` steps.

    Returns ``arm -> [{"seed", "history", "eval_steps", "mmd", "final_mmd", "skipped",
    "max_loss", "raw_outside", "on_edge"}]``: ``max_loss`` is the largest generator loss
    logged, ``on_edge`` the fraction of the student's samples with a coordinate on the edge of
    the box (where a clamp puts them), ``raw_outside`` the fraction of the trained student's
    *unthresholded* x0 estimates, along
    its own trajectories, that lie off the support (a reflected student only ever shows the
    clamped ones). Non-finite updates are skipped and counted (``on_nonfinite="skip"``), so
    an unstable run shows instead of stopping. ``progress``: one bar per run, labelled with
    the method, arm and seed."""
    ref = make_reference(backend, n=n_eval, n_steps=n_steps)
    out = {}
    for arm in arms:
        runs = []
        for s in seeds:
            tracker = EvalTracker(backend, ref, n_eval)
            view = train_arm(backend, method, arm, seeds=(s,), steps=steps,
                             batch_size=batch_size, lr=lr, n_steps=n_steps,
                             method_kw=method_kw, callbacks=(tracker,), eval_every=eval_every,
                             on_nonfinite=on_nonfinite, progress=progress,
                             desc=bar_label(method, arm, (s,)))[0]
            hist = view.run["history"]
            losses = [h["loss/student"] for h in hist if "loss/student" in h]
            runs.append({"seed": s, "history": hist, "eval_steps": tracker.steps,
                         "mmd": tracker.mmd,
                         "final_mmd": tracker.mmd[-1] if tracker.mmd else float("nan"),
                         "skipped": sum(h.get("skipped", 0) for h in hist),
                         "max_loss": max(losses) if losses else float("nan"),
                         "raw_outside": raw_outside(view, backend, ref),
                         "on_edge": on_edge(view.sample(ref.x_T, ref.cond).sample)})
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


def on_edge(x: torch.Tensor, lo: float = -1.0, hi: float = 1.0, tol: float = 1e-4) -> float:
    """Fraction of samples with a coordinate on the edge of the box [lo, hi]^d (within
    ``tol``): where a static clamp leaves every estimate that was outside."""
    return float((((x - lo).abs() < tol) | ((x - hi).abs() < tol)).flatten(1).any(1)
                 .double().mean())


def _box(ax, lo=-1.0, hi=1.0):
    ax.add_patch(Rectangle((lo, lo), hi - lo, hi - lo, fill=False, ls="--", lw=0.8, color="k"))


def teacher_x0(backend, guidance: float = 6.0, thresholding: bool = True, n_steps: int = 4,
               n: int = 1000, size: float = 2.4) -> Figure:
    """The (guided) teacher's x0 estimates at the states of its own trajectory, per step:
    raw (red) and, with ``thresholding``, clamped to the data support [-1, 1]^2 (blue, the
    reflected teacher); titles give the fraction of raw estimates outside the support. For
    sliders."""
    traj, cond = teacher_trajectory(backend, n_steps, guidance if backend.conditional
                                          else None, n=n)
    teacher = guided_teacher(backend, guidance) if backend.conditional else backend.teacher
    fig = Figure(figsize=(size * len(traj.grid), size + 0.9), layout="constrained")
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
        ax.set_title(f"t = {t}: {100 * outside_support(raw):.0f}% outside", fontsize=9)
    handles, labels = axs[0].get_legend_handles_labels()  # below the panels, off the data
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8, markerscale=3,
               frameon=False)
    fig.suptitle(f"teacher x0 estimates along its trajectory (w={guidance:g}, {n} states); "
                 f"dashed: support", fontsize=10)
    return fig


def target_scatter(report: dict, size: float = 2.6, n_max: int = 1500) -> Figure:
    """Each method's regression targets on teacher-trajectory states, without (red) and with
    (blue) reflected distillation, with the fraction outside the support in the titles."""
    names = list(report)
    fig = Figure(figsize=(size * len(names), size + 0.9), layout="constrained")
    axs = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axs, names):
        plain, refl = report[name]["plain"], report[name]["reflected"]
        lim = max(1.3, 1.1 * float(plain["targets"].abs().quantile(0.99)))
        for d, color, lab in ((plain, "C3", "plain"), (refl, "C0", "reflected")):
            scatter2d(d["targets"][:n_max], ax, color=color, s=2, alpha=0.4, lim=lim, label=lab)
        _box(ax)
        ax.set_title(f"{name} targets\noutside: plain {100 * plain['outside']:.0f}%, "
                     f"reflected {100 * refl['outside']:.0f}%", fontsize=9)
    handles, labels = axs[0].get_legend_handles_labels()  # below the panels, off the data
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8, markerscale=3,
               frameon=False)
    return fig


def stability(runs: dict, key: str = "loss/student", quality: bool = True, size=(3.4, 2.6)
              ) -> Figure:
    """Loss curves (``key`` from the history, one thin line per seed) and, with ``quality``,
    sample quality during training below them (MMD x1e3 to the teacher, one line per seed),
    one column per arm."""
    arms = list(runs)
    rows = 2 if quality else 1
    fig = Figure(figsize=(size[0] * len(arms), size[1] * rows + 0.4), layout="constrained")
    axs = fig.subplots(rows, len(arms), squeeze=False, sharey="row")
    what = {"loss/student": "generator loss ½‖g‖²", "loss/critic": "fake-critic loss"}
    for c, arm in enumerate(arms):
        for i, r in enumerate(runs[arm]):
            steps = [h["step"] for h in r["history"] if key in h]
            vals = [h[key] for h in r["history"] if key in h]
            axs[0, c].plot(steps, vals, lw=0.7, color=f"C{i}", alpha=0.8, label=f"seed {r['seed']}")
            if quality:
                axs[1, c].plot(r["eval_steps"], r["mmd"], marker="o", ms=2, lw=0.8, color=f"C{i}")
        axs[0, c].set_title(f"{arm}: {what.get(key, key)}", fontsize=9)
        axs[0, c].set_yscale("log")
        if quality:
            axs[1, c].set_title(f"{arm}: sample quality", fontsize=9)
        axs[-1, c].set_xlabel("training step")
        for ax in axs[:, c]:
            ax.grid(alpha=0.3)
    axs[0, 0].set_ylabel(f"{key} (log)")
    if quality:
        axs[1, 0].set_ylabel("MMD² x1e3 to the teacher")
    handles, labels = axs[0, 0].get_legend_handles_labels()  # one legend, off the curves
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=7,
               frameon=False)
    return fig


def findings(per_seed: dict, base: str, refl: str, teacher_outside: float, guidance: float
             ) -> tuple[str, dict]:
    """What notebook 04's DMD2 runs show, as a Markdown template and the values that fill it
    (for ``notebook.fill``): the final MMD of arm ``refl`` against ``base`` (means over seeds,
    the change in standard errors, read as in ``notebook.verdict``), the share of each arm's
    samples on the edge of the box, and ``teacher_outside``, the share of the teacher's own
    samples outside it."""
    import math

    def stats(arm, key):
        v = [r[key] for r in per_seed[arm]]
        mu = sum(v) / len(v)
        var = sum((x - mu) ** 2 for x in v) / (len(v) - 1) if len(v) > 1 else float("nan")
        return mu, var / len(v)
    (mb, vb), (mr, vr) = stats(base, "final_mmd"), stats(refl, "final_mmd")
    se = math.sqrt(vb + vr)
    z = abs(mr - mb) / se if se > 0 else float("nan")
    word = "worse" if mr > mb else "better"
    if math.isnan(z):
        how = "one seed only, so no error bar"
    elif z <= 1:
        how = "within one standard error: no difference"
    else:
        how = ("{z:.1f} standard errors: " + ("clear" if z > 2 else "suggestive, not clear"))
    values = {"w": guidance, "base_mmd": mb, "refl_mmd": mr, "z": z,
              "base_edge": 100 * stats(base, "on_edge")[0],
              "refl_edge": 100 * stats(refl, "on_edge")[0],
              "teacher_out": 100 * teacher_outside}
    text = (f"**What this run found** (means over seeds): at guidance w = {{w:g}}, the `{refl}` "
            f"arm's final MMD² x1e3 is {{refl_mmd:.0f}} against `{base}`'s {{base_mmd:.0f}}: "
            f"{word}, {how}. {{refl_edge:.0f}}% of the `{refl}` student's samples have a "
            f"coordinate on the edge of the box (`{base}`: {{base_edge:.0f}}%), while "
            f"{{teacher_out:.1f}}% of the teacher's own samples lie outside it.")
    return text, values
