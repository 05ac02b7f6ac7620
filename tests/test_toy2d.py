"""The exact mixture teacher against closed forms, and the toy metrics."""
import math

import pytest
import torch

from ddil_lab.toy.backend import GMM, ExactTeacher, Toy2dBackend, embed, make_mixture
from ddil_lab.diffusion import Schedule, timesteps
from ddil_lab.metrics import mmd, sliced_wasserstein
from ddil_lab.toy.metrics import covariate_shift, mode_stats, nll
from ddil_lab.sampling import MixedPolicy, DDIMPolicy, sample

S = Schedule()


@pytest.mark.parametrize("name,dim", [("ring8_cond", 2), ("grid25", 2), ("imbalanced", 5)])
def test_posterior_mean_is_tweedie(name, dim):
    """E[x0|x_t] = (x_t + sigma^2 grad log q_t(x_t)) / alpha, with the autograd score."""
    gmm = make_mixture(name, dim)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, dim, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randint(0, 1000, (32,), generator=g)
    label = None
    if gmm.labels is not None:
        label = torch.randint(-1, gmm.num_classes, (32,), generator=g)
    lp = gmm.log_prob(x, t, S, label=label)
    (score,) = torch.autograd.grad(lp.sum(), x)
    a, s = S.alpha(t).double()[:, None], S.sigma(t).double()[:, None]
    tweedie = (x + s ** 2 * score) / a
    torch.testing.assert_close(gmm.posterior_mean(x.detach(), t, S, label=label),
                               tweedie.detach(), atol=1e-8, rtol=1e-8)


def test_log_prob_matches_torch_distributions():
    gmm = embed(make_mixture("imbalanced"), 4)
    t = torch.full((50,), 300)
    x = torch.randn(50, 4, dtype=torch.float64)
    a, s = S.alpha(t)[0].double(), S.sigma(t)[0].double()
    comps = torch.distributions.MultivariateNormal(
        a * gmm.means, a ** 2 * gmm.covs + s ** 2 * torch.eye(4, dtype=torch.float64))
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(gmm.weights), comps)
    torch.testing.assert_close(gmm.log_prob(x, t, S), mix.log_prob(x))
    torch.testing.assert_close(gmm.log_prob(x), torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(gmm.weights),
        torch.distributions.MultivariateNormal(gmm.means, gmm.covs)).log_prob(x))


def test_conditional_restricts_to_class():
    gmm = make_mixture("ring8_cond")
    x, comp, lab = gmm.sample(2000, torch.Generator().manual_seed(0), label=1)
    assert (lab == 1).all() and (gmm.labels[comp] == 1).all()
    # p(x) = sum_c p(c) p(x|c)
    pc = torch.stack([gmm.weights[gmm.labels == c].sum() for c in range(2)])
    mix = torch.logsumexp(torch.stack([pc[c].log() + gmm.log_prob(x, label=c) for c in range(2)]), 0)
    torch.testing.assert_close(mix, gmm.log_prob(x))
    with pytest.raises(ValueError, match="no class labels"):
        make_mixture("ring8").log_prob(x, label=0)


