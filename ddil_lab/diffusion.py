"""The discrete VP diffusion core: schedule, parameterisations, the stateless DDIM step,
timestep grids and x0 thresholding.

Notation (DDIM, Song et al. 2021; DDIL paper, Sec. 3):
    alpha_bar_t          cumulative product of (1 - beta) for t = 0..T-1
    alpha(t)             sqrt(alpha_bar_t)       signal scale
    sigma(t)             sqrt(1 - alpha_bar_t)   noise scale
    x_t = alpha(t) x0 + sigma(t) eps             (q_sample)
    t = -1               the clean end of every trajectory: alpha = 1, sigma = 0
                         (diffusers' ``set_alpha_to_one=True`` final step)

Everything here is a pure function of tensors, except ``Schedule`` which only holds the
alpha_bar table. Timesteps are integer tensors of shape (B,) (or Python ints).
"""

from __future__ import annotations

import math

import torch

from .validation import ConfigError, check_choice, check_int, check_number, fail

SCHEDULES = ("scaled_linear", "linear", "cosine")
THRESHOLDS = ("none", "static", "dynamic")


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) tensor to broadcast against x of shape (B, ...); a 0-dim one
    (one timestep for all) broadcasts as it is (and may stay on the CPU beside a GPU ``x``)."""
    if a.ndim == 0:
        return a.to(x.dtype)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)).to(x.dtype)


class Schedule:
    """Discrete variance-preserving schedule with T steps.

    ``kind`` is "scaled_linear" (Stable Diffusion: sqrt-betas linear in [0.00085, 0.012]),
    "linear" (DDPM: betas linear in [1e-4, 0.02] unless given) or "cosine" (Nichol & Dhariwal).
    """

    def __init__(self, kind: str = "scaled_linear", T: int = 1000,
                 beta_start: float | None = None, beta_end: float | None = None):
        check_choice("kind", kind, SCHEDULES)
        check_int("T", T, 2)
        if kind == "cosine":
            for name, b in (("beta_start", beta_start), ("beta_end", beta_end)):
                if b is not None:  # the cosine schedule has no betas to set: refuse, not ignore
                    fail(name, b, "None for kind='cosine' (its betas follow from the cosine)")
        # None means the kind's default; an explicit 0.0 is honoured (0 <= start < end < 1)
        b0 = beta_start if beta_start is not None else {"scaled_linear": 0.00085,
                                                        "linear": 1e-4}.get(kind)
        b1 = beta_end if beta_end is not None else {"scaled_linear": 0.012,
                                                    "linear": 0.02}.get(kind)
        if kind != "cosine":
            check_number("beta_start", b0, 0.0, 1.0, hi_open=True)
            check_number("beta_end", b1, b0, 1.0, lo_open=True, hi_open=True,
                         why=f"it must exceed beta_start={b0:g} (betas grow with t)")
        self.kind, self.T = kind, T
        self.beta_start, self.beta_end = b0, b1
        # float32, computed as diffusers does, so our DDIM matches its scheduler to 1e-6.
        if kind == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2
        elif kind == "linear":
            betas = torch.linspace(b0, b1, T, dtype=torch.float32)
        else:  # cosine, as diffusers' "squaredcos_cap_v2"
            f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)],
                                 dtype=torch.float32)
        self.betas = betas
        alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        # One extra entry at the end holds alpha_bar = 1, so that index t = -1 is the clean state.
        self.alpha_bar = torch.cat([alpha_bar, torch.ones(1)])  # (T + 1,)
        # the tables alpha(t), sigma(t) look up, shifted by one (entry 0 is t = -1): an index
        # t + 1 is cheaper than wrapping -1 around on every call
        ab = torch.cat([torch.ones(1), alpha_bar])
        self._tables = {"alpha_bar": ab, "alpha": ab.sqrt(), "sigma": (1.0 - ab).clamp_min(0).sqrt()}

    def __repr__(self) -> str:
        return f"Schedule(kind={self.kind!r}, T={self.T})"

    def _table(self, t, name: str = "alpha_bar") -> torch.Tensor:
        if type(t) is int:  # one timestep (the samplers' steps): a 0-dim CPU tensor, no scan
            if not -1 <= t <= self.T - 1:
                raise ValueError(f"timestep out of range: allowed [-1, {self.T - 1}], got {t}")
            return self._tables[name][t + 1]
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point:
            raise TypeError(f"timesteps must be integers in [-1, {self.T - 1}], got dtype {t.dtype}")
        if t.numel():
            lo, hi = (int(v) for v in torch.aminmax(t))  # one pass: this runs on every call
            if lo < -1 or hi > self.T - 1:
                raise ValueError(f"timestep out of range: allowed [-1, {self.T - 1}], "
                                 f"got min {lo}, max {hi}")
        table = self._tables[name].to(t.device)  # index_select: several times faster than []
        return table.index_select(0, t.reshape(-1).long() + 1).reshape(t.shape)

    def alpha(self, t) -> torch.Tensor:
        return self._table(t, "alpha")

    def sigma(self, t) -> torch.Tensor:
        return self._table(t, "sigma")

    def snr(self, t) -> torch.Tensor:
        """alpha^2 / sigma^2 (infinite at t = -1)."""
        ab = self._table(t)
        return ab / (1.0 - ab)

    # ---- forward process and parameterisations (all in float32 or wider) ----
    def q_sample(self, x0, t, noise):
        """x_t = alpha(t) x0 + sigma(t) eps."""
        t = torch.as_tensor(t, device=x0.device).expand(x0.shape[0])
        return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * noise

    def x0_from_eps(self, x_t, t, eps):
        return (x_t - _bcast(self.sigma(t), x_t) * eps) / _bcast(self.alpha(t), x_t)

    def eps_from_x0(self, x_t, t, x0):
        return (x_t - _bcast(self.alpha(t), x_t) * x0) / _bcast(self.sigma(t), x_t)

    def x0_from_v(self, x_t, t, v):
        # v = alpha eps - sigma x0  =>  x0 = alpha x_t - sigma v
        return _bcast(self.alpha(t), x_t) * x_t - _bcast(self.sigma(t), x_t) * v

    def v_from_x0(self, x_t, t, x0):
        eps = self.eps_from_x0(x_t, t, x0)
        return _bcast(self.alpha(t), x_t) * eps - _bcast(self.sigma(t), x_t) * x0

    # ---- the stateless DDIM step ----
    def ddim_step(self, x_t, x0_hat, t, s):
        """Deterministic DDIM (eta = 0) from t to s < t given any model's x0 estimate.

        eps is derived from x0_hat, so a thresholded x0_hat also fixes the direction to the
        next state ("reflected" sampling), and any model (teacher or student) may take any step.
        """
        eps = self.eps_from_x0(x_t, t, x0_hat)  # t, s: one int each, or one per sample (B,)
        return _bcast(self.alpha(s), x_t) * x0_hat + _bcast(self.sigma(s), x_t) * eps

    def renoise(self, x0_hat, s, noise):
        """Multistep consistency sampling step: jump to s with fresh noise (t = -1: no noise)."""
        return self.q_sample(x0_hat, s, noise)


# ---- diffusers scheduler configs (what a pipeline's scheduler/ folder says) ----
DIFFUSERS_BETAS = {"scaled_linear": "scaled_linear", "linear": "linear",
                   "squaredcos_cap_v2": "cosine"}
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def schedule_from_config(cfg, alphas_cumprod=None) -> Schedule:
    """The ``Schedule`` of a diffusers scheduler config (beta_schedule, betas, T), checked
    against the scheduler's own ``alphas_cumprod`` when given. Raises ValueError for schedules
    this library cannot represent (trained betas, zero-terminal-SNR rescaling, unknown kinds)."""
    kind = cfg.get("beta_schedule", "linear")
    if kind not in DIFFUSERS_BETAS:
        raise ValueError(f"scheduler beta_schedule={kind!r} is not supported; allowed: "
                         f"{tuple(DIFFUSERS_BETAS)}")
    if cfg.get("trained_betas") is not None:
        raise ValueError("scheduler has trained_betas, which Schedule cannot represent")
    if cfg.get("rescale_betas_zero_snr", False):
        raise ValueError("scheduler has rescale_betas_zero_snr=True, which Schedule does not "
                         "support (alpha_bar at t=T-1 would be 0)")
    betas = (None, None) if kind == "squaredcos_cap_v2" else \
        (cfg.get("beta_start"), cfg.get("beta_end"))  # the cosine's betas follow from it
    S = Schedule(DIFFUSERS_BETAS[kind], int(cfg.get("num_train_timesteps", 1000)), *betas)
    if alphas_cumprod is not None and not torch.allclose(
            S.alpha_bar[:-1], torch.as_tensor(alphas_cumprod).float(), atol=1e-6, rtol=1e-5):
        raise ValueError(f"{S} does not reproduce the scheduler's alphas_cumprod "
                         f"(beta_schedule={kind!r})")
    return S


def prediction_from_config(cfg) -> str:
    """"eps", "v" or "x0" from a diffusers scheduler config's ``prediction_type``."""
    p = cfg.get("prediction_type", "epsilon")
    if p not in DIFFUSERS_PREDICTIONS:
        raise ValueError(f"scheduler prediction_type={p!r} is not one of "
                         f"{tuple(DIFFUSERS_PREDICTIONS)}")
    return DIFFUSERS_PREDICTIONS[p]


