"""What the teaching notebooks share: the (guided) teacher's trajectory and the forward states
q_t at the same timesteps, students trained by arm name (the toy table's ``train_arm``: the seeds
of an arm as one batched ensemble, so the notebooks and the table agree on every arm), the
states an arm trains on, and the figure helpers every lesson draws with.

Paper terms used throughout the lessons:
    q_t(x | c)       forward marginal at timestep t: what forward-only training draws x_t from
    trajectory       the states x_t a policy visits on the student grid, e.g. {999, 749, 500, 250}
    covariate shift  the states a student meets at inference leave the states it trained on
    reachable modes  the modes the teacher reaches when it continues a state x_t to t = -1;
                     their histogram per step shows where diversity is lost (Sec. 3.3)
    sources          forward / teacher / student / mixed (``rollout.SOURCES``), DDIL's priors
    reflected        x0 estimates clamped to the data support [-1, 1]^d (Sec. 4.1)

Every figure function returns a ``matplotlib.figure.Figure`` made without pyplot, so a notebook
cell shows it exactly once and nothing accumulates in pyplot's registry. Source colours follow
the paper's Figure 2: forward (data) blue, teacher green, student red, mixed orange.
"""

from __future__ import annotations

import copy
import math

import torch
from matplotlib.figure import Figure
from torch import nn

from ...denoiser import CFG
from ...diffusion import NO_THRESHOLD, Threshold, timesteps
from ...metrics import state_distance
from ...rollout import States, StateSampler
from ...sampling import DDIMPolicy, Trajectory, sample
from ...train.arms import EnsembleBackend, MemberView, train_arm
from ..plots import density2d, scatter2d


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


# Arms by name: the toy table's (``ddil_lab.train.ARMS``) and one more, "backward": the
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
                   progress: bool = True, **distill_kw) -> dict[str, list[MemberView]]:
    """Train several arms of one method, the seeds of each as one ensemble (the toy table's
    ``train_arm``): ``arm name -> [one MemberView per seed]``. Arms are names in
    ``ARM_RECIPES``, or a dict ``label -> (toy table arm, sampler_kw)``. ``progress``: one
    progress bar per arm (a widget in Jupyter, through ``tqdm.auto``), labelled with the
    method, the arm's name and the seeds (``bar_label``)."""
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
                               progress=progress, desc=bar_label(method, label, seeds),
                               **distill_kw)
    return out


def bar_label(method: str, arm: str, seeds) -> str:
    """A progress bar's label: the method, the arm as the notebook names it and the seeds,
    e.g. ``dmd2 backward, seeds 0,1`` (one bar per arm, so labels within a cell differ)."""
    seeds = list(seeds)
    return f"{method} {arm}, seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"


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


def arm_parts(run):
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
    method, base, view, student = arm_parts(run)
    pri = dict(priors if priors is not None else
               (base.priors_at(step) if step is not None else base.priors))
    sampler = StateSampler(**pri, p_student=base.p_student if p_student is None else p_student)
    spec = copy.copy(method.spec())
    spec.forward_t, spec.grids = method.grid, [method.grid]
    st = sampler.sample(view, spec, student, n * len(method.grid))
    return States(st.x_t, st.t, labels_of(st.cond), st.source)


def labels_of(cond):
    """The class labels of a conditioning (the ensemble's ``{"m", "c"}`` or plain)."""
    return cond["c"] if isinstance(cond, dict) and "c" in cond else cond


def states_at(states: States, t: int) -> States:
    """The states of a batch at one timestep."""
    return states.take((states.t == int(t)).nonzero().squeeze(1))


SOURCE_COLORS = {"forward": "C0", "teacher": "C2", "student": "C3", "mixed": "C1"}


PRIOR_SHORT = {"beta_frwd": "frwd", "beta_teacher_bckwrd": "tch", "beta_student_bckwrd": "stu",
          "beta_mixed": "mix"}


def plot_limit(schedule, t: int) -> float:
    """A view that holds q_t: the data scaled by alpha(t) plus 2.5 sigma(t) of noise."""
    if t < 0:
        return 1.2
    return max(1.2, 0.9 * float(schedule.alpha(t)) + 2.5 * float(schedule.sigma(t)))


def shade_density(ax, backend, t: int, lim: float, label=None, cache: dict | None = None):
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


def pick(x, cond, label, n):
    """The states of class ``label`` (all when label or cond is None), at most n of them."""
    if label is not None and cond is not None:
        x = x[torch.as_tensor(cond) == label]
    return x[:n]


def label_title(backend, label, guidance=None) -> str:
    if label is None or not backend.conditional:
        return "q_t(x)"
    w = backend.guidance if guidance is None else guidance
    return f"q_t(x | c={label}), guidance w={w:g}"


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


def step_labels(grid):
    return [f"t={t}" for t in grid] + ["sample"]
