"""Metrics read samples and trajectories; they never train. ``toy``: exact metrics for mixtures."""
from .toy import (covariate_shift, mmd, mode_stats, nll, sliced_wasserstein, state_distance,
                  toy_metrics)

__all__ = ["covariate_shift", "mmd", "mode_stats", "nll", "sliced_wasserstein",
           "state_distance", "toy_metrics"]
