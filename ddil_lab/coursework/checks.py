"""The exercises' checks. Each takes the student's function (and what it needs), compares it with
the library (the oracle) and returns ``Result(passed, points, hint)``; it never raises at the
student. A wrong answer that matches a known mistake (an off-by-one timestep, eps taken from
the unclamped x0, coin flips not drawn from the generator, ...) gets that mistake's hint.

Oracles: ``Schedule.ddim_step`` / ``timesteps`` / ``threshold`` (ex1, ex6), ``PD.target``
(ex2), ``toy.covariate_shift`` (ex3), ``StateSampler.backward`` with the same generator (ex4),
``toy.paired_deltas`` (ex5, in ``study``).
"""
from __future__ import annotations

import math
import traceback

import torch

from ..diffusion import Schedule, threshold, timesteps
from ..methods import PD
from ..rollout import StateSampler, StateSpec
from ..sampling import DDIMPolicy
from ..toy import covariate_shift
from .exercises import points_of
from .record import Result


def passed(exercise: str, name: str) -> Result:
    return Result(True, points_of(exercise, name), "")


def failed(hint: str) -> Result:
    return Result(False, 0, hint)


def call(fn, *args, what: str = "your function"):
    """``(value, None)``, or ``(None, hint)`` when the student's code raised."""
    name = getattr(fn, "__name__", what)
    try:
        return fn(*args), None
    except NotImplementedError:
        return None, f"`{name}` is not implemented yet: replace its TODO with your code."
    except Exception as e:  # the student's bug, told in one line with where it happened
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if "ddil_lab" not in f.filename and "site-packages" not in f.filename]
        where = f" (line {frames[-1].lineno} of its cell: `{frames[-1].line}`)" if frames else ""
        return None, f"`{name}` raised {type(e).__name__}: {e}{where}."


def as_tensor(x):
    try:
        return torch.as_tensor(x)
    except Exception:
        return None


def close(a, b, atol=1e-5, rtol=1e-5) -> bool:
    a = as_tensor(a)
    return a is not None and a.shape == b.shape and torch.allclose(a.double(), b.double(),
                                                                    atol=atol, rtol=rtol)


def first_match(got, variants: dict, **tol) -> str | None:
    """The hint of the first variant (hint -> tensor) that ``got`` equals, else None."""
    for hint, v in variants.items():
        if v is not None and close(got, v, **tol):
            return hint
    return None


# ---------------------------------------------------------------- ex1: DDIM and the grid

