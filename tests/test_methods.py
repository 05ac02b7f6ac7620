"""StateSampler, PD, LCM, DMD2 and the train loop on the toy tier: identities first."""
import os

import pytest
import torch

from ddil_lab.diffusion import timesteps
from ddil_lab.methods import DMD2, LCM, PD, ConsistencyFn, make_method
from ddil_lab.metrics import mmd
from ddil_lab.rollout import SOURCES, StateSampler
from ddil_lab.sampling import DDIMPolicy, sample
from ddil_lab.toy.backend import Toy2dBackend
from ddil_lab.toy.metrics import nll
from ddil_lab.train import distill, progressive


@pytest.fixture(scope="module")
def ring():
    return Toy2dBackend("ring8")


@pytest.fixture(scope="module")
def guided_mlp():
    return Toy2dBackend("ring8_cond", teacher="mlp", guidance=3.0)


def test_pd_target_lands_where_teacher_lands(ring):
    pd = PD(n_steps=4, substeps=8)
    pd.setup(ring)
    S = ring.schedule
    x = torch.randn(64, 2)
    for t in timesteps(4).tolist():
        x0_tgt, x_s = pd.target(x, t)
        s = pd.next_t[t]
        one_step = S.ddim_step(x, x0_tgt, t, s)
        torch.testing.assert_close(one_step, x_s.float(), atol=1e-5, rtol=1e-5)
        # and x_s is the teacher's 8-substep DDIM walk on the 32-step grid
        walk = DDIMPolicy(ring.teacher, S, fine_steps=32).step(x, t, s)[0]
        torch.testing.assert_close(x_s, walk)
        x = x_s.float()


def test_consistency_boundary_conditions(ring):
    f = ConsistencyFn(ring.make_student())
    c_skip, c_out = f.boundary(torch.tensor([0, 999]))
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    assert float(c_skip[1]) < 1e-6 and abs(float(c_out[1]) - 1) < 1e-6
    x = torch.randn(16, 2)
    torch.testing.assert_close(f(x, torch.zeros(16, dtype=torch.long)), x)


def test_dmd2_gradient_vanishes_when_critic_is_teacher(ring):
    import copy
    dmd = DMD2()
    dmd.setup(ring)
    dmd.critic = copy.deepcopy(ring.init_net)
    dmd.teacher = ring.init_net  # real score == fake score
    g, _, _ = dmd.dm_gradient(torch.randn(128, 2).clamp(-1, 1), None)
    assert g.abs().max() < 1e-6
    dmd.critic.net.out.bias.data += 0.1  # a different critic gives a non-zero gradient
    g, _, _ = dmd.dm_gradient(torch.randn(128, 2).clamp(-1, 1), None)
    assert g.abs().mean() > 1e-3


def test_sampler_priors_sources_and_buffer(ring):
    with pytest.raises(ValueError, match="must sum to 1"):
        StateSampler(beta_frwd=0.5)
    with pytest.raises(ValueError, match="beta_mixed=-0.5"):
        StateSampler(beta_frwd=1.5, beta_mixed=-0.5)
    with pytest.raises(ValueError, match="prior_schedule"):
        StateSampler(prior_schedule="cosine")
    pd = PD(n_steps=4, substeps=2)
    pd.setup(ring)
    spec = pd.spec()
    sm = StateSampler(beta_frwd=0.25, beta_teacher_bckwrd=0.25, beta_student_bckwrd=0.25,
                      beta_mixed=0.25)
    st = sm.sample(ring, spec, pd.student, 400)
    assert len(st) == 400 and set(st.t.tolist()) <= set(timesteps(4).tolist())
    counts = torch.bincount(st.source, minlength=4)
    assert (counts > 50).all()
    # backward states at t = 999 are the initial noise; at later t they come from the rollout
    assert sm.nfe["teacher"] > 0 and sm.nfe["student"] > 0
    ramp = StateSampler(beta_frwd=0.5, beta_student_bckwrd=0.5, prior_schedule="student_selection",
                        ramp_steps=100)
    assert ramp.priors_at(0)["beta_frwd"] == 1.0 and ramp.priors_at(50)["beta_student_bckwrd"] == 0.25
    assert ramp.priors_at(500)["beta_student_bckwrd"] == 0.5
    until = StateSampler(beta_frwd=0.0, beta_mixed=1.0, rollout_until=500)
    assert set(until.sample(ring, spec, pd.student, 60).t.tolist()) == {999, 749, 500}
    buf = StateSampler(beta_frwd=0.0, beta_student_bckwrd=1.0, buffer_size=64, refresh_every=5)
    buf.sample(ring, spec, pd.student, 32, step=0)
    used = buf.nfe["student"]
    buf.sample(ring, spec, pd.student, 32, step=1)  # served from the buffer: no rollout
    assert buf.nfe["student"] == used
    buf.sample(ring, spec, pd.student, 32, step=5)  # refresh
    assert buf.nfe["student"] > used
    # fill: every buffer with a prior > 0 at once, and only once (benchmarks time it apart)
    two = StateSampler(beta_frwd=0.5, beta_teacher_bckwrd=0.25, beta_mixed=0.25,
                       buffer_size=16, refresh_every=5)
    assert two.fill(ring, spec, pd.student) == ["teacher", "mixed"]
    assert {k: len(v) for k, v in two.buffer.items()} == {"teacher": 16, "mixed": 16}
    before = dict(two.nfe)
    assert two.fill(ring, spec, pd.student) == []
    two.sample(ring, spec, pd.student, 32, step=1)  # no refresh step: served from the buffers
    assert two.nfe == before
    assert StateSampler(beta_frwd=0.5, beta_mixed=0.5).fill(ring, spec, pd.student) == []


