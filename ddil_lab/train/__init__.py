"""The one train loop and what it owns: ``distill(backend, method, sampler, ...)``, progressive
halving, checkpoints (safetensors + JSON), what a resumed run may change, several processes and
FSDP sharding, validated settings, and named experiment arms with seeds trained as one
ensemble. Knows no tier."""
from ..validation import ConfigError
from .args import LR_SCHEDULES, MAX_LR, MAX_SEED, ON_NONFINITE, check_distill_args, check_parts
from .arms import (ARMS, DDIL_SOURCE, METHODS, Budget, EnsembleBackend, MemberView,
                   RenoisedRolloutSampler, SeedEnsemble, make_arm, make_sampler, method_defaults,
                   train_arm, train_cells)
from .checkpoint import CheckpointError
from .loop import EMA, DistillResult, NonFiniteError, distill, lr_lambda, progressive
from .processes import plan_seed, rank_seed, seed_everything
from .resume import APPLIED, MUST_MATCH, backend_identity
from .tracking import Tracker

__all__ = ["APPLIED", "ARMS", "Budget", "DDIL_SOURCE", "RenoisedRolloutSampler", "train_cells", "EMA", "LR_SCHEDULES", "MAX_LR", "MAX_SEED",
           "METHODS", "MUST_MATCH", "ON_NONFINITE", "CheckpointError", "ConfigError",
           "DistillResult", "Tracker", "EnsembleBackend", "MemberView", "NonFiniteError", "SeedEnsemble",
           "backend_identity", "check_distill_args", "check_parts", "distill", "lr_lambda",
           "make_arm", "make_sampler", "method_defaults", "plan_seed", "progressive",
           "rank_seed", "seed_everything", "train_arm"]
