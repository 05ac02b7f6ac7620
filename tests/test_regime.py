"""Issue 14: the mixture family and the pretrained-network cache key, per-class evaluation,
cells trained as one ensemble, the shift diagnostic (oracle cases on the exact teacher; it runs
on the image and SD backends) and the regime map's --quick run."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from ddil_lab import toy as tx
from ddil_lab.diffusion import Schedule, timesteps
from ddil_lab.metrics import mmd, sliced_wasserstein
from ddil_lab.shift import shift_diagnostic
from ddil_lab.toy import backend as tb
from ddil_lab.toy.backend import GMM, Toy2dBackend, class_mixture, ring8, ring8_cond
from ddil_lab.toy.metrics import mode_stats, per_class
from ddil_lab.train.arms import EnsembleBackend, RenoisedRolloutSampler, train_cells
from ddil_lab.train.settings import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _regime_map():
    spec = importlib.util.spec_from_file_location("regime_map", ROOT / "experiments/regime_map.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- the mixture family and the cache key ----
def test_named_mixtures_are_family_instances():
    """The named mixtures are unchanged by the family (the old closed-form definitions)."""
    ang = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    ring = 0.7 * torch.stack([ang.cos(), ang.sin()], 1)
    old = GMM(ring, 0.1, weights=[0.20, 0.08, 0.15, 0.12, 0.10, 0.16, 0.05, 0.14],
              labels=[0, 1] * 4)
    new = ring8_cond()
    for a, b in ((old.means, new.means), (old.covs, new.covs), (old.weights, new.weights),
                 (old.labels, new.labels)):
        assert torch.equal(a, b)
    g = torch.linspace(-0.8, 0.8, 5, dtype=torch.float64)
    assert torch.equal(tb.grid25().means, torch.cartesian_prod(g, g))
    m = class_mixture(12, 3, 0.04, 0.6, weights=range(1, 13), dim=5)
    assert (m.K, m.d, m.num_classes) == (12, 5, 3)
    assert m.labels.tolist() == [i % 3 for i in range(12)]
    torch.testing.assert_close(m.weights, torch.arange(1, 13, dtype=torch.float64) / 78)


def test_cache_key_is_the_mixture_content(monkeypatch):
    calls = []
    real = tb.train_denoiser

    def counted(gmm, *a, **k):
        calls.append(gmm)
        return real(gmm, *a, **k)
    monkeypatch.setattr(tb, "train_denoiser", counted)
    monkeypatch.setattr(tb, "_TRAINED", {})
    a = Toy2dBackend(ring8(std=0.1), teacher="mlp", init_steps=3)
    b = Toy2dBackend(ring8(std=0.2), teacher="mlp", init_steps=3)  # same means, other covs
    assert a.cond_teacher is not b.cond_teacher and len(calls) == 2
    same = Toy2dBackend(ring8(std=0.2), teacher="mlp", init_steps=3)
    assert same.cond_teacher is b.cond_teacher and len(calls) == 2
    # same means and covariances, other weights or labels: other networks
    w = Toy2dBackend(GMM(ring8().means, 0.1, weights=range(1, 9)), teacher="mlp", init_steps=3)
    lab = Toy2dBackend(class_mixture(8, 2, 0.1), teacher="mlp", init_steps=3)
    assert w.cond_teacher is not a.cond_teacher and lab.cond_teacher is not a.cond_teacher
    assert len(calls) == 4
    # the parameterisation is part of the recipe
    eps = Toy2dBackend(ring8(std=0.1), init_steps=3, student_param="eps")
    assert type(eps.init_net).__name__ == "PredEps" and len(calls) == 5


BAD = [({"guidance": 0.5}, r"guidance=0.5 is not allowed.*a number >= 1"),
       ({"guidance": "6"}, r"guidance='6' is not allowed"),
       ({"teacher": "gmm"}, r"teacher='gmm' is not allowed.*'exact'"),
       ({"dim": 1}, r"dim=1 is not allowed.*int >= 2"),
       ({"init_steps": -1}, r"init_steps=-1 is not allowed"),
       ({"init_steps": 2.5}, r"init_steps=2.5 is not allowed"),
       ({"hidden": 0}, r"hidden=0 is not allowed.*positive int"),
       ({"seed": "a"}, r"seed='a' is not allowed"),
       ({"student_init": "zeros"}, r"student_init='zeros' is not allowed.*'random'"),
       ({"student_param": "score"}, r"student_param='score' is not allowed.*'eps'"),
       ({"schedule": "linear"}, r"schedule='linear' is not allowed.*a Schedule"),
       ({"mixture": 3}, r"mixture=3 is not allowed"),
       ({"mixture": "ring8", "guidance": 3.0}, r"guidance=3.0 .*no classes to guide")]


@pytest.mark.parametrize("kw,pattern", BAD, ids=[str(b[0]) for b in BAD])
def test_constructor_checks_before_training(kw, pattern, monkeypatch):
    def heavy(*a, **k):
        raise AssertionError("a network was trained before the settings were checked")
    monkeypatch.setattr(tb, "train_denoiser", heavy)
    with pytest.raises(ConfigError, match=pattern):
        Toy2dBackend(**{"mixture": "ring8_cond", **kw})
    if "schedule" not in kw:  # a config may give the schedule as a kind: that is allowed there
        with pytest.raises(ConfigError, match="backend." + pattern.split("=")[0]):
            tb.check_params({"mixture": "ring8_cond", **kw})


@pytest.mark.parametrize("kw,pattern", [
    ({"modes": 0}, r"modes=0 .*positive int"), ({"modes": 8, "layout": "grid"}, "square number"),
    ({"classes": 9}, r"classes=9 .*\[0, modes=8\]"), ({"std": 0.0}, r"std=0.0 .*\(0, 0.5\]"),
    ({"radius": 1.5}, r"radius=1.5"), ({"weights": [1, 2]}, r"weights=\[1, 2\] .*8 non-negative"),
    ({"layout": "spiral"}, r"layout='spiral'"), ({"dim": 1}, r"dim=1")])
def test_class_mixture_checks(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        class_mixture(**{"modes": 8, **kw})


# ---- per-class evaluation ----
def test_per_class_metrics_see_swapped_classes():
    """Samples of class 0 drawn from class 1's modes (and vice versa) match the pooled
    distribution but not the per-class one; own-class off-mode sees it, off-mode does not."""
    gmm = class_mixture(8, 2, 0.05, weights=None)
    g = torch.Generator().manual_seed(0)
    lab = torch.arange(2000) % 2
    ref = gmm.sample(2000, g, label=lab)[0]
    swapped = gmm.sample(2000, g, label=1 - lab)[0]
    pooled, cls = mmd(swapped, ref), per_class(mmd, swapped, ref, lab, lab)
    assert abs(pooled) < 0.01 and cls > 0.2
    same = gmm.sample(2000, g, label=lab)[0]
    assert abs(per_class(mmd, same, ref, lab, lab)) < 0.01
    assert per_class(sliced_wasserstein, swapped, ref, lab, lab) > \
        5 * per_class(sliced_wasserstein, same, ref, lab, lab)
    ms = mode_stats(swapped, gmm, label=lab)
    assert ms["off_mode"] < 0.01 and ms["off_mode_class"] > 0.99
    assert mode_stats(same, gmm, label=lab)["off_mode_class"] < 0.01
    # per-class TV against the within-class weights: 0-ish for true samples of unequal classes
    imb = class_mixture(8, 2, 0.05, weights=[4, 1, 4, 1, 4, 1, 4, 1])
    x = imb.sample(4000, g, label=lab.repeat(2))[0]
    assert mode_stats(x, imb, label=lab.repeat(2))["tv"] < 0.03


def test_reference_labels_are_balanced_and_metrics_per_class():
    be = Toy2dBackend(class_mixture(12, 3, 0.06, weights=range(1, 13)), guidance=3.0,
                      student_init="random")
    ref = tx.make_reference(be, n=300)
    assert torch.bincount(ref.cond).tolist() == [100, 100, 100]
    row = tx.evaluate_trajectory(ref.teacher2, be, ref, per_step=False)
    x, y, c = ref.teacher2.sample, ref.teacher.sample, ref.cond
    want = sum(mmd(x[c == k], y[c == k]) for k in range(3)) / 3
    assert math.isclose(row["mmd_x1e3"], 1e3 * want, rel_tol=1e-9)
    assert 0 <= row["off_mode_class"] <= row["off_mode"] + 1 and "shift_t999" not in row


# ---- cells as one ensemble ----
def test_cells_ensemble_fuses_guidance_and_seeds_random_inits():
    gmm = class_mixture(8, 2, 0.1)
    bes = [Toy2dBackend(gmm, guidance=w, hidden=8, student_init="random") for w in (1.0, 6.0)]
    view = EnsembleBackend(bes[0], 4, seeds=[0, 1, 0, 1], bases=[bes[0], bes[0], bes[1], bes[1]])
    assert view.teacher.fused
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(64, 2, generator=g), torch.randint(0, 1000, (64,), generator=g)
    c, m = torch.randint(0, 2, (64,), generator=g), torch.arange(64) % 4
    out = view.teacher(x, t, {"m": m, "c": c})
    for k, be in enumerate([bes[0], bes[0], bes[1], bes[1]]):
        torch.testing.assert_close(out[m == k], be.teacher(x[m == k], t[m == k], c[m == k]))
    state = torch.random.get_rng_state()
    s1, s2 = view.make_student(), view.make_student()
    assert torch.equal(state, torch.random.get_rng_state())  # the global stream is untouched
    p = [next(s1.member(k).parameters()) for k in range(4)]
    assert torch.equal(p[0], p[2]) and not torch.equal(p[0], p[1])  # follows the seed
    assert torch.equal(p[1], next(s2.member(1).parameters()))      # and repeats


def test_train_cells_returns_paired_views_and_renoised_states():
    gmm = class_mixture(8, 2, 0.1)
    bes = [Toy2dBackend(gmm, guidance=w, hidden=8, init_steps=5) for w in (1.0, 3.0)]
    views = train_cells(bes, "lcm", "ddil", seeds=(3, 4), steps=3, batch_size=16,
                        sampler_kw={"renoise": True, "buffer_size": 8, "refresh_size": 4,
                                    "prior_schedule": "student_selection", "ramp_steps": 2})
    assert [[v.seed for v in vs] for vs in views] == [[3, 4], [3, 4]]
    assert [v.member for vs in views for v in vs] == [0, 1, 2, 3]
    sampler = views[0][0].run["sampler"]
    assert isinstance(sampler, RenoisedRolloutSampler) and sampler.ramp_steps == 2
    method = views[0][0].method
    st = sampler.backward(EnsembleBackend(bes[0], 4), method.spec(), method.student,
                          "student", 40)
    assert set(st.t.tolist()) <= set(method.solver_t.tolist())  # solver times, not the grids
    assert len(set(st.t.tolist())) > 10


# ---- the shift diagnostic ----
def test_shift_diagnostic_oracle_cases():
    """An unguided exact teacher's states follow q_t: about 0. Under w = 6 they do not."""
    state = torch.random.get_rng_state()
    plain = shift_diagnostic(Toy2dBackend("ring8_cond", student_init="random"), n=2000)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's stream is untouched
    guided = shift_diagnostic(Toy2dBackend("ring8_cond", guidance=6.0, student_init="random"),
                              n=2000)
    assert plain.per_class and plain.grid == timesteps(4).tolist()
    assert abs(plain.summary) < 0.03
    assert guided.summary > 0.1 and guided.teacher[-1] > 0.3
    assert "teacher shift" in guided.table()
    # a student that is the teacher itself has the teacher's shift, up to sampling noise
    be = Toy2dBackend("ring8_cond", guidance=6.0, student_init="random")
    rep = shift_diagnostic(be, n=2000, fine_steps=None, student=be.teacher)
    assert abs(rep.student_summary - rep.summary) < 0.05