def check_timesteps(fn) -> Result:
    """``fn(n, T=1000)`` must equal ``timesteps(n)``: descending, 4 -> 999, 749, 500, 250."""
    for n in (4, 1, 2, 3, 8, 10, 16, 32, 7):
        got, err = call(fn, n, 1000)
        if err:
            return failed(err)
        want = timesteps(n)
        g = as_tensor(got)
        if g is not None and g.shape == want.shape and torch.equal(g.long(), want):
            continue
        lin = lambda m, top: torch.linspace(0, top, m, dtype=torch.float64)
        variants = {
            "ascending: the grid runs from the noisiest timestep (999) down; flip it.":
                want.flip(0),
            "truncated instead of rounded: use .round() before .long() (4 steps: 500 and 250, "
            "not 499 and 249).": lin(n + 1, 999).long().flip(0)[:-1],
            "n + 1 points: drop the last one (0); the step after the last grid point goes to "
            "t = -1, the clean end.": lin(n + 1, 999).round().long().flip(0),
            "off by one: timesteps are 0 .. T-1, so the noisiest is T-1 = 999, not T = 1000.":
                lin(n + 1, 1000).round().long().flip(0)[:-1],
            "linspace with n points instead of n + 1 before dropping the last: 4 steps are "
            "999, 749, 500, 250, not 999, 666, 333, 0.": lin(n, 999).round().long().flip(0),
            "that is DDIM's 'leading' spacing (multiples of T // n); the paper uses "
            "linspace spacing: round(linspace(0, T-1, n+1)).":
                (torch.arange(n) * (1000 // n)).flip(0),
        }
        hint = first_match(g, {k: v.double() for k, v in variants.items()}, atol=0.5, rtol=0) \
            if g is not None else None
        shown = g.tolist() if g is not None else repr(got)
        return failed(f"n={n}: " + (hint or f"expected {want.tolist()}, got {shown}."))
    return passed("ex1_ddim", "timesteps")


def _ddim_variants(S: Schedule, x_t, x0, t: int, s: int, lo: float, hi: float) -> dict:
    c = x0.clamp(lo, hi)
    a, sg = lambda u: float(S.alpha(u)), lambda u: float(S.sigma(u))
    eps_raw, eps_c = (x_t - a(t) * x0) / sg(t), (x_t - a(t) * c) / sg(t)
    out = {
        "eps is taken from the unclamped x0: derive eps from the *clamped* x0, so that "
        "clamping also fixes the direction to the next state.": a(s) * c + sg(s) * eps_raw,
        "x0 is not clamped: threshold x0_hat to [lo, hi] first.": S.ddim_step(x_t, x0, t, s),
        "the x0 term uses the unclamped x0: use the clamped x0 in both terms.":
            a(s) * x0 + sg(s) * eps_c,
        "alpha and sigma are swapped: x_s = alpha(s) x0 + sigma(s) eps.":
            sg(s) * c + a(s) * eps_c,
        "alpha_bar used where alpha = sqrt(alpha_bar) belongs (and sigma = sqrt(1 - "
        "alpha_bar)).": (a(s) ** 2) * c + (1 - a(s) ** 2) * (x_t - a(t) ** 2 * c)
        / (1 - a(t) ** 2),
    }
    for dt, ds in ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, 1)):
        tt, ss = t + dt, s + ds
        if -1 <= ss < tt <= S.T - 1 and (dt or ds):
            which = "t" if dt and not ds else "s" if ds and not dt else "t and s"
            out[f"off by one: alpha/sigma are read at {which} shifted by one; index the "
                f"schedule at exactly t and s (S.alpha(t), S.sigma(s), ...)."] = \
                S.ddim_step(x_t, c, tt, ss)
    return out


def check_ddim_step(fn, lo: float = -1.0, hi: float = 1.0) -> Result:
    """``fn(S, x_t, x0_hat, t, s, lo, hi)``: the reflected DDIM step; oracle
    ``S.ddim_step(x_t, threshold(x0_hat, "static"), t, s)`` on random tensors."""
    S = Schedule()
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(64, 2, generator=g) * 1.2
    x0 = torch.randn(64, 2, generator=g) * 1.5  # many estimates outside the box
    pairs = [(999, 749), (749, 500), (500, 250), (250, -1), (37, 5)]
    for t, s in pairs:
        want = S.ddim_step(x_t, threshold(x0, "static", lo=lo, hi=hi), t, s)
        got, err = call(fn, S, x_t.clone(), x0.clone(), t, s, lo, hi)
        if err:
            return failed(f"step {t} -> {s}: {err}")
        if close(got, want):
            continue
        g_t = as_tensor(got)
        if g_t is None or g_t.shape != want.shape:
            return failed(f"step {t} -> {s}: expected a tensor of shape {tuple(want.shape)}, "
                          f"got {type(got).__name__} {tuple(getattr(g_t, 'shape', ()))}.")
        hint = first_match(got, _ddim_variants(S, x_t, x0, t, s, lo, hi))
        if hint is None and s == -1:
            hint = ("wrong only at s = -1, the clean end: there alpha = 1 and sigma = 0 "
                    "(S.alpha(-1), S.sigma(-1)); a table without that entry wraps around.")
        return failed(f"step {t} -> {s}: " + (hint or "differs from the library's DDIM step "
                      f"(max error {float((g_t.double() - want.double()).abs().max()):.3g})."))
    return passed("ex1_ddim", "ddim_step")


