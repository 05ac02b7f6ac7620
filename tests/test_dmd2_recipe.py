"""DMD2's recipe options: the regression loss on teacher ODE pairs (DMD's first version), a
randomly initialised fake critic, and the search that picks the defaults (its quick mode)."""
import pytest
import torch

from ddil_lab.diffusion import timesteps
from ddil_lab.methods import DMD2
from ddil_lab.sampling import DDIMPolicy, sample
from ddil_lab.toy.backend import Toy2dBackend
from ddil_lab.train import distill
from ddil_lab.train.arms import EnsembleBackend
from ddil_lab.validation import ConfigError


@pytest.fixture(scope="module")
def cond():
    return Toy2dBackend("ring8_cond", guidance=2.0, init_steps=100)


def test_regression_pairs_are_the_teachers_ddim_solutions(cond):
    """Oracle: every pair's target is the guided teacher's DDIM walk from the pair's state at
    its grid time down to 0 on the 8-step grid, recomputed here independently; the states at
    t = T are (numerically) pure noise; the teacher calls are counted."""
    torch.manual_seed(0)
    dmd = DMD2(n_steps=4, regression_weight=1.0, regression_pairs=16, regression_steps=8)
    dmd.setup(cond)
    p = dmd.pairs
    assert p["x_t"].shape == (64, 2)
    assert p["t"].tolist() == [t for t in (999, 749, 500, 250) for _ in range(16)]
    fine = timesteps(8).tolist()
    for t in (999, 749, 500, 250):
        rows = p["t"] == t
        walk = sample(DDIMPolicy(cond.teacher, cond.schedule), p["x_t"][rows],
                      [u for u in fine if u <= t], p["cond"][rows], schedule=cond.schedule)
        torch.testing.assert_close(p["y"][rows], walk.sample)
    assert p["x_t"][p["t"] == 999].std() > 0.9  # alpha_999 ~ 0.07: mostly noise
    # 16 pairs per grid time, walking 8, 6, 4 and 2 steps of the fine grid
    assert dmd.nfe["teacher_target"] == 16 * (8 + 6 + 4 + 2)


def test_regression_loss_is_the_mse_to_the_pairs_and_pulls_the_student(cond):
    """The loss of drawn pairs is their per-sample MSE; a few steps on the regression loss
    alone (the DM term weighted away) bring the student closer to the teacher's ODE map."""
    torch.manual_seed(1)
    dmd = DMD2(n_steps=4, regression_weight=1.0, regression_pairs=64, regression_steps=8)
    dmd.setup(cond)
    torch.manual_seed(5)
    loss = dmd.regression_loss(32)
    torch.manual_seed(5)
    idx = torch.randint(0, 256, (32,))
    p = dmd.pairs
    manual = ((dmd.student(p["x_t"][idx], p["t"][idx], p["cond"][idx]) - p["y"][idx]) ** 2
              ).mean(1)
    torch.testing.assert_close(loss, manual)
    before = float(dmd.regression_loss(256).mean().detach())
    res = distill(cond, DMD2(n_steps=4, critic_steps=1, regression_weight=1e3,
                             regression_pairs=64, regression_steps=8), steps=40, batch_size=64,
                  lr=1e-3, grad_clip=None, progress=False, seed=1)
    after = float(res.method.regression_loss(256).mean().detach())
    assert "student/regression" in res.history[-1]
    assert after < 0.5 * before


def test_random_critic_is_fresh_and_follows_the_seed(cond):
    """critic_init="random": the teacher's architecture with new weights; in an ensemble,
    member k's critic is bitwise the one built alone under seed k."""
    torch.manual_seed(0)
    a = DMD2(critic_init="random")
    a.setup(cond)
    b = DMD2()
    b.setup(cond)
    wa = dict(a.critic.named_parameters())
    wb = dict(b.critic.named_parameters())
    assert wa.keys() == wb.keys()
    assert all(not torch.equal(wa[k], wb[k]) for k in wa)
    torch.testing.assert_close(dict(b.critic.named_parameters())["net.out.weight"],
                               cond.init_net.net.out.weight)  # "teacher": a copy of its network
    ens = EnsembleBackend(cond, 2, seeds=[3, 4])
    e = DMD2(critic_init="random")
    e.setup(ens)
    for k, seed in enumerate((3, 4)):
        torch.manual_seed(seed)
        alone = cond.make_random_critic()
        for n, v in e.critic.groups[0].member(k).named_parameters():
            assert torch.equal(v, dict(alone.named_parameters())[n])


@pytest.mark.parametrize("kw,match", [
    ({"regression_weight": -1.0}, r"regression_weight=-1.0 .*>= 0"),
    ({"regression_pairs": 0}, r"regression_pairs=0"),
    ({"regression_steps": 6}, r"regression_steps=6 .*multiple of n_steps=4"),
    ({"critic_init": "student"}, r"critic_init='student' .*\('teacher', 'random'\)"),
    ({"dm_weight": 0.0}, r"dm_weight=0.0 .*unless regression_weight > 0"),
    ({"dm_weight": -1.0}, r"dm_weight=-1.0 .*>= 0"),
])
def test_bad_recipe_options_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        DMD2(**kw)


def test_regression_needs_data(cond):
    class NoData(Toy2dBackend):
        has_data = False
    be = NoData("ring8_cond", init_steps=100)
    with pytest.raises(ConfigError, match=r"regression_weight=1.0 .*without data"):
        DMD2(regression_weight=1.0).setup(be)


