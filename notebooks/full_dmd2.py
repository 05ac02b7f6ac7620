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
# # Full tier: DMD2 + DDIL on SSD-1B
#
# The paper's DMD2 recipe (DDIL, Sec. 5 "DMD2 + DDIL") on SSD-1B (or SD1.5), headless through
# papermill: a 4-step generator trained by distribution matching against the guided teacher
# (real score) and a fake critic updated 10 times per generator step, an optional GAN head on
# the critic's features, batch 7. Reflected thresholding on teacher, critic and generator
# (`threshold`). DMD2+DDIL draws generator inputs from mixed teacher/student rollouts run down
# to a chosen noise level (`rollout_t`, t = 500) as well as from the student's own rollouts;
# `ddil=False` is DMD2's backward simulation alone.
#
# Headless, one GPU (every parameter below can be set with `-p name value`, dicts and lists with
# `-y "name: value"`):
#
# ```bash
# papermill notebooks/full_dmd2.ipynb runs/full_dmd2.ipynb \
#     -p model_id segmind/SSD-1B -p data <imagefolder> -p out_dir runs/full_dmd2
# ```
#
# Several GPUs: `experiments/train_full.py --config experiments/configs/dmd2.yaml` under
# `accelerate launch` runs the same recipe (docs/full.md). `model_id="tiny"` builds a random
# tiny pipeline (and random tiny data) in the output folder, so the notebook runs on a CPU in
# seconds; the tests run it so with 2 training steps per stage.

# %% tags=["parameters"]
from typing import Optional  # for the annotations below

# ---- model and data ----
model_id: str = "segmind/SSD-1B"  # hub id, local pipeline folder, or "tiny"
tiny_kind: str = "sdxl"  # random pipeline shape for model_id "tiny": "sd15" or "sdxl"
data: Optional[str] = None  # imagefolder (metadata.jsonl), save_to_disk folder or datasets name
prompts: Optional[str] = None  # prompts file; without data: data-free (teacher rollouts)
resolution: Optional[int] = None  # training image side in pixels (None: the UNet's native size)
latent_cache: Optional[str] = None  # .safetensors path: encode the data with the VAE once
# ---- guidance (w_min equal to w_max: one fixed w; a range: w embedded in the student) ----
w_min: float = 8.0  # smallest guidance scale w of the teacher (the real score)
w_max: float = 8.0  # largest guidance scale w of the teacher (the real score)
# ---- the student ----
n_steps: int = 4  # inference steps of the final student (4: timesteps 999, 749, 500, 250)
# ---- DDIL: where training states come from (the four priors sum to 1) ----
ddil: bool = True  # False: the baseline (PD, LCM: forward states; DMD2: backward simulation)
beta_frwd: float = 0.0  # prior of forward-diffused data states
beta_teacher_bckwrd: float = 0.0  # prior of teacher rollout states
beta_student_bckwrd: float = 0.5  # prior of student rollout states
beta_mixed: float = 0.5  # prior of mixed teacher/student rollout states
p_student: float = 0.5  # in mixed rollouts, the probability that the student takes a step
prior_schedule: str = "constant"  # "constant" or "student_selection" (ramp)
ramp_steps: int = 1000  # student selection: from data only to the priors over k steps
buffer_size: int = 0  # DAgger aggregation buffer per source (0: fresh rollouts)
refresh_every: int = 1  # with a buffer: roll out new states every k steps
# ---- reflected thresholding of x0 estimates in latent space ----
threshold: str = "dynamic"  # "none", "static" (clamp) or "dynamic" (Imagen quantile)
latent_lo: float = -4.0  # lower end of the latent support
latent_hi: float = 4.0  # upper end of the latent support
threshold_ratio: float = 0.995  # dynamic thresholding quantile
threshold_max: float = 1.5  # dynamic thresholding: largest scale, in support half-widths
# ---- optimisation (AdamW, warmup, linear schedule) ----
batch_size: int = 7  # global batch, split over processes
lr: float = 1e-05  # AdamW learning rate
warmup: int = 500  # linear warmup steps (each stage and part restarts it)
lr_schedule: str = "linear"  # after warmup: "constant", "linear" or "cosine" decay
weight_decay: float = 0.01  # AdamW weight decay
grad_clip: float = 1.0  # gradient norm clipping
ema_decay: Optional[float] = None  # EMA of the student weights (None: off)
seed: int = 0  # random seed
max_steps: Optional[int] = None  # cap on the training steps of every stage (smoke tests)
# ---- precision and memory ----
mixed_precision: str = "bf16"  # frozen teacher, VAE, text encoders in "bf16", "fp16" or "no"
gradient_checkpointing: bool = True  # on the trained UNets
lora_rank: int = 0  # above 0: train LoRA adapters of this rank instead of all weights
device: str = "auto"  # "auto" (accelerate's, else cuda if available, else cpu) or a device
# ---- output, checkpoints, monitoring ----
out_dir: str = "runs/full_dmd2"  # run folder: stages, samples, loss plot, pipeline, eval
resume_from: Optional[str] = None  # a previous run folder: finished stages load, the rest resumes
ckpt_every: int = 500  # checkpoint every k steps (0: none; stages still save their student)
keep_stage_checkpoints: bool = False  # keep the optimizer checkpoints of finished stages
sample_every: int = 500  # sample grid and loss plot every k steps (and at each stage end)
n_samples: int = 8  # images per sample grid
log_every: int = 10  # history record every k steps
log_with: str = "tensorboard"  # run tracking: "tensorboard" (in out_dir), "wandb" or "none"
progress: bool = True  # progress bars
# ---- evaluation of the exported pipeline (the paper's protocol) ----
metrics: str = "auto"  # "auto" (skip metrics without weights), "required", "tiny" or "none"
eval_captions: Optional[str] = None  # captions file, e.g. COCO 2017 val (None: the prompts)
n_eval: int = 5000  # images for FID and CLIP score (COCO 2017-5K)
eval_guidance: float = 8.0  # w for a guidance-conditioned student at inference
fid_reference: Optional[str] = None  # reference images folder or features file for FID
clip_model: str = "ViT-g-14"  # open_clip model of the CLIP score
clip_pretrained: str = "laion2b_s34b_b88k"  # open_clip weights of the CLIP score
lpips_prompts: int = 50  # LPIPS diversity: prompts (0: skip)
lpips_seeds: int = 10  # LPIPS diversity: images per prompt
eval_batch: int = 8  # images per generation batch
# ---- DMD2: distribution matching with a fake critic ----
steps: int = 30000  # generator updates
critic_steps: int = 10  # fake-critic updates per generator update
critic_lr: Optional[float] = None  # critic learning rate (None: lr)
gan_weight: float = 0.0  # GAN head on the critic's features: generator loss weight (0: off)
gan_critic_weight: float = 1.0  # GAN head: critic loss weight
tau_min: float = 0.02  # distribution matching at tau in [tau_min, tau_max] x T
tau_max: float = 0.98  # distribution matching at tau in [tau_min, tau_max] x T
rollout_t: int = 500  # DDIL: rollouts stop at this noise level (0: the whole grid)

