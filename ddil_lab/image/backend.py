"""The image tier: a small diffusers UNet on pixels in [-1, 1].

The same distillation story as the toy tier, on images, through the same Backend contract:

    data       ``ImageData``: CIFAR-10 (torchvision's loader, ``root`` given by the user) or
               the offline default, scikit-learn's bundled 8x8 digits upsampled to 16x16
               (1797 images, 10 classes = the known modes; no download, runs on a laptop CPU)
    network    ``UNet`` (``image.network``): ``diffusers.UNet2DModel`` called as
               ``net(x_t, t, cond)``; class-conditional with a learned null class (label -1 or
               None), so classifier-free guidance can be taught; optionally a w-embedding
    teacher    ``train_teacher``: eps- or v-prediction training with EMA, safetensors
               checkpoints and a progress bar; the network is wrapped to predict x0
               (``denoiser.wrap``) like every other model
    backend    ``ImageBackend``: teacher (guided with ``CFG`` when w != 1), students and critics
               as trainable copies of the teacher's network, support [-1, 1] for thresholding

Checkpoints are a folder: ``teacher.safetensors`` (EMA weights), ``teacher.json`` (network,
prediction, schedule, data, step) and ``train_state.safetensors`` (online weights, AdamW moments,
RNG state) so training resumes exactly where it stopped. Nothing here unpickles a file:
CIFAR-10's own batches are read by torchvision.
"""

from __future__ import annotations

import os
import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..denoiser import CFG, wrap
from ..diffusion import Schedule, Threshold
from ..backend import Backend
from ..train.settings import check_names, fail, is_int, reuse
from ..validation import is_number
from .data import DATASETS, ImageData, make_data
from .network import CIFAR_NET, DIGITS_NET, SMALL_NET, TINY_NET, UNet  # noqa: F401

PREDICTIONS = ("eps", "v", "x0")


# ---------------------------------------------------------------------------------------------
# teacher training and checkpoints
# ---------------------------------------------------------------------------------------------
# The regression target of each parameterisation, given (schedule, x_t, t, x0, eps).
TARGETS = {
    "eps": lambda S, x_t, t, x0, eps: eps,
    "v": lambda S, x_t, t, x0, eps: S.v_from_x0(x_t, t, x0),
    "x0": lambda S, x_t, t, x0, eps: x0,
}


def _save_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def _save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def read_teacher_config(ckpt_dir: str | Path) -> dict:
    """The JSON config of a teacher checkpoint folder written by ``train_teacher``."""
    path = Path(ckpt_dir) / "teacher.json"
    if not path.is_file():
        raise FileNotFoundError(f"no teacher checkpoint in {ckpt_dir} (missing teacher.json); "
                                "train one with train_teacher(..., ckpt_dir=...)")
    return json.loads(path.read_text())


def teacher_cache_dir(root: str | Path, data: str, **recipe) -> Path:
    """The checkpoint folder of a teacher recipe (``train_teacher``'s settings): ``root /
    <data>_<hash of the recipe>``. Pass it as ``teacher_dir``: the first run trains the teacher
    there, later runs load it, and another recipe gets another folder (``train_teacher`` refuses
    to resume a folder trained with other settings)."""
    key = json.dumps({"data": data, **recipe}, sort_keys=True, default=str)
    return Path(root) / f"{data}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def load_teacher(ckpt_dir: str | Path, device="cpu") -> nn.Module:
    """The EMA teacher of a checkpoint folder as a frozen Denoiser ``(x_t, t, cond) -> x0_hat``."""
    from safetensors.torch import load_file

    cfg = read_teacher_config(ckpt_dir)
    net = UNet(**cfg["net"])
    net.load_state_dict(load_file(str(Path(ckpt_dir) / "teacher.safetensors")))
    schedule = Schedule(cfg["schedule"]["kind"], cfg["schedule"]["T"])
    return wrap(net, schedule, cfg["prediction"]).to(device).eval().requires_grad_(False)


@torch.no_grad()
def _ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)


