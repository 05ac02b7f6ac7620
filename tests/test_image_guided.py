"""Issue 22: the guided image tier. Classifier-free guidance of a class-conditional UNet teacher,
guidance-conditioned students (a w-embedding), the per-class evaluation against the guided
teacher, the shift diagnostic on the image backend (and, slow, on a random full-size SD1.5),
and experiments/image_map.py --quick end to end."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from ddil_lab.denoiser import CFG, PredV
from ddil_lab.diffusion import Schedule, timesteps
from ddil_lab.image import (TINY_NET, GuidanceEmbedding, ImageBackend, ImageData, UNet,
                            teacher_cache_dir)
from ddil_lab.image import metrics as im
from ddil_lab.shift import shift_diagnostic
from ddil_lab.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _data(n=80, classes=4):
    g = torch.Generator().manual_seed(0)
    return ImageData("tiny", torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8,
                                           generator=g),
                     torch.arange(n) % classes, [str(k) for k in range(classes)])


def _teacher(classes=4):
    torch.manual_seed(0)
    return PredV(UNet(16, 1, classes, **TINY_NET).eval(), Schedule())


def _x(n=6, t=500):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 16, 16, generator=g), torch.full((n,), t)


# ---- the guided teacher ----
def test_cfg_teacher_at_fixed_w_is_the_guidance_formula():
    """The backend's teacher at w = 3 is x0_u + w (x0_c - x0_u) of the conditional network
    (x0_u: the learned null class), and the fixed-w conditioning is plain labels."""
    teacher, w = _teacher(), 3.0
    be = ImageBackend(_data(), teacher, guidance=w)
    x, t = _x()
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    x0_c = teacher(x, t, y)
    x0_u = teacher(x, t, torch.full_like(y, -1))
    torch.testing.assert_close(be.teacher(x, t, y), x0_u + w * (x0_c - x0_u))
    torch.testing.assert_close(teacher(x, t, None), x0_u)  # None is the null class too
    assert torch.is_tensor(be.sample_cond(5)) and be.sample_cond(5).dtype == torch.long
    unguided = ImageBackend(_data(), teacher, guidance=1.0)
    torch.testing.assert_close(unguided.teacher(x, t, y), x0_c)


def test_range_teacher_guides_each_sample_with_its_own_w():
    teacher = _teacher()
    be = ImageBackend(_data(), teacher, guidance=(2.0, 8.0))
    x, t = _x()
    _, cond = be.sample_data(6, torch.Generator().manual_seed(0))
    assert set(cond) == {"y", "w"} and cond["w"].shape == (6,)
    y, w = cond["y"], cond["w"]
    x0_c, x0_u = teacher(x, t, y), teacher(x, t, None)
    want = x0_u + w[:, None, None, None] * (x0_c - x0_u)
    torch.testing.assert_close(be.teacher(x, t, cond), want)
    # per row, the same as a fixed-w teacher at that row's w
    k = 2
    fixed = CFG(teacher, float(w[k]))
    torch.testing.assert_close(be.teacher(x[k:k + 1], t[k:k + 1], {"y": y[k:k + 1], "w": w[k:k + 1]}),
                               fixed(x[k:k + 1], t[k:k + 1], y[k:k + 1]))


# ---- the w-embedding ----
def test_w_embedding_draws_w_in_range_and_starts_at_the_conditional_teacher():
    teacher = _teacher()
    be = ImageBackend(_data(), teacher, guidance=(2.0, 8.0))
    assert be.w_embed
    w = be.sample_cond(2000, torch.Generator().manual_seed(0))["w"]
    assert 2.0 <= float(w.min()) and float(w.max()) <= 8.0 and float(w.std()) > 1.0
    student = be.make_student()
    assert isinstance(student.net.unet.class_embedding, GuidanceEmbedding)
    x, t = _x()
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    for wv in (1.0, 5.0, 9.0):  # zero-initialised: equal to the conditional teacher for any w
        torch.testing.assert_close(student(x, t, be.cond_at(y, wv)), teacher(x, t, y))
    with pytest.raises(ValueError, match="needs cond"):
        student(x, t, y)  # a guidance-conditioned student needs its w


def test_w_embedded_student_learns_to_depend_on_w_and_reloads():
    """A few PD steps on the range backend (the teacher guides each sample with its own w) make
    the student's output depend on w; its network rebuilds from its config."""
    from ddil_lab.methods import PD
    from ddil_lab.rollout import StateSampler
    from ddil_lab.train import distill

    be = ImageBackend(_data(), _teacher(), guidance=(1.0, 9.0))
    res = distill(be, PD(n_steps=2, substeps=2), StateSampler(), steps=3, batch_size=8,
                  lr=1e-2, progress=False)
    s = res.student
    x, t = _x()
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        a, b = s(x, t, be.cond_at(y, 1.5)), s(x, t, be.cond_at(y, 8.0))
    assert float((a - b).abs().max()) > 1e-4
    assert s.net.config["w_embed_dim"] == be.w_embed_dim
    net = UNet(**s.net.config)
    net.load_state_dict(s.net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(PredV(net, Schedule())(x, t, be.cond_at(y, 8.0)), b)


def test_guidance_settings_are_checked():
    with pytest.raises(ConfigError, match="guidance"):
        ImageBackend(_data(), _teacher(), guidance=(5.0, 2.0))
    with pytest.raises(ConfigError, match="guidance"):
        ImageBackend(_data(), _teacher(), guidance=0.5)
    with pytest.raises(ConfigError, match="w_embed"):
        ImageBackend(_data(), _teacher(), guidance=3.0, w_embed="yes")
    with pytest.raises(ConfigError, match="w_embed"):
        ImageBackend(_data(), _teacher(), guidance=(1.0, 9.0), w_embed=False)


def test_teacher_cache_dir_is_keyed_by_the_recipe(tmp_path):
    a = teacher_cache_dir(tmp_path, "digits", net="small", conditional=True, steps=10)
    assert a == teacher_cache_dir(tmp_path, "digits", steps=10, conditional=True, net="small")
    assert a != teacher_cache_dir(tmp_path, "digits", net="small", conditional=False, steps=10)
    assert a.parent == tmp_path and a.name.startswith("digits_")


# ---- evaluation and the diagnostic ----
class _Fixed:
    """A sampler that returns a given trajectory (the oracle of the evaluation maths)."""

    def __init__(self, traj):
        self.traj = traj

    def sample(self, x_T, cond=None):
        return self.traj


def test_class_reference_oracle():
    """The teacher's own reference trajectory, evaluated as a student: FID 0 per class,
    precision = recall = 1, and its drift from itself is minus the noise floor."""
    be = ImageBackend(_data(), _teacher(), guidance=3.0)
    clf = im.Classifier(1, 4).eval()
    grid = timesteps(2).tolist()
    ref = im.ClassReference(be, clf, n=40, grid=grid, fine_steps=4)
    assert ref.labels.bincount().tolist() == [10] * 4
    from ddil_lab.sampling import DDIMPolicy, sample
    g = torch.Generator().manual_seed(1234)
    be.sample_noise(40, g)
    traj = sample(DDIMPolicy(be.teacher, be.schedule, fine_steps=4), be.sample_noise(40, g),
                  grid, ref.cond, schedule=be.schedule)
    torch.testing.assert_close(traj.sample.clamp(-1, 1), ref.samples)  # the same draw
    e = ref.evaluate(_Fixed(traj))
    assert abs(e["fid_class"]) < 1e-3 and e["precision"] == 1.0 and e["recall"] == 1.0
    for t in grid:
        assert math.isclose(e[f"drift_t{t}"], -ref.floor[t] / ref.scale[t], abs_tol=1e-9)
    assert e["acc"] == ref.accuracy
    assert math.isfinite(e["gap"])


def test_shift_diagnostic_on_the_image_backend_in_a_feature_space():
    """In pooled pixels, class by class (labels with >= 20 states per class); at t = 999 both
    sets are pure noise (about 0). A w-embedded backend's dict conditioning runs too."""
    data = _data(160)
    be = ImageBackend(data, _teacher(), guidance=6.0)
    rep = shift_diagnostic(be, n=200, n_steps=2, fine_steps=4, features=im.pooled_pixels,
                           n_proj=16)
    assert rep.per_class and len(rep.teacher) == 2
    assert all(math.isfinite(v) for v in rep.teacher)
    assert abs(rep.teacher[0]) < 0.2  # t = 999: both sets are (almost) pure noise
    rng = ImageBackend(data, _teacher(), guidance=(1.0, 9.0))
    rep = shift_diagnostic(rng, n=40, n_steps=2, fine_steps=None, features=im.pooled_pixels,
                           n_proj=16)
    assert all(math.isfinite(v) for v in rep.teacher)


# ---- the slice ----
def _image_map():
    spec = importlib.util.spec_from_file_location("image_map", ROOT / "experiments/image_map.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_image_map_quick_writes_files_and_resumes(tmp_path, monkeypatch):
    mod = _image_map()
    out = tmp_path / "map"
    pred = mod.run(str(out), quick=True, predict_only=True, progress=False)
    assert (out / "prediction.md").stat().st_size > 0 and not pred["rows"]
    assert {p["toy"] for p in pred["prediction"] if p["method"] == "pd"} == {"none", "little"}
    res = mod.run(str(out), quick=True, progress=False)
    assert res["skipped"] == 2  # the diagnostic units (w 1, 6; 2 steps) of the predict-only run
    for f in ("rows.csv", "deltas.csv", "map.json", "summary.md", "heatmap.png",
              "prediction.md"):
        assert (out / f).stat().st_size > 0
    assert {(d["method"], d["w"]) for d in res["deltas"]} == {
        (m, w) for m in ("pd", "lcm", "dmd2") for w in (1.0, 6.0)}
    d = next(x for x in res["deltas"] if x["method"] == "pd" and x["w"] == 6.0)
    rows = {(r["arm"], r["seed"]): r["fid_class"] for r in res["rows"] if r["setting"] == d["setting"]}
    want = sum(rows[("ddil", s)] - rows[("baseline", s)] for s in (0, 1)) / 2
    assert math.isclose(d["fid_class"], want, rel_tol=1e-9)
    assert {"acc", "precision", "recall", "gap", "drift", "gap_t999"} <= set(res["rows"][0])
    # a rerun with the same settings trains nothing and gives the same deltas
    monkeypatch.setattr(mod, "train_cells", lambda *a, **k: pytest.fail("retrained"))
    again = mod.run(str(out), quick=True, progress=False)
    assert again["skipped"] == 2 + 6 + 2  # diagnostics, (method, arm) ensembles, teacher rows
    assert [x["fid_class"] for x in again["deltas"]] == [x["fid_class"] for x in res["deltas"]]
    with pytest.raises(ConfigError, match="seeds"):
        mod.run(str(out), quick=True, progress=False, seeds=[0, 1, 2])


# ---- the diagnostic at full size (slow) ----
@pytest.mark.slow
def test_shift_diagnostic_on_random_full_size_sd15_at_low_resolution():
    """The diagnostic's code path on the real SD1.5 architecture (860M-parameter UNet, random
    weights) at 64 px (8x8 latents), prompts only: the unguided teacher's rollouts stand in for
    q_t. Random weights: the number means nothing, the path and the shapes do."""
    from ddil_lab.sd import SDBackend
    from ddil_lab.sd.random_pipeline import random_pipeline

    torch.manual_seed(0)
    be = SDBackend(random_pipeline("sd15"), prompts=["a cat", "a red car"], guidance=7.5,
                   resolution=64)
    rep = shift_diagnostic(be, n=8, n_steps=2, fine_steps=None, n_proj=16)
    assert len(rep.teacher) == 2 and all(math.isfinite(v) for v in rep.teacher)
    assert "unguided teacher" in rep.reference