# ---------------------------------------------------------------- ex2: the PD target

def pd_setup(backend, n_steps: int = 4, substeps: int = 2) -> PD:
    """The library's PD on ``backend`` (the oracle of ex2)."""
    pd = PD(n_steps=n_steps, substeps=substeps)
    pd.setup(backend)
    return pd


def pd_states(backend, t: int, n: int = 256, seed: int = 0):
    """Forward states x_t of the backend's data at timestep t, and their conditioning."""
    g = torch.Generator().manual_seed(seed + t)
    x0, cond = backend.sample_data(n, g)
    x_t = backend.schedule.q_sample(x0, torch.full((n,), t), torch.randn(x0.shape, generator=g))
    return x_t, cond


def _pd_cases(backend, substeps: int):
    pd = pd_setup(backend, substeps=substeps)
    S, grid = backend.schedule, pd.grid.tolist()
    fine = timesteps(pd.n_steps * substeps).tolist() + [-1]
    for i, t in enumerate(grid):
        s = grid[i + 1] if i + 1 < len(grid) else -1
        points = [u for u in fine if s <= u <= t]
        x_t, cond = pd_states(backend, t)
        x0_tgt, x_s = pd.target(x_t, t, cond)
        yield pd, S, t, s, points, x_t, cond, x0_tgt, x_s


def _pd_call(fn, backend, S, x_t, points, cond):
    out, err = call(fn, backend.teacher, S, x_t.clone(), list(points), cond)
    if err:
        return None, None, err
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        return None, None, "return the pair (x0_tgt, x_s)."
    return as_tensor(out[0]), as_tensor(out[1]), None


def check_pd_teacher(fn, backend, substeps: int = 2) -> Result:
    """The x_s of ``fn(teacher, S, x_t, points, cond) -> (x0_tgt, x_s)``: where the teacher's
    ``substeps`` DDIM steps through ``points`` land (oracle: ``PD.target``)."""
    for pd, S, t, s, points, x_t, cond, _, want in _pd_cases(backend, substeps):
        _, x_s, err = _pd_call(fn, backend, S, x_t, points, cond)
        if err:
            return failed(f"step {t} -> {s}: {err}")
        if close(x_s, want, atol=1e-4, rtol=1e-4):
            continue
        one = DDIMPolicy(backend.teacher, S).step(x_t, t, s, cond)[0]
        first = S.ddim_step(x_t, backend.teacher(x_t, torch.full((len(x_t),), t), cond),
                            points[0], points[1])
        hint = first_match(x_s, {
            "the teacher took one step t -> s: PD's teacher takes `len(points) - 1` DDIM "
            "steps, through every point of `points`.": one,
            "x_s is the state after the teacher's first substep only: keep stepping until s.":
                first,
            "x_s is the start state x_t: step the teacher from t down to s.": x_t}, atol=1e-4,
            rtol=1e-4)
        return failed(f"step {t} -> {s} (points {points}): " + (hint or
                      "x_s differs from the teacher's DDIM steps through `points`."))
    return passed("ex2_pd_target", "pd_teacher")


