"""Schedule, DDIM and thresholding against diffusers' schedulers (the oracle)."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ddil_lab.denoiser import CFG, PredEps, PredV
from ddil_lab.diffusion import Schedule, Threshold, substeps, threshold, timesteps
from ddil_lab.sampling import sample

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
          beta_schedule="scaled_linear")


class DummyEps(torch.nn.Module):
    """A deterministic, nonlinear eps model."""

    def forward(self, x, t, cond=None):
        tt = t.float().reshape(-1, *([1] * (x.ndim - 1))) / 1000
        return torch.sin(3 * x) * tt + 0.3 * x - 0.1


@pytest.mark.parametrize("kind,dkind", [("scaled_linear", "scaled_linear"), ("linear", "linear"),
                                         ("cosine", "squaredcos_cap_v2")])
def test_alpha_bar_matches_diffusers(kind, dkind):
    kw = dict(SD, beta_schedule=dkind)
    if kind == "linear":
        kw.update(beta_start=1e-4, beta_end=0.02)
    ref = DDPMScheduler(**kw).alphas_cumprod
    torch.testing.assert_close(Schedule(kind).alpha_bar[:-1], ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n,spacing", [(4, "trailing"), (10, "leading"), (25, "trailing")])
def test_ddim_loop_matches_diffusers(n, spacing):
    sch = DDIMScheduler(**SD, set_alpha_to_one=True, clip_sample=False, timestep_spacing=spacing,
                        prediction_type="epsilon")
    sch.set_timesteps(n)
    net = DummyEps()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(8, 3, 4, 4, generator=g)
    x = x_T.clone()
    for t in sch.timesteps:
        x = sch.step(net(x, t.expand(8)), t, x).prev_sample
    ours = sample(PredEps(net, Schedule()), x_T, sch.timesteps.tolist(), schedule=Schedule())
    torch.testing.assert_close(ours.sample, x, atol=1e-5, rtol=1e-5)


def test_grid_matches_dpm_solver_linspace_and_nests():
    assert timesteps(4).tolist() == [999, 749, 500, 250]  # the paper's 4-step grid
    for n in (1, 2, 4, 8, 16, 32, 50):
        d = DPMSolverMultistepScheduler(**SD, timestep_spacing="linspace")
        d.set_timesteps(n)
        assert timesteps(n).tolist() == d.timesteps.tolist()
        assert set(timesteps(n).tolist()) <= set(timesteps(2 * n).tolist())
    assert substeps(999, 749, 4, 2) == [999, 874, 749]
    assert substeps(250, -1, 4, 2) == [250, 125, -1]
    with pytest.raises(ValueError, match="not on the 4-step grid"):
        substeps(999, 700, 4, 2)
    with pytest.raises(ValueError, match="number of steps n"):
        timesteps(0)


def test_conversions_round_trip():
    S = Schedule()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(64, 5, generator=g), torch.randn(64, 5, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = S.q_sample(x0, t, eps)
    torch.testing.assert_close(S.x0_from_eps(x_t, t, eps), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S.eps_from_x0(x_t, t, x0), eps, atol=1e-4, rtol=1e-4)
    v = S.v_from_x0(x_t, t, x0)
    torch.testing.assert_close(v, S.alpha(t)[:, None] * eps - S.sigma(t)[:, None] * x0,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S.x0_from_v(x_t, t, v), x0, atol=1e-4, rtol=1e-4)
    # t = -1 is the clean state; a DDIM step to -1 returns x0_hat
    assert float(S.alpha(-1)) == 1.0 and float(S.sigma(-1)) == 0.0
    torch.testing.assert_close(S.ddim_step(x_t, x0, t, -1), x0)
    with pytest.raises(ValueError, match="timestep out of range"):
        S.alpha(torch.tensor([1000]))


def test_wrappers_agree():
    S = Schedule()
    net = DummyEps()
    x = torch.randn(6, 2)
    t = torch.tensor([0, 10, 100, 500, 900, 999])
    eps = net(x, t)
    x0 = PredEps(net, S)(x, t)
    v = S.v_from_x0(x, t, x0)
    vnet = lambda x_, t_, c=None: v  # noqa: E731
    torch.testing.assert_close(PredV(vnet, S)(x, t), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S.eps_from_x0(x, t, x0), eps, atol=1e-4, rtol=1e-4)


def test_cfg_in_x0_equals_eps_guidance():
    S = Schedule()
    ec = lambda x, t, c=None: torch.sin(x) if c is not None else torch.cos(x)  # noqa: E731
    x, t, w = torch.randn(5, 3), torch.full((5,), 600), 7.5
    guided = CFG(PredEps(ec, S), w)(x, t, cond=torch.zeros(5))
    eps_g = ec(x, t) + w * (ec(x, t, 1) - ec(x, t))
    torch.testing.assert_close(guided, S.x0_from_eps(x, t, eps_g), atol=1e-4, rtol=1e-4)
    # a per-sample scale read from cond["w"]
    ws = torch.tensor([1.0, 2, 3, 4, 5])
    g2 = CFG(PredEps(ec, S), None)(x, t, cond={"w": ws})
    eps2 = ec(x, t) + ws[:, None] * (ec(x, t, 1) - ec(x, t))
    torch.testing.assert_close(g2, S.x0_from_eps(x, t, eps2), atol=1e-4, rtol=1e-4)


def test_threshold_static_dynamic_and_identity():
    g = torch.Generator().manual_seed(2)
    x = 3 * torch.randn(16, 3, 8, 8, generator=g)
    st = threshold(x, "static", lo=-1, hi=1)
    assert st.min() >= -1 and st.max() <= 1
    small = torch.rand(4, 10, generator=g) * 1.8 - 0.9
    for mode in ("none", "static", "dynamic"):  # inside the support nothing changes
        torch.testing.assert_close(threshold(small, mode), small)
    # dynamic thresholding equals diffusers' implementation
    d = DDPMScheduler(**SD, thresholding=True, dynamic_thresholding_ratio=0.9,
                      sample_max_value=2.0)
    torch.testing.assert_close(threshold(x, "dynamic", ratio=0.9, max_value=2.0),
                               d._threshold_sample(x.clone()), atol=1e-6, rtol=1e-6)
    dyn = threshold(x, "dynamic", ratio=0.9, max_value=2.0)
    assert dyn.abs().max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="threshold mode"):
        Threshold("reflect")
    with pytest.raises(ValueError, match="lo=1"):
        Threshold("static", lo=1, hi=-1)


def test_explicit_zero_betas_are_honoured_or_refused_never_replaced():
    """``beta_start=0.0`` is a value, not "use the default" (it was, through ``or``)."""
    from ddil_lab.validation import ConfigError

    for kind in ("linear", "scaled_linear"):
        s = Schedule(kind, beta_start=0.0)
        assert float(s.betas[0]) == 0.0 and float(s.alpha_bar[0]) == 1.0
        assert s.beta_start == 0.0
        ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0,
                            beta_end=0.02 if kind == "linear" else 0.012, beta_schedule=kind)
        torch.testing.assert_close(s.alpha_bar[:-1], ref.alphas_cumprod, atol=1e-6, rtol=1e-5)
    assert Schedule("linear").beta_start == 1e-4  # None is the default
    with pytest.raises(ConfigError, match=r"beta_end=0.0 is not allowed: it must exceed "
                                          r"beta_start=0.00085"):
        Schedule(beta_end=0.0)
    with pytest.raises(ConfigError, match=r"beta_start=0.0 is not allowed; allowed: None for "
                                          r"kind='cosine'"):
        Schedule("cosine", beta_start=0.0)
    for kw, name in (({"beta_start": float("nan")}, "beta_start=nan"),
                     ({"beta_end": 1.0}, "beta_end=1.0"), ({"T": True}, "T=True"),
                     ({"kind": "cosin"}, "kind='cosin'")):
        with pytest.raises(ConfigError, match=f"{name} is not allowed"):
            Schedule(**kw)


def test_int_timesteps_look_up_what_tensors_do():
    """One int timestep (the samplers' steps) takes a shortcut past the tensor lookup: the same
    values, the same range check, and a DDIM step with int t, s equals one with (B,) tensors."""
    S = Schedule()
    for t in (-1, 0, 499, 999):
        for name in ("alpha", "sigma", "snr"):
            assert torch.equal(getattr(S, name)(t), getattr(S, name)(torch.tensor([t]))[0])
    for bad in (-2, 1000):
        with pytest.raises(ValueError, match=r"allowed \[-1, 999\]"):
            S.alpha(bad)
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    full = lambda v: torch.full((16,), v)  # noqa: E731
    assert torch.equal(S.ddim_step(x, x0, 500, 250), S.ddim_step(x, x0, full(500), full(250)))
    assert torch.equal(S.ddim_step(x, x0, 249, -1), S.ddim_step(x, x0, full(249), full(-1)))
