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
# # 05 · The same story on pixels
#
# Notebooks 01–04 showed covariate shift and mode loss on 2D mixtures, where everything is
# exact. Here the same `distill(...)`, the same `StateSampler` and the same Methods run on
# **images**; only the backend changes (`ImageBackend`: a small `diffusers.UNet2DModel`
# teacher on pixels in $[-1, 1]$).
#
# The default data set needs no download and runs on a laptop CPU: scikit-learn's bundled
# handwritten **digits**, upsampled to 16x16, whose 10 classes are the known modes. With
# `data="cifar10"` (and `root`, a GPU and a teacher trained with the recipe in
# `docs/image.md`) the same cells give the CIFAR-10 table.
#
# We train (or load) a teacher, distil 4-step **PD**, **LCM** and **DMD2** students with and
# without **DDIL**, and compare them on the same noise:
#
# - **FID** in the features of a small classifier trained here on the digits (Inception on
#   CIFAR-10), with precision / recall;
# - **mode coverage**: the classifier's class histogram of the samples, its coverage and its
#   total variation (TV) to the data's class weights;
# - **diversity**: pairwise LPIPS among samples of the same conditioning (the paper's
#   protocol), or classifier-feature distances when LPIPS' weights cannot be downloaded;
# - **covariate shift per step**: the Fréchet distance, in 8x8-pooled pixels, between the
#   states a student visits at $t$ and forward-diffused data $q_t$ — the states forward-only
#   training sees. The dotted line is the estimate's floor (two forward sets).
#
# With the defaults this takes about 35 minutes on a 2-core CPU, plus about 25 for the teacher
# the first time (it is then loaded from `teacher_dir`). Measured numbers: `docs/image.md`.

# %% tags=["parameters"]
out_dir: str = "runs/notebooks/05_image_toy"  # figures and metrics.json go here
data: str = "digits"  # "digits" (offline, 1x16x16) or "cifar10" (needs root)
root: str = ""  # CIFAR-10 folder holding cifar-10-batches-py/ (for data "cifar10")
teacher_dir: str = "runs/image_teacher_digits"  # teacher checkpoint folder ("": in memory)
teacher_steps: int = 2000  # teacher training steps (when trained or resumed here)
tiny_net: bool = False  # a tiny teacher UNet: quick runs only, not a usable teacher
conditional: bool = False  # class-conditional students (else unconditional: classes are modes)
guidance: float = 1.0  # classifier-free guidance scale w of the teacher (w > 1 needs labels)
methods: list = ["pd", "lcm", "dmd2"]  # distillation methods
arms: list = ["baseline", "ddil"]  # arms: baseline, ddil, reflected, ddil+reflected
steps: int = 200  # distillation steps per arm
batch_size: int = 64  # training states per step
lr: float = 1e-4  # AdamW learning rate of the students
share: float = 0.5  # DDIL: fraction of each batch from rollouts
buffer_size: int = 256  # DDIL aggregation buffer of rollout states (0: fresh rollouts)
critic_steps: int = 2  # DMD2 critic updates per generator update (10 in the paper)
n_eval: int = 500  # evaluation samples per arm
classifier_steps: int = 600  # training steps of the digits classifier (FID features, histogram)
diversity: str = "auto"  # "auto", "lpips", "features" or "none"
device: str = "cpu"  # "cpu" or "cuda"
threads: int = 1  # torch CPU threads (1 is fastest on a busy 2-core machine)
seed: int = 0  # seed of the students

# %%
from IPython.display import Markdown, display

from ddil_lab import notebook as nb
from ddil_lab.image import TINY_NET, ImageBackend
from ddil_lab.image.metrics import ImageEvaluator
from ddil_lab.image.plots import grids, shift_curves
from ddil_lab.train import train_arm

nb.check_parameters()  # a mistyped papermill parameter stops the run here
nb.setup(threads=threads, seed=seed)
rec = nb.Recorder(out_dir)
teacher_kw = {"net": TINY_NET} if tiny_net else {}
sampler_kw = {"share": share, "buffer_size": buffer_size, "refresh_size": buffer_size // 4}
table_keys = ["fid", "precision", "recall", "coverage", "tv", "diversity", "shift_sum"]

# %% [markdown]
# ## 1. The teacher
#
# `ImageBackend` loads the teacher from `teacher_dir`, resumes its training there, or trains
# it (`train_teacher`: v-prediction, EMA, safetensors checkpoints). The network is wrapped to
# predict $x_0$, like every model in the library; students and DMD2's critic start as copies
# of it.

# %%
backend = ImageBackend(data, root=root or None, teacher_dir=teacher_dir or None,
                       teacher_steps=teacher_steps, conditional=conditional or guidance != 1.0,
                       guidance=guidance, device=device, seed=seed, **teacher_kw)
ev = ImageEvaluator.for_backend(backend, classifier_steps, n=n_eval, diversity=diversity)
results = ev.reference_rows()
display(Markdown(f"`{backend}`; classifier held-out accuracy: "
                 f"{getattr(ev.classifier, 'accuracy', None)}; diversity: {ev.diversity_kind}"))
rec.figure("teacher", grids(results))

# %% [markdown]
# ## 2. Distil 4-step students, with and without DDIL
#
# Each arm trains with the same steps, batch and learning rate (`ddil_lab.train.train_arm`,
# the same arms as the toy table): *baseline* on forward-diffused states only; *ddil* with
# half of each batch from rollouts (PD and DMD2: mixed teacher/student rollouts; LCM: the
# student's own trajectories).

# %%
for method in methods:
    for arm in arms:
        view = train_arm(backend, method, arm, seeds=[seed], steps=steps, batch_size=batch_size,
                         lr=lr, ensemble=False, sampler_kw=sampler_kw,
                         method_kw={"critic_steps": critic_steps} if method == "dmd2" else None)[0]
        results[f"{method} {arm}"] = ev.evaluate(view, with_samples=True)

# %% [markdown]
# ## 3. Samples per arm, from the same noise

# %%
rec.figure("samples", grids(results))

# %% [markdown]
# ## 4. The metrics table
#
# FID (lower is better), precision/recall, coverage and TV of the class histogram to the
# data's class weights (lower TV: modes kept in proportion), diversity (higher: more varied
# samples per conditioning) and the summed covariate shift above the floor.

# %%
display(Markdown(nb.markdown_table(results, table_keys)))
rec.log("table", results)

# %% [markdown]
# ## 5. Covariate shift per step
#
# At $t = 999$ every policy starts from pure noise, so all curves start at the floor. The
# further a student's states at later steps sit above the floor (and above the teacher's),
# the further they are from the states forward-only training showed it.

# %%
rec.figure("shift", shift_curves(results, ev.grid, ev.shift_floor).figure)
rec.save()
