"""ddil_lab: diffusion distillation with imitation learning (DDIL), from 2D mixtures to SD.

Parts (see shared/DESIGN.md): ``diffusion`` (Schedule), ``denoiser`` (one calling convention,
x0 out), ``backends`` (toy2d, image, sd), ``rollout`` (StateSampler: where training states come
from), ``distill`` (PD, LCM, DMD2: the feedback), ``train`` (the one loop), ``metrics``.
"""

__version__ = "0.1.0"
