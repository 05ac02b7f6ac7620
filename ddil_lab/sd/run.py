"""Running a full-tier recipe (``run_full``): resolve model and data (or build the tiny random
ones), train stage after stage through ``distill`` (each stage's student teaching the next),
watch the run (loss curve, sample grids, progress callbacks), export the student as a diffusers
pipeline, and evaluate it (FID, CLIP score, LPIPS diversity, HPSv2 where available). The
recipes themselves and their validation are in ``ddil_lab.sd.recipes``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from typing import Callable

import torch

from ..hub import OfflineError
from ..methods import DMD2, LCM, PD
from ..rollout import StateSampler
from .recipes import TINY_CAPTIONS, FullRecipe, Stage


class _InitView:
    """A backend view whose ``make_student()`` starts from a given student (a later stage)."""

    def __init__(self, base, init: torch.nn.Module):
        self.base, self.init = base, init

    def __getattr__(self, name):
        return getattr(self.base, name)

    def make_student(self):
        return copy.deepcopy(self.init).train()  # keeps LoRA's frozen base weights frozen


def _is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def _wait(accelerator):
    if accelerator is not None:
        accelerator.wait_for_everyone()


def _device(recipe, accelerator) -> torch.device:
    if accelerator is not None:
        return accelerator.device
    if recipe.device != "auto":
        return torch.device(recipe.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Log:
    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, msg: str):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def prepare_inputs(recipe: FullRecipe, out_dir: str, accelerator=None) -> dict:
    """Resolve the model and data: for ``model_id="tiny"`` write a random tiny pipeline (and,
    without data or prompts, a random tiny image-caption folder) under ``out_dir/tiny``."""
    model, data, prompts = recipe.model_id, recipe.data, recipe.prompts
    if recipe.is_tiny:
        from .tiny import make_tiny_pipeline
        from .data import make_imagefolder

        model = os.path.join(out_dir, "tiny", recipe.tiny_kind)
        tiny_data = os.path.join(out_dir, "tiny", "data")
        if _is_main(accelerator):
            if not os.path.isfile(os.path.join(model, "model_index.json")):
                make_tiny_pipeline(model, recipe.tiny_kind, seed=recipe.seed)
            if data is None and prompts is None and not os.path.isdir(tiny_data):
                g = torch.Generator().manual_seed(recipe.seed)
                imgs = torch.rand(len(TINY_CAPTIONS), 3, 16, 16, generator=g) * 2 - 1
                make_imagefolder(tiny_data, imgs, TINY_CAPTIONS)
        _wait(accelerator)
        if data is None and prompts is None:
            data = tiny_data
    return {"model": model, "data": data, "prompts": prompts}


def build_backend(recipe: FullRecipe, inputs: dict, device):
    from .backend import SDBackend

    return SDBackend(**recipe.backend_params(**inputs), device=device)


def make_method(recipe: FullRecipe, stage: Stage, teacher=None):
    """The stage's Method; ``teacher`` (a frozen Denoiser) replaces the backend's (PD only)."""
    kw = recipe.method_params(stage)
    if stage.kind == "pd":
        return PD(**kw, teacher=teacher)
    if stage.kind == "lcm":
        return LCM(**kw)
    return DMD2(**kw)


@torch.no_grad()
def sample_grid(backend, method, student, x_T, cond, n_steps: int | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] of the student sampling its grid (or ``n_steps``) the way
    it runs at inference, with fixed noise (and a fixed generator for consistency sampling)."""
    from ..diffusion import timesteps
    from ..sampling import sample

    policy = method.student_policy(student)
    if hasattr(policy, "generator"):
        policy.generator = torch.Generator(x_T.device).manual_seed(0)
    grid = timesteps(n_steps, backend.schedule.T) if n_steps else method.grid
    traj = sample(policy, x_T, grid, cond, schedule=backend.schedule)
    return ((backend.decode(traj.sample) + 1) / 2).clamp(0, 1).cpu()


