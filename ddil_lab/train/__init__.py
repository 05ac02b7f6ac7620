"""The one train loop and what it owns: ``distill(backend, method, sampler, ...)``, progressive
halving, checkpoints (safetensors + JSON), several processes and FSDP sharding, validated
settings, and named experiment arms with seeds trained as one ensemble. Knows no tier."""
from .arms import (ARMS, DDIL_SOURCE, METHODS, EnsembleBackend, MemberView, SeedEnsemble,
                   make_arm, make_sampler, method_defaults, train_arm)
from .checkpoint import CheckpointError
from .loop import (EMA, LR_SCHEDULES, ON_NONFINITE, DistillResult, NonFiniteError,
                   check_distill_args, distill, lr_lambda, progressive)
from .processes import plan_seed, rank_seed, seed_everything

__all__ = ["ARMS", "DDIL_SOURCE", "EMA", "LR_SCHEDULES", "METHODS", "ON_NONFINITE",
           "CheckpointError", "DistillResult", "EnsembleBackend", "MemberView",
           "NonFiniteError", "SeedEnsemble", "check_distill_args", "distill", "lr_lambda",
           "make_arm", "make_sampler", "method_defaults", "plan_seed", "progressive",
           "rank_seed", "seed_everything", "train_arm"]
