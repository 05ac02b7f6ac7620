"""The toy tier's backend: the exact teacher of a Gaussian mixture (``toy.mixture``), the MLP
students start from, and ``Toy2dBackend``, which puts them together."""

from __future__ import annotations

import copy
import hashlib
import math

import torch
from torch import nn

from ..denoiser import PARAMETERISATIONS, BatchedCFG, no_class
from ..diffusion import Schedule, Threshold
from ..backend import Backend
from ..train.settings import ConfigError, check_names, fail, is_int, reuse
from .mixture import (GMM, LAYOUTS, MIXTURES, RING12_WEIGHTS, _number, class_mixture,  # noqa: F401
                      embed, grid25, imbalanced, make_mixture, ring8, ring8_cond, ring12_cond3)


# ---- teachers and networks ----
class ExactTeacher(nn.Module):
    """The closed-form denoiser E[x0 | x_t (, c)] of a mixture: a perfect teacher.
    ``dtype``: float64 (the oracle) or float32 (faster; see ``GMM.posterior_mean``)."""

    def __init__(self, gmm: GMM, schedule: Schedule, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.gmm, self.schedule, self.dtype = gmm, schedule, dtype

    def forward(self, x_t, t, cond=None):
        x0 = self.gmm.posterior_mean(x_t, t, self.schedule, label=cond, dtype=self.dtype)
        return x0.to(device=x_t.device, dtype=torch.float32)


_FREQS: dict = {}


def time_embedding(t: torch.Tensor, dim: int = 32, T: int = 1000) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim)."""
    key = (dim, t.device)
    if key not in _FREQS:  # the same frequencies on every call: made once per device
        half = dim // 2
        _FREQS[key] = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    ang = (t.float()[:, None] + 1) / T * 1000.0 * _FREQS[key][None]
    return torch.cat([ang.sin(), ang.cos()], 1)


class MLP(nn.Module):
    """A small time- and class-conditioned MLP ``net(x_t, t, cond) -> output`` (B, d).

    cond is None or class labels (B,); label -1 and None both mean "no class" (a learned null
    embedding), which is what classifier-free guidance needs."""

    def __init__(self, d: int = 2, hidden: int = 128, depth: int = 3, num_classes: int = 0,
                 temb: int = 32):
        super().__init__()
        self.d, self.num_classes, self.temb = d, num_classes, temb
        self.cemb = nn.Embedding(num_classes + 1, temb) if num_classes else None
        layers, width = [], d + temb
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, d)

    def _features(self, x_t, t, cond=None) -> torch.Tensor:
        h = time_embedding(t, self.temb)
        if self.cemb is not None:
            c = torch.full((x_t.shape[0],), -1, device=x_t.device) if cond is None else cond
            h = h + self.cemb(torch.where(c < 0, self.num_classes, c))
        return self.body(torch.cat([x_t.float(), h], 1))

    def features(self, x_t, t, cond=None) -> torch.Tensor:
        """The last hidden layer (for a GAN head on DMD2's critic). A separate entry point:
        sharded (FSDP) training hooks it like ``forward``, so ``forward`` must not call it."""
        return self._features(x_t, t, cond)

    def forward(self, x_t, t, cond=None):
        return self.out(self._features(x_t, t, cond))

    def forward_stacked(self, p: dict, x_t, t, cond=None):
        """``forward`` of M members at once (``train.ensemble.StackedMembers``): ``p`` holds
        their parameters stacked by name (M, ...), x_t (M, n, d), t and cond (M, n). Each
        member's rows meet only its own weights, in batched matmuls (on the CPU faster than
        ``vmap`` over ``forward``: 3-25% by size, ``docs/results.md``)."""
        M, n = t.shape
        h = time_embedding(t.reshape(-1), self.temb).reshape(M, n, self.temb)
        if self.cemb is not None:
            c = torch.full((M, n), -1, device=x_t.device) if cond is None else cond
            c = torch.where(c < 0, self.num_classes, c)
            h = h + p["cemb.weight"].gather(1, c[..., None].expand(M, n, self.temb))
        z = torch.cat([x_t.float(), h], 2)
        layers = [(f"body.{i}", m) for i, m in enumerate(self.body)] + [("out", self.out)]
        for name, layer in layers:
            if isinstance(layer, nn.Linear):  # z @ W.T + b, member by member
                z = torch.baddbmm(p[f"{name}.bias"].unsqueeze(1), z,
                                  p[f"{name}.weight"].transpose(1, 2))
            else:
                z = layer(z)
        return z


def train_denoiser(gmm: GMM, schedule: Schedule, steps: int = 3000, batch: int = 512,
                   lr: float = 5e-3, hidden: int = 128, depth: int = 3, p_uncond: float = 0.15,
                   seed: int = 0, progress: bool = False, prediction: str = "v") -> nn.Module:
    """Train an MLP denoiser on mixture samples (an imperfect teacher).

    The network predicts ``prediction`` ("v", "eps" or "x0"; wrapped to an x0 Denoiser); every
    parameterisation is trained with the same v-space loss (= x0 loss weighted by SNR + 1), so
    they differ only in what the network outputs. Class-conditional mixtures drop the label with
    probability ``p_uncond`` so the network is both conditional and unconditional
    (classifier-free guidance). Returns the Denoiser in eval mode. About 10 s on a laptop CPU
    with the defaults; ``steps=0`` returns a randomly initialised one (seeded by ``seed``).
    """
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MLP(gmm.d, hidden, depth, gmm.num_classes)
    den = PARAMETERISATIONS[prediction](net, schedule)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr * 0.05)
    for _ in tqdm(range(steps), desc="toy teacher", disable=not progress):
        x0, _, lab = gmm.sample(batch, g)
        if lab is not None:
            lab = torch.where(torch.rand(batch, generator=g) < p_uncond, -1, lab)
        t = torch.randint(0, schedule.T, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = schedule.q_sample(x0, t, eps)
        v = schedule.v_from_x0(x_t, t, x0)
        if prediction == "v":  # the network's own output (bit-identical to the v-only past)
            v_hat = net(x_t, t, lab)
        else:
            v_hat = schedule.v_from_x0(x_t, t, den(x_t, t, lab))
        loss = ((v_hat - v) ** 2).mean()  # v-loss = x0-loss weighted by SNR + 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return den.eval().requires_grad_(False)


_TRAINED: dict = {}  # cache of trained MLP denoisers, keyed by their full recipe (``_recipe``)
_EXACT: dict = {}  # exact teachers by mixture content and schedule
TEACHERS = ("exact", "mlp")
STUDENT_INITS = ("pretrained", "random")


def _recipe(gmm: GMM, schedule: Schedule, init_steps: int, hidden: int, seed: int,
            prediction: str) -> tuple:
    """What a pretrained MLP depends on: the mixture's full content (not its name or means
    alone: a std sweep of one ring must not share networks), the schedule's table, the recipe."""
    sched = hashlib.sha256(schedule.alpha_bar.numpy().tobytes()).hexdigest()[:16]
    return (gmm.fingerprint(), sched, int(init_steps), int(hidden), int(seed), prediction)


