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
# # 04 · Reflected distillation: thresholding x0
#
# The data lives in a bounded support, here the box $[-1, 1]^2$, as images live in
# $[-1, 1]$ per pixel. Nothing forces a model's estimate $\hat x_0(x_t, t)$ to stay there,
# and **classifier-free guidance** $\hat x_0^w = \hat x_0^u + w(\hat x_0^c - \hat x_0^u)$
# extrapolates it outwards. The DDIL paper (Sec. 4.1) adopts *reflected diffusion* (Lou &
# Ermon, 2023) for distillation: threshold the estimates to the support, which it reports
# makes training more stable, needs smaller batches and improves results. It thresholds
#
# - the teacher's $\hat x_0$, for every method (PD, LCM, DMD2);
# - the consistency target of LCM;
# - DMD2's real score (teacher), fake critic and generator.
#
# Because DDIM derives its noise direction from $\hat x_0$, clamping $\hat x_0$ also changes
# where the next state goes. This notebook shows what thresholding does (1) to the guided
# teacher's $\hat x_0$, (2) to each method's regression targets, and (3) to DMD2 trained with
# a small batch, over seeds, and (4) why reflection can make that DMD2 *worse*, not better.
#
# **What you will see** (a few minutes at the defaults on a 2-core CPU: `docs/notebooks.md`
# has measured times; the DMD2 cell shows one progress bar per run, named by arm and seed):
#
# 1. the guided teacher's raw and clamped $\hat x_0$ per step (sliders);
# 2. each method's targets with and without reflection, and a table of how many leave the box;
# 3. DMD2 at batch 8 over seeds (the toy recipe of `docs/dmd2.md`: DMD's regression loss on,
#    `dmd2_regression`; 0 is DMD2's own recipe): generator loss and sample quality during
#    training, the critic's loss, and a table with verdict lines;
# 4. what this run found, why reflection can make it worse, and the settings searched for
#    the paper's claim.

# %% tags=["parameters"]
out_dir: str = "runs/notebooks/04_reflected"  # figures and metrics.json go here
setting: str = "guided"  # toy setting: guided (ring8_cond under CFG), ring8, imbalanced, grid25
teacher: str = "exact"  # exact (closed-form posterior mean) or mlp (a trained, imperfect one)
guidance: float = 9.0  # classifier-free guidance scale w of the teacher (the toy table uses 6)
n_steps: int = 4  # student inference steps
thresholding: bool = True  # draw the thresholded estimates next to the raw ones
n_eval: int = 2000  # states and samples drawn for plots and metrics
dmd2_arms: list = ["baseline", "reflected", "ddil+reflected"]  # DMD2 arms of the stability runs
dmd2_steps: int = 300  # gradient steps of each DMD2 run
dmd2_batch_size: int = 8  # generator batch: small, like the paper's DMD2 with batch 7
critic_steps: int = 5  # DMD2 fake-critic updates per generator update
dmd2_regression: float = 10.0  # DMD2: weight of DMD's regression loss (10: the toy recipe of docs/dmd2.md; 0: DMD2's own)
lr: float = 1e-3  # AdamW learning rate
eval_every: int = 25  # steps between sample-quality checks during training
seeds: list = [0, 1, 2]  # one separate run per seed (each keeps its own loss curve)
init_steps: int = 1000  # training steps of the MLP denoiser the students start from
widgets: bool = True  # show controls under the static figures (in a widget-enabled frontend)

# %%
from IPython.display import Markdown, display

from ddil_lab import notebook as nb
from ddil_lab.toy import make_backend
from ddil_lab.toy.lessons import common, reflection

nb.check_parameters()  # a mistyped papermill parameter stops the run here
nb.setup(threads=1, seed=seeds[0])
rec = nb.Recorder(out_dir)
backend = make_backend(setting, teacher=teacher, guidance=guidance, init_steps=init_steps)

# %% [markdown]
# ## 1. The teacher's x0 along its own trajectory
#
# Red: the raw $\hat x_0$ the guided teacher predicts at the states of its trajectory; blue:
# the same clamped to the support (dashed box). Titles give the fraction outside. Move the
# guidance slider: at $w=1$ the exact teacher is a posterior mean, an average of data
# points, so it stays inside the box (up to the Gaussians' tails); guidance extrapolates,
# and past some $w$ its estimates leave the box.
#
# *Controls* redraw the figure in place. The kernel runs one thing at a time, so while later
# cells are still running (e.g. during Run All) a moved control redraws only once they have
# finished.

