"""The exercises and the points of their checks (plain data: the grader reads it without torch).

A check with ``by="grader"`` is not run inside the notebook: the grader computes it after the
run (``reproducible``: the numbers the submitted notebook shows equal the grader's re-run).
"""
from __future__ import annotations

EXERCISES = {
    "ex1_ddim": {"title": "The DDIM step and the 4-step grid",
                 "checks": {"timesteps": 2, "ddim_step": 3}},
    "ex2_pd_target": {"title": "The progressive-distillation target",
                      "checks": {"pd_teacher": 2, "pd_target": 3}},
    "ex3_shift": {"title": "Measuring the covariate shift of a given student",
                  "checks": {"shift": 3, "largest_shift_step": 1}},
    "ex4_mixed_rollout": {"title": "A mixed teacher/student rollout",
                          "checks": {"mixed_rollout": 4}},
    "ex5_study": {"title": "A small study: baseline vs DDIL on a map cell",
                  "checks": {"paired_interval": 2, "study_range": 2, "interpretation": 1,
                             "reproducible": 2},
                  "grader_checks": ("reproducible",)},
    "ex6_reflection": {"title": "Reflection: thresholding x0, and DMD2 at small batch",
                       "checks": {"static_threshold": 1, "dynamic_threshold": 3,
                                  "outside_fraction": 1}},
}


def max_points(exercise: str) -> int:
    return sum(EXERCISES[exercise]["checks"].values())


def points_of(exercise: str, check: str) -> int:
    try:
        return EXERCISES[exercise]["checks"][check]
    except KeyError:
        raise KeyError(f"no check {check!r} in exercise {exercise!r}; known: "
                       f"{ {k: list(v['checks']) for k, v in EXERCISES.items()} }") from None