def train_teacher(data: str | ImageData = "digits", *, root=None, schedule: Schedule | None = None,
                  prediction: str = "v", net: dict | None = None, conditional: bool = True,
                  steps: int = 2000, batch_size: int = 64, lr: float = 1e-3, warmup: int = 100,
                  ema_decay: float = 0.999, p_uncond: float = 0.2, grad_clip: float = 1.0,
                  ckpt_dir: str | Path | None = None, save_every: int = 500, resume: bool = True,
                  seed: int = 0, device="cpu", amp: bool = False, progress: bool = True,
                  callback=None) -> nn.Module:
    """Train a UNet teacher by denoising score matching; return its EMA as a frozen Denoiser.

    Loss: || net(x_t, t, c) - target ||^2 with target eps, v = alpha eps - sigma x0, or x0
    (``prediction``), x_t = alpha(t) x0 + sigma(t) eps, t ~ U{0..T-1}. The default schedule is
    the cosine one (Nichol & Dhariwal 2021): it puts the 4-step grid {999, 749, 500, 250}
    at alpha = 0, 0.38, 0.70, 0.92, where the linear DDPM schedule leaves two of the four
    steps in almost pure noise (alpha(749) = 0.06); v-prediction keeps x0 finite at
    alpha = 0. With ``conditional`` the labels are dropped to the null class with
    probability ``p_uncond`` (classifier-free guidance). AdamW with linear warmup, then a
    constant lr; EMA with the usual warmup decay_k = min(ema_decay, (1 + k) / (10 + k)).

    :param data: "digits", "cifar10" (needs ``root``) or an ``ImageData``.
    :param net: ``UNet`` settings (channels, layers_per_block, attention, norm_groups, dropout);
        default ``DIGITS_NET`` for images up to 16 px, ``CIFAR_NET`` above.
    :param ckpt_dir: folder for checkpoints (every ``save_every`` steps and at the end). With
        ``resume``, a folder holding a run with the same settings continues from its step (and
        a finished run is just loaded).
    :param amp: bfloat16 autocast on CUDA (the loss and EMA stay in float32).
    :param callback: ``callback(step, loss)`` after every step (live plots).
    """
    from tqdm.auto import tqdm

    if prediction not in TARGETS:
        raise ValueError(f"prediction={prediction!r} is not one of {tuple(TARGETS)}")
    data = make_data(data, root)
    schedule = schedule or Schedule("cosine")
    alpha_T = float(schedule.alpha(schedule.T - 1))
    if prediction == "eps" and alpha_T < 1e-3:
        raise ValueError(f"prediction='eps' divides by alpha(T-1)={alpha_T:.1e} under the "
                         f"{schedule.kind!r} schedule; use prediction='v' or "
                         "schedule=Schedule('linear')")
    C, H, W = data.shape
    net_cfg = dict(net or (DIGITS_NET if H <= 16 else CIFAR_NET))
    net_cfg.update(sample_size=H, in_channels=C, num_classes=data.num_classes if conditional else 0)
    torch.manual_seed(seed)
    model = UNet(**net_cfg).to(device)
    cfg = dict(net=model.config, prediction=prediction, data=data.name, data_shape=[C, H, W],
               schedule=dict(kind=schedule.kind, T=schedule.T), seed=seed, batch_size=batch_size,
               lr=lr, warmup=warmup, ema_decay=ema_decay, p_uncond=p_uncond, step=0, steps=steps)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = 0
    ckpt = Path(ckpt_dir) if ckpt_dir is not None else None
    if ckpt is not None and resume and (ckpt / "train_state.safetensors").is_file():
        start = _load_state(ckpt, cfg, model, ema, opt, g)

    def save(step):
        cfg["step"] = step
        ckpt.mkdir(parents=True, exist_ok=True)
        _save_tensors(ckpt / "teacher.safetensors", ema.state_dict())
        _save_state(ckpt, model, opt, g)
        _save_json(ckpt / "teacher.json", cfg)

    target = TARGETS[prediction]
    model.train()
    bar = tqdm(range(start, steps), desc=f"{data.name} teacher", disable=not progress,
               initial=start, total=steps)
    for k in bar:
        x0, c, t, eps = _batch(data, schedule, batch_size, conditional, p_uncond, g, device)
        x_t = schedule.q_sample(x0, t, eps)
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=amp):
            out = model(x_t, t, c)
        loss = ((out.float() - target(schedule, x_t, t, x0, eps)) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (k + 1) / max(warmup, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        _ema_update(ema, model, min(ema_decay, (1 + k) / (10 + k)))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if callback is not None:
            callback(k + 1, loss.item())
        if ckpt is not None and ((k + 1) % save_every == 0 or k + 1 == steps):
            save(k + 1)
    return wrap(ema, schedule, prediction).eval()


def _batch(data, schedule, n, conditional, p_uncond, g, device):
    """A training batch (x0, labels with p_uncond of them dropped to -1, or None, t, eps), drawn
    on the CPU from ``g`` (so runs and resumptions are reproducible) and moved to ``device``."""
    x0, c = data.sample(n, g, augment=True)
    c = torch.where(torch.rand(n, generator=g) < p_uncond, -1, c).to(device) if conditional \
        else None
    t = torch.randint(0, schedule.T, (n,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return x0.to(device), c, t.to(device), eps.to(device)


# The resumable training state lives in safetensors, no pickles: the online weights, AdamW's
# per-parameter step and moments, and the data/noise generator state.
def _save_state(ckpt: Path, model: nn.Module, opt, g: torch.Generator) -> None:
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    names = dict(zip(map(id, model.parameters()), (n for n, _ in model.named_parameters())))
    for p, s in opt.state.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            state[f"adam.{key}.{names[id(p)]}"] = torch.as_tensor(s[key], dtype=torch.float32)
    state["rng"] = g.get_state()
    state["rng_torch"] = torch.get_rng_state()  # dropout
    _save_tensors(ckpt / "train_state.safetensors", state)


def _load_state(ckpt: Path, cfg: dict, model, ema, opt, g) -> int:
    from safetensors.torch import load_file

    old = read_teacher_config(ckpt)
    for key in ("net", "prediction", "data", "data_shape", "schedule", "seed", "batch_size",
                "lr", "warmup", "ema_decay", "p_uncond"):
        if old.get(key) != cfg[key]:
            raise ValueError(f"cannot resume the teacher in {ckpt}: its {key}={old.get(key)!r} "
                             f"differs from {key}={cfg[key]!r}; use another ckpt_dir or "
                             "resume=False")
    dev = next(model.parameters()).device
    state = load_file(str(ckpt / "train_state.safetensors"))
    model.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    ema.load_state_dict(load_file(str(ckpt / "teacher.safetensors")))
    for n, p in model.named_parameters():
        if f"adam.step.{n}" in state:
            opt.state[p] = {"step": state[f"adam.step.{n}"].float(),
                            "exp_avg": state[f"adam.exp_avg.{n}"].to(dev),
                            "exp_avg_sq": state[f"adam.exp_avg_sq.{n}"].to(dev)}
    g.set_state(state["rng"])
    torch.set_rng_state(state["rng_torch"])
    return int(old["step"])


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
_TRAINED: dict = {}  # teachers trained in this process without a ckpt_dir, keyed by recipe


class ImageBackend(Backend):
    """Small-UNet image backend (pixels in [-1, 1]).

    :param data: "digits" (offline, 1x16x16), "cifar10" (3x32x32, needs ``root``) or an
        ``ImageData``.
    :param teacher: a checkpoint folder written by ``train_teacher``, a Denoiser
        ``(x_t, t, cond) -> x0_hat`` (e.g. ``load_teacher(...)``) with ``.net`` and
        ``.schedule``, or None to train one with ``teacher_steps`` (saved in ``teacher_dir``
        when given, and cached in this process).
    :param guidance: classifier-free guidance scale w of the teacher (1.0: the plain
        conditional teacher), or a range (w_min, w_max): each sample then draws its own w
        uniformly, the teacher guides it with that w, and students get a w-embedding
        (guidance-conditioned students, the paper's PD protocol).
    :param w_embed: give students a guidance-scale embedding (``UNet.add_w_embedding``; the
        conditioning is then ``{"y": labels, "w": w}``); default: iff ``guidance`` is a range.
    :param conditional: distil class-conditionally (cond = labels (B,)) or unconditionally
        (cond = None, the teacher's null class: the class histogram then measures mode
        coverage); None: conditional when the teacher is. A teacher trained here is
        unconditional for ``conditional=False`` and ``guidance=1`` (it then learns only the
        unconditional model, which needs far fewer steps), else class-conditional.
    :param teacher_kw: more ``train_teacher`` settings when teacher is None (prediction, net,
        batch_size, lr, ...).
    """

    def __init__(self, data: str | ImageData = "digits", teacher=None, *,
                 guidance: float | tuple = 1.0, conditional: bool | None = None,
                 w_embed: bool | None = None, w_embed_dim: int = 64, root=None,
                 download: bool | None = None, teacher_dir=None, teacher_steps: int = 2000,
                 device="cpu", seed: int = 0, **teacher_kw):
        check_args(dict(data=data, teacher=teacher, guidance=guidance, conditional=conditional,
                        w_embed=w_embed, root=root, download=download, teacher_dir=teacher_dir,
                        teacher_steps=teacher_steps, device=device, seed=seed))
        self.data = make_data(data, root, download)
        self.device = torch.device(device)
        if teacher is None:  # trained with labels unless an unguided unconditional run asks
            labels = conditional is not False or guidance != 1.0
            teacher = self._train(teacher_dir, teacher_steps, seed,
                                  {"conditional": labels, **teacher_kw})
        elif isinstance(teacher, (str, Path)):
            teacher = load_teacher(teacher)
        shape = teacher_shape(teacher)
        if shape is not None and shape != self.data.shape:
            fail("teacher", getattr(teacher, "source", type(teacher.net).__name__),
                 f"a teacher of images of shape {self.data.shape} (the data's)",
                 f"its network makes images of shape {shape}")
        self.cond_teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.schedule = teacher.schedule
        ranged = isinstance(guidance, (tuple, list))
        self.guidance = tuple(map(float, guidance)) if ranged else float(guidance)
        self.w_range = self.guidance if ranged else None
        self.w_embed = ranged if w_embed is None else bool(w_embed)
        if ranged and not self.w_embed:
            fail("w_embed", w_embed, "True or None with a guidance range (cond carries each w)")
        self.w_embed_dim = w_embed_dim
        has_labels = getattr(teacher.net, "num_classes", 0) > 0
        if conditional and not has_labels:
            fail("conditional", conditional, "False or None with an unconditional teacher",
                 "conditional=True needs a class-conditional teacher "
                 "(train_teacher(conditional=True))")
        self.conditional = has_labels if conditional is None else bool(conditional)
        if (guidance != 1.0 or self.w_embed) and not self.conditional:
            fail("guidance", guidance, "1.0, or conditional=True with a class-conditional teacher",
                 f"guidance={guidance}{' with w_embed' if self.w_embed else ''} needs "
                 "conditional=True and a class-conditional teacher "
                 "(train_teacher(conditional=True))")
        # a w-embedded conditioning carries each sample's w: CFG reads it (w=None)
        self.teacher = CFG(self.cond_teacher, None) if self.w_embed else \
            CFG(self.cond_teacher, guidance) if guidance != 1.0 else self.cond_teacher
        self.support = Threshold("static", -1.0, 1.0)
        self.shape = self.data.shape
        self.num_classes = self.data.num_classes
        self.class_weights = self.data.class_weights

    @classmethod
    def from_pretrained(cls, model, data: str | ImageData = "cifar10", **kw) -> ImageBackend:
        """A backend whose teacher is a diffusers ``DDPMPipeline`` folder or hub id (e.g.
        ``google/ddpm-cifar10-32``: ``model_index.json``, ``unet/``, ``scheduler/``), its
        prediction type and schedule taken from the scheduler config
        (``image.pretrained.load_pretrained``; a hub id not cached fails within seconds offline).
        ``data`` gives the images of forward-diffused training states (CIFAR-10 train for that
        teacher: pass ``root``); ``kw`` as for ``ImageBackend``. Only safetensors weights load
        unless ``allow_pickle=True`` (unpickling runs code: only for a folder you trust).
        Every argument is checked before the teacher is loaded."""
        from .pretrained import check_from_pretrained, load_pretrained

        allow_pickle = check_from_pretrained(model, data, kw)  # pops allow_pickle from kw
        return cls(data, load_pretrained(model, kw.get("device", "cpu"), allow_pickle), **kw)

    def _train(self, teacher_dir, steps, seed, kw):
        if teacher_dir is not None:
            return train_teacher(self.data, steps=steps, ckpt_dir=teacher_dir, seed=seed,
                                 device=self.device, **kw)
        key = (self.data.name, len(self.data), self.data.shape, steps, seed,
               repr(sorted(kw.items())))
        if key not in _TRAINED:
            _TRAINED[key] = train_teacher(self.data, steps=steps, seed=seed, device=self.device,
                                          **kw)
        return copy.deepcopy(_TRAINED[key])

    def __repr__(self):
        return (f"ImageBackend({self.data.name!r}, shape={self.shape}, guidance={self.guidance}, "
                f"prediction={type(self.cond_teacher).__name__})")

    def sample_data(self, n, generator=None):
        x0, c = self.data.sample(n, generator)
        return x0.to(self.device), (self.cond_at(c, generator=generator) if self.conditional
                                    else None)

    def sample_cond(self, n, generator=None):
        """Labels drawn with the data's class weights, via ``cond_at`` (None: unconditional)."""
        if not self.conditional:
            return None
        idx = torch.multinomial(self.class_weights, n, replacement=True, generator=generator)
        return self.cond_at(idx, generator=generator)

    def cond_at(self, labels: torch.Tensor, w: float | None = None, generator=None):
        """The conditioning of ``labels`` (B,): the labels, or with a w-embedding {"y": labels,
        "w": (B,)} at ``w`` (default: the fixed w, or drawn per sample from the range)."""
        y = labels.to(self.device)
        if not self.w_embed:
            return y
        if w is None and self.w_range is not None:
            lo, hi = self.w_range
            w = lo + (hi - lo) * torch.rand(len(y), generator=generator)
        w = torch.as_tensor(self.guidance if w is None else w, dtype=torch.float32)
        return {"y": y, "w": w.expand(len(y)).clone().to(self.device)}

    def sample_noise(self, n, generator=None):
        return torch.randn((n, *self.shape), generator=generator).to(self.device)

    def make_student(self) -> nn.Module:
        """A trainable copy of the teacher's wrapped network (same parameterisation), with a
        zero-initialised guidance-scale embedding when ``w_embed``."""
        student = copy.deepcopy(self.cond_teacher)
        if self.w_embed:
            student.net.add_w_embedding(self.w_embed_dim)
        return student.train().requires_grad_(True)

    def plot_samples(self, x, ax, nrow: int | None = None, title: str | None = None):
        from .plots import image_grid
        return image_grid(x, ax, nrow=nrow, title=title)


# image shapes of the named data sets (what a teacher checkpoint must match)
IMAGE_SHAPES = {"digits": (1, 16, 16), "cifar10": (3, 32, 32)}


def teacher_shape(teacher) -> tuple | None:
    """(C, H, W) of the images a teacher Denoiser's network makes, when its config says."""
    net = getattr(teacher, "net", None)
    cfg = getattr(getattr(net, "unet", None), "config", None)
    if cfg is None or not hasattr(cfg, "sample_size"):
        return None
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return (int(cfg.in_channels), int(size), int(size))


def check_args(p: dict, prefix: str = "") -> None:
    """Types and ranges of ``ImageBackend``'s parameters ``p`` before any data is read or
    teacher trained; raises ``ConfigError`` naming ``prefix + key``, the value and what is
    allowed. The constructor calls it (prefix "") and so does ``check_params`` ("backend.")."""
    data = p.get("data", "digits")
    if isinstance(data, str):
        if data not in DATASETS:
            fail(f"{prefix}data", data, f"one of {DATASETS} (or an ImageData object)")
        if data == "cifar10":
            root = p.get("root")
            if root is None:
                fail(f"{prefix}root", root, "the folder that holds cifar-10-batches-py/",
                     "data='cifar10' needs root")
            if not isinstance(root, (str, os.PathLike)):
                fail(f"{prefix}root", root, "a folder path")
            if p.get("download") is False and not os.path.isdir(
                    os.path.join(root, "cifar-10-batches-py")):
                fail(f"{prefix}root", root, "a folder holding cifar-10-batches-py/ (or "
                     "download=True)", "the data folder does not exist")
        shape = IMAGE_SHAPES.get(data)
    elif isinstance(data, ImageData):
        shape = data.shape
    else:
        fail(f"{prefix}data", data, f"one of {DATASETS} or an ImageData object")
    teacher = p.get("teacher")
    if isinstance(teacher, (str, os.PathLike)):
        if not os.path.isdir(teacher):
            fail(f"{prefix}teacher", str(teacher), "a teacher checkpoint folder written by "
                 "image.train_teacher, or None to train one", "the folder does not exist")
        cfg = reuse(f"{prefix}teacher", read_teacher_config, teacher)
        if shape and tuple(cfg.get("data_shape", shape)) != tuple(shape):
            fail(f"{prefix}teacher", str(teacher), f"a teacher trained on images of shape "
                 f"{shape}", f"it was trained on images of shape {tuple(cfg['data_shape'])}, "
                 f"but data={data!r} has images of shape {tuple(shape)}")
    elif teacher is not None and not (hasattr(teacher, "net") and hasattr(teacher, "schedule")):
        fail(f"{prefix}teacher", type(teacher).__name__, "a checkpoint folder, None (train one) "
             "or a wrapped Denoiser with .net and .schedule (see ddil_lab.denoiser.wrap)")
    g = p.get("guidance", 1.0)
    if not (len(g) == 2 and all(map(is_number, g)) and 1.0 <= g[0] <= g[1]
            if isinstance(g, (tuple, list)) else is_number(g) and g >= 1.0):
        fail(f"{prefix}guidance", g, "a number >= 1 (1 = no guidance), or a range (w_min, "
             "w_max) with 1 <= w_min <= w_max")
    for key in ("conditional", "download", "w_embed"):
        if p.get(key) is not None and not isinstance(p[key], bool):
            fail(f"{prefix}{key}", p[key], "True, False or None")
    if "teacher_steps" in p and not (is_int(p["teacher_steps"]) and p["teacher_steps"] >= 1):
        fail(f"{prefix}teacher_steps", p["teacher_steps"], "a positive int")
    if "seed" in p and not is_int(p["seed"]):
        fail(f"{prefix}seed", p["seed"], "an int")
    if p.get("teacher_dir") is not None and not isinstance(p["teacher_dir"], (str, os.PathLike)):
        fail(f"{prefix}teacher_dir", p["teacher_dir"], "a folder path or None")
    dev = p.get("device", "cpu")
    try:
        torch.device(dev)
    except (RuntimeError, TypeError):
        fail(f"{prefix}device", dev, "a torch device such as 'cpu' or 'cuda'")


def check_params(p: dict) -> None:
    """Check the image backend's settings ``p`` (a config's ``backend`` section) before any
    data is read or teacher trained; raises ``ConfigError`` naming ``backend.<key>``."""
    check_names("backend", p, ImageBackend, "the image backend")
    check_args(p, "backend.")


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


NETS = {"small": SMALL_NET, "digits": DIGITS_NET, "cifar": CIFAR_NET, "tiny": TINY_NET}


def main(argv=None) -> None:
    """Train (or resume) a teacher from the command line:

        python -m ddil_lab.image.backend --data digits --ckpt-dir runs/image_teacher_digits
    """
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", choices=DATASETS)
    p.add_argument("--root", default=None, help="CIFAR-10 folder (data cifar10)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 when missing")
    p.add_argument("--ckpt-dir", required=True, help="checkpoint folder (resumed when present)")
    p.add_argument("--net", default=None, choices=tuple(NETS),
                   help="UNet layout (default: digits for <= 16 px, cifar above)")
    p.add_argument("--prediction", default="v", choices=PREDICTIONS)
    p.add_argument("--unconditional", action="store_true", help="no class labels")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    data = make_data(a.data, a.root, True if a.download else None)
    train_teacher(data, prediction=a.prediction, net=NETS[a.net] if a.net else None,
                  conditional=not a.unconditional, steps=a.steps, batch_size=a.batch_size,
                  lr=a.lr, warmup=a.warmup, ema_decay=a.ema_decay, ckpt_dir=a.ckpt_dir,
                  save_every=a.save_every, seed=a.seed, device=a.device, amp=a.amp)
    print(f"teacher checkpoint: {a.ckpt_dir} ({read_teacher_config(a.ckpt_dir)['step']} steps)")


if __name__ == "__main__":
    main()