# ---- the search script (experiments/dmd2_search.py), quick mode ----
def _search():
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "experiments" / "dmd2_search.py"
    sys.path.insert(0, str(path.parent))  # it imports its neighbours (image_map)
    spec = importlib.util.spec_from_file_location("dmd2_search", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_search_quick_rows_ratios_and_resume(tmp_path, monkeypatch):
    """Every recipe x w x seed has a row; the ratio is the metric over the teacher's own
    second draw; a rerun over the same folder trains nothing; the files are written."""
    ds = _search()
    res = ds.run(str(tmp_path), quick=True, progress=False)
    rows = res["rows"]
    assert {(r["factor"], str(r["level"])) for r in rows} == {
        ("centre", ""), ("regression_weight", "0.0"), ("critic_init", "random")}
    assert len(rows) == 3 * 2 * 2  # recipes x w x seeds
    for r in rows:
        assert r["ratio"] == pytest.approx(r["sw_x1e3"] / res["floor"][r["w"]]["teacher2"])
        assert r["failed"] == (r["sw_x1e3"] > res["floor"][r["w"]]["ddim4"])
    assert (tmp_path / "summary.md").exists() and (tmp_path / "search.png").exists()
    monkeypatch.setattr(ds, "train_cells", lambda *a, **k: pytest.fail("retrained"))
    again = ds.run(str(tmp_path), quick=True, progress=False)
    assert [r["sw_x1e3"] for r in again["rows"]] == [r["sw_x1e3"] for r in rows]


def test_claims_quick_table(tmp_path):
    """The small-batch claims: every arm (baseline, reflected, ddil, ddil+reflected) at the
    quick batch, with its failure count in the table."""
    ds = _search()
    res = ds.run(str(tmp_path), claims=True, quick=True, progress=False)
    assert {r["arm"] for r in res["rows"]} == set(ds.CLAIM_ARMS)
    assert {r["batch_size"] for r in res["rows"]} == {7}
    for arm in ds.CLAIM_ARMS:
        assert f"| 10 | 7 | {arm} |" in res["markdown"]


def test_digits_quick(tmp_path):
    """The digits check runs through the image slice's backends with FID against the
    teacher, and its floor is the teacher's own second draw."""
    ds = _search()
    res = ds.run(str(tmp_path), digits=True, quick=True, progress=False)
    assert {r["w"] for r in res["rows"]} == {1.0, 6.0}
    for r in res["rows"]:
        assert r["ratio"] == pytest.approx(r["fid_class"] / res["floor"][r["w"]]["teacher2"])
    assert "works" in res["markdown"] and "digits" in res["markdown"]


def test_search_cli_names_bad_options():
    ds = _search()
    with pytest.raises(ConfigError, match="--seeds"):
        ds.main(["--seeds", "a,b"])


def test_dm_weight_zero_leaves_the_regression_loss_alone(cond):
    """dm_weight=0: the generator's loss is exactly regression_weight x the regression loss
    of the pairs drawn at that step (no distribution-matching term)."""
    from ddil_lab.rollout import StateSampler
    torch.manual_seed(2)
    dmd = DMD2(n_steps=4, critic_steps=1, dm_weight=0.0, regression_weight=3.0,
               regression_pairs=32, regression_steps=8)
    dmd.setup(cond)
    states = StateSampler().sample(cond, dmd.spec(), dmd.student, 16)
    *_, (group, loss, logs) = list(dmd.losses(states))
    assert group == "student"
    torch.testing.assert_close(loss.mean(), torch.tensor(3.0 * logs["regression"]),
                               rtol=1e-5, atol=1e-7)


def test_resume_with_the_regression_loss_is_bitwise(cond, tmp_path):
    """The regression pairs are drawn at setup from the run's seed, so a resumed run draws the
    same pairs and continues bit for bit (random critic and DDIL's mixed rollouts included)."""
    from ddil_lab.rollout import StateSampler

    def run(out, steps, resume=False):
        return distill(cond, DMD2(n_steps=4, critic_steps=2, regression_weight=10.0,
                                  regression_pairs=16, regression_steps=8,
                                  critic_init="random"),
                       StateSampler(beta_frwd=0.5, beta_mixed=0.5, rollout_until=500),
                       steps=steps, batch_size=16, lr=1e-3, out_dir=str(out), ckpt_every=3,
                       resume=resume, progress=False, seed=4)
    full = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6, resume=True)
    for group in ("student", "critic"):
        a = getattr(full.method, group).state_dict()
        b = getattr(resumed.method, group).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (group, k)
    assert torch.equal(full.method.pairs["y"], resumed.method.pairs["y"])


def test_one_recipe(tmp_path):
    """--recipe: the centre with settings changed, and nothing else."""
    ds = _search()
    res = ds.run(str(tmp_path), quick=True, recipe={"regression_weight": 100.0}, progress=False)
    assert {(r["factor"], r["regression_weight"]) for r in res["rows"]} == {("centre", 100.0)}


def test_gan_recipes_train_member_by_member(tmp_path, monkeypatch):
    """A recipe with the GAN head trains each (cell, seed) alone, so no head is shared between
    seeds; every member has its own head and the rows are complete."""
    ds = _search()
    monkeypatch.setattr(ds, "train_cells", lambda *a, **k: pytest.fail("GAN in an ensemble"))
    heads = []
    real = ds.distill

    def spy(*a, **k):
        res = real(*a, **k)
        heads.append(res.method.gan_head)
        return res
    monkeypatch.setattr(ds, "distill", spy)
    res = ds.run(str(tmp_path), quick=True, recipe={"gan_weight": 0.1}, progress=False)
    assert len(heads) == 2 * 2 and len({id(h) for h in heads}) == 4  # cells x seeds
    assert all(h is not None for h in heads)
    assert len(res["rows"]) == 4 and all(r["gan_weight"] == 0.1 for r in res["rows"])
