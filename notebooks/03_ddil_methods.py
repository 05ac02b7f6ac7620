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
# # 03 · PD, LCM and DMD2, with and without DDIL and reflected distillation
#
# DDIL separates two choices that every distillation method makes (paper, Sec. 4.1):
# **the feedback** (the loss: progressive distillation, consistency distillation as in
# LCM, or DMD2's distribution matching) and **the training distribution** (which states
# $x_t$ the student is trained on). DDIL changes only the second: it draws states from
# forward diffusion of the data (prior $\beta_\text{frwd}$), teacher rollouts
# ($\beta_\text{teacher\_bckwrd}$), student rollouts ($\beta_\text{student\_bckwrd}$) and
# mixed teacher/student rollouts (DAgger), and applies the method's own loss to all of them
# (Algorithm 1). Reflected distillation additionally clamps $\hat x_0$ to the data support.
#
# Part 1 runs the **toy table**, the toy counterpart of the paper's Tables 2 and 3: each
# method as baseline, +DDIL, +reflected and +DDIL+reflected with the same budget, evaluated
# against the exact teacher (`experiments/toy_table.py`; the quick setting by default).
# Part 2 opens the StateSampler: **where the training states come from, as training
# proceeds**, coloured by source.
#
# **What you will see** (a few minutes at the defaults on a 2-core CPU: `docs/notebooks.md`
# has measured times; the training cells show progress bars):
#
# 1. one compact table of the toy table's arms (sample quality, mean ± std over seeds) with
#    verdict lines, and one figure: the samples of every arm; the full tables and the other
#    figures are written to `out_dir/toy_table/`;
# 2. one student's training states, one row per source, at any snapshot of training (slider),
#    the share of each source over training, and the loss on each source;
# 3. a what-if preview of the StateSampler with other priors (sliders).

# %% tags=["parameters"]
out_dir: str = "runs/notebooks/03_ddil_methods"  # figures and metrics.json go here
table_quick: bool = True  # start from the toy table's quick setting (False: its full default run, ~15 min)
table_overrides: dict = {"settings": ["guided"], "steps": 200, "seeds": [0, 1], "init_steps": 1000}  # toy_table.DEFAULTS keys applied on top
setting: str = "guided"  # toy setting of the sources run: guided, ring8, grid25 or imbalanced
method: str = "pd"  # method of the sources run: pd, lcm or dmd2
beta_frwd: float = 0.4  # prior on forward-diffused data states
beta_teacher_bckwrd: float = 0.2  # prior on teacher-rollout states
beta_student_bckwrd: float = 0.2  # prior on student-rollout states
beta_mixed: float = 0.2  # prior on mixed teacher/student rollout states
p_student: float = 0.5  # in a mixed rollout, the probability that the student takes a step
ramp_steps: int = 150  # student-selection prior: forward only at first, the priors above after this many steps (0: constant)
steps: int = 300  # gradient steps of the sources run
batch_size: int = 256  # training states per step
lr: float = 1e-3  # AdamW learning rate
snapshot_every: int = 50  # steps between snapshots of the training states
n_snapshot: int = 4000  # states drawn per snapshot (over all timesteps and sources)
init_steps: int = 1000  # training steps of the MLP denoiser the students start from
seed: int = 0  # seed of the sources run
widgets: bool = True  # show controls under the static figures (in a widget-enabled frontend)

# %%
import os

from IPython.display import Markdown, display

from ddil_lab import notebook as nb
from ddil_lab.toy import make_backend
from ddil_lab.toy.lessons import sources

nb.check_parameters()  # a mistyped papermill parameter stops the run here
nb.setup(threads=1, seed=seed)
rec = nb.Recorder(out_dir)
priors = {"beta_frwd": beta_frwd, "beta_teacher_bckwrd": beta_teacher_bckwrd,
          "beta_student_bckwrd": beta_student_bckwrd, "beta_mixed": beta_mixed}

# %% [markdown]
# ## 1. The toy table
#
# Every arm of a setting trains with the same gradient steps, batch and learning rate and
# is evaluated from the same noise and labels, against the 32-step exact teacher. Columns:
# NLL of the samples under the true mixture (nats, lower is better), squared MMD x1000 to
# the teacher's samples (unbiased estimator: 0 for the same distribution, slightly negative
# values are sampling noise) and the fraction of samples off every mode. The `teacher`
# rows are the noise floor (a second draw of the 32-step teacher) and plain 4-step DDIM of
# the teacher (the untrained student). With the quick setting the budget is tiny: read the
# table as a demonstration of the pipeline, and the committed full run (`docs/results.md`)
# for results.

# %%
table = sources.run_toy_table(os.path.join(rec.out_dir, "toy_table"), table_quick,
                              **table_overrides)
shown = table["rows"][0]["setting"]
display(Markdown(f"**{shown}**, {len(table['config']['seeds'])} seed(s), "
                 f"{table['config']['steps']} steps per arm\n\n"
                 + nb.markdown_table(sources.compact_table(table["rows"], shown),
                                     list(sources.COMPACT_HEADERS), fmt="{:.4g}")))