def check_pd_target(fn, backend, substeps: int = 2) -> Result:
    """The x0_tgt of ``fn``: one student DDIM step t -> s from x_t with it lands on the
    teacher's x_s (the k-teacher-step identity), equal to ``PD.target``."""
    for pd, S, t, s, points, x_t, cond, want, x_s in _pd_cases(backend, substeps):
        x0, x_s_got, err = _pd_call(fn, backend, S, x_t, points, cond)
        if err:
            return failed(f"step {t} -> {s}: {err}")
        if close(x0, want, atol=1e-4, rtol=1e-3):
            lands = S.ddim_step(x_t, want, t, s)
            if torch.allclose(lands, x_s, atol=1e-4):
                continue
        if x0 is None or x0.shape != want.shape:
            return failed(f"step {t} -> {s}: x0_tgt should have shape {tuple(want.shape)}.")
        a_s, a_t = float(S.alpha(s)), float(S.alpha(t))
        r = float(S.sigma(s)) / float(S.sigma(t))
        variants = {
            "x0_tgt is the teacher's own x0 estimate at t: PD's target is the x0 that makes ONE "
            "student DDIM step land where the teacher's steps land; solve "
            "x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t for x0.":
                backend.teacher(x_t, torch.full((len(x_t),), t), cond),
            "the denominator misses a term: x0_tgt = (x_s - r x_t) / (alpha_s - r alpha_t), "
            "r = sigma_s / sigma_t.": (x_s - r * x_t) / a_s,
            "the ratio is inverted: r = sigma_s / sigma_t, not sigma_t / sigma_s.":
                (x_s - x_t / r) / (a_s - a_t / r) if r else None,
            "x0_tgt is the teacher's landing state x_s itself (true only at s = -1).": x_s,
        }
        hint = None
        if x_s_got is not None and x_s_got.shape == x_s.shape:
            own = S.ddim_step(x_t, x0, t, s)
            if torch.allclose(own, x_s_got.to(own.dtype), atol=1e-4) and \
                    not torch.allclose(x_s_got.double(), x_s.double(), atol=1e-4):
                hint = ("your x0_tgt is consistent with your x_s, but x_s is not where the "
                        "teacher lands: fix the teacher's steps first (check pd_teacher).")
        hint = hint or first_match(x0, variants, atol=1e-4, rtol=1e-3)
        return failed(f"step {t} -> {s}: " + (hint or "one student DDIM step with your "
                      "x0_tgt does not land on the teacher's x_s."))
    return passed("ex2_pd_target", "pd_target")


# ---------------------------------------------------------------- ex3: covariate shift

SHIFT_TOL = 0.05  # nats: the Monte Carlo error of the entropy term is ~0.01 at n_ref = 20000


def check_shift(fn, traj, gmm, S, label) -> Result:
    """``fn(x_t, t, gmm, S, label)`` at every state of a student's trajectory, against
    ``covariate_shift`` within ``SHIFT_TOL`` nats (+ 5% of its size)."""
    for x, t in zip(traj.xs, traj.grid):
        want = covariate_shift(x, t, gmm, S, label=label)
        got, err = call(fn, x, t, gmm, S, label)
        if err:
            return failed(f"t={t}: {err}")
        try:
            got = float(got)
        except (TypeError, ValueError):
            return failed(f"t={t}: return one number (a float), got {type(got).__name__}.")
        if math.isfinite(got) and abs(got - want) <= SHIFT_TOL + 0.05 * abs(want):
            continue
        tv = torch.full((len(x),), int(t))
        cross = float(-gmm.log_prob(x, tv, S, label).mean())
        variants = {
            "the sign is flipped: shift = E_states[-log q_t] - E_{q_t}[-log q_t] (positive "
            "where states sit where training data at t is rare).": -want,
            "only the cross-entropy E_states[-log q_t(x|c)]: subtract the same average over "
            "forward samples of q_t (the entropy), so that no shift reads 0.": cross,
            "measured against the data density q_0: pass t to gmm.log_prob(x, t, S, label) "
            "and draw the reference states at t.":
                covariate_shift_at_zero(x, gmm, label),
            "the class labels are ignored: compare with q_t(x | c), the density of each "
            "state's own class.": covariate_shift(x, t, gmm, S, label=None),
        }
        hint = next((h for h, v in variants.items()
                     if abs(got - v) <= SHIFT_TOL + 0.05 * abs(v)), None)
        return failed(f"t={t}: " + (hint or f"expected {want:.3f} nats (within "
                                            f"{SHIFT_TOL}), got {got:.3f}."))
    return passed("ex3_shift", "shift")


