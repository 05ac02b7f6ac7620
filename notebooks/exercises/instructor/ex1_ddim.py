# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Exercise 1 · The DDIM step and the 4-step grid
#
# **Learning goal.** Write the two pieces every few-step sampler and every distillation method
# in this library rests on: the *n-step timestep grid* and the deterministic *DDIM step* with
# a thresholded ("reflected") $\hat x_0$. After this exercise you can say why a 4-step student
# visits exactly $t = 999, 749, 500, 250$ and why clamping $\hat x_0$ also changes the
# direction to the next state.
#
# Background (notebook 01, `ddil_lab/diffusion.py`): the VP schedule has $T = 1000$ steps,
# $\alpha(t) = \sqrt{\bar\alpha_t}$, $\sigma(t) = \sqrt{1 - \bar\alpha_t}$ and
# $x_t = \alpha(t) x_0 + \sigma(t)\epsilon$; $t = -1$ is the clean end ($\alpha = 1$,
# $\sigma = 0$). DDIM (Song et al., 2021, $\eta = 0$) moves from $t$ to $s < t$ with
#
# $$\epsilon = \frac{x_t - \alpha(t)\hat x_0}{\sigma(t)}, \qquad x_s = \alpha(s)\hat x_0 + \sigma(s)\,\epsilon .$$
#
# Edit only the regions marked `TODO`; run every cell; each check prints PASS or FAIL with a
# hint. Runs in seconds.

# %% tags=["parameters"]
record: str = ""  # where the checks write their JSON record (the grader sets it)
seed: int = 0  # random seed

# %%
import torch

from ddil_lab import Schedule
from ddil_lab import notebook as nb
from ddil_lab.coursework import Record, checks

nb.check_parameters()  # a mistyped papermill parameter stops the run here
nb.setup(threads=1, seed=seed)
rec = Record("ex1_ddim", record)
S = Schedule()

# %% [markdown]
# ## 1. The n-step grid
#
# The paper uses "linspace" spacing: take $n + 1$ points $\mathrm{round}(\mathrm{linspace}(0,
# T-1, n+1))$, order them from noisy to clean and drop the last one (0): the step after the
# last grid point goes to $t = -1$. Return a `torch.long` tensor.

# %%
def my_timesteps(n: int, T: int = 1000) -> torch.Tensor:
    grid = torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round().long()
    return grid.flip(0)[:-1]


# %%
rec.check("timesteps", checks.check_timesteps, my_timesteps)

# %% [markdown]
# ## 2. The reflected DDIM step
#
# Clamp $\hat x_0$ to the data support $[lo, hi]$ first, then derive $\epsilon$ from the
# **clamped** $\hat x_0$ and step to $s$. `S.alpha(t)` and `S.sigma(t)` take an int (or a
# tensor of ints) and accept $t = -1$. `t` and `s` are Python ints.

# %%
def my_ddim_step(S: Schedule, x_t: torch.Tensor, x0_hat: torch.Tensor, t: int, s: int,
                 lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    x0 = x0_hat.clamp(lo, hi)
    eps = (x_t - S.alpha(t) * x0) / S.sigma(t)
    return S.alpha(s) * x0 + S.sigma(s) * eps


# %%
rec.check("ddim_step", checks.check_ddim_step, my_ddim_step)
print(rec.summary())

# %% [markdown]
# ## Questions (answer in prose)
#
# 1. Why does the 4-step grid contain 500 and not 499? What would a "leading" spacing
#    ($t = 750, 500, 250, 0$) change for the first step a student takes?
# 2. The grids nest: every point of the 4-step grid is on the 32-step grid. Why does
#    progressive distillation need that?
# 3. Clamping $\hat x_0$ but deriving $\epsilon$ from the *unclamped* estimate would keep
#    $x_s$ closer to the unclamped step. Why does the library derive $\epsilon$ from the clamped
#    one ("reflected" sampling)?

# %% [markdown]
# *Model answers.* (1) round(linspace(0, 999, 5)) = 0, 249.75 -> 250, 499.5 -> 500,
# 749.25 -> 749, 999: rounding, not truncation. A leading grid starts at 750, so the student
# never sees pure noise (t = 999) although sampling starts there. (2) The PD teacher walks the
# fine grid inside each student step, so every student step must start and end on fine-grid
# points. (3) With eps from the clamped x0 the step is the exact DDIM step of the clamped
# estimate: x_s is consistent with x0 (the state is re-noised from the clamped x0), and the
# trajectory stays on the support's side instead of carrying the out-of-box part into eps.