def plot_history(history: list[dict], path: str | None = None, ax=None):
    """The student loss over all stages (log scale; split by state source where there are
    several), the critic loss for DMD2, and stage boundaries. Saves to ``path`` if given."""
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.2))
    xs = [h["global_step"] for h in history]
    keys = ["loss/student", "loss/critic"] + sorted({k for h in history for k in h
                                                     if k.startswith("source/")})
    for k in keys:
        pts = [(h["global_step"], h[k]) for h in history if k in h and h[k] > 0]
        if pts:
            ax.plot(*zip(*pts), lw=1.2 if k.startswith("loss") else 0.8,
                    ls="-" if k.startswith("loss") else ":", label=k)
    starts = {}
    for h in history:
        starts.setdefault(h["stage"], h["global_step"])
    for name, x in starts.items():
        ax.axvline(x, color="0.8", lw=0.8)
        ax.text(x, 1.0, name, transform=ax.get_xaxis_transform(), fontsize=7, va="bottom")
    if xs:
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("training step (all stages)")
    if fig is not None and path is not None:
        fig.subplots_adjust(left=0.09, right=0.98, bottom=0.15, top=0.9)  # tight_layout is slow
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return ax


class _Monitor:
    """Sample grids and loss plots every ``sample_every`` steps (a ``distill`` callback)."""

    def __init__(self, recipe, backend, out_dir, accelerator, callbacks, log, tracker=None):
        from .data import read_captions

        self.recipe, self.backend, self.out_dir, self.tracker = recipe, backend, out_dir, tracker
        self.accelerator, self.callbacks, self.log = accelerator, callbacks, log
        self.history: list[dict] = []  # finished stages
        self.stage, self.offset, self.stage_steps, self.grid_steps = None, 0, 0, None
        caps = read_captions(recipe.eval_captions) if recipe.eval_captions else backend.prompts
        self.prompts = [caps[i % len(caps)] for i in range(recipe.n_samples)]
        g = torch.Generator().manual_seed(recipe.seed + 12345)
        self.x_T = torch.cat([backend.sample_noise(1, g) for _ in self.prompts])
        self.w = recipe.eval_guidance if backend.w_range else None
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)

    def cond(self):
        return self.backend.encode_prompts(self.prompts, w=self.w)

    def records(self, stage_history) -> list[dict]:
        return self.history + [{**h, "stage": self.stage, "global_step": self.offset + h["step"]}
                               for h in stage_history]

    def start(self, stage: "Stage"):
        self.stage, self.stage_steps = stage.name, stage.steps
        # matching stages (one teacher substep) train on a fine grid: show them on start_steps
        self.grid_steps = getattr(self.recipe, "start_steps", None) if stage.substeps == 1 \
            and stage.kind == "pd" else None

    def __call__(self, step, result, student=None, method=None, history=None):
        """As a ``distill`` callback ``(step, result)``; run_full calls it once more at the end
        of every stage (with the final student), so the callback skips the stage's last step."""
        from .metrics import save_grid

        if result is not None and step >= self.stage_steps:
            return None
        method = method or result.method
        student = student if student is not None else result.student
        imgs = sample_grid(self.backend, method, student, self.x_T, self.cond(), self.grid_steps)
        hist = self.records(history if history is not None else result.history)
        event = {"stage": self.stage, "step": step, "global_step": self.offset + step,
                 "grid": None, "loss_plot": None}
        if _is_main(self.accelerator):
            if self.tracker is not None:
                self.tracker.log_images(f"samples/{self.stage}", imgs, self.offset + step)
            event["grid"] = save_grid(imgs, os.path.join(
                self.out_dir, "samples", f"{self.offset + step:07d}_{self.stage}.png"))
            if hist:
                event["loss_plot"] = os.path.join(self.out_dir, "loss.png")
                plot_history(hist, event["loss_plot"])
            loss = [h["loss/student"] for h in hist if "loss/student" in h]
            self.log(f"{self.stage} step {step}: "
                     + (f"loss {loss[-1]:.4g}, " if loss else "") + f"samples {event['grid']}")
            for cb in self.callbacks:
                cb(event)
        return event


