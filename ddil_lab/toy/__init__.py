"""The toy tier: Gaussian mixtures with an exact closed-form teacher (and an MLP one), exact
metrics, plots, the toy table's settings and evaluation, the notebook lessons (``lessons``) and
the demo (``python -m ddil_lab.toy.demo``)."""
from .backend import (GMM, MIXTURES, MLP, ExactTeacher, Toy2dBackend, embed, grid25, imbalanced,
                      make_mixture, ring8, ring8_cond)
from .experiments import (SETTINGS, Reference, SettingResult, TeacherSampler, evaluate_student,
                          evaluate_trajectory, make_backend, make_reference, mean_std,
                          paired_deltas, reference_rows, run_setting, save_figures, summarise,
                          support_violations, training_state_mismatch)
from .metrics import covariate_shift, mode_stats, nll, toy_metrics

__all__ = ["GMM", "MIXTURES", "MLP", "SETTINGS", "ExactTeacher", "Reference", "SettingResult",
           "TeacherSampler", "Toy2dBackend", "covariate_shift", "embed", "evaluate_student",
           "evaluate_trajectory", "grid25", "imbalanced", "make_backend", "make_mixture",
           "make_reference", "mean_std", "mode_stats", "nll", "paired_deltas", "reference_rows",
           "ring8", "ring8_cond", "run_setting", "save_figures", "summarise",
           "support_violations", "toy_metrics", "training_state_mismatch"]