def test_labelled_posterior_mean_of_no_rows_and_mixed_classes():
    """Rows of several classes (and -1) in any order get their own class's posterior mean, as
    one row at a time would; an empty batch gives an empty answer (a mixed rollout may hand the
    teacher no rows)."""
    gmm = make_mixture("ring8_cond")
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(40, 2, generator=g), torch.randint(0, 1000, (40,), generator=g)
    lab = torch.randint(-1, 2, (40,), generator=g)
    for dtype in (torch.float64, torch.float32):
        out = gmm.posterior_mean(x, t, S, lab, dtype=dtype)
        one = torch.cat([gmm.posterior_mean(x[i:i + 1], t[i:i + 1], S, lab[i:i + 1], dtype=dtype)
                         for i in range(40)])
        torch.testing.assert_close(out, one, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
        empty = gmm.posterior_mean(x[:0], t[:0], S, lab[:0], dtype=dtype)
        assert empty.shape == (0, 2)


def test_exact_teacher_32_steps_recovers_ring8():
    gmm = make_mixture("ring8")
    g = torch.Generator().manual_seed(0)
    x = sample(ExactTeacher(gmm, S), torch.randn(10000, 2, generator=g), timesteps(32),
               schedule=S).sample
    true = gmm.sample(10000, g)[0]
    m = mode_stats(x, gmm)
    assert m["coverage"] == 1.0
    assert m["tv"] < 0.05
    assert abs(nll(x, gmm) - nll(true, gmm)) < 0.1
    # and 4 DDIM steps of the same teacher are visibly worse: room for a distilled student
    x4 = sample(ExactTeacher(gmm, S), torch.randn(10000, 2, generator=g), timesteps(4),
                schedule=S).sample
    assert nll(x4, gmm) > nll(true, gmm) + 2.0


def test_metrics_sanity():
    gmm = make_mixture("ring8")
    g = torch.Generator().manual_seed(3)
    a, b = gmm.sample(3000, g)[0], gmm.sample(3000, g)[0]
    far = a + 0.5
    assert abs(mmd(a, b)) < 0.01 < mmd(a, far)
    assert sliced_wasserstein(a, b) < 0.02 < sliced_wasserstein(a, far)
    one_mode = gmm.means[:1].float() + 0.05 * torch.randn(1000, 2, generator=g)
    ms = mode_stats(one_mode, gmm)
    assert ms["coverage"] == 1 / 8 and abs(ms["tv"] - 7 / 8) < 1e-9 and ms["off_mode"] == 0
    # covariate shift: forward states have none; states pushed off the marginal have a lot
    t = 500
    x_t = S.q_sample(gmm.sample(5000, g)[0], torch.full((5000,), t), torch.randn(5000, 2, generator=g))
    assert abs(covariate_shift(x_t, t, gmm, S)) < 0.05
    assert covariate_shift(1.5 * x_t, t, gmm, S) > 0.2


def test_mixed_policy_extremes_equal_pure_rollouts():
    gmm = make_mixture("ring8")
    teacher = DDIMPolicy(ExactTeacher(gmm, S), S, fine_steps=8)
    student = DDIMPolicy(lambda x, t, c=None: 0.9 * x, S)
    x_T = torch.randn(256, 2)
    grid = timesteps(4)
    for p, ref in ((0.0, teacher), (1.0, student)):
        mixed = sample(MixedPolicy(teacher, student, p), x_T, grid, schedule=S).sample
        torch.testing.assert_close(mixed, sample(ref, x_T, grid, schedule=S).sample)
    half = MixedPolicy(teacher, student, 0.5, torch.Generator().manual_seed(0))
    out = sample(half, x_T, grid, schedule=S).sample
    assert 0.3 < half.last_mask.float().mean() < 0.7 and torch.isfinite(out).all()


def test_mlp_teacher_is_usable_and_guidance_runs():
    b = Toy2dBackend("ring8_cond", teacher="mlp", guidance=3.0)
    g = torch.Generator().manual_seed(0)
    cond = b.sample_cond(4000, g)
    x = sample(b.cond_teacher, b.sample_noise(4000, g), timesteps(32), cond, schedule=S).sample
    m = mode_stats(x, b.gmm)
    assert m["coverage"] == 1.0 and m["off_mode"] < 0.1
    # guided samples stay in their class's modes
    xg = sample(b.teacher, b.sample_noise(4000, g), timesteps(32), cond, schedule=S).sample
    k, _ = b.gmm.assign(xg)
    assert (b.gmm.labels[k] == cond).float().mean() > 0.97
    with pytest.raises(ValueError, match="no classes to guide"):
        Toy2dBackend("ring8", guidance=3.0, init_steps=10)
    with pytest.raises(ValueError, match="mixture='moons'"):
        make_mixture("moons")


def test_gmm_validates():
    with pytest.raises(ValueError, match="weights"):
        GMM([[0.0, 0.0]], 0.1, weights=[-1.0])
    with pytest.raises(ValueError, match="means must have shape"):
        GMM([0.0, 0.0])
    assert math.isclose(float(GMM([[0.0], [1.0]], 0.1, weights=[1, 3]).weights[1]), 0.75)


def test_float32_exact_teacher_is_within_1e5_of_float64():
    """The regime map's teacher runs in float32: on the map's mixtures (12 modes, std 0.04-0.1,
    2-3 classes), at forward states, far-off states and every t, with and without labels, it is
    within 1e-5 of the float64 oracle (measured: at most 2.1e-6)."""
    from ddil_lab.toy import class_mixture

    g = torch.Generator().manual_seed(0)
    for std in (0.04, 0.1):
        gmm = class_mixture(12, 3, std, 0.7)
        x0, _, lab = gmm.sample(4000, g)
        t = torch.randint(0, 1000, (5000,), generator=g)
        x = torch.cat([S.q_sample(x0, t[:4000], torch.randn(4000, 2, generator=g)),
                       3 * torch.randn(1000, 2, generator=g)])
        lab = torch.cat([lab, torch.randint(-1, 3, (1000,), generator=g)])
        lab = torch.where(torch.rand(5000, generator=g) < 0.3, -1, lab)
        exact = gmm.posterior_mean(x, t, S, lab)
        fast = ExactTeacher(gmm, S, torch.float32)(x, t, lab)
        assert exact.dtype == torch.float64 and fast.dtype == torch.float32
        assert (fast.double() - exact).abs().max() < 1e-5
    with pytest.raises(ValueError, match="teacher_dtype='float16'"):
        Toy2dBackend("ring8", teacher_dtype="float16", init_steps=0)