def _save_student(student, path):
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    save_file(state, path)


def _load_student(student, path):
    from safetensors.torch import load_file

    student.load_state_dict(load_file(path))
    return student


def run_stage(recipe, stage: Stage, index: int, backend, students: dict, monitor: _Monitor,
              out_dir: str, accelerator=None, log=print, tracker=None):
    """Run (or, if already finished in ``out_dir``, load) one stage; returns (student, method,
    history). ``students`` maps finished stage names to their students."""
    d = os.path.join(out_dir, "stages", stage.name)
    done = os.path.join(d, "student.safetensors")
    teacher = None
    if stage.teacher == "unguided":
        teacher = backend.cond_teacher
    elif stage.teacher != "backend":
        teacher = copy.deepcopy(students[stage.teacher]).eval().requires_grad_(False)
    view = backend if stage.init == "teacher" else _InitView(backend, students[stage.init])
    method = make_method(recipe, stage, teacher)
    monitor.start(stage)
    if tracker is not None:
        tracker.start_stage(stage.name, monitor.offset)
    if os.path.isfile(done):  # finished in an earlier run: rebuild its modules, load the student
        method.setup(view)
        with open(os.path.join(d, "history.json"), encoding="utf-8") as f:
            history = json.load(f)
        student = _load_student(method.student, done)
        log(f"stage {stage.name}: finished earlier, loaded {done}")
        if tracker is not None:
            tracker.write_history(history)
        return student, method, history
    from ..train.fsdp import settings_from
    from ..train import distill

    sampler = StateSampler(**recipe.sampler_params(stage, backend.has_data))
    n_proc = accelerator.num_processes if accelerator is not None else 1
    sharded = n_proc > 1 and settings_from(accelerator) is not None
    log(f"stage {stage.name}: {stage.steps} steps, {type(method).__name__}"
        f"(n_steps={stage.n_steps}, substeps={stage.substeps}), teacher={stage.teacher}, "
        f"init={stage.init}, priors={sampler.priors}, batch {recipe.batch_size} over "
        f"{n_proc} process(es)" + (", modules sharded (FSDP)" if sharded else ""))
    kw = recipe.train_params(stage, index, os.path.join(d, "ckpt"))
    callbacks = (monitor,) + ((tracker,) if tracker is not None else ())
    callbacks = callbacks if kw["eval_every"] else ()  # sample_every=0: no grids during a stage
    res = distill(view, method, sampler, **kw, callbacks=callbacks, accelerator=accelerator)
    if tracker is not None:
        tracker.write_history(res.history)  # the steps after the last callback
    student = res.student
    if _is_main(accelerator):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "history.json"), "w", encoding="utf-8") as f:
            json.dump(res.history, f)
        _save_student(student, done)
        if not recipe.keep_stage_checkpoints:
            shutil.rmtree(os.path.join(d, "ckpt"), ignore_errors=True)
    _wait(accelerator)
    return student, method, res.history


def _tiny_eval_nets(folder: str, seed: int = 0):
    """Random tiny FID features, CLIP and LPIPS trunk (no downloads; not perceptual metrics:
    they exercise the metric code on ``model_id="tiny"``)."""
    import open_clip

    from ..metrics import lpips_model

    torch.manual_seed(seed)
    feat = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten()).eval()
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                          "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tiny-eval-clip.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(path)
    clip = (open_clip.create_model("tiny-eval-clip").eval(),
            open_clip.get_tokenizer("tiny-eval-clip"))
    return feat, clip, lpips_model(pretrained=False)


