"""The toy results table, the DDIL demo and the benchmark with tiny settings, and the seed
ensemble they rely on (each member must train exactly as it would alone)."""
import importlib.util
import math
import os

import pytest
import torch

from ddil_lab import toy as tx
from ddil_lab import train
from ddil_lab.toy.backend import Toy2dBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                     f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ring():
    return Toy2dBackend("ring8", init_steps=100)


def test_arms_and_errors():
    m, s = train.make_arm("pd", "ddil+reflected")
    assert m.reflected and m.substeps == 8 and s.priors["beta_mixed"] == 0.5
    _, s = train.make_arm("lcm", "ddil")
    assert s.priors["beta_student_bckwrd"] == 0.5
    assert not train.make_arm("dmd2", "baseline")[1].is_ddil
    with pytest.raises(ValueError, match="arm='dagger'"):
        train.make_arm("pd", "dagger")
    with pytest.raises(ValueError, match="method='sd'"):
        train.make_sampler("sd", True)
    with pytest.raises(ValueError, match="setting='moons'"):
        tx.make_backend("moons")


def test_teacher_second_draw_is_the_noise_floor(ring):
    ref = tx.make_reference(ring, n=1500, seed=0)
    rows = tx.reference_rows(ring, ref)
    floor, ddim4 = rows["teacher 32-step (2nd draw)"], rows["teacher DDIM 4-step"]
    assert floor["mmd_x1e3"] < 10 < ddim4["mmd_x1e3"]
    assert floor["nll"] < ddim4["nll"] - 2
    assert all(abs(floor[f"shift_t{t}"]) < 0.1 for t in ref.grid)
    assert all(floor[f"gap_t{t}"] < 60 for t in ref.grid)  # teacher states ~ q_t when unguided
    # the exact teacher's x0 (a posterior mean) never leaves the support: reflection is a no-op
    assert all(v == 0.0 for k, v in tx.support_violations(ring, ref).items()
               if k.startswith("outside"))


def test_paired_deltas_against_hand_computed():
    rows = [{"setting": "s", "method": "pd", "arm": arm, "seed": seed, "nll": v}
            for arm, vals in (("baseline", [1.0, 2.0, 3.0]), ("ddil", [0.5, 1.4, 2.5]))
            for seed, v in enumerate(vals)]
    (d,) = tx.paired_deltas(rows, ["nll"])
    diffs = [-0.5, -0.6, -0.5]  # ddil - baseline, seed by seed
    mu = sum(diffs) / 3
    sd = (sum((x - mu) ** 2 for x in diffs) / 2) ** 0.5
    assert d["arm"] == "ddil" and math.isclose(d["nll"], mu)
    assert math.isclose(d["nll_ci"], 4.303 * sd / 3 ** 0.5) and d["nll_sig"]


@pytest.mark.parametrize("arm", ["reflected", "baseline"])
def test_reflected_dmd2_samples_inside_the_support(ring, arm):
    """Reflected DMD2 samples (and rolls out) with the clamp it trains with; plain DMD2 does not
    clamp."""
    method, _ = train.make_arm("dmd2", arm)
    method.setup(ring)
    with torch.no_grad():
        method.student.net.out.bias += 5.0  # push the raw generator far outside [-1, 1]
    x = method.sample(torch.randn(256, 2)).sample
    assert (x.abs().max() <= 1.0) == (arm == "reflected")


def _finite(rows, keys):
    for r in rows:
        for k in keys:
            assert math.isfinite(float(r[k])), (r["method"], r["arm"], k, r[k])


def test_toy_table_quick_writes_csv_md_and_figures(tmp_path):
    table = _load("toy_table")
    res = table.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    names = set(os.listdir(tmp_path))
    assert {"results.csv", "summary.csv", "table.md", "samples_ring8.png", "steps_ring8.png",
            "modes_ring8.png"} <= names
    students = [r for r in res["rows"] if r["method"] != "teacher"]
    assert len(students) == 12 and {r["arm"] for r in students} == set(train.ARMS)
    grid = [999, 749, 500, 250]
    _finite(res["rows"], ["nll", "mmd_x1e3", "sw_x1e3", "tv", "off_mode", "shift_sum",
                          "gap_sum", "drift_sum"] + [f"shift_t{t}" for t in grid])
    _finite(students, ["wall_s", "nfe_teacher", "nfe_student"])
    # DDIL's rollouts show up in its cost; PD's target costs 8 teacher evaluations per state
    pd = {r["arm"]: r for r in students if r["method"] == "pd"}
    assert pd["baseline"]["nfe_teacher"] == 8.0 and pd["ddil"]["nfe_teacher"] > 8.0
    md = (tmp_path / "table.md").read_text()
    assert "| pd | ddil+reflected |" in md and "drift t=250" in md and "ΔNLL" in md
    again = table.main(["--deltas-from", str(tmp_path / "results.csv")])
    assert "| ring8 | pd | ddil |" in again["markdown"]
    with pytest.raises(ValueError, match="arms="):
        table.run(str(tmp_path), quick=True, arms=("nope",))


def test_demo_tiny(tmp_path):
    from ddil_lab.toy import demo
    res = demo.main(["--quick", "--out", str(tmp_path)])
    assert {"table.md", "samples_demo.png", "steps_demo.png"} <= set(os.listdir(tmp_path))
    arms = [r for r in res.rows if r["method"] == "pd"]
    assert {r["arm"] for r in arms} == {"baseline", "ddil"}
    _finite(arms, ["nll", "mmd_x1e3", "off_mode_class"]
            + [f"train_gap_t{t}" for t in res.ref.grid])
    # the regime it shows is the regime map's cell (docs/results.md): 12 modes of std 0.06 in
    # 3 classes under w = 9, pretrained width-128 students, balanced evaluation labels
    be = res.backend
    assert (be.gmm.name, be.gmm.K, be.gmm.num_classes, be.guidance) == ("ring12_cond3", 12, 3, 9.0)
    assert torch.allclose(be.gmm.covs, 0.06 ** 2 * torch.eye(2, dtype=torch.float64))
    assert (be.student_init, be.hidden) == ("pretrained", 128)
    assert torch.bincount(res.ref.cond).tolist() == [100, 100, 100]
    other = demo.main(["--quick", "--out", str(tmp_path / "ring8"), "--setting", "ring8"])
    assert other.backend.gmm.name == "ring8" and other.backend.guidance == 1.0
    with pytest.raises(SystemExit, match="--std applies to --setting guided12 only"):
        demo.main(["--quick", "--out", str(tmp_path / "x"), "--setting", "ring8", "--std", "0.1"])


def test_bench_tiny(capsys):
    bench = _load("bench")
    res = bench.main(["--steps", "3", "--batch", "16", "--repeats", "1", "--init-steps", "100",
                      "--buffer-size", "32", "--refresh-size", "16"])
    for v in res["ratios"].values():
        assert v["wall"] > 0 and math.isfinite(v["cpu"])
    assert "distill() / hand-written PD" in capsys.readouterr().out
    ens = bench.main(["--ensemble", "--steps", "2", "--batch", "4", "--repeats", "1",
                      "--init-steps", "5", "--buffer-size", "8", "--refresh-size", "4"])
    assert ens["config"]["members"] == 48
    assert set(ens["ratios"]) == {"ensemble: forward-only / bound", "ensemble: ddil / forward-only"}
    assert "| ensemble bare loop (bound) |" in capsys.readouterr().out
