"""Exercise 5, a small study: baseline vs DDIL (PD, mixed rollouts) on one cell of the regime
map, a few seeds, a paired interval, and the checks of the study.

The cells are 12-mode, 3-class rings (mode std 0.04, the map's unequal weights) with the exact
teacher under guidance w, 4-step randomly initialised width-32 students, trained at the map's
"table" budget (300 steps x batch 256 per seed; DDIL: half the batch from mixed rollouts with
the aggregation buffer and the student-selection ramp over the first quarter). The stored
ranges (``CELLS``) bracket the paired difference DDIL - baseline of the per-class sliced W1
(x1e3) measured at the default budget and seeds 0-2 on the 2-core development machine.
"""
from __future__ import annotations

import math
import time

from ..toy import Toy2dBackend, class_mixture, evaluate_student, make_reference, paired_deltas
from ..toy.backend import RING12_WEIGHTS
from ..train import train_arm
from .exercises import points_of
from .record import Result

# Per guidance w: (measured delta SW x1e3, its 95% half-width, accepted range for the delta).
CELLS = {
    1.0: {"delta": 1.1, "ci": 8.1, "range": (-12.0, 12.0), "reading": "no measurable difference"},
    6.0: {"delta": -27.6, "ci": 7.9, "range": (-50.0, -10.0), "reading": "DDIL better"},
    9.0: {"delta": -67.1, "ci": 40.3, "range": (-110.0, -30.0), "reading": "DDIL better"},
}
BUDGET = {"steps": 300, "batch_size": 256, "seeds": [0, 1, 2], "n_eval": 1200}
KEY = "sw_x1e3"  # per-class sliced W1 to the 32-step teacher, x1e3 (lower is better)
TOL = 1e-3  # relative: the library rounds its t quantiles to 3 decimals (4.303)


def study_backend(guidance: float) -> Toy2dBackend:
    return Toy2dBackend(class_mixture(12, 3, 0.04, 0.7, weights=RING12_WEIGHTS),
                        guidance=guidance, hidden=32, student_init="random")


def run_study(guidance: float = 9.0, seeds=(0, 1, 2), steps: int = 300, batch_size: int = 256,
              n_eval: int = 1200, progress: bool = True) -> dict:
    """Train the baseline and DDIL arms (all seeds as one ensemble each) on the cell with
    guidance w and evaluate them on one reference. Returns ``{"baseline": [SW per seed],
    "ddil": [...], "off_mode": {arm: [...]}, "budget": {...}, "guidance", "wall_s"}``."""
    t0 = time.perf_counter()
    backend = study_backend(guidance)
    ref = make_reference(backend, n_eval, 4)
    ddil_kw = {"buffer_size": 1024, "refresh_size": 256, "refresh_every": 10,
               "prior_schedule": "student_selection", "ramp_steps": steps // 4}
    out = {"guidance": float(guidance), "off_mode": {},
           "budget": {"steps": steps, "batch_size": batch_size, "seeds": list(seeds),
                      "n_eval": n_eval}}
    for arm in ("baseline", "ddil"):
        views = train_arm(backend, "pd", arm, seeds=tuple(seeds), steps=steps,
                          batch_size=batch_size, sampler_kw=ddil_kw if arm == "ddil" else None,
                          progress=progress)
        evals = [evaluate_student(v, backend, ref, per_step=False) for v in views]
        out[arm] = [e[KEY] for e in evals]
        out["off_mode"][arm] = [e["off_mode_class"] for e in evals]
    out["wall_s"] = time.perf_counter() - t0
    return out


def library_interval(baseline, ddil) -> tuple[float, float]:
    """The oracle: mean of ddil - baseline paired by seed and its 95% t half-width
    (``toy.paired_deltas``)."""
    rows = [{"setting": "", "method": "pd", "arm": arm, "seed": i, KEY: v}
            for arm, vals in (("baseline", baseline), ("ddil", ddil)) for i, v in enumerate(vals)]
    d = paired_deltas(rows, [KEY])[0]
    return d[KEY], d[f"{KEY}_ci"]


def _interval_variants(a, b) -> dict:
    n = len(a)
    d = [y - x for x, y in zip(a, b)]
    mu = sum(d) / n
    sd1 = math.sqrt(sum((v - mu) ** 2 for v in d) / (n - 1))
    sd0 = math.sqrt(sum((v - mu) ** 2 for v in d) / n)
    t = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}.get(n - 1, 1.96)
    va = sum((x - sum(a) / n) ** 2 for x in a) / (n - 1)
    vb = sum((y - sum(b) / n) ** 2 for y in b) / (n - 1)
    return {
        "the difference has the wrong sign: report ddil - baseline (negative: DDIL better).":
            (-mu, t * sd1 / math.sqrt(n)),
        "1.96 is the normal quantile: with n seeds use Student's t with n - 1 degrees of "
        "freedom (3 seeds: 4.303).": (mu, 1.96 * sd1 / math.sqrt(n)),
        "the standard deviation divides by n: use n - 1 (the sample standard deviation).":
            (mu, t * sd0 / math.sqrt(n)),
        "the half-width misses 1/sqrt(n): it is t * sd / sqrt(n).": (mu, t * sd1),
        "unpaired: the interval must come from the per-seed differences ddil[i] - "
        "baseline[i] (same seed, same evaluation noise), not from the two arms' spreads.":
            (mu, t * math.sqrt((va + vb) / n)),
    }