def timesteps(n: int, T: int = 1000) -> torch.Tensor:
    """The n-step inference grid, descending: round(linspace(0, T-1, n+1))[::-1][:-1].

    This is diffusers' DPM-Solver "linspace" spacing that the paper uses: 4 steps ->
    (999, 749, 500, 250). The step after the last one goes to t = -1 (the clean state).
    Grids nest: the n-step grid is contained in the (k*n)-step grid for every integer k,
    so a teacher with k substeps per student step walks the (k*n)-step grid (``substeps``).
    """
    if not isinstance(n, int) or not 1 <= n <= T:
        raise ConfigError(f"number of steps n={n!r} must be an int in [1, {T}]")
    grid = torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round().long()
    return grid.flip(0)[:-1]


def next_timestep(grid: torch.Tensor, i: int) -> int:
    """The timestep after grid[i]: grid[i+1], or -1 after the last step."""
    return int(grid[i + 1]) if i + 1 < len(grid) else -1


def substeps(t: int, s: int, n: int, k: int, T: int = 1000) -> list[int]:
    """Teacher timesteps between student steps t -> s, when a student with n steps is taught by
    a teacher with k steps per student step: the points of the (k*n)-step grid in [s, t], with
    t first and s (possibly -1) last. Length k + 1."""
    fine = timesteps(n * k, T).tolist() + [-1]
    pts = [u for u in fine if s <= u <= t]
    if len(pts) != k + 1 or pts[0] != t or pts[-1] != s:
        raise ConfigError(f"student step {t}->{s} is not on the {n}-step grid refined by k={k}")
    return pts


