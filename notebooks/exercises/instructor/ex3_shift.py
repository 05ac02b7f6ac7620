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
# # Exercise 3 · Measuring the covariate shift of a given student
#
# **Learning goal.** Turn "the student meets states it was not trained on" into a number.
# Plain distillation trains on forward states $x_t \sim q_t(x \mid c)$; at inference a
# 4-step student meets the states of its own trajectory. On a Gaussian mixture $q_t$ is known
# in closed form, so the shift at timestep $t$ can be measured exactly (DDIL paper, Sec. 3):
#
# $$\text{shift}_t = \mathbb{E}_{x \sim \text{states}}\big[-\log q_t(x \mid c)\big] - \mathbb{E}_{x \sim q_t(\cdot \mid c)}\big[-\log q_t(x \mid c)\big],$$
#
# a cross-entropy minus an entropy: about 0 when the states look like forward states, positive
# when they sit where training data at $t$ is rare. You write it, measure a given PD student
# under classifier-free guidance, and read where its shift is largest. Background: notebook 01,
# `ddil_lab/toy/metrics.py`. Runs in about 16 s (papermill, shared 2-core CPU).

# %% tags=["parameters"]
record: str = ""  # where the checks write their JSON record (the grader sets it)
guidance: float = 6.0  # classifier-free guidance scale w of the teacher (ring8_cond)
train_steps: int = 150  # training steps of the given PD student
n_eval: int = 2000  # trajectories of the given student that are measured
seed: int = 0  # random seed

# %%
import torch
from IPython.display import Markdown, display

from ddil_lab import notebook as nb
from ddil_lab.coursework import Record, checks
from ddil_lab.toy import TeacherSampler, covariate_shift, make_backend
from ddil_lab.train import train_arm

nb.check_parameters()  # a mistyped papermill parameter stops the run here
nb.setup(threads=1, seed=seed)
rec = Record("ex3_shift", record)
backend = make_backend("guided", guidance=guidance, hidden=32, init_steps=300)
gmm, S = backend.gmm, backend.schedule

# %% [markdown]
# ## The given student
#
# A 4-step PD student (width 32, started from a briefly pretrained denoiser) trained on
# forward states only, and its trajectories from common noise with class labels `label`.

# %%
student = train_arm(backend, "pd", "baseline", seeds=(seed,), steps=train_steps,
                    batch_size=128)[0]
g = torch.Generator().manual_seed(seed)
label = backend.sample_cond(n_eval, g)
traj = student.sample(backend.sample_noise(n_eval, g), label)
print("grid:", traj.grid, "| states per step:", traj.xs[0].shape)

# %% [markdown]
# ## Your function
#
# `gmm.log_prob(x, t_vec, S, label)` is $\log q_t(x \mid c)$ per sample (`t_vec`: a long
# tensor of shape (B,); `label=None`: the unconditional mixture). `gmm.sample(n, generator,
# label=labels)` returns `(x0, component, label)`: data with the given labels. For the
# entropy term draw `n_ref` forward states $x_t = \alpha_t x_0 + \sigma_t \epsilon$ whose
# labels are drawn from `label` (`S.q_sample(x0, t_vec, noise)`).

# %%
def my_shift(x_t: torch.Tensor, t: int, gmm, S, label, n_ref: int = 20000) -> float:
    g = torch.Generator().manual_seed(0)
    ref_label = label[torch.randint(0, len(x_t), (n_ref,), generator=g)]
    x0 = gmm.sample(n_ref, g, label=ref_label)[0]
    x_ref = S.q_sample(x0, torch.full((n_ref,), t), torch.randn(x0.shape, generator=g))
    cross = -gmm.log_prob(x_t, torch.full((len(x_t),), t), S, label).mean()
    entropy = -gmm.log_prob(x_ref, torch.full((n_ref,), t), S, ref_label).mean()
    return float(cross - entropy)


# %%
rec.check("shift", checks.check_shift, my_shift, traj, gmm, S, label)

# %% [markdown]
# ## The shift along the trajectory
#
# The library's `covariate_shift` for the student and for the guided teacher's own 32-step
# trajectory (same labels): is the student's shift its own, or already the guided sampler's?

# %%
teacher = TeacherSampler(backend, traj.grid, fine_steps=32).sample(
    backend.sample_noise(n_eval, g), label)
rows = {name: {f"t={t}": covariate_shift(x, t, gmm, S, label=label)
               for x, t in zip(tr.xs, tr.grid)}
        for name, tr in (("student (4 steps)", traj), ("teacher (32 steps)", teacher))}
display(Markdown(nb.markdown_table(rows, list(rows["student (4 steps)"]))))

# %% [markdown]
# Which grid timestep has the largest **absolute** shift for the student? Set
# `largest_shift_step` to it (an int from the grid).

# %%
shifts = rows["student (4 steps)"]  # {"t=999": shift, ...}
largest_shift_step = int(max(shifts, key=lambda k: abs(shifts[k]))[2:])
rec.check("largest_shift_step", checks.check_largest_shift_step, largest_shift_step, traj,
          gmm, S, label)
print(rec.summary())

# %% [markdown]
# ## Questions (answer in prose)
#
# 1. Why is the shift at $t = 999$ about 0 for every sampler?
# 2. The shift is signed. What does a *negative* value mean, and why can a guided sampler
#    score below 0 although its states are far from $q_t(x \mid c)$? Which two-sided measure
#    would you read next to it?
# 3. Compare the student's row with the teacher's. Does most of the student's shift come from
#    its own errors or from guidance? What does that predict for DDIL at $w = 1$ vs $w = 6$?

# %% [markdown]
# *Model answers.* (1) At t = 999 every sampler starts from pure noise, which is q_999 up to
# alpha_999 ~ 0.07: states and forward states coincide. (2) Negative: the states sit in
# denser parts of q_t than forward samples do, i.e. they are over-concentrated. Guidance pushes
# samples towards the class modes' centres, so the cross-entropy falls below the entropy while
# the spread is wrong; read a sample distance (sliced W1 to forward states, `gap_t`) next to
# it. (3) When the teacher's row is close to the student's, the shift is the guided sampler's
# own: forward-only training never sees those states, which is the case DDIL targets; at
# w = 1 the teacher stays on q_t and there is little to gain.