def test_shift_diagnostic_runs_on_image_backend():
    from ddil_lab.denoiser import PredV
    from ddil_lab.image import TINY_NET, ImageBackend, ImageData, UNet

    torch.manual_seed(0)
    data = ImageData("tiny", torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8),
                     torch.arange(40) % 4, ["a", "b", "c", "d"])
    be = ImageBackend(data, PredV(UNet(16, 1, 4, **TINY_NET).eval(), Schedule()), guidance=3.0)
    rep = shift_diagnostic(be, n=16, n_steps=2, fine_steps=None, n_proj=16)
    assert len(rep.teacher) == 2 and all(math.isfinite(v) for v in rep.teacher)
    assert not rep.per_class  # 4 classes x 16 states: pooled


@pytest.mark.parametrize("with_data", [False, True], ids=["prompts", "data"])
def test_shift_diagnostic_runs_on_tiny_sd(tmp_path, with_data):
    from ddil_lab.sd import SDBackend
    from ddil_lab.sd.data import make_imagefolder
    from ddil_lab.sd.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline(tmp_path / "sd15", "sd15")
    if with_data:
        g = torch.Generator().manual_seed(0)
        folder = make_imagefolder(tmp_path / "imgs", torch.rand(4, 3, 20, 24, generator=g) * 2 - 1,
                                  ["a cat", "a dog", "a bird", "a red car"])
        be = SDBackend(pipe, data=folder, guidance=4.0)
    else:
        be = SDBackend(pipe, prompts=["a cat", "a red car"], guidance=4.0)
    rep = shift_diagnostic(be, n=8, n_steps=2, fine_steps=4, n_proj=16)
    assert all(math.isfinite(v) for v in rep.teacher)
    assert ("unguided teacher" in rep.reference) == (not with_data)