def threshold(x0: torch.Tensor, mode: str = "none", *, lo: float = -1.0, hi: float = 1.0,
              ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Keep x0 estimates on the data support ("reflected diffusion distillation").

    mode "none":    unchanged.
    mode "static":  clamp to the box [lo, hi].
    mode "dynamic": Imagen / diffusers dynamic thresholding: per sample, s = quantile(|x0|, ratio)
                    clamped to [1, max_value]; x0 -> clamp(x0, -s, s) / s.
    """
    if mode == "none":
        return x0
    if mode == "static":
        if not lo < hi:
            raise ConfigError(f"static threshold needs lo < hi, got lo={lo}, hi={hi}")
        return x0.clamp(lo, hi)
    if mode == "dynamic":
        if not 0 < ratio <= 1:
            raise ConfigError(f"dynamic threshold ratio={ratio} must be in (0, 1]")
        flat = x0.reshape(x0.shape[0], -1).float().abs()
        s = torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max(max_value, 1.0))
        s = _bcast(s, x0)
        return (torch.maximum(torch.minimum(x0, s), -s) / s).to(x0.dtype)
    raise ConfigError(f"threshold mode={mode!r} is not one of {THRESHOLDS}")


class Threshold:
    """A validated thresholding setting, callable on x0 estimates (see ``threshold``)."""

    def __init__(self, mode: str = "none", lo: float = -1.0, hi: float = 1.0,
                 ratio: float = 0.995, max_value: float = 1.0):
        if mode not in THRESHOLDS:
            raise ConfigError(f"threshold mode={mode!r} is not one of {THRESHOLDS}")
        if mode == "static" and not lo < hi:
            raise ConfigError(f"threshold lo={lo} must be below hi={hi}")
        if mode == "dynamic" and not 0 < ratio <= 1:
            raise ConfigError(f"threshold ratio={ratio} must be in (0, 1]")
        self.mode, self.lo, self.hi, self.ratio, self.max_value = mode, lo, hi, ratio, max_value

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return threshold(x0, self.mode, lo=self.lo, hi=self.hi, ratio=self.ratio,
                         max_value=self.max_value)

    def __bool__(self) -> bool:
        return self.mode != "none"

    def __repr__(self) -> str:
        return f"Threshold({self.mode!r}, lo={self.lo}, hi={self.hi})"


NO_THRESHOLD = Threshold("none")
