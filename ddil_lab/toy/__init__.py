"""The toy tier: Gaussian mixtures with an exact closed-form teacher (and an MLP one), exact
metrics, plots, the toy table's settings and evaluation, the notebook lessons (``lessons``) and
the demo (``python -m ddil_lab.toy.demo``)."""
from .backend import (GMM, MIXTURES, MLP, ExactTeacher, Toy2dBackend, check_toy_args,
                      class_mixture, embed, grid25, imbalanced, make_mixture, ring8, ring8_cond, ring12_cond3)
from .experiments import (SETTINGS, Reference, SettingResult, TeacherSampler, balanced_labels,
                          evaluate_members, evaluate_student, evaluate_trajectory, make_backend,
                          make_reference,
                          mean_ci, mean_std, paired_deltas, reference_rows, run_setting, save_figures,
                          summarise, support_violations, training_state_mismatch, write_csv)
from .metrics import covariate_shift, mode_stats, nll, per_class, toy_metrics

__all__ = ["GMM", "MIXTURES", "MLP", "SETTINGS", "ExactTeacher", "Reference", "SettingResult",
           "TeacherSampler", "Toy2dBackend", "balanced_labels", "check_toy_args",
           "class_mixture", "covariate_shift", "embed", "evaluate_members", "evaluate_student",
           "evaluate_trajectory", "grid25", "imbalanced", "make_backend", "make_mixture",
           "make_reference", "mean_ci", "mean_std", "mode_stats", "nll", "paired_deltas", "per_class",
           "reference_rows", "ring8", "ring8_cond", "ring12_cond3", "run_setting", "save_figures", "summarise",
           "support_violations", "toy_metrics", "training_state_mismatch", "write_csv"]
