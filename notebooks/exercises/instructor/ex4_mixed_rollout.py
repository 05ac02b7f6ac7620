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
# # Exercise 4 · A mixed teacher/student rollout
#
# **Learning goal.** Write the state source that makes DDIL an imitation-learning method: the
# DAgger-style *mixed rollout*, where at every step each sample is moved by the student with
# probability $p_\text{student}$ and by the teacher otherwise (DDIL paper, Sec. 4, Algorithm 1).
# The states it visits are what DDIL trains on besides forward states. Your rollout must equal
# the library's `StateSampler` **bitwise** when both draw their coin flips from the same
# generator, which is what makes rollouts reproducible, and what lets several processes
# share one plan of rollouts.
#
# The rules (as `ddil_lab/rollout.py` and `ddil_lab/sampling.py` have them):
#
# - record the state *before* each step: the first state is $x_T$, and the step after the
#   last grid point is not taken (`len(grid)` states);
# - at each step draw **one coin per sample**, `u = torch.rand(B, generator=generator)`; the
#   student moves the samples with `u < p_student`, the teacher the others;
# - each model takes its DDIM step `S.ddim_step(x, x0_hat, t, s)` on the rows it moves only
#   (`x[idx]`, with `cond[idx]`; the models' $\hat x_0$ come from `model(x, t_vec, cond)`).
#
# Background: notebook 03. Runs in seconds.

# %% tags=["parameters"]
record: str = ""  # where the checks write their JSON record (the grader sets it)
guidance: float = 6.0  # classifier-free guidance scale w of the teacher (ring8_cond)
n: int = 512  # trajectories rolled out
p_student: float = 0.5  # probability that the student moves a sample at a step
seed: int = 0  # random seed

# %%
import torch

from ddil_lab import Schedule, Toy2dBackend, timesteps
from ddil_lab import notebook as nb
from ddil_lab.coursework import Record, checks

nb.check_parameters()  # a mistyped papermill parameter stops the run here
nb.setup(threads=1, seed=seed)
rec = Record("ex4_mixed_rollout", record)
backend = Toy2dBackend("ring8_cond", teacher="exact", guidance=guidance, hidden=32,
                       student_init="random")
S, teacher = backend.schedule, backend.teacher
student = backend.make_student().eval()  # an untrained student: it moves samples badly
g = torch.Generator().manual_seed(seed)
x_T, cond = backend.sample_noise(n, g), backend.sample_cond(n, g)
grid = timesteps(4).tolist()

# %% [markdown]
# ## Your rollout

# %%
@torch.no_grad()
def my_mixed_rollout(teacher, student, S: Schedule, x_T: torch.Tensor, cond, grid: list[int],
                     p_student: float, generator: torch.Generator) -> list[torch.Tensor]:
    xs, x = [], x_T
    for i, t in enumerate(grid):
        xs.append(x)
        if i + 1 == len(grid):
            break  # the step after the last state is not needed
        s = grid[i + 1]
        by_student = torch.rand(x.shape[0], generator=generator) < p_student
        x_next = torch.empty_like(x)
        for mask, model in ((by_student, student), (~by_student, teacher)):
            idx = mask.nonzero().squeeze(1)
            if len(idx):
                x0 = model(x[idx], torch.full((len(idx),), t), cond[idx])
                x_next[idx] = S.ddim_step(x[idx], x0, t, s)
        x = x_next
    return xs


# %% [markdown]
# The check runs your rollout with $p_\text{student} \in \{0.5, 0.3, 0, 1\}$ against
# `StateSampler(beta_mixed=1).backward(..., "mixed", plan=generator)`: same noise, same labels,
# and a generator seeded as the sampler's plan (advanced past the sampler's one draw that
# picks the rollout grid, so both see the same coins).

# %%
rec.check("mixed_rollout", checks.check_mixed_rollout, my_mixed_rollout, teacher, student, S,
          x_T, cond, grid)
print(rec.summary())

# %% [markdown]
# ## How far do the mixed states drift?
#
# Mean distance of the mixed rollout's states from the teacher's own rollout ($p = 0$), per
# grid point, for a few $p_\text{student}$ (the library's rollout, so this runs even before
# your function passes).

# %%
ref = checks.library_mixed_rollout(teacher, student, S, x_T, cond, grid, 0.0, seed)
for p in (0.25, 0.5, 1.0):
    xs = checks.library_mixed_rollout(teacher, student, S, x_T, cond, grid, p, seed)
    print(f"p_student={p}: " + ", ".join(f"t={t}: {float((a - b).norm(dim=1).mean()):.3f}"
                                         for t, a, b in zip(grid, xs, ref)))

# %% [markdown]
# ## Questions (answer in prose)
#
# 1. Why must the coins come from a generator passed in, not from torch's global stream? Name
#    two things in this library that rely on it.
# 2. With $p_\text{student} = 0.5$ and 4 grid points, what fraction of the trajectories take
#    every step with the teacher? What do the states of a mixed rollout give the student that
#    teacher rollouts ($p = 0$) and its own rollouts ($p = 1$) do not?
# 3. The distances above grow with $t$ decreasing and with $p_\text{student}$. Why, and what
#    would they look like for a well-trained student?

# %% [markdown]
# *Model answers.* (1) Reproducibility (the same plan gives the same rollouts, e.g. for a
# resumed run) and processes that share a plan: a sharded (FSDP) student must be called by
# every process on the same sequence of rollouts (`StateSampler.sample(plan=...)`); the
# global stream also feeds data and noise, so it differs between processes. (2) Only 3 steps
# are taken (the step after the last point is not), so 0.5^3 = 1/8 of the samples follow the
# teacher all the way. Mixed states are states the student itself leads to, corrected by the
# teacher afterwards (DAgger): the student learns to recover from its own errors, with the
# teacher's feedback, on states near its own distribution. (3) Errors compound: each student
# step moves the state off the teacher's path and later steps start from there; an untrained
# student errs at every step. A well-trained student would give small distances for every p.
