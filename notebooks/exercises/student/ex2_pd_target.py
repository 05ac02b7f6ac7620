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
# # Exercise 2 · The progressive-distillation target
#
# **Learning goal.** Derive and compute the target of Progressive Distillation (Salimans & Ho,
# 2022), the feedback DDIL uses for PD: the $\hat x_0$ that makes **one** student DDIM step
# $t \to s$ land exactly where the teacher's $k$ DDIM steps land. You check it on the *exact*
# teacher of a 2D Gaussian mixture, where "exactly" means to float precision.
#
# One DDIM step from $x_t$ with estimate $x_0$ lands on
# $x_s = \alpha_s x_0 + \sigma_s\,(x_t - \alpha_t x_0)/\sigma_t$. Given the teacher's landing
# point $x_s$, solve this for $x_0$:
#
# $$\hat x_0^{\text{tgt}} = \frac{x_s - r\,x_t}{\alpha_s - r\,\alpha_t}, \qquad r = \sigma_s / \sigma_t .$$
#
# The teacher walks the finer grid: for a 4-step student and $k = 2$ it takes 2 DDIM steps
# through the points of the 8-step grid between $t$ and $s$ (`points`, given: $t$ first, $s$
# last, e.g. `[999, 874, 749]`). Background: notebook 03, `ddil_lab/methods/pd.py`.
# Runs in seconds.

# %% tags=["parameters"]
record: str = ""  # where the checks write their JSON record (the grader sets it)
guidance: float = 3.0  # classifier-free guidance scale w of the exact teacher
substeps: int = 2  # teacher DDIM steps per student step (2: one halving stage)
seed: int = 0  # random seed

# %%
import torch

from ddil_lab import Schedule, Toy2dBackend
from ddil_lab import notebook as nb
from ddil_lab.coursework import Record, checks

nb.check_parameters()  # a mistyped papermill parameter stops the run here
nb.setup(threads=1, seed=seed)
rec = Record("ex2_pd_target", record)
# 8 modes in 2 classes, exact teacher under guidance; the (untrained) students are only built
backend = Toy2dBackend("ring8_cond", teacher="exact", guidance=guidance, hidden=16,
                       student_init="random")
S = backend.schedule

# %% [markdown]
# ## Your function
#
# `teacher(x, t_vec, cond)` returns the teacher's $\hat x_0$ (`t_vec`: a long tensor of shape
# (B,)); `S.ddim_step(x, x0, a, b)` takes one DDIM step $a \to b$. Return the pair
# `(x0_tgt, x_s)`.

# %%
def my_pd_target(teacher, S: Schedule, x_t: torch.Tensor, points: list[int], cond):
    # TODO: your code here
    raise NotImplementedError("write this part (see the TODO above)")


# %% [markdown]
# The checks run your function at every step of the 4-step grid on forward states of the data,
# against the library's `PD.target`: first where the teacher lands, then the target (one
# student DDIM step from $x_t$ with your target must land on the teacher's $x_s$).

# %%
with torch.no_grad():
    rec.check("pd_teacher", checks.check_pd_teacher, my_pd_target, backend, substeps)
    rec.check("pd_target", checks.check_pd_target, my_pd_target, backend, substeps)
print(rec.summary())

# %% [markdown]
# ## Questions (answer in prose)
#
# 1. At the last student step $s = -1$: what is $r$, and what is the target then?
# 2. The denominator $\alpha_s - r\alpha_t$ is small at the first step from $t = 999$. What
#    does that do to the regression target, and why does PD weight the loss by
#    $\max(\mathrm{SNR}(t), 1)$ in $x_0$ space (or regress in $v$ space)?
# 3. PD's target depends on the state $x_t$ it is computed at. Which states does plain PD
#    train on, and which does a 4-step student meet at inference? (This is the covariate
#    shift of exercise 3.)

# %% [markdown]
# *Your answers:*