nb.show_lines(sources.table_verdicts(table["rows"], shown, label="MMD² x1e3"))
rec.log("table", sources.table_metrics(table["summary"]))

# %% [markdown]
# Samples of each arm from the same noise (seed 0), coloured by class, crosses at the modes:
# what the numbers above summarise. The per-step shift / gap / drift curves and the mode
# histograms of every setting, the full tables (with the train time and the cost per
# sample) and the CSVs are in `out_dir/toy_table/` (`table.md`, `steps_<setting>.png`,
# `modes_<setting>.png`, `summary.csv`).

# %%
samples_png = next(p for p in table["files"] if p.endswith(f"samples_{shown}.png"))
rec.image("table_samples", samples_png)

# %% [markdown]
# ## 2. Where the training states come from
#
# One student, trained on all four sources with the priors above and the paper's
# *student-selection* schedule: early on the student is poor, so states come from the data;
# over `ramp_steps` the priors move to the chosen mix. The figure shows one snapshot of the
# training states: one row per source (forward, teacher, student and mixed rollouts; the
# row label gives the source's share), one column per student timestep, over the grey
# forward marginal $q_t$. Under guidance the states are coloured by class and the crosses
# mark each class's modes at $t$ (the component centres $\alpha_t \mu_k$). The slider picks
# the snapshot (0: the first, after `snapshot_every` steps); the last is shown first, and the
# lines under it say where its states sit, per source.
#
# *Controls* redraw the figure in place; while later cells are still running (Run All) they
# redraw only once those have finished.

# %%
backend = make_backend(setting, init_steps=init_steps)
result, snaps = sources.sources_run(backend, method, priors, p_student, ramp_steps, steps,
                                  batch_size, lr, n_snapshot=n_snapshot,
                                  snapshot_every=snapshot_every, seed=seed)
n_snaps = len(snaps.snapshots)
nb.explore(sources.snapshot_by_source, {"snapshot": (0, n_snaps - 1, 1)},
           {"snapshot": n_snaps - 1}, rec, "sources_over_training", widgets, snapshots=snaps,
           backend=backend, grid=result.method.grid.tolist())
template, values = sources.spread_findings(snaps.snapshots[-1][1], backend,
                                           result.method.grid.tolist())
nb.fill(template, rec, "spread", **values)

# %% [markdown]
# The share of each source among the training states over training (the prior schedule).

# %%
rec.figure("source_fractions", sources.source_fractions(snaps))

# %% [markdown]
# The loss the student sees on each kind of state (`source/<name>` in the training
# history). Forward states are not the states it meets when it samples; the rollout
# sources are.

# %%
rec.figure("source_losses", sources.source_losses(result))

# %% [markdown]
# ## 3. Play with the priors
#
# What the StateSampler would feed this trained student with other priors (normalised to
# sum to one) and another mixed-rollout probability, one row per source as above. With
# `p_student = 0` a mixed rollout is the teacher's, with 1 the student's.

# %%
nb.explore(sources.source_preview, {"beta_frwd": (0.0, 1.0, 0.05),
                                  "beta_teacher_bckwrd": (0.0, 1.0, 0.05),
                                  "beta_student_bckwrd": (0.0, 1.0, 0.05),
                                  "beta_mixed": (0.0, 1.0, 0.05), "p_student": (0.0, 1.0, 0.05)},
              {**priors, "p_student": p_student}, rec, "source_preview", widgets, run=result,
              backend=backend)

# %%
fractions = snaps.source_fractions()
rec.log("sources_final", {s: v[-1] for s, v in fractions.items()})
rec.log("source_loss_final", {s: v[1][-1] for s, v in sources.source_loss_curves(result).items()})
print("metrics and figures in", rec.save())

# %% [markdown]
# ## What to read, and what to try
#
# - In the table, compare each method's arms against the seeds' spread (mean ± std) and read
#   the verdict lines; the teacher rows give the noise floor (a second teacher draw) and what
#   plain 4-step DDIM of the teacher achieves. `out_dir/toy_table/table.md` has every metric.
# - In the snapshots, forward states are noised data of their class, so together they fill
#   $q_t$, while rollout states sit where the sampler goes. Under guidance (the default
#   `setting`) the guided sampler is pushed away from the other class's modes; whether that
#   shows at $t = 500$ and $250$, where the noise still outweighs the data in every state, is
#   what the radii and the own-class shares under the figure say (chance: one over the
#   number of classes). Move the slider to the first snapshots: during the `ramp_steps` ramp
#   most states are forward states (the row labels give the shares).
# - Try: `table_quick=False, table_overrides={}` for the full table (much longer: see the
#   `table_quick` help);
#   `table_overrides={"settings": ["ring8"], "steps": 300}`; `method="dmd2"`;
#   `beta_frwd=0` (no data: the data-free setting, teacher rollouts stand in for the data);
#   `ramp_steps=0`; `p_student=1`.