TEACHER_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def check_toy_args(mixture="ring8", teacher="exact", guidance=1.0, dim=2, schedule=None,
                   init_steps=3000, hidden=128, seed=0, student_init="pretrained",
                   student_param="v", teacher_dtype="float64", prefix: str = "") -> GMM:
    """Check every ``Toy2dBackend`` setting (types and ranges) before any network is trained;
    raise ``ConfigError`` naming ``<prefix><parameter>``, its value and what is allowed.
    Returns the mixture (cheap: no training)."""
    def name(k):
        return f"{prefix}{k}"
    if teacher not in TEACHERS:
        fail(name("teacher"), teacher, "'exact' (closed form) or 'mlp' (trained here)")
    if not (_number(guidance) and guidance >= 1.0):
        fail(name("guidance"), guidance, "a number >= 1 (1 = no guidance)")
    if not (is_int(dim) and dim >= 2):
        fail(name("dim"), dim, "an int >= 2 (the 2D mixture is embedded in dim dimensions)")
    if schedule is not None and not isinstance(schedule, Schedule):
        fail(name("schedule"), schedule, "None (the default Schedule()) or a Schedule")
    if not (is_int(init_steps) and init_steps >= 0):
        fail(name("init_steps"), init_steps,
             "an int >= 0 (training steps of the pretrained MLP; 0 = untrained)")
    if not (is_int(hidden) and hidden >= 1):
        fail(name("hidden"), hidden, "a positive int (MLP width)")
    if not is_int(seed):
        fail(name("seed"), seed, "an int")
    if student_init not in STUDENT_INITS:
        fail(name("student_init"), student_init,
             f"one of {STUDENT_INITS} (start from the pretrained MLP, or from random weights)")
    if student_param not in PARAMETERISATIONS:
        fail(name("student_param"), student_param,
             f"one of {tuple(PARAMETERISATIONS)} (what the student network predicts)")
    if teacher_dtype not in TEACHER_DTYPES:
        fail(name("teacher_dtype"), teacher_dtype,
             f"one of {tuple(TEACHER_DTYPES)} (the exact teacher's arithmetic)")
    if not isinstance(mixture, (str, GMM)):
        fail(name("mixture"), mixture, f"one of {tuple(MIXTURES)} or a GMM (e.g. class_mixture)")
    try:
        gmm = make_mixture(mixture, dim)
    except ConfigError as e:
        raise ConfigError(f"{prefix[:-1]}: {e}" if prefix else str(e)) from e
    if guidance != 1.0 and gmm.labels is None:
        fail(name("guidance"), guidance, "1.0 for this mixture, or a class-conditional mixture "
             "such as 'ring8_cond' or class_mixture(classes >= 1)",
             f"mixture {gmm.name!r} has no classes to guide")
    return gmm