# %%
nb.explore(reflection.teacher_x0, {"guidance": (1.0, 10.0, 0.5), "thresholding": bool},
              {"guidance": guidance, "thresholding": thresholding}, rec, "teacher_x0", widgets,
              backend=backend, n_steps=n_steps, n=n_eval)

# %%
traj, cond = common.teacher_trajectory(backend, n_steps, n=n_eval)
outside = {f"t{t}": reflection.outside_support(x0)
           for t, x0 in zip(traj.grid, reflection.teacher_x0_along(backend, traj, cond))}
nb.show_lines([f"share of the teacher's x0 outside the box per step ({n_eval} states, as in "
               "the figure's titles): " + ", ".join(f"t = {t[1:]}: {100 * v:.0f}%"
                                                   for t, v in outside.items())])
rec.log("teacher_x0_outside", outside)
samples_outside = reflection.outside_support(traj.sample)  # the teacher's samples

# %% [markdown]
# ## 2. What the students are taught
#
# On the same teacher-trajectory states: PD's target (the $x_0$ that lands where the
# teacher's substeps land), LCM's consistency target (the EMA student after one teacher
# DDIM step) and DMD2's (the point $x - g$ its generator is pulled to), each without and
# with reflected distillation.

# %%
report = reflection.target_report(backend, n_steps=n_steps, n=n_eval // 2)
rec.figure("targets", reflection.target_scatter(report))

# %%
rows = {f"{m} {arm}": {k: v for k, v in d.items() if k in ("outside", "max_abs", "pull_rms")}
        for m, arms in report.items() for arm, d in arms.items()}
display(Markdown(nb.markdown_table(rows, ["outside", "max_abs", "pull_rms"])))
rec.log("targets", rows)

# %% [markdown]
# ## 3. DMD2 with a small batch, over seeds
#
# One run per seed and arm, each with batch `dmd2_batch_size`. Top: the generator loss
# $\frac12\lVert g\rVert^2$ with $g = (\hat x_0^\text{fake} - \hat x_0^\text{real}) /
# \text{mean}|x - \hat x_0^\text{real}|$ (a normalised distribution-matching gradient, not
# a fit: it need not fall; with `dmd2_regression` > 0 the logged loss adds the regression
# term, which does fall) and, below, the MMD of the student's 4-step samples to the
# 32-step teacher during training. Stability shows as curves that stay together and settle;
# instability as spikes, spread between seeds, or skipped non-finite updates.
#
# Two things to check in the table below. `max_loss`: a value many orders above 1 means the
# normaliser $\text{mean}|x - \hat x_0^\text{real}|$ collapsed, which happens when the
# clamped generator output and the clamped teacher estimate land on the same corner of the
# box. `raw_outside`: thresholding the generator's output inside the loss also blocks the
# gradient of every clamped coordinate, so nothing stops the *raw* output from drifting off
# the support; this column shows how much of it did.

# %%
runs = reflection.stability_runs(backend, "dmd2", dmd2_arms, seeds, steps=dmd2_steps,
                            batch_size=dmd2_batch_size, lr=lr, n_steps=n_steps,
                            eval_every=eval_every, n_eval=min(500, n_eval),
                            method_kw={"critic_steps": critic_steps,
                                       "regression_weight": dmd2_regression})
rec.figure("dmd2_stability", reflection.stability(runs, "loss/student"))

# %% [markdown]
# The fake critic's denoising loss on the generator's samples, per run (its sample-quality
# panels would repeat the ones above).

# %%
rec.figure("dmd2_critic", reflection.stability(runs, "loss/critic", quality=False))

# %% [markdown]
# Per arm (mean ± std over seeds): `final_mmd` (squared MMD x1e3 of the 4-step samples to
# the 32-step teacher's, at the end), `max_loss` (largest generator loss), `on_edge` (share
# of samples with a coordinate exactly on the edge of the box, where a clamp leaves every
# estimate that was outside), `raw_outside` (share of the student's *unclamped* $\hat x_0$
# along its own trajectories that lie off the box) and `skipped` (non-finite updates).

# %%
keys = ["final_mmd", "max_loss", "on_edge", "raw_outside", "skipped"]
per_seed = {arm: [{k: r[k] for k in keys} for r in rs] for arm, rs in runs.items()}
display(Markdown(nb.markdown_table({a: nb.seed_lists(v) for a, v in per_seed.items()},
                                      keys, fmt="{:.4g}")))
nb.show_lines([nb.verdict(per_seed, dmd2_arms[0], arm, "final_mmd") for arm in dmd2_arms[1:]])
rec.log("dmd2", {arm: nb.seed_mean(v) for arm, v in per_seed.items()})

# %% [markdown]
# ## 4. Why reflection can make small-batch DMD2 worse
#
# The paper reports that reflection *stabilises* DMD2 with small batches. The cell below
# writes what this run found, from its numbers (the `reflected` arm against the baseline, and
# the `on_edge` column: samples with a coordinate exactly on the edge of the box, where a
# clamp leaves every estimate that was outside). Where reflection makes it worse, why:
#
# - **The clamped real score points at the edge.** DMD2 pulls the generator by
#   $g \propto \hat x_0^\text{fake} - \hat x_0^\text{real}$ at a random noise level
#   $\tau$. Under guidance the teacher's $\hat x_0$ at noisy $\tau$ lies *outside* the box
#   (section 1), so the reflected teacher's estimate sits *on its edge*: clamping moves the
#   target of the distribution matching from "the data" to "the edge of the box", and the
#   generator follows it. Section 2's table shows DMD2's reflected targets still leave the
#   box.
# - **The clamp also blocks the way back.** The generator's output is clamped inside the loss,
#   whose derivative is 0 outside the box: a coordinate that has left it gets no gradient and
#   stays (`raw_outside`). In the search in `docs/notebooks.md` this was not the main cause: a
#   straight-through clamp (clamped forward, gradient passed) was no better.
# - **Small batches make each pull noisier** (batch `dmd2_batch_size`, lr `lr`): a few large
#   steps put samples on the edge, and the edge is where the clamped target keeps them.

# %%
base, refl = dmd2_arms[0], next((a for a in dmd2_arms[1:] if a == "reflected"), dmd2_arms[-1])
template, values = reflection.findings(per_seed, base, refl, samples_outside, guidance)
nb.fill(template, rec, "findings", **values)
print("metrics and figures in", rec.save())

# %% [markdown]
# **Is there a regime where the paper's claim holds on this toy?** `docs/dmd2.md` measured it
# (`python experiments/dmd2_search.py --claims`: batch 7, 16 and 64, with and without
# reflection and DDIL, 3 seeds, a 12-mode ring at w 1 and 6, 1000 steps). Where DMD2 works (the
# regression recipe used here) no run failed at any batch, so there was no instability for
# reflection to fix, and reflection's point estimates were worse at w = 6 (not significant).
# For DMD2's own recipe (`dmd2_regression=0`) every w = 6 run failed (worse than the teacher's
# own 4-step sampler) and reflection left one of three runs below that line at batch 7 and 16,
# lowering the mean: the direction the paper reports, one seed each, not measurable at 3
# seeds. Earlier searches of this notebook's settings without the regression loss
# (`docs/notebooks.md`: guidance 6 and 9, batch 8 and 64, lr $10^{-3}$ and $10^{-4}$, 1 and 5
# critic steps, a straight-through clamp) found reflection worse or no different in every
# one. Reflection as wired here (every estimate hard-clamped, as the paper's Sec. 4.1 lists)
# keeps samples on the support but not on the data; a softer wiring (e.g. clamping only where
# the teacher is queried at low noise) is a question for the method, not settled here.
#
# ## What to read, and what to try
#
# - Thresholding only acts where estimates leave the support: the exact unguided teacher
#   never does, the guided one does at the early, noisy steps, which is where targets get
#   extreme and gradients noisy.
# - The verdict lines compare the final sample quality of each arm in standard errors over
#   the seeds; the curves show whether runs wander. Read `on_edge` and `raw_outside` next to
#   them: a reflected arm that is worse and has many samples on the edge lost coordinates to
#   the clamp.
# - Try: `dmd2_regression=0` (DMD2's own recipe); `guidance` 1 (nothing to clamp), 3, 6;
#   `lr=1e-4`; `dmd2_batch_size` 4 or 64; `critic_steps=1`; `setting="ring8"`; more `seeds`.