def test_data_free_needs_no_forward_prior(ring):
    class NoData:
        has_data = False
    with pytest.raises(ValueError, match="beta_frwd must be 0"):
        StateSampler().check_backend(NoData())


ARMS = [(m, ddil, refl) for m in ("pd", "lcm", "dmd2") for ddil in (False, True) for refl in (False, True)]


def _sampler(method, ddil):
    if not ddil:
        return StateSampler()
    if method == "lcm":  # LCM+DDIL: forward and the student's own multistep trajectories
        return StateSampler(beta_frwd=0.5, beta_student_bckwrd=0.5)
    return StateSampler(beta_frwd=0.5, beta_mixed=0.5)


def _mmd_to_teacher(method, backend, student=None):
    """MMD between the 4-step student's samples and the (guided) 32-step teacher's."""
    g = torch.Generator().manual_seed(0)
    x_T, cond = backend.sample_noise(2000, g), backend.sample_cond(2000, g)
    x = method.sample(x_T, cond, student).sample
    ref = sample(backend.teacher, backend.sample_noise(2000, g), timesteps(32), cond,
                 schedule=backend.schedule).sample
    return mmd(x, ref)


@pytest.mark.parametrize("method,ddil,reflected", ARMS)
def test_every_arm_trains_and_improves(ring, guided_mlp, method, ddil, reflected):
    """PD and LCM: the loss falls. DMD2: the critic keeps up (its loss stays finite) and the
    generator's 4-step samples improve; its generator loss 0.5|g|^2 is a normalised gradient,
    not a fit, and need not fall."""
    kw = {"pd": dict(substeps=2), "lcm": {}, "dmd2": dict(critic_steps=2)}[method]
    for backend in (ring, guided_mlp):
        torch.manual_seed(0)
        m = make_method(method, reflected=reflected, **kw)
        r = distill(backend, m, _sampler(method, ddil), steps=40, batch_size=128, lr=1e-3,
                    progress=False)
        L = r.losses("loss/student")
        assert len(L) == 40 and all(v == v for v in L)
        if method != "dmd2":
            assert sum(L[-10:]) < sum(L[:10]), (method, ddil, reflected, L[:3], L[-3:])
        assert _mmd_to_teacher(m, backend) < 0.85 * _mmd_to_teacher(m, backend, backend.make_student())
        if ddil:
            backward = {"source/teacher", "source/student", "source/mixed"}
            assert any(k in backward for h in r.history for k in h)


@pytest.mark.parametrize("method", ["pd", "lcm", "dmd2"])
def test_short_run_beats_4_step_ddim_of_teacher(ring, method):
    kw = {"pd": dict(substeps=8), "lcm": {}, "dmd2": dict(critic_steps=5)}[method]
    r = distill(ring, make_method(method, **kw), steps=150, batch_size=256, lr=1e-3,
                progress=False)
    g = torch.Generator().manual_seed(0)
    x_T = ring.sample_noise(4000, g)
    student = r.method.sample(x_T).sample
    ddim4 = sample(ring.teacher, x_T, timesteps(4), schedule=ring.schedule).sample
    assert nll(student, ring.gmm) < nll(ddim4, ring.gmm) - 2.0


def test_history_splits_losses_by_source(ring):
    r = distill(ring, PD(substeps=2), StateSampler(beta_frwd=0.5, beta_student_bckwrd=0.5),
                steps=5, batch_size=64, progress=False)
    keys = set().union(*r.history)
    assert {"loss/student", "source/forward", "source/student", "nfe/teacher", "lr"} <= keys
    assert {k.split("/")[1] for k in keys if k.startswith("source/")} <= set(SOURCES)


