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
# # Full tier: Progressive Distillation + DDIL on Stable Diffusion
#
# The paper's PD recipe (DDIL, Sec. 5 "PD + DDIL") on SD1.5, headless through papermill:
#
# 1. **eps -> v conversion** (`v_steps`, 4K): the student (a copy of the teacher's UNet with a
#    zero-initialised guidance embedding) learns to predict v, matching the unguided teacher;
# 2. **guidance conditioning** (`gc_steps`, 6K; 10K with stage 1): it matches the guided teacher
#    at w ~ U[2, 14], fed to its w embedding, giving the checkpoint SD(gc);
# 3. **progressive halving** 32 -> 16 -> 8 -> 4 (-> 2) in v space, each stage's student teaching
#    the next: 32->16 for 5K steps, 16->8 for 6K + 4K, 8->4 and 4->2 for 8K + 6K (a second part
#    restarts the warmup, as in the paper); the 4-step student samples at 999, 749, 500, 250.
#
# PD+DDIL trains the halving stages on forward states and mixed teacher/student rollouts
# (`beta_frwd`, `beta_mixed`, with the student-selection ramp); `ddil=False` is the baseline.
# AdamW 1e-5 with warmup and a linear schedule, batch 224, reflected (thresholded) teacher.
#
# Headless, one GPU (every parameter below can be set with `-p name value`, dicts and lists with
# `-y "name: value"`):
#
# ```bash
# papermill notebooks/full_pd.ipynb runs/full_pd.ipynb \
#     -p model_id runwayml/stable-diffusion-v1-5 -p data <imagefolder> -p out_dir runs/full_pd
# ```
#
# Several GPUs: `experiments/train_full.py --config experiments/configs/pd.yaml` under
# `accelerate launch` runs the same recipe (docs/full.md). `model_id="tiny"` builds a random
# tiny pipeline (and random tiny data) in the output folder, so the notebook runs on a CPU in
# seconds; the tests run it so with 2 training steps per stage.

# %% tags=["parameters"]
from typing import Optional  # for the annotations below

# ---- model and data ----
model_id: str = "runwayml/stable-diffusion-v1-5"  # hub id, local pipeline folder, or "tiny"
tiny_kind: str = "sd15"  # random pipeline shape for model_id "tiny": "sd15" or "sdxl"
data: Optional[str] = None  # imagefolder (metadata.jsonl), save_to_disk folder or datasets name
prompts: Optional[str] = None  # prompts file; without data: data-free (teacher rollouts)
resolution: Optional[int] = None  # training image side in pixels (None: the UNet's native size)
latent_cache: Optional[str] = None  # .safetensors path: encode the data with the VAE once
# ---- guidance (w_min equal to w_max: one fixed w; a range: w embedded in the student) ----
w_min: float = 2.0  # smallest guidance scale w of the teacher
w_max: float = 14.0  # largest guidance scale w of the teacher
# ---- the student ----
n_steps: int = 4  # inference steps of the final student (4: timesteps 999, 749, 500, 250)
# ---- DDIL: where training states come from (the four priors sum to 1) ----
ddil: bool = True  # False: the baseline (PD, LCM: forward states; DMD2: backward simulation)
beta_frwd: float = 0.5  # prior of forward-diffused data states
beta_teacher_bckwrd: float = 0.0  # prior of teacher rollout states
beta_student_bckwrd: float = 0.0  # prior of student rollout states
beta_mixed: float = 0.5  # prior of mixed teacher/student rollout states
p_student: float = 0.5  # in mixed rollouts, the probability that the student takes a step
prior_schedule: str = "student_selection"  # "constant" or "student_selection" (ramp)
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
batch_size: int = 224  # global batch, split over processes
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
out_dir: str = "runs/full_pd"  # run folder: stages, samples, loss plot, pipeline, eval
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
# ---- PD: eps to v conversion, guidance conditioning, progressive halving ----
start_steps: int = 32  # the teacher's discretisation, halved down to n_steps
v_steps: int = 4000  # eps to v conversion stage (0: skip)
gc_steps: int = 6000  # guidance-conditioning stage, w ~ U[w_min, w_max] embedded (0: skip)
match_grid: int = 256  # timesteps of the v and gc stages (a multiple of start_steps)
# stage_steps: steps of each halving stage (key: its student steps), one per part
stage_steps: dict = {16: [5000], 8: [6000, 4000],
                     4: [8000, 6000], 2: [8000, 6000]}  # steps per halving stage and part
space: str = "v"  # loss and student prediction space: "v" or "x0"

# %% [markdown]
# ## Check the parameters
#
# One `ValueError` names every bad parameter, its value and what is allowed (the same checks as
# `experiments/train_full.py`); then the plan: each stage's steps, grid, teacher and states.

# %%
from ddil_lab import notebook as nb
from ddil_lab import sd

nb.check_parameters()  # a mistyped papermill parameter stops the run here

recipe = sd.from_namespace("pd", globals())
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
