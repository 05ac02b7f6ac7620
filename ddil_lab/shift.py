"""The shift diagnostic: how far the states forward-only training sees are from the states the
(guided) teacher's sampler visits, measured *before* any student is trained (DDIL, Sec. 3).

Forward-only distillation trains the student on x_t ~ q_t(x | c), the forward diffusion of
data. At inference the student starts where the teacher's sampler starts and, if it imitates
the teacher, walks where the teacher walks. Under classifier-free guidance (w > 1) the guided
teacher leaves q_t(x | c): its states are more concentrated, pulled towards its class's modes.
Where they differ, a forward-only student is trained on states it never meets and meets states
it was never trained on, which is the gap DDIL's rollouts close. At each student timestep t
(the n-step grid; ``n_steps``)

    d_t     = SW1(teacher states at t, forward states at t)        (class by class, if labelled)
    floor_t = SW1(a second forward draw at t, forward states at t)  (the sampling noise of d_t)
    shift_t = (d_t - floor_t) / scale_t

with SW1 the sliced 1-Wasserstein distance (random projections: any dimension) and scale_t the
RMS per-coordinate standard deviation of the forward states (a dimensionless number: "what
fraction of the marginal's spread the teacher's states sit away from it"). The summary is the
mean of shift_t over the grid. An unguided exact teacher follows q_t, so its shift is about 0
(up to DDIM's discretisation); a guided one is clearly above 0. The same is measured for a
given (trained) student's own states, if one is passed. ``features`` maps states to a feature
space first (e.g. a fixed encoder), where one fits better than raw coordinates.

Works on any ``Backend`` (toy, image, SD): it only calls ``sample_data`` / ``sample_noise`` /
``schedule.q_sample`` and the teacher. A data-free backend (prompts only) has no q_t to draw
from; there the unguided conditional teacher's rollouts (``backend.cond_teacher``) stand in for
q_t(x | c), which is exact only as far as the teacher matches its data (the report says so).

    from ddil_lab.shift import shift_diagnostic
    report = shift_diagnostic(backend, n=2000)     # e.g. Toy2dBackend("ring8_cond", guidance=6)
    print(report.table()); report.summary
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from .diffusion import Schedule, timesteps
from .metrics import sliced_wasserstein
from .sampling import DDIMPolicy, sample, take_cond
from .validation import check_bool, check_callable, check_int, fail

MIN_PER_CLASS = 20  # states per class below which per-class distances are mostly noise


@dataclass
class ShiftReport:
    """Per student timestep (``grid``): ``teacher[i]`` = shift_t of the teacher's states,
    ``student[i]`` of the student's (or None), the raw distances ``d_teacher``, ``d_student``,
    ``floor`` and ``scale``; ``summary`` / ``student_summary`` are the means over the grid;
    ``reference`` says what stood in for q_t(x | c)."""
    grid: list[int]
    teacher: list[float]
    d_teacher: list[float]
    floor: list[float]
    scale: list[float]
    summary: float
    reference: str = "forward diffusion of data, q_t(x | c)"
    student: list[float] | None = None
    d_student: list[float] | None = None
    student_summary: float | None = None
    n: int = 0
    per_class: bool = False
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    def table(self) -> str:
        """A Markdown table: one row per student timestep, then the summary."""
        head = ["t", "teacher shift", "SW teacher-fwd", "SW floor", "scale"]
        if self.student is not None:
            head[2:2] = ["student shift"]
            head.insert(4, "SW student-fwd")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, t in enumerate(self.grid):
            cells = [str(t), f"{self.teacher[i]:+.3f}"]
            if self.student is not None:
                cells.append(f"{self.student[i]:+.3f}")
            cells.append(f"{self.d_teacher[i]:.4f}")
            if self.student is not None:
                cells.append(f"{self.d_student[i]:.4f}")
            cells += [f"{self.floor[i]:.4f}", f"{self.scale[i]:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        s = (f"summary (mean over t): teacher {self.summary:+.3f}"
             + (f", student {self.student_summary:+.3f}" if self.student_summary is not None
                else ""))
        return ("\n".join(lines) + f"\n\n{s}  (n = {self.n} states per set"
                + (", class by class" if self.per_class else "") + f"; reference: "
                f"{self.reference}; {self.seconds:.1f} s)\n"
                + "".join(f"\nnote: {x}" for x in self.notes))


def _is_labels(cond) -> bool:
    return torch.is_tensor(cond) and cond.ndim == 1 and not cond.dtype.is_floating_point


def _distance(a, b, ca, cb, per_class: bool, n_proj: int, seed: int) -> float:
    a, b = a.detach().double().cpu().flatten(1), b.detach().double().cpu().flatten(1)
    if not per_class:
        return sliced_wasserstein(a, b, n_proj=n_proj, seed=seed)
    vals = [sliced_wasserstein(a[ca == c], b[cb == c], n_proj=n_proj, seed=seed)
            for c in torch.unique(ca) if (ca == c).sum() >= 2 and (cb == c).sum() >= 2]
    return sum(vals) / len(vals)


@torch.no_grad()
def shift_diagnostic(backend, n: int = 2000, n_steps: int = 4, fine_steps: int | None = 32,
                     student=None, features=None, per_class: bool | None = None,
                     n_proj: int = 64, seed: int = 0, batch: int | None = None) -> ShiftReport:
    """Measure the shift between forward states and the teacher's (and a student's) states at
    each of the ``n_steps`` student timesteps; see the module docstring.

    :param n: states per set (forward, second forward, teacher, student).
    :param fine_steps: the teacher walks this many-step grid (its own sampler, e.g. the 32
        steps a PD teacher uses); None: plain ``n_steps``-step DDIM.
    :param student: anything with ``.sample(x_T, cond) -> Trajectory`` on the same grid (a
        Method after ``distill``, a ``MemberView``), or an x0 denoiser (sampled with DDIM).
    :param features: optional map of states (B, ...) to features (B, D) before the distances.
    :param per_class: compare class by class (default: when the conditioning is integer class
        labels with at least 20 states per class).
    :param batch: roll the teacher out this many states at a time (memory; SD), default all.
    """
    _check(backend, n, n_steps, fine_steps, student, features, per_class, n_proj, seed, batch)
    with torch.random.fork_rng(devices=[]):  # the caller's global stream stays as it was
        return _diagnose(backend, n, n_steps, fine_steps, student, features, per_class, n_proj,
                         seed, batch, time.perf_counter())


def _check(backend, n, n_steps, fine_steps, student, features, per_class, n_proj, seed, batch):
    """Every argument, before any state is drawn (``ConfigError`` naming it)."""
    need = ("schedule", "teacher", "sample_noise", "has_data")
    if isinstance(backend, (str, bytes)) or not all(hasattr(backend, k) for k in need):
        fail("backend", backend if isinstance(backend, (str, bytes)) else
             f"<{type(backend).__name__}>", "a Backend object (e.g. Toy2dBackend(...), "
             "ImageBackend(...)), not its name", "it has no " + ", ".join(
                 k for k in need if not hasattr(backend, k)))
    if not isinstance(backend.schedule, Schedule):
        fail("backend.schedule", f"<{type(backend.schedule).__name__}>", "a ddil_lab.Schedule")
    T = backend.schedule.T
    check_int("n", n, 8, why="states per set")
    check_int("n_steps", n_steps, 1, T)
    check_int("fine_steps", fine_steps, n_steps, none=True)
    check_int("n_proj", n_proj, 1, why="random projections of the sliced distance")
    check_int("seed", seed, 0)
    check_int("batch", batch, 1, none=True)
    check_bool("per_class", per_class, none=True)
    check_callable("features", features, "None or a function states (B, ...) -> features (B, D)",
                   none=True)
    if student is not None and not (hasattr(student, "sample") or callable(student)):
        fail("student", f"<{type(student).__name__}>", "None, something with .sample(x_T, cond) "
             "(a Method after distill) or an x0 denoiser")


def _per_class_counts(cond) -> dict:
    return {int(c): int(k) for c, k in zip(*torch.unique(cond.cpu(), return_counts=True))}


def _diagnose(backend, n, n_steps, fine_steps, student, features, per_class, n_proj, seed,
              batch, t0) -> ShiftReport:
    S = backend.schedule
    grid = timesteps(n_steps, S.T).tolist()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # backends that draw from the global stream (SD data order)
    feat = features or (lambda x: x)
    batch = batch or n

    def rollout(den, x_T, cond):
        policy = DDIMPolicy(den, S, fine_steps=fine_steps if fine_steps and fine_steps >
                            n_steps else None)
        parts = [sample(policy, x_T[i:i + batch], grid, take_cond(cond, slice(i, i + batch))
                        if cond is not None else None, schedule=S).xs
                 for i in range(0, len(x_T), batch)]
        return [torch.cat([p[k] for p in parts]) for k in range(len(grid))]

    notes = []
    if backend.has_data:
        x0, cond = backend.sample_data(2 * n, g)
        x0a, x0b = x0[:n], x0[n:]
        cond_a = take_cond(cond, slice(0, n)) if cond is not None else None
        cond_b = take_cond(cond, slice(n, 2 * n)) if cond is not None else None
        fwd_a, fwd_b = [], []
        for t in grid:
            tt = torch.full((n,), t, dtype=torch.long, device=x0.device)
            fwd_a.append(S.q_sample(x0a, tt, torch.randn(x0a.shape, generator=g).to(x0a)))
            fwd_b.append(S.q_sample(x0b, tt, torch.randn(x0b.shape, generator=g).to(x0b)))
        reference = "forward diffusion of data, q_t(x | c)"
    else:
        base = getattr(backend, "cond_teacher", None)
        if base is None:
            fail("backend", f"<{type(backend).__name__}>", "a backend with data, or a data-free "
                 "one with an unguided teacher (backend.cond_teacher) to stand in for q_t(x | c)")
        cond_a = backend.sample_cond(n, g)
        cond_b = cond_a
        fwd_a = rollout(base, backend.sample_noise(n, g), cond_a)
        fwd_b = rollout(base, backend.sample_noise(n, g), cond_a)
        reference = "the unguided teacher's rollouts (data-free backend: no q_t to draw from)"
        notes.append("without data the unguided teacher stands in for q_t(x | c); the shift "
                     "then measures what guidance adds, not what the teacher's own error adds")
    if per_class is None:
        per_class = _is_labels(cond_a) and bool(
            torch.bincount(cond_a.clamp_min(0).cpu()).min() >= MIN_PER_CLASS)
    elif per_class:
        if not _is_labels(cond_a):
            fail("per_class", per_class, "False or None with this backend",
                 "its conditioning is not integer class labels (an unconditional backend, or "
                 "prompts), so there are no classes to compare")
        counts = _per_class_counts(cond_a)
        if max(counts.values()) < 2:
            fail("per_class", per_class, f"False, or a larger n (at least {MIN_PER_CLASS} states "
                 "per class)", f"with n={n} no class has 2 states ({counts}), so no per-class "
                 "distance can be computed")
        if min(counts.values()) < MIN_PER_CLASS:
            msg = (f"per_class=True with n={n}: some classes have fewer than {MIN_PER_CLASS} "
                   f"states ({counts}); per-class distances from so few states are mostly "
                   "sampling noise (classes with < 2 states are left out): use a larger n")
            warnings.warn(msg, stacklevel=4)  # the caller's line
            notes.append(msg)
    la, lb = (cond_a, cond_b) if per_class else (None, None)

    def feat_checked(x):
        f = features(x)
        if not (torch.is_tensor(f) and f.ndim >= 2 and len(f) == len(x) and f[0].numel() > 0):
            fail("features", getattr(features, "__name__", f"<{type(features).__name__}>"),
                 "a function mapping states (B, ...) to features (B, D) with D >= 1",
                 f"it returned {_describe(f)} for states of shape {tuple(x.shape)}")
        if not torch.isfinite(f).all():
            fail("features", getattr(features, "__name__", f"<{type(features).__name__}>"),
                 "a function returning finite features", "it returned NaN or inf")
        return f

    if features is not None:
        feat = feat_checked
        feat(fwd_a[0])  # a bad features function fails before the teacher's rollouts
    teach = rollout(backend.teacher, backend.sample_noise(n, g), cond_a)
    stud = None
    if student is not None:
        x_T = backend.sample_noise(n, g)
        if hasattr(student, "sample"):
            traj = student.sample(x_T, cond_a)
            if [int(t) for t in traj.grid] != grid:
                raise ValueError(f"the student's grid {traj.grid} differs from the {n_steps}-step "
                                 f"grid {grid}")
            stud = traj.xs[:len(grid)]
        else:
            stud = sample(DDIMPolicy(student, S), x_T, grid, cond_a, schedule=S).xs[:len(grid)]

    d_t, d_s, floor, scale = [], [], [], []
    for i in range(len(grid)):
        fa, fb = feat(fwd_a[i]), feat(fwd_b[i])
        floor.append(_distance(fb, fa, lb, la, per_class, n_proj, seed))
        scale.append(float(fa.detach().double().flatten(1).var(0).mean().sqrt()))
        d_t.append(_distance(feat(teach[i]), fa, la, la, per_class, n_proj, seed))
        if stud is not None:
            d_s.append(_distance(feat(stud[i]), fa, la, la, per_class, n_proj, seed))
    sh = [(d - f) / max(s, 1e-12) for d, f, s in zip(d_t, floor, scale)]
    rep = ShiftReport(grid, sh, d_t, floor, scale, sum(sh) / len(sh), reference, n=n,
                      per_class=per_class, notes=notes)
    if stud is not None:
        rep.student = [(d - f) / max(s, 1e-12) for d, f, s in zip(d_s, floor, scale)]
        rep.d_student = d_s
        rep.student_summary = sum(rep.student) / len(rep.student)
    rep.seconds = time.perf_counter() - t0
    if not all(math.isfinite(v) for v in sh):
        rep.notes.append("non-finite distances: check the teacher's outputs")
    return rep


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


__all__ = ["ShiftReport", "shift_diagnostic"]