def test_forward_only_batches_are_forward_states_and_log_one_source(ring):
    """Forward diffusion alone draws no source split: a batch is exactly ``forward``'s states
    (the same random stream), and the history logs its loss as the forward source's."""
    sp = PD(substeps=2)
    sp.setup(ring)
    spec, sampler = sp.spec(), StateSampler()
    torch.manual_seed(5)
    a = sampler.sample(ring, spec, sp.student, 32)
    torch.manual_seed(5)
    b = sampler.forward(ring, spec, 32)
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.t, b.t) and not a.source.any()
    r = distill(ring, PD(substeps=2), None, steps=3, batch_size=32, progress=False)
    assert all(h["source/forward"] == h["loss/student"] for h in r.history)


def test_pd_target_refuses_states_off_its_grid(ring):
    pd = PD(n_steps=4, substeps=2)
    pd.setup(ring)
    x = torch.randn(3, 2)
    for t in (499, -5, 1200):
        with pytest.raises(ValueError, match=f"PD got a state at t={t}, not on its 4-step grid"):
            pd.target(x, torch.tensor([999, t, 250]))


def test_resume_is_bitwise(ring, tmp_path):
    def run(out, steps, resume=False):
        return distill(ring, LCM(), StateSampler(beta_frwd=0.5, beta_student_bckwrd=0.5,
                                                 buffer_size=64, refresh_every=3),
                       steps=steps, batch_size=32, lr=1e-3, ema_decay=0.9, out_dir=str(out),
                       ckpt_every=4, resume=resume, progress=False, seed=3)
    full = run(tmp_path / "a", 12)
    run(tmp_path / "b", 8)
    resumed = run(tmp_path / "b", 12, resume=True)
    for (k, a), b in zip(full.method.student.state_dict().items(),
                         resumed.method.student.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(full.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)
    assert [h["loss/student"] for h in full.history] == [h["loss/student"] for h in resumed.history]


def test_progressive_halving_chains_teachers(ring):
    res = progressive(ring, start=8, end=2, steps_per_stage=[5, 5], batch_size=32, lr=1e-3,
                      progress=False)
    assert [r.method.n_steps for r in res] == [4, 2]
    assert res[1].method.teacher is not ring.teacher  # stage two is taught by stage one
    with pytest.raises(ValueError, match="power of two"):
        progressive(ring, start=12, end=4)


@pytest.mark.parametrize("method,per_state", [(PD(n_steps=4, substeps=4), 4), (LCM(), 1),
                                               (DMD2(critic_steps=3), 1)])
def test_teacher_calls_of_the_targets_are_counted(method, per_state):
    """``nfe/teacher_target`` counts each method's own teacher calls (PD: substeps DDIM steps
    per state; LCM: one solver step; DMD2: one real score, the critic not counted), apart
    from the rollouts' ``nfe/teacher``; a guided (CFG) teacher call counts once per state."""
    guided = Toy2dBackend("ring8_cond", guidance=2.0, init_steps=100)
    calls = []
    inner = guided.teacher.forward
    guided.teacher.forward = lambda x, t, c=None: (calls.append(len(x)), inner(x, t, c))[1]
    try:
        res = distill(guided, method, None, steps=3, batch_size=16, lr=1e-3, progress=False)
    finally:
        guided.teacher.forward = inner
    assert [h["nfe/teacher_target"] for h in res.history] == [16 * per_state * s for s in (1, 2, 3)]
    assert [h["nfe/teacher"] for h in res.history] == [0, 0, 0]  # forward states: no rollouts
    assert sum(calls) == 3 * 16 * per_state  # the counter equals the calls the teacher saw
    rolled = distill(guided, PD(n_steps=4, substeps=2), StateSampler(beta_frwd=0.0,
                     beta_teacher_bckwrd=1.0), steps=2, batch_size=16, lr=1e-3, progress=False)
    h = rolled.history[-1]
    assert h["nfe/teacher_target"] == 2 * 16 * 2 and h["nfe/teacher"] > 0


def test_progressive_stages_checkpoint_apart_and_resume(ring, tmp_path):
    kw = dict(start=8, end=2, steps_per_stage=3, batch_size=16, lr=1e-3, progress=False,
              out_dir=str(tmp_path), ckpt_every=3)
    first = progressive(ring, **kw)
    assert sorted(os.listdir(tmp_path)) == ["stage_2", "stage_4"]
    again = progressive(ring, **kw, resume=True)  # both stages were finished: loaded
    assert [r.resumed_from for r in again] == [str(tmp_path / f"stage_{n}" / "step_0000003")
                                               for n in (4, 2)]
    for a, b in zip(first, again):
        for (k, v), w in zip(a.student.state_dict().items(), b.student.state_dict().values()):
            assert torch.equal(v, w), k