def reference_features(path: str, resolution: int, feature_fn, limit: int = 50000,
                       batch_size: int = 64) -> torch.Tensor:
    """FID reference features (N, D): read from a ``.safetensors`` (key "features") or ``.pt``
    file, or extracted batch by batch (never all images in memory) from an image-caption /
    save_to_disk folder or a plain folder of images, resized and center-cropped to
    ``resolution``."""
    from .data import IMAGE_EXTS, load_image_captions, preprocess
    from ..metrics import extract

    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)["features"].float()
        return torch.load(path, map_location="cpu", weights_only=True).float()
    try:
        ds = load_image_captions(path, resolution)
        n, image = min(len(ds), limit), ds.image
    except ValueError:  # not a dataset folder: every image file in it
        from PIL import Image

        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))[:limit]
        n = len(files)

        def image(i):
            with Image.open(os.path.join(path, files[i])) as im:
                return preprocess(im, resolution)
    if n == 0:
        raise ValueError(f"fid_reference={path!r} holds no images")
    return torch.cat([extract(feature_fn, torch.stack([image(i) for i in
                                                       range(k, min(k + batch_size, n))]))
                      for k in range(0, n, batch_size)])  # images are in [-1, 1]


def evaluate(recipe: FullRecipe, pipeline_dir: str, out_dir: str, prompts: list[str],
             reference_dir: str | None = None, device="cpu", log=print) -> dict:
    """The paper's evaluation of the exported pipeline (``metrics.t2i.evaluate_t2i``): FID,
    CLIP score, LPIPS diversity, HPSv2 where available. ``metrics="auto"`` skips (with a note)
    each metric whose weights cannot be had; "tiny" uses random tiny networks; "none" only
    writes samples."""
    from .export import load_student_pipeline
    from .metrics import evaluate_t2i, pipeline_generator

    mode = "tiny" if (recipe.metrics == "auto" and recipe.is_tiny) else recipe.metrics
    notes, feat, clip, lp, ref = [], None, False, None, None
    pipe, kw = load_student_pipeline(pipeline_dir)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    from .data import image_size

    res_px = tuple(pipe.vae_scale_factor * v for v in image_size(pipe.unet.config.sample_size))
    if mode == "tiny":
        feat, clip, lp = _tiny_eval_nets(os.path.join(out_dir, "tiny_nets"), recipe.seed)
    elif mode in ("auto", "required"):
        from ..metrics import InceptionFeatures, lpips_model
        from .metrics import load_clip

        for what, load in (("FID", InceptionFeatures), ("CLIP score", lambda: load_clip(
                recipe.clip_model, recipe.clip_pretrained, device)),
                           ("LPIPS diversity", lambda: lpips_model(device=device))):
            if what == "FID" and not (recipe.fid_reference or reference_dir):
                notes.append("FID skipped: no fid_reference given")
                continue
            try:
                net = load()
            except (OfflineError, ImportError, OSError) as e:
                if mode == "required":
                    raise
                notes.append(f"{what} skipped: {e}")
                log(notes[-1])
                continue
            if what == "FID":
                feat = net.to(device) if hasattr(net, "to") else net
            elif what == "CLIP score":
                clip = net
            else:
                lp = net
    ref_path = recipe.fid_reference or reference_dir
    if feat is not None and ref_path:
        ref = reference_features(ref_path, res_px, feat)
    captions = read_eval_captions(recipe, prompts)
    gen = pipeline_generator(pipe, **kw)
    lpips_prompts = recipe.lpips_prompts if (lp is not None and mode != "none") else 0
    if mode != "none" and lp is None and recipe.lpips_prompts:
        notes.append("LPIPS diversity skipped: no LPIPS model")
    res = evaluate_t2i(gen, captions, out_dir, reference=ref, n_captions=recipe.n_eval,
                       seed=recipe.seed, feature_fn=feat, clip=clip if clip else False,
                       lpips_model=lp, lpips_prompts=lpips_prompts,
                       lpips_seeds=recipe.lpips_seeds, hps="auto" if mode != "tiny" else False,
                       batch_size=recipe.eval_batch, progress=recipe.progress)
    res["notes"] = notes + res["notes"] + (["metrics from random tiny networks (model_id='tiny')"
                                            " exercise the code; they are not image quality"]
                                           if mode == "tiny" else [])
    res["pipeline_kwargs"] = kw
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2)
    return res