def covariate_shift_at_zero(x, gmm, label, n_ref: int = 20000) -> float:
    """The mistake of measuring states against the data density q_0 (no diffusion)."""
    g = torch.Generator().manual_seed(0)
    ref_label = None if label is None else \
        torch.as_tensor(label)[torch.randint(0, len(x), (n_ref,), generator=g)]
    ref = gmm.sample(n_ref, g, label=ref_label)[0]
    return float(-gmm.log_prob(x, label=label).mean() + gmm.log_prob(ref, label=ref_label).mean())


def check_largest_shift_step(answer, traj, gmm, S, label) -> Result:
    """``answer``: the grid timestep where the trajectory's |shift| is largest."""
    if answer is None:
        return failed("`largest_shift_step` is not answered yet: set it to a timestep of the "
                      "grid.")
    shifts = {t: abs(covariate_shift(x, t, gmm, S, label=label))
              for x, t in zip(traj.xs, traj.grid)}
    best = max(shifts, key=shifts.get)
    if answer == best:
        return passed("ex3_shift", "largest_shift_step")
    if answer not in shifts:
        return failed(f"{answer!r} is not a timestep of the grid {list(shifts)}.")
    return failed(f"at t={answer} |shift| is {shifts[answer]:.3f} nats; another step's is "
                  f"larger (compare the absolute values: the shift is signed).")


# ---------------------------------------------------------------- ex4: a mixed rollout

class _Fixed:
    """A backend stand-in that hands the StateSampler the given noise and conditioning."""

    def __init__(self, schedule, x_T, cond):
        self.schedule, self.x_T, self.cond = schedule, x_T, cond

    def sample_noise(self, m, generator=None):
        return self.x_T

    def sample_cond(self, m, generator=None):
        return self.cond


def library_mixed_rollout(teacher, student, S, x_T, cond, grid, p_student: float, seed: int):
    """The oracle of ex4: the states of ``StateSampler.backward(..., "mixed", plan=generator)``
    at the grid points, grid-major (its final shuffle undone). Its plan generator first picks
    the rollout grid (one draw), then one coin per sample and step."""
    grid = torch.as_tensor(grid)
    spec = StateSpec(forward_t=grid, grids=[grid], teacher=teacher,
                     student_policy=lambda den: DDIMPolicy(den, S))
    sampler = StateSampler(beta_frwd=0.0, beta_mixed=1.0, p_student=p_student)
    n = len(x_T) * len(grid)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        states = sampler.backward(_Fixed(S, x_T, cond), spec, student, "mixed", n,
                                  plan=torch.Generator().manual_seed(seed))
        torch.manual_seed(0)
        perm = torch.randperm(n)  # the shuffle backward applied
    x = torch.empty_like(states.x_t)
    x[perm] = states.x_t
    return list(x.split(len(x_T)))


def student_generator(seed: int) -> torch.Generator:
    """The generator handed to the student's rollout: seeded as the sampler's plan and advanced
    past the sampler's one draw that picks the rollout grid, so both see the same coins."""
    g = torch.Generator().manual_seed(seed)
    torch.randint(0, 1, (), generator=g)
    return g


def _mixed_variant(teacher, student, S, x_T, cond, grid, p, g, kind: str):
    """Plausible wrong rollouts, for hints only (the oracle is the StateSampler)."""
    xs, x = [], x_T
    grid = [int(t) for t in grid]
    for i, t in enumerate(grid):
        xs.append(x)
        if i + 1 == len(grid):
            break
        s = grid[i + 1]
        u = torch.rand(() if kind == "one_coin" else (len(x),), generator=g)
        mask = (u > p) if kind == "inverted" else (u < p)
        mask = mask.expand(len(x)) if mask.ndim == 0 else mask
        tv = torch.full((len(x),), t)
        x0 = torch.where(mask[:, None], student(x, tv, cond), teacher(x, tv, cond))
        x = S.ddim_step(x, x0, t, s)
    if kind == "after":
        xs = xs[1:] + [S.ddim_step(x, teacher(x, torch.full((len(x),), grid[-1]), cond),
                                   grid[-1], -1)]
    return xs


