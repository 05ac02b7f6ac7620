"""The teaching notebooks' helpers, one module per lesson: ``shift`` (01, covariate shift),
``modes`` (02, mode loss), ``sources`` (03, where training states come from), ``reflection``
(04, reflected distillation); ``common`` holds what they share. Each module computes and draws
(figures without pyplot); the notebooks call these and ``ddil_lab.notebook``, nothing else of
their own, so the tests reach every line a lecturer shows."""
from . import common, modes, reflection, shift, sources

__all__ = ["common", "modes", "reflection", "shift", "sources"]