def read_eval_captions(recipe, prompts: list[str]) -> list[str]:
    from .data import read_captions

    return read_captions(recipe.eval_captions) if recipe.eval_captions else list(prompts)


def run_full(recipe: FullRecipe, out_dir: str | None = None, accelerator=None,
             callbacks: tuple[Callable[[dict], None], ...] = ()) -> dict:
    """Run a recipe end to end: resolve the model (``"tiny"``: build one), build the
    ``SDBackend``, run the stages (resuming from ``recipe.resume_from``), write sample grids and
    loss plots every ``sample_every`` steps, export the student as a diffusers pipeline, and
    evaluate it.

    :param out_dir: the run folder (default ``recipe.out_dir``).
    :param accelerator: an ``accelerate.Accelerator`` for multi-process runs (files are written
        by the main process only; the batch is split over processes).
    :param callbacks: functions ``f(event)`` called on every sample grid, with the event's
        ``stage``, ``step``, ``grid`` and ``loss_plot`` paths (e.g. ``show_progress``).
    :returns: dict with ``paths`` (pipeline, samples, loss_plot, metrics, history, log),
        ``metrics`` and ``stages``.
    """
    recipe.validate(num_processes=accelerator.num_processes if accelerator is not None else 1)
    out_dir = os.fspath(out_dir or recipe.out_dir)
    main = _is_main(accelerator)
    if recipe.resume_from and os.path.abspath(recipe.resume_from) != os.path.abspath(out_dir):
        if main and not os.path.isdir(os.path.join(out_dir, "stages")):
            for sub in ("stages", "tiny"):  # finished and unfinished stages, a tiny model
                if os.path.isdir(os.path.join(recipe.resume_from, sub)):
                    shutil.copytree(os.path.join(recipe.resume_from, sub),
                                    os.path.join(out_dir, sub), dirs_exist_ok=True)
        _wait(accelerator)
    if main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "recipe.json"), "w", encoding="utf-8") as f:
            json.dump(recipe.to_dict(), f, indent=2)
    log = _Log(os.path.join(out_dir, "log.txt")) if main else (lambda msg: None)
    t0 = time.time()
    torch.manual_seed(recipe.seed)
    device = _device(recipe, accelerator)
    inputs = prepare_inputs(recipe, out_dir, accelerator)
    if accelerator is not None:  # downloads and the latent cache: process 0 first, then the rest
        with accelerator.main_process_first():
            backend = build_backend(recipe, inputs, device)
    else:
        backend = build_backend(recipe, inputs, device)
    log(f"{backend!r}")
    log(recipe.summary())
    from ..train.tracking import Tracker
    from .memory import memory_report

    log(memory_report(recipe, accelerator.num_processes if accelerator is not None else 1))
    tracker = Tracker(os.path.join(out_dir, "tensorboard"), recipe.log_with,
                      config=recipe.to_dict(), run_name=os.path.basename(os.path.abspath(out_dir)),
                      enabled=main)
    monitor = _Monitor(recipe, backend, out_dir, accelerator, tuple(callbacks), log, tracker)
    plan = recipe.plan()
    students: dict = {}
    student = method = None
    for i, stage in enumerate(plan):
        student, method, history = run_stage(recipe, stage, i, backend, students, monitor,
                                             out_dir, accelerator, log, tracker)
        students[stage.name] = student
        needed = {s.teacher for s in plan[i + 1:]} | {s.init for s in plan[i + 1:]}
        for k in [k for k in students if k not in needed and k != stage.name]:
            del students[k]  # free stages nothing later needs
        if not history:
            history = [{"step": stage.steps}]
        if main:  # the stage's final sample grid and loss plot
            monitor(stage.steps, None, student=student, method=method, history=history)
        monitor.history = monitor.records(history)
        monitor.offset += stage.steps
    paths = {"out_dir": out_dir, "log": os.path.join(out_dir, "log.txt"),
             "samples": os.path.join(out_dir, "samples"),
             "loss_plot": os.path.join(out_dir, "loss.png"),
             "history": os.path.join(out_dir, "history.json"),
             "pipeline": os.path.join(out_dir, "pipeline"),
             "eval": os.path.join(out_dir, "eval"),
             "metrics": os.path.join(out_dir, "eval", "metrics.json")}
    paths["tensorboard"] = os.path.join(out_dir, "tensorboard")
    out = {"paths": paths, "metrics": None, "stages": [s.name for s in plan]}
    if not main:  # process 0 exports and evaluates; no barrier after it (that could time out)
        return out
    from .export import export_pipeline

    with open(paths["history"], "w", encoding="utf-8") as f:
        json.dump(monitor.history, f)
    sampler = "ddim" if recipe.method == "pd" else "consistency"
    export_pipeline(backend, student, paths["pipeline"], n_steps=recipe.n_steps, sampler=sampler,
                    guidance_scale=recipe.eval_guidance if backend.w_range else None)
    log(f"exported the {recipe.n_steps}-step student to {paths['pipeline']}")
    del students, student, method  # free GPU memory for the evaluation
    metrics = evaluate(recipe, paths["pipeline"], paths["eval"], backend.prompts,
                       reference_dir=inputs["data"] if recipe.is_tiny else None, device=device,
                       log=log)
    log("metrics: " + json.dumps({k: metrics[k] for k in ("n_images", "fid", "clip_score",
                                                          "lpips_diversity", "hpsv2")}))
    for note in metrics["notes"]:
        log(f"note: {note}")
    tracker.log_scalars({f"eval/{k}": metrics.get(k) for k in ("fid", "clip_score",
                                                              "lpips_diversity", "hpsv2")
                         if isinstance(metrics.get(k), (int, float))}, monitor.offset)
    tracker.close()
    log(f"done in {time.time() - t0:.0f} s")
    out["metrics"] = metrics
    with open(os.path.join(out_dir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2, default=str)
    return out


# ---- notebook helpers ----
_SHOWN: set = set()  # digests of the images this process displayed (each shown once)


def _display_once(path: str, what: str):
    """Display the image file at ``path`` unless the same bytes were displayed before (a grid
    that did not change between two events); then say so in one line instead."""
    import hashlib

    from IPython.display import Image, display

    with open(path, "rb") as f:
        data = f.read()
    key = hashlib.sha1(data).hexdigest()
    if key in _SHOWN:
        print(f"({what} {os.path.basename(path)}: unchanged, shown above)")
        return
    _SHOWN.add(key)
    display(Image(data=data, format="png"))


def show_progress(event: dict):
    """A ``run_full`` callback for notebooks: show the latest sample grid and loss plot."""
    for key, what in (("grid", "sample grid"), ("loss_plot", "loss plot")):
        if event.get(key) and os.path.isfile(event[key]):
            _display_once(event[key], what)


def show_result(result: dict):
    """Display the final loss plot, the evaluation samples and the metrics of a ``run_full``."""
    p = result["paths"]
    for f, what in ((p["loss_plot"], "loss plot"),
                    (os.path.join(p["eval"], "samples.png"), "evaluation samples"),
                    (os.path.join(p["eval"], "lpips_grid.png"), "LPIPS grid")):
        if os.path.isfile(f):
            _display_once(f, what)
    m = result["metrics"] or {}
    for k in ("n_images", "fid", "clip_score", "lpips_diversity", "hpsv2"):
        print(f"{k:>16}: {m.get(k)}")
    for note in m.get("notes", []):
        print(f"note: {note}")
    print(f"exported pipeline: {p['pipeline']}")


__all__ = ["evaluate", "plot_history", "prepare_inputs", "run_full", "run_stage", "sample_grid",
           "show_progress", "show_result"]