# %% [markdown]
# ## Check the parameters
#
# One `ValueError` names every bad parameter, its value and what is allowed (the same checks as
# `experiments/train_full.py`); then the plan: each stage's steps, grid, teacher and states.

# %%
from ddil_lab import notebook as nb
from ddil_lab import sd

nb.check_parameters()  # a mistyped papermill parameter stops the run here

recipe = sd.from_namespace("dmd2", globals())
print(recipe.summary())

# %% [markdown]
# ## Train, export, evaluate
#
# First the memory plan (`ddil_lab.sd.plan_memory`: predicted peak memory per process, by part,
# and which GPU sizes it fits). Progress bars per stage; every `sample_every` steps (and at the
# end of each stage) a grid of
# samples of the current student on fixed noise and prompts, and the loss plot (split by the
# source of the training states), saved under `out_dir` and shown here. Then the student is
# exported as a diffusers pipeline and evaluated with the paper's protocol (FID, CLIP score,
# LPIPS diversity, HPSv2 where available; a metric whose weights are missing is skipped with a
# note unless `metrics="required"`). With `log_with="tensorboard"` the losses (per state source),
# learning rate, NFE, sample grids and metrics go to `out_dir/tensorboard`
# (`tensorboard --logdir <out_dir>/tensorboard`); `log_with="wandb"` sends them to wandb.

# %%
result = sd.run_full(recipe, callbacks=[sd.show_progress])

# %% [markdown]
# ## Results
#
# Load the exported pipeline elsewhere with
# `pipe, kw = ddil_lab.sd.load_student_pipeline(path)` and sample with `pipe(prompt, **kw)`.

# %%
sd.show_result(result)