# ---- the map ----
def test_spearman_against_scipy():
    rm = _regime_map()
    from scipy.stats import spearmanr
    x, y = [1.0, 2.0, 2.0, 5.0, 3.0, 0.5], [0.1, 0.4, 0.3, 0.9, 0.2, 0.0]
    assert math.isclose(rm.spearman(x, y), spearmanr(x, y).statistic, rel_tol=1e-12)
    rho, lo, hi = rm.spearman_ci(x, y, n_boot=200)
    assert lo <= rho <= hi


def test_regime_map_quick(tmp_path):
    rm = _regime_map()
    res = rm.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    for f in ("rows.csv", "deltas.csv", "map.json", "summary.md", "heatmap_pd.png",
              "diagnostic.png"):
        assert (tmp_path / f).stat().st_size > 0
    blocks = {d["block"] for d in res["deltas"]}
    assert blocks == {"pd", "pd_source", "lcm", "dmd2"}
    # a paired Δ equals the mean over seeds of the per-seed differences
    d = next(x for x in res["deltas"] if x["block"] == "pd" and x["w"] == 6.0)
    rows = {(r["arm"], r["seed"]): r["sw_x1e3"] for r in res["rows"] if r["setting"] == d["setting"]}
    want = sum(rows[("ddil", s)] - rows[("baseline", s)] for s in (0, 1)) / 2
    assert math.isclose(d["sw_x1e3"], want, rel_tol=1e-9)
    diag = {k[2]: v["summary"] for k, v in res["diagnostic"].items()}
    assert diag[6.0] > diag[1.0]  # guidance moves the teacher off q_t
    assert "Does the diagnostic predict" in res["markdown"] and "Total time" in res["markdown"]


