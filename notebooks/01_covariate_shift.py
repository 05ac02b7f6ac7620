# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Covariate shift, seen
#
# Reverse diffusion is a sequential decision process: a policy (the teacher, or a few-step
# student) moves a state $x_t$ to the next timestep, and **the state it meets next is the
# one it produced itself** (DDIL paper, Sec. 3.1–3.2). Plain distillation trains the student
# on forward-diffused states $x_t \sim q_t(x)$ (noised data), but at inference the student
# meets the states of its own backward trajectory. If those leave $q_t$, the student is asked
# about states it was never trained on: **covariate shift**, which compounds over steps.
# DDIL (Algorithm 1) also trains on backward trajectories, here *mixed* rollouts where each
# step is taken by the teacher or the student at random (DAgger), with prior
# $\beta_\text{frwd}$ on forward states and the rest on rollouts.
#
# On a 2D Gaussian mixture everything is exact: the teacher is the closed-form posterior
# mean $E[x_0 \mid x_t]$ and $q_t$ is known in closed form, so we can *see* the states.
# We compare a 4-step **progressive-distillation (PD)** student trained on forward states
# only (*baseline*) with the same student trained with DDIL (*ddil*), in two settings:
#
# 1. **unconditional** mixture: the teacher's trajectory stays on $q_t$, and a well-trained
#    student barely shifts;
# 2. **classifier-free guidance** (class-conditional mixture, guidance scale $w > 1$): the
#    guided sampler leaves $q_t(x \mid c)$ far behind, so forward-only training looks at
#    the wrong states.
#
# Distances are sliced Wasserstein-1 (x1000) between sets of states at the same $t$,
# class by class; "shift" is $E[-\log q_t(x\mid c)]$ over the states minus the same over
# forward states (nats, 0 = none).
#
# **What you will see** (a few minutes at the defaults on a 2-core CPU: `docs/notebooks.md`
# has measured times; each training cell shows a progress bar per arm, named by arm and seeds):
#
# 1. the exact teacher's states over the grey forward marginals $q_t$, with sliders;
# 2. unconditional: the PD students' states next to the states each was trained on, per-step
#    distance curves, where the student's step is wrong, and a table with verdict lines;
# 3. the same under classifier-free guidance, where the sampler leaves $q_t(x\mid c)$;
# 4. the guided samples side by side, and the guided table.

# %% tags=["parameters"]
out_dir: str = "runs/notebooks/01_covariate_shift"  # figures and metrics.json go here
setting: str = "ring8"  # unconditional toy setting: ring8, grid25 or imbalanced
guidance: float = 6.0  # classifier-free guidance scale w of the guided setting (ring8_cond)
n_steps: int = 4  # student inference steps (grid 999, 749, 500, 250 for 4)
substeps: int = 4  # teacher DDIM steps per student step in the PD target
steps: int = 600  # gradient steps per student
batch_size: int = 256  # training states per step and seed
lr: float = 1e-3  # AdamW learning rate
ddil_share: float = 0.5  # DDIL: fraction of each batch from mixed teacher/student rollouts
seeds: list = [0, 1, 2]  # seeds of each arm (trained together as one ensemble)
n_eval: int = 2000  # trajectories drawn for the plots and metrics
init_steps: int = 1000  # training steps of the MLP denoiser the students start from
widgets: bool = True  # show sliders under the static figures (in a widget-enabled frontend)

# %%
from IPython.display import Markdown, display

from ddil_lab import notebook as nb
from ddil_lab.toy import make_backend
from ddil_lab.toy.lessons import common, shift

nb.check_parameters()  # a mistyped papermill parameter stops the run here
nb.setup(threads=1, seed=seeds[0])
rec = nb.Recorder(out_dir)
train_kw = {"seeds": seeds, "steps": steps, "batch_size": batch_size, "lr": lr,
            "n_steps": n_steps, "n_eval": n_eval, "method_kw": {"substeps": substeps},
            "sampler_kw": {"share": ddil_share}}
table_keys = ["mmd_x1e3", "nll", "off_mode", "gap_sum", "train_gap_sum", "drift_sum",
              "shift_sum"]