def check_mixed_rollout(fn, teacher, student, S, x_T, cond, grid) -> Result:
    """``fn(teacher, student, S, x_T, cond, grid, p_student, generator) -> [x at grid[0],
    ..., x at grid[-1]]`` must equal the StateSampler's mixed rollout bitwise."""
    for p, seed in ((0.5, 0), (0.3, 1), (0.0, 2), (1.0, 3)):
        with torch.no_grad():
            want = library_mixed_rollout(teacher, student, S, x_T, cond, grid, p, seed)
            torch.manual_seed(100)
            got, err = call(fn, teacher, student, S, x_T.clone(), cond, list(grid), p,
                            student_generator(seed))
        where = f"p_student={p}"
        if err:
            return failed(f"{where}: {err}")
        if not isinstance(got, (list, tuple)) or len(got) != len(grid):
            return failed(f"{where}: return a list of {len(grid)} states, one per grid point "
                          f"(x_T first), got {type(got).__name__} of length "
                          f"{len(got) if hasattr(got, '__len__') else '?'}.")
        got = [as_tensor(x) for x in got]
        if all(a is not None and a.shape == b.shape and torch.equal(a, b)
               for a, b in zip(got, want)):
            continue
        if all(a is not None and a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
               for a, b in zip(got, want)):
            return failed(f"{where}: equal to 1e-5 but not bitwise: move each sample with "
                          f"`S.ddim_step` and call each model only on the rows it moves "
                          f"(x[idx]), as the library does.")
        with torch.no_grad():
            torch.manual_seed(101)
            again, _ = call(fn, teacher, student, S, x_T.clone(), cond, list(grid), p,
                            student_generator(seed))
        if again is not None and not all(torch.equal(as_tensor(a), b)
                                         for a, b in zip(again, got)):
            return failed(f"{where}: two runs with the same generator differ: draw the coin "
                          f"flips from `generator` (torch.rand(B, generator=generator)), not "
                          f"from torch's global stream.")
        if not torch.equal(got[0], x_T):
            return failed(f"{where}: the first state must be x_T itself: record each state "
                          f"*before* the step taken from it.")
        hints = {"inverted": "the coins are inverted: a sample is moved by the student when "
                             "u < p_student (probability p_student), else by the teacher.",
                 "one_coin": "one coin for the whole batch: draw one coin per sample, "
                             "torch.rand(B, generator=generator).",
                 "after": "the states are recorded after each step: record x_T and each "
                          "state before its step (the step after the last point is not "
                          "taken)."}
        for kind, hint in hints.items():
            with torch.no_grad():
                v = _mixed_variant(teacher, student, S, x_T, cond, grid, p,
                                   student_generator(seed), kind)
            if all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, v)):
                return failed(f"{where}: {hint}")
        bad = next(i for i, (a, b) in enumerate(zip(got, want))
                   if a is None or a.shape != b.shape or not torch.equal(a, b))
        return failed(f"{where}: the states first differ at grid[{bad}] = {grid[bad]}: one "
                      f"coin u = torch.rand(B, generator=generator) per step, student where "
                      f"u < p_student, each model's DDIM step on its own rows.")
    return passed("ex4_mixed_rollout", "mixed_rollout")


# ---------------------------------------------------------------- ex6: thresholding x0

def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, 2, generator=g) * 1.5, torch.randn(16, 1, 4, 4, generator=g) * 2,
            torch.rand(8, 3, generator=g) * 1.6 - 0.8]  # the last one inside the box