class Toy2dBackend(Backend):
    """Gaussian-mixture backend.

    :param mixture: a name in ``MIXTURES`` or a ``GMM`` (e.g. ``class_mixture(...)``).
    :param teacher: "exact" (closed-form posterior mean) or "mlp" (a trained, imperfect MLP).
    :param guidance: classifier-free guidance scale w of the teacher (needs a labelled mixture);
        1.0 means the plain conditional teacher.
    :param dim: embed the 2D mixture in this many dimensions.
    :param init_steps: training steps of the MLP denoiser that students and critics start from
        (the MLP teacher itself when teacher="mlp"; with the exact teacher, students still start
        from a pretrained denoiser, as real students start from the teacher's weights).
    :param hidden: width of that MLP (and of a randomly initialised student).
    :param student_init: "pretrained" (a copy of that MLP) or "random" (a fresh MLP of width
        ``hidden``, initialised from torch's global random stream: ``train_arm`` seeds it with
        each run's seed, so a seed study varies the initialisation too).
    :param student_param: what the student network predicts: "v" (default), "eps" or "x0"
        (a pretrained start is then pretrained in that parameterisation).
    :param teacher_dtype: "float64" (default: the exact teacher is the oracle) or "float32"
        (2-3x faster on the regime map's mixtures, within 1e-5 of float64: the map uses it).
    Every setting is checked (``check_toy_args``) before any network is trained.
    """

    def __init__(self, mixture: str | GMM = "ring8", teacher: str = "exact", guidance: float = 1.0,
                 dim: int = 2, schedule: Schedule | None = None, init_steps: int = 3000,
                 hidden: int = 128, seed: int = 0, student_init: str = "pretrained",
                 student_param: str = "v", teacher_dtype: str = "float64"):
        self.gmm = check_toy_args(mixture, teacher, guidance, dim, schedule, init_steps, hidden,
                                  seed, student_init, student_param, teacher_dtype)
        self.schedule = schedule or Schedule()
        self.shape, self.guidance, self.teacher_kind = (self.gmm.d,), guidance, teacher
        self.hidden, self.student_init, self.student_param = hidden, student_init, student_param
        self.support = Threshold("static", -1.0, 1.0)
        self._init_net = None
        if teacher == "mlp" or student_init == "pretrained":
            key = _recipe(self.gmm, self.schedule, init_steps, hidden, seed, student_param)
            if key not in _TRAINED:
                _TRAINED[key] = train_denoiser(self.gmm, self.schedule, init_steps,
                                               hidden=hidden, seed=seed,
                                               prediction=student_param)
            self._init_net = _TRAINED[key]
        if teacher == "exact":  # one per mixture and schedule: backends that differ only in w
            key = _recipe(self.gmm, self.schedule, 0, 0, 0, "exact")  # share it (train_cells)
            key += (teacher_dtype,)
            base = _EXACT.setdefault(key, ExactTeacher(self.gmm, self.schedule,
                                                       TEACHER_DTYPES[teacher_dtype]))
        else:
            base = self._init_net
        self.cond_teacher = base
        # guided: the conditional and unconditional (label -1) halves in one call
        self.teacher = BatchedCFG(base, guidance, no_class) if guidance != 1.0 else base

    @property
    def init_net(self) -> nn.Module:
        """The pretrained MLP students start from (trained on first use when
        ``student_init="random"``, which does not need it)."""
        if self._init_net is None:
            raise AttributeError("this backend has student_init='random' and the exact teacher: "
                                 "it trains no pretrained MLP")
        return self._init_net

    @property
    def conditional(self) -> bool:
        return self.gmm.labels is not None

    def sample_data(self, n, generator=None):
        x, _, lab = self.gmm.sample(n, generator)
        return x, lab

    def sample_cond(self, n, generator=None):
        if not self.conditional:
            return None
        return self.gmm.sample(n, generator)[2]

    def make_student(self) -> nn.Module:
        if self.student_init == "random":
            net = MLP(self.gmm.d, self.hidden, 3, self.gmm.num_classes)
            return PARAMETERISATIONS[self.student_param](net, self.schedule).train()
        return copy.deepcopy(self.init_net).train().requires_grad_(True)

    def make_critic(self) -> nn.Module:
        """DMD2's fake critic: a copy of the pretrained MLP where there is one (it estimates
        the student's score from the start), else a random one."""
        if self._init_net is None:
            return self.make_student()
        return copy.deepcopy(self._init_net).train().requires_grad_(True)

    def plot_samples(self, x, ax, **kw):
        from .plots import scatter2d
        return scatter2d(x, ax, gmm=self.gmm, **kw)


def check_params(p: dict) -> None:
    """Check the toy backend's settings ``p`` (a config's ``backend`` section) before any
    teacher is trained; raises ``ConfigError`` naming ``backend.<key>``. The checks are the
    constructor's own (``check_toy_args``); a schedule given as a dict or a kind is built."""
    check_names("backend", p, Toy2dBackend, "the toy2d backend")
    kw = dict(p)
    sched = kw.get("schedule")
    if isinstance(sched, dict):
        kw["schedule"] = reuse("backend.schedule", Schedule, **sched)
    elif isinstance(sched, str):
        kw["schedule"] = reuse("backend.schedule", Schedule, sched)
    check_toy_args(**kw, prefix="backend.")