def check_paired_interval(fn) -> Result:
    """``fn(baseline, ddil) -> (mean, half_width)`` against ``paired_deltas`` on fixed data."""
    cases = [([250.0, 231.0, 272.0], [188.0, 178.0, 189.0]),
             ([10.0, 12.5, 9.0, 11.0], [10.5, 11.0, 9.8, 12.4])]
    for a, b in cases:
        want = library_interval(a, b)
        try:
            got = fn(list(a), list(b))
        except NotImplementedError:
            return Result(False, 0, "`paired_interval` is not implemented yet: replace its TODO.")
        except Exception as e:
            return Result(False, 0, f"`paired_interval` raised {type(e).__name__}: {e}.")
        try:
            got = (float(got[0]), float(got[1]))
        except (TypeError, ValueError, IndexError):
            return Result(False, 0, "return the pair (mean difference, 95% half-width).")
        if all(abs(g - w) <= TOL * max(1.0, abs(w)) for g, w in zip(got, want)):
            continue
        for hint, v in _interval_variants(a, b).items():
            if all(abs(g - w) <= TOL * max(1.0, abs(w)) for g, w in zip(got, v)):
                return Result(False, 0, f"{len(a)} seeds: {hint}")
        return Result(False, 0, f"{len(a)} seeds, baseline {a}, ddil {b}: expected "
                                f"({want[0]:.4g}, {want[1]:.4g}), "
                                f"got ({got[0]:.4g}, {got[1]:.4g}).")
    return Result(True, points_of("ex5_study", "paired_interval"), "")


def check_study_range(result: dict, fn) -> Result:
    """The student's interval ``fn(baseline, ddil)`` on the run equals the library's and, at the
    default budget, its delta lies in the stored range of the chosen cell (sign and size)."""
    try:
        got = [float(v) for v in fn(list(result["baseline"]), list(result["ddil"]))][:2]
    except Exception:
        return Result(False, 0, "no interval: `paired_interval` must work first (see its check).")
    want = library_interval(result["baseline"], result["ddil"])
    if len(got) < 2 or any(abs(g - w) > TOL * max(1.0, abs(w)) for g, w in zip(got, want)):
        return Result(False, 0, f"your interval {tuple(round(v, 3) for v in got)} on the run is "
                                f"not the paired one {tuple(round(v, 3) for v in want)}.")
    cell = CELLS.get(result["guidance"])
    if cell is None:
        return Result(False, 0, f"guidance={result['guidance']} has no stored reference range; "
                                f"pick one of {sorted(CELLS)}.")
    if result["budget"] != BUDGET:
        return Result(False, 0, f"not comparable: the reference ranges are for the budget "
                                f"{BUDGET}, this run used {result['budget']}.")
    lo, hi = cell["range"]
    if lo <= want[0] <= hi:
        return Result(True, points_of("ex5_study", "study_range"), "")
    return Result(False, 0, f"delta {want[0]:.1f} is outside the reference range [{lo}, {hi}] "
                            f"of the w={result['guidance']:g} cell (measured {cell['delta']} "
                            f"± {cell['ci']}): did the training code or the budget change?")


def check_interpretation(text, min_words: int = 40) -> Result:
    """A paragraph, not a placeholder (its content is for the instructor to read)."""
    words = str(text or "").split()
    if not words or "TODO" in str(text):
        return Result(False, 0, "write your interpretation paragraph in `interpretation`.")
    if len(words) < min_words:
        return Result(False, 0, f"{len(words)} words: write a paragraph of at least {min_words} "
                                f"(what the interval says, how sure, and what it does not say).")
    if not any(ch.isdigit() for ch in str(text)):
        return Result(False, 0, "quote your numbers (the delta and its interval) in the paragraph.")
    return Result(True, points_of("ex5_study", "interpretation"), "")