# %% [markdown]
# ## 1. The exact teacher over the forward marginals
#
# Shading: the exact forward marginal $q_t$ at each student timestep; dots: the teacher's
# states there. With plain few-step DDIM (no substeps) the teacher itself is the untrained
# "student": the fewer steps, the further its last states and samples leave $q_t$ and the
# data. Try the slider for the number of steps, and the `fine` box (the teacher walking the
# 32-step grid inside each student step, which is what the student is taught to imitate).
#
# *Controls*: moving one redraws the figure in place. The kernel runs one thing at a time,
# so while later cells are still running (e.g. during Run All) a moved control redraws only
# once they have finished.

# %%
uncond = make_backend(setting, init_steps=init_steps)
nb.explore(shift.teacher_over_marginals, {"n_steps": (1, 8, 1), "fine": bool},
              {"n_steps": n_steps, "fine": False}, rec, "teacher_uncond", widgets,
              backend=uncond, label=None, n=n_eval // 2)

# %% [markdown]
# ## 2. Unconditional: a PD student, with and without DDIL
#
# Each row is a policy from the same noise $x_T$ (colour) over the grey $q_t$; black dots are
# the states that arm was *trained* on at that $t$ (forward states for the baseline; forward
# plus mixed-rollout states for DDIL). The last column draws a few whole trajectories. The
# training cell below shows one progress bar per arm (each arm trains its seeds together).

# %%
study_u = shift.shift_study(uncond, "pd", ("baseline", "ddil"), **train_kw)
rec.figure("states_uncond", shift.states_over_marginals(uncond, study_u.trajs,
                                                     train_states=study_u.train_states))

# %% [markdown]
# Per step $t$ (mean and ±1 std over seeds), four measures of where a policy's inference
# states $x_t$ sit, each a sliced Wasserstein-1 distance x1000 between state sets except the
# last:
#
# - **`gap`**: to fresh forward states of $q_t(x\mid c)$, the states forward-only training
#   looks at. Large gap = covariate shift for a forward-only student.
# - **`train_gap`**: to the states *this arm* was trained on at $t$ (the black dots above).
#   For the baseline those are forward states too, another draw of them (with the training
#   batches' class mix), so its `train_gap` and `gap` measure the same thing and differ by
#   sampling noise; DDIL's rollouts should bring `train_gap` down. The two panels share
#   their y axis.
# - **`drift`**: to the teacher's states at $t$ (the states the student should visit).
# - **`shift`**: the excess $-\log q_t(x\mid c)$ in nats, 0 when the states are as likely
#   under $q_t$ as forward states are.
#
# The table's `gap_sum`, `train_gap_sum`, `drift_sum` and `shift_sum` add these over the
# student timesteps. The **grey band** is the noise floor of each measure: the same measure
# between independent forward draws of $q_t(x\mid c)$ of the same size (mean ± 2 sd over
# eight draws). A curve inside the band is as close to $q_t$ as sampling noise can tell; two
# curves that differ by less than the band's width may differ by chance. At $t=999$ every
# policy holds pure noise, which is on $q_t$: the students and the plain DDIM teacher share
# one draw $x_T$ (so their curves start at one point), the `teacher` row is an independent
# draw (a second 32-step teacher run), and each starts inside the band or near its edge (a
# single draw falls outside ±2 sd about one time in twenty).

# %%
rec.figure("shift_uncond", shift.shift_curves(study_u))

# %% [markdown]
# Where the student's step is wrong: the RMS distance between one student DDIM step and the
# teacher's substep walk from the same state (the PD target), on forward states (dashed line,
# open squares: where PD trains) and on the student's own inference states (solid line,
# filled circles: where it is used); colour: the arm.

# %%
rec.figure("step_error_uncond", shift.step_errors(study_u))

# %% [markdown]
# The numbers, mean ± std over seeds. Sample quality: `mmd_x1e3`, the squared MMD x1000
# between the policy's samples and the 32-step teacher's (the *unbiased* estimator: its
# expected value is 0 for identical distributions, so values near 0 may come out slightly
# negative; read a negative value as "as close as sampling noise can tell"), `nll` under the
# true mixture (nats), `off_mode` the fraction of samples far from every mode. Then the sums
# of the per-step curves above. The verdict lines say whether DDIL's change is larger than
# the seeds' noise.

# %%
rows_u = {k: nb.seed_lists(v) for k, v in study_u.rows.items()}
display(Markdown(nb.markdown_table(rows_u, table_keys)))
nb.show_lines([nb.verdict(study_u.rows, "baseline", "ddil"),
               nb.verdict(study_u.rows, "baseline", "ddil", "nll")])
rec.log("uncond", {k: nb.seed_mean(v) for k, v in study_u.rows.items()})

# %% [markdown]
# ## 3. Under classifier-free guidance
#
# A class-conditional mixture (two classes of four modes on a ring) and the guided teacher
# $\hat x_0^w = \hat x_0^u + w(\hat x_0^c - \hat x_0^u)$. Shading is now $q_t(x \mid c=0)$,
# the forward marginal of class 0, and dots are class-0 trajectories. Move the guidance
# slider: at $w = 1$ the teacher stays on $q_t(x\mid c)$; as $w$ grows its states leave it
# (the W1 in each title), so forward states $q_t(x\mid c)$ no longer show the student where
# its sampler goes.

# %%
guided = make_backend("guided", guidance=guidance, init_steps=init_steps)
nb.explore(shift.teacher_over_marginals, {"guidance": (1.0, 10.0, 0.5), "n_steps": (1, 8, 1)},
              {"guidance": guidance, "n_steps": n_steps}, rec, "teacher_guided", widgets,
              backend=guided, label=0, n=n_eval // 2)

# %%
study_g = shift.shift_study(guided, "pd", ("baseline", "ddil"), **train_kw)
rec.figure("states_guided", shift.states_over_marginals(guided, study_g.trajs, study_g.ref.cond,
                                                     label=0, train_states=study_g.train_states))

# %%
rec.figure("shift_guided", shift.shift_curves(study_g))

# %%
rec.figure("step_error_guided", shift.step_errors(study_g))

# %% [markdown]
# ## 4. Side by side: samples and numbers
#
# Final samples of each policy from the same noise, coloured by class (crosses: the modes).

# %%
rec.figure("samples_guided", common.sample_panels({k: t.sample for k, t in study_g.trajs.items()},
                                              guided, study_g.ref.cond))

# %%
rows_g = {k: nb.seed_lists(v) for k, v in study_g.rows.items()}
display(Markdown(nb.markdown_table(rows_g, table_keys)))
nb.show_lines([nb.verdict(study_g.rows, "baseline", "ddil"),
               nb.verdict(study_g.rows, "baseline", "ddil", "nll"),
               nb.verdict(study_g.rows, "baseline", "ddil", "off_mode")])
rec.log("guided", {k: nb.seed_mean(v) for k, v in study_g.rows.items()})
print("metrics and figures in", rec.save())

# %% [markdown]
# ## What to read, and what to try
#
# Figures and `metrics.json` are in `out_dir` (a relative `out_dir` is under the repository
# root, wherever the notebook runs; `run/wall_s` is the run's time).
#
# - **Unconditional**: the teacher's and the students' states sit on $q_t$ (small `gap`,
#   close to the teacher's own). There is little covariate shift to correct, and DDIL is
#   expected to change little; the verdict lines above say whether it did, against the
#   seeds' noise.
# - **Guided**: the guided teacher (and any student that imitates it) leaves $q_t(x\mid c)$
#   far behind (large `gap`), while DDIL's training states follow the sampler (a smaller
#   `train_gap` than the baseline's). Whether that buys better samples at this budget is what the verdict lines
#   measure; the toy table (notebook 03) has more seeds.
# - Try: `guidance` 1, 3, 9; `n_steps` 2 or 8; `ddil_share=1.0` (rollouts only); more `steps`;
#   `setting="grid25"`; fewer `substeps` (a cheaper, cruder target).