def test_regime_map_resumes_skips_done_units_and_refuses_other_settings(tmp_path, capsys,
                                                                        monkeypatch):
    """A killed map keeps its finished units: a rerun with the same settings trains none of
    them again (and says so) and reports the same numbers; other settings over the same folder
    are refused, naming the difference. Two worker processes give the rows one process gives."""
    rm = _regime_map()
    kw = dict(quick=True, only=["pd"], progress=True)
    first = rm.run(str(tmp_path / "a"), workers=1, **kw)
    capsys.readouterr()
    trained = []
    monkeypatch.setattr(rm, "train_cells", lambda *a, **k: trained.append(1))
    again = rm.run(str(tmp_path / "a"), workers=1, **kw)
    assert not trained and "2 of 2 units already done" in capsys.readouterr().out
    assert [d["sw_x1e3"] for d in again["deltas"]] == [d["sw_x1e3"] for d in first["deltas"]]
    with pytest.raises(ConfigError, match=r"other settings \(seeds: \[0, 1\] in the folder, "
                                          r"\[0, 1, 2\] now"):
        rm.run(str(tmp_path / "a"), workers=1, seeds=(0, 1, 2), **kw)
    # a unit cut off mid-write leaves a partial line: it is dropped and the unit redone
    done = tmp_path / "a" / "done.jsonl"
    lines = done.read_text().splitlines(keepends=True)
    done.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    from ddil_lab.train.runstore import RunStore
    store = RunStore(str(tmp_path / "a"), json.loads((tmp_path / "a" / "settings.json").read_text()))
    assert len(store) == len(lines) - 1 and done.read_text().endswith("\n")


def test_regime_map_two_workers_give_the_rows_of_one(tmp_path):
    """Units run in two processes (one mixture each) give exactly the rows one process gives."""
    rm = _regime_map()
    blocks = {"pd": {**rm.QUICK["blocks"]["pd"], "classes": (2, 3), "guidance": (6.0,),
                     "inits": ("pretrained",)}}
    res = [rm.run(str(tmp_path / str(w)), quick=True, progress=False, workers=w, blocks=blocks)
           for w in (1, 2)]
    key = lambda r: (r["setting"], r["arm"], r["seed"])  # noqa: E731
    one, two = (sorted(r["rows"], key=key) for r in res)
    assert len(one) == 8 and [r["sw_x1e3"] for r in one] == [r["sw_x1e3"] for r in two]