def check_static(fn) -> Result:
    """``fn(x0, lo, hi)``: the static clamp (``threshold(x0, "static")``)."""
    for x in _inputs():
        for lo, hi in ((-1.0, 1.0), (-0.5, 2.0)):
            got, err = call(fn, x.clone(), lo, hi)
            if err:
                return failed(err)
            if not close(got, threshold(x, "static", lo=lo, hi=hi), atol=1e-6):
                return failed(f"with lo={lo}, hi={hi}: every coordinate must be clamped to "
                              f"[lo, hi] (torch.clamp(x0, lo, hi)).")
    return passed("ex6_reflection", "static_threshold")


def _per_sample(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample (B,) or batch-wide () scale shaped to broadcast against x (B, ...)."""
    return s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s


def scaled_clamp(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """clamp(x, -s, s) / s, the last step of dynamic thresholding."""
    s = _per_sample(s, x)
    return torch.maximum(torch.minimum(x, s), -s) / s


def check_dynamic(fn, ratio: float = 0.9, max_value: float = 1.5) -> Result:
    """``fn(x0, ratio, max_value)``: Imagen's dynamic thresholding, per sample."""
    for x in _inputs():
        want = threshold(x, "dynamic", ratio=ratio, max_value=max_value)
        got, err = call(fn, x.clone(), ratio, max_value)
        if err:
            return failed(err)
        if close(got, want, atol=1e-5):
            continue
        flat = x.flatten(1).abs()
        per = torch.quantile(flat, ratio, dim=1)
        s_ok = per.clamp(1.0, max_value)
        variants = {
            "the quantile is taken over the whole batch: take it per sample, over all but the "
            "batch dimension.": scaled_clamp(x, torch.quantile(flat.flatten(), ratio)
                                      .clamp(1.0, max_value)),
            "x0 is clamped to [-s, s] but not divided by s: x0 -> clamp(x0, -s, s) / s.":
                scaled_clamp(x, s_ok) * _per_sample(s_ok, x),
            "s is not kept >= 1: clamp s to [1, max_value], so that estimates already inside "
            "[-1, 1] stay unchanged.": scaled_clamp(x, per.clamp(max=max_value)),
            "s is not capped at max_value: clamp s to [1, max_value].":
                scaled_clamp(x, per.clamp(min=1.0)),
            "the quantile is of x0, not of |x0|: use x0.abs().": scaled_clamp(
                x, torch.quantile(x.flatten(1), ratio, dim=1).clamp(1.0, max_value)),
            "ratio is ignored (the maximum of |x0| is used): s = quantile(|x0|, ratio).":
                scaled_clamp(x, flat.max(1).values.clamp(1.0, max_value)),
        }
        hint = first_match(got, variants, atol=1e-5)
        return failed(f"input of shape {tuple(x.shape)}: " + (hint or "differs from "
                      "threshold(x0, 'dynamic', ratio, max_value)."))
    return passed("ex6_reflection", "dynamic_threshold")


def outside_fraction(x0: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> float:
    """The oracle of ex6: the fraction of samples with any coordinate outside [lo, hi]."""
    return float(((x0 < lo) | (x0 > hi)).flatten(1).any(1).double().mean())


def check_outside(fn) -> Result:
    """``fn(x0, lo, hi)``: the fraction of *samples* (not coordinates) outside the box."""
    for x in _inputs():
        want = outside_fraction(x)
        got, err = call(fn, x.clone(), -1.0, 1.0)
        if err:
            return failed(err)
        try:
            got = float(got)
        except (TypeError, ValueError):
            return failed(f"return one number, got {type(got).__name__}.")
        if abs(got - want) < 1e-6:
            continue
        if abs(got - float(((x < -1) | (x > 1)).double().mean())) < 1e-6:
            return failed("that is the fraction of coordinates outside: count a sample once "
                          "if any of its coordinates is outside (.flatten(1).any(1)).")
        if abs(got - float((x > 1).flatten(1).any(1).double().mean())) < 1e-6:
            return failed("only the upper edge is tested: a coordinate below lo is outside too.")
        return failed(f"input of shape {tuple(x.shape)}: expected {want:.4f}, got {got:.4f}.")
    return passed("ex6_reflection", "outside_fraction")
