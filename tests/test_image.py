"""The image tier against oracles: diffusers' DDIM loop with the UNet, closed-form Frechet
distances, CIFAR-10 files written here in CIFAR's own format, exact resumption, and
fail-fast errors offline."""
import hashlib
import importlib.util
import json
import math
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ddil_lab import hub
from ddil_lab.image import (ImageBackend, UNet, load_cifar10, load_digits,
                                     load_teacher, read_teacher_config, train_teacher)
from ddil_lab.denoiser import CFG, PredEps, PredV, wrap
from ddil_lab.diffusion import Schedule
from ddil_lab import metrics as cm
from ddil_lab.image import metrics as im
from ddil_lab.sampling import Trajectory, sample

TINY_NET = dict(channels=(8, 16), layers_per_block=1, attention=(False, True), norm_groups=4)
LINEAR = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def tiny_unet(num_classes=10, size=16, channels=1, seed=0):
    torch.manual_seed(seed)
    net = UNet(size, channels, num_classes, **TINY_NET)
    with torch.no_grad():  # make the random network's output large enough to matter
        net.unet.conv_out.weight.mul_(3)
    return net.eval()


@pytest.fixture(scope="module")
def digits():
    return load_digits()


# ---- data ----
def test_digits_offline_set(digits):
    assert digits.shape == (1, 16, 16) and len(digits) == 1797 and digits.num_classes == 10
    x, y = digits.get(torch.arange(len(digits)))
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # background is -1
    torch.testing.assert_close(digits.class_weights.sum().item(), 1.0)
    assert (digits.class_weights - 0.1).abs().max() < 0.01  # about balanced
    a = digits.sample(8, torch.Generator().manual_seed(0))
    b = digits.sample(8, torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    tr, te = digits.split(0.9)
    assert len(tr) + len(te) == len(digits) and len(set(tr.labels.tolist())) == 10
    from sklearn.datasets import load_digits as sk_digits
    raw = torch.tensor(sk_digits().images, dtype=torch.float32)[:, None]  # (1797, 1, 8, 8), 0..16
    torch.testing.assert_close(load_digits(size=8).images, raw / 8 - 1)  # only rescaled
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(x, 2).mean(), (raw / 8 - 1).mean(),
                               atol=0.02, rtol=0)  # upsampling keeps the mean intensity


def _write_cifar(root, n_per_batch=3):
    """Write a tiny data set in CIFAR-10's on-disk format (python pickles of uint8 rows in
    R, G, B planes) and return its images (N, 3, 32, 32), labels and the checksums."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    md5, images, labels = {}, {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n_per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x.reshape(n_per_batch, 3072), "labels": y,
                         "batch_label": name}, f)
        images[name], labels[name] = x, y
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": n_per_batch}, f)
    for p in folder.iterdir():
        md5[p.name] = hashlib.md5(p.read_bytes()).hexdigest()
    return images, labels, md5, names


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    images, labels, md5, names = _write_cifar(tmp_path)
    # The files are CIFAR-10's format; only their checksums differ from the real data set's.
    monkeypatch.setattr(CIFAR10, "train_list", [[f, md5[f]] for f, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", dict(CIFAR10.meta, md5=md5["batches.meta"]))
    return tmp_path, images, labels, names


def test_cifar10_loader_reads_files_written_in_cifar_format(cifar_root):
    root, images, labels, names = cifar_root
    data = load_cifar10(root, download=False)
    assert data.shape == (3, 32, 32) and len(data) == 15 and data.images.dtype == torch.uint8
    want = np.concatenate([images[f"data_batch_{i}"] for i in range(1, 6)])
    assert torch.equal(data.images, torch.from_numpy(want))  # channel planes in the right place
    assert data.labels.tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    assert data.class_names == names and data.hflip
    x, y = data.get(torch.tensor([4]))
    torch.testing.assert_close(x[0], torch.from_numpy(want[4]).float() / 127.5 - 1)
    test = load_cifar10(root, train=False, download=False)
    assert torch.equal(test.images, torch.from_numpy(images["test_batch"]))
    # and the backend on it: data in [-1, 1], labels as conditioning
    be = ImageBackend("cifar10", teacher=wrap(tiny_unet(10, 32, 3), Schedule("linear"), "v"),
                      root=root, download=False)
    x0, c = be.sample_data(6, torch.Generator().manual_seed(0))
    assert x0.shape == (6, 3, 32, 32) and c.shape == (6,) and x0.abs().max() <= 1
    assert be.sample_noise(2).shape == (2, 3, 32, 32)


def test_cifar10_missing_files_fail_fast(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*download=True"):
        load_cifar10(tmp_path, download=False)
    monkeypatch.setattr(hub, "host_reachable", lambda host, **kw: False)
    t0 = time.time()
    with pytest.raises(hub.OfflineError, match="CIFAR-10.*www.cs.toronto.edu is unreachable"):
        load_cifar10(tmp_path)
    assert time.time() - t0 < 5
    with pytest.raises(ValueError, match="needs root"):
        ImageBackend("cifar10", teacher=wrap(tiny_unet(), Schedule("linear"), "v"))


def test_cifar10_corrupted_files_name_the_folder(cifar_root, monkeypatch):
    root, *_ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not cifar")
    with pytest.raises(RuntimeError, match="cifar-10-batches-py failed torchvision's check"):
        load_cifar10(root, download=False)


# ---- the UNet teacher through our adapters == diffusers' DDIM loop ----
@pytest.mark.parametrize("prediction,dpred", [("eps", "epsilon"), ("v", "v_prediction")])
def test_unet_adapters_reproduce_diffusers_ddim(prediction, dpred):
    net = tiny_unet()
    S = Schedule("linear")
    sch = DDIMScheduler(**LINEAR, set_alpha_to_one=True, clip_sample=False,
                        timestep_spacing="trailing", prediction_type=dpred)
    sch.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x_T, c = torch.randn(4, 1, 16, 16, generator=g), torch.tensor([0, 3, -1, 9])
    x = x_T.clone()
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(net.unet(x, t, class_labels=torch.tensor([0, 3, 10, 9])).sample,
                         t, x).prev_sample
    ours = sample(wrap(net, S, prediction), x_T, sch.timesteps.tolist(), c, schedule=S).sample
    assert x.abs().max() > 0.5  # the comparison is not trivially small
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_guided_teacher_is_eps_space_cfg(digits):
    """ImageBackend(guidance=w).teacher under DDIM == diffusers' loop with
    eps_u + w (eps_c - eps_u), the unconditional input being the learned null class."""
    net, S, w = tiny_unet(), Schedule("linear"), 3.0
    be = ImageBackend(digits, PredEps(net, S), guidance=w)
    assert isinstance(be.teacher, CFG)
    sch = DDIMScheduler(**LINEAR, set_alpha_to_one=True, clip_sample=False,
                        timestep_spacing="trailing")
    sch.set_timesteps(4)
    x_T = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    c = torch.tensor([1, 5, 7])
    x = x_T.clone()
    with torch.no_grad():
        for t in sch.timesteps:
            e_c = net.unet(x, t, class_labels=c).sample
            e_u = net.unet(x, t, class_labels=torch.full((3,), 10)).sample
            x = sch.step(e_u + w * (e_c - e_u), t, x).prev_sample
    ours = sample(be.teacher, x_T, sch.timesteps.tolist(), c, schedule=S).sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_backend_contract(digits):
    S = Schedule("linear")
    be = ImageBackend(digits, PredV(tiny_unet(), S))
    assert be.shape == (1, 16, 16) and be.has_data and be.conditional
    assert be.support.mode == "static" and (be.support.lo, be.support.hi) == (-1.0, 1.0)
    assert all(not p.requires_grad for p in be.teacher.parameters())
    g = torch.Generator().manual_seed(0)
    x0, c = be.sample_data(64, g)
    assert x0.shape == (64, 1, 16, 16) and c.dtype == torch.long and 0 <= c.min() <= c.max() < 10
    cond = be.sample_cond(20000, g)
    freq = torch.bincount(cond, minlength=10).double() / 20000
    assert (freq - digits.class_weights).abs().max() < 0.015
    # the student starts as the teacher but is its own trainable copy
    st, critic = be.make_student(), be.make_critic()
    x_t, t = torch.randn(4, 1, 16, 16), torch.tensor([999, 600, 300, 10])
    with torch.no_grad():
        torch.testing.assert_close(st(x_t, t, c[:4]), be.teacher(x_t, t, c[:4]))
    assert all(p.requires_grad for p in st.parameters()) and isinstance(st, PredV)
    with torch.no_grad():
        next(st.parameters()).add_(1.0)
    assert not torch.equal(next(st.parameters()), next(be.teacher.parameters()))
    assert next(critic.parameters()) is not next(st.parameters())
    assert st.net.features(x_t, t, c[:4]).shape[0] == 4  # for DMD2's GAN head
    # unconditional view of the same teacher: cond None everywhere
    un = ImageBackend(digits, PredV(tiny_unet(), S), conditional=False)
    assert un.sample_data(3)[1] is None and un.sample_cond(3) is None
    with pytest.raises(ValueError, match="guidance=2.0 needs conditional=True"):
        ImageBackend(digits, PredV(tiny_unet(), S), guidance=2.0, conditional=False)
    with pytest.raises(ValueError, match="data='mnist' is not allowed; allowed: one of"):
        ImageBackend("mnist", PredV(tiny_unet(), S))
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    be.plot_samples(x0[:9], ax)
    plt.close(fig)


def test_distill_api_runs_on_the_image_backend(digits):
    """The same distill(...) as every tier: PD with DDIL's mixed rollouts, and DMD2 with the
    optional GAN head on the critic UNet's mid-block features."""
    from ddil_lab.methods import DMD2, PD
    from ddil_lab.rollout import StateSampler
    from ddil_lab.train import distill

    be = ImageBackend(digits, PredV(tiny_unet(), Schedule()))
    res = distill(be, PD(n_steps=4, substeps=2), StateSampler(beta_frwd=0.5, beta_mixed=0.5),
                  steps=2, batch_size=8, progress=False)
    assert all(math.isfinite(h["loss/student"]) for h in res.history)
    x_t, t = torch.randn(2, 1, 16, 16), torch.tensor([999, 500])
    with torch.no_grad():
        assert not torch.equal(res.student(x_t, t, None), be.teacher(x_t, t, None))
    res = distill(be, DMD2(n_steps=4, critic_steps=1, gan_weight=0.1),
                  StateSampler(beta_frwd=0.5, beta_mixed=0.5), steps=1, batch_size=4,
                  progress=False)
    assert math.isfinite(res.history[-1]["loss/student"])


# ---- teacher training ----
def test_train_teacher_resumes_exactly_and_loads(tmp_path, digits):
    kw = dict(net=TINY_NET, batch_size=8, warmup=2, ema_decay=0.9, progress=False)
    straight = train_teacher(digits, steps=4, ckpt_dir=tmp_path / "a", **kw)
    train_teacher(digits, steps=2, ckpt_dir=tmp_path / "b", **kw)
    assert read_teacher_config(tmp_path / "b")["step"] == 2
    resumed = train_teacher(digits, steps=4, ckpt_dir=tmp_path / "b", **kw)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    from safetensors.torch import load_file
    sa, sb = (load_file(str(tmp_path / d / "train_state.safetensors")) for d in "ab")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # online weights and AdamW moments too
    cfg = read_teacher_config(tmp_path / "a")
    assert cfg["step"] == 4 and cfg["prediction"] == "v" and cfg["data"] == "digits"
    loaded = load_teacher(tmp_path / "a")
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([900, 100]), torch.tensor([1, -1])
    torch.testing.assert_close(loaded(x, t, c), straight(x, t, c))
    be = ImageBackend(digits, tmp_path / "a")
    torch.testing.assert_close(be.teacher(x, t, c), straight(x, t, c))
    with pytest.raises(ValueError, match="its batch_size=8 differs from batch_size=16"):
        train_teacher(digits, steps=6, ckpt_dir=tmp_path / "a", **dict(kw, batch_size=16))
    with pytest.raises(ValueError, match="prediction='z' is not one of"):
        train_teacher(digits, steps=1, prediction="z")


def test_teacher_command_line(tmp_path, capsys):
    from ddil_lab.image.backend import main
    main(["--data", "digits", "--net", "tiny", "--steps", "2", "--batch-size", "4",
          "--ckpt-dir", str(tmp_path)])
    assert read_teacher_config(tmp_path)["step"] == 2
    assert "(2 steps)" in capsys.readouterr().out


def test_train_teacher_loss_goes_down(digits):
    losses = []
    train_teacher(digits, steps=60, net=TINY_NET, batch_size=32, lr=3e-3, warmup=5,
                  progress=False, prediction="eps", schedule=Schedule("linear"),
                  callback=lambda k, loss: losses.append(loss))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    with pytest.raises(ValueError, match="prediction='eps' divides by alpha"):
        train_teacher(digits, steps=1, prediction="eps")  # the cosine schedule's alpha(999) ~ 0


@pytest.mark.slow
def test_digits_teacher_is_usable_after_500_steps(digits):
    """The offline recipe: 500 steps (a few CPU minutes) give a class-conditional teacher whose
    32-step samples are as close to the data as held-out data, with every class in
    proportion; plain 4-step DDIM is visibly worse (room for a student)."""
    teacher = train_teacher(digits, steps=500, progress=False)
    ev = im.ImageEvaluator.for_backend(ImageBackend(digits, teacher), n=500, diversity="none")
    rows = ev.reference_rows()
    data, fine, ddim4 = (rows[k] for k in ("data (held out)", "teacher 32-step",
                                           "teacher DDIM 4-step"))
    assert fine["fid"] < 1.5 * data["fid"]
    assert fine["coverage"] == 1.0 and fine["tv"] < 0.1
    assert ddim4["fid"] > 1.3 * fine["fid"]


# ---- Frechet distance ----
def _spd(d, g):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_closed_forms():
    from scipy.linalg import sqrtm

    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 6, generator=g, dtype=torch.float64)
    assert cm.frechet_distance(f, f) < 1e-8
    delta = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.1, 0.3], dtype=torch.float64)
    assert cm.frechet_distance(f, f + delta) == pytest.approx(float(delta.pow(2).sum()), abs=1e-8)
    # stats form vs the textbook formula with scipy's sqrtm
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    S1, S2 = _spd(6, g), _spd(6, g)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(S1.numpy() + S2.numpy()
                                              - 2 * sqrtm(S1.numpy() @ S2.numpy()).real)
    assert cm.frechet_distance_from_stats(mu1, S1, mu2, S2) == pytest.approx(float(ref), rel=1e-9)
    # samples of two Gaussians: FD -> |mu1 - mu2|^2 + sum (s1 - s2)^2 for diagonal covariances
    s1, s2 = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([1.0, 1.5, 1.0])
    a = torch.randn(40000, 3, generator=g) * s1
    b = torch.randn(40000, 3, generator=g) * s2 + torch.tensor([1.0, 0.0, 0.0])
    closed = 1.0 + float(((s1 - s2) ** 2).sum())
    assert cm.frechet_distance(a, b) == pytest.approx(closed, rel=0.02)
    assert cm.frechet_distance(a[:20000], a[20000:]) < 0.01


def test_precision_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(200, 2, generator=g) * 0.1,
                      torch.randn(200, 2, generator=g) * 0.1 + 5])
    assert cm.precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    pr = cm.precision_recall(real, real[:200])  # one of two modes: precise, half the recall
    assert pr["precision"] == 1.0 and 0.45 < pr["recall"] < 0.55
    assert cm.precision_recall(real, real + 20)["precision"] == 0.0


# ---- mode coverage ----
class LabelReader(torch.nn.Module):
    """A perfect classifier for images that carry their label in pixel (0, 0)."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long(), 10).float()


def test_mode_coverage_oracle():
    w = torch.tensor([0.3, 0.2] + [0.0625] * 8, dtype=torch.float64)
    labels = torch.tensor([0] * 50 + [1] * 50)  # only two classes, equally often
    x = torch.zeros(100, 1, 4, 4)
    x[:, 0, 0, 0] = labels.float()
    m = im.mode_coverage(x, LabelReader(), w)
    assert m["coverage"] == 0.2
    assert m["tv"] == pytest.approx(0.5 * (0.2 + 0.3 + 8 * 0.0625))
    assert m["hist"][:2] == [0.5, 0.5]


def test_digits_classifier_is_accurate_and_matches_data(digits):
    clf = im.train_classifier(digits, steps=200)
    assert clf.accuracy > 0.9
    x, _ = digits.get(torch.arange(len(digits)))
    m = im.mode_coverage(x, clf, digits.class_weights)
    assert m["coverage"] == 1.0 and m["tv"] < 0.05
    feats = cm.extract(im.ClassifierFeatures(clf), x)
    assert feats.shape == (len(digits), 64)
    half = len(x) // 2
    fid_data = cm.frechet_distance(feats[:half], feats[half:])
    five = feats[:half][digits.labels[:half] < 5]  # a set that lost half of the modes
    assert cm.frechet_distance(five, feats[half:]) > 3 * fid_data


# ---- diversity ----
@pytest.fixture(scope="module")
def lpips_rand():
    return cm.lpips_model("alex", pretrained=False)  # package's linear layers, random trunk


def test_lpips_diversity_protocol(lpips_rand):
    g = torch.Generator().manual_seed(0)
    same = torch.rand(1, 1, 16, 16, generator=g).expand(5, -1, -1, -1) * 2 - 1
    assert cm.lpips_diversity({0: same}, model=lpips_rand) == pytest.approx(0.0, abs=1e-6)
    a = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    b = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        da = [lpips_rand(a[i:i + 1], a[j:j + 1]).item() for i in range(3) for j in range(i + 1, 3)]
        db = [lpips_rand(b[i:i + 1], b[j:j + 1]).item() for i in range(4) for j in range(i + 1, 4)]
    want = (np.mean(da) + np.mean(db)) / 2  # mean over pairs, then over conditionings
    assert cm.lpips_diversity({"a": a, "b": b}, model=lpips_rand) == pytest.approx(want, rel=1e-5)
    assert cm.lpips_diversity([a, b], model=lpips_rand) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match=">= 2 samples"):
        cm.lpips_diversity({0: a[:1]}, model=lpips_rand)


def test_weights_fail_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    monkeypatch.setattr(hub, "host_reachable", lambda host, **kw: False)
    t0 = time.time()
    with pytest.raises(hub.OfflineError, match="alex trunk weights for LPIPS.*alexnet"):
        cm.lpips_model("alex")
    with pytest.raises(hub.OfflineError, match="alex.*download.pytorch.org is unreachable"):
        cm.lpips_diversity(torch.zeros(2, 3, 8, 8))
    with pytest.raises(hub.OfflineError, match="Inception-v3 weights for FID"):
        cm.InceptionFeatures("torchvision")
    assert time.time() - t0 < 5
    with pytest.raises(ValueError, match="kind='tf' is not one of"):
        cm.InceptionFeatures("tf")


# ---- covariate shift per step ----
def test_covariate_shift_per_step_sees_shifted_states(digits):
    S, g = Schedule("linear"), torch.Generator().manual_seed(0)
    x0, _ = digits.sample(600, g)
    grid = [999, 749, 500, 250]
    fwd = Trajectory(grid, xs=[S.q_sample(x0, t, torch.randn(x0.shape, generator=g)) for t in grid])
    # states whose signal is 30% too weak: what a student that lost contrast would visit
    weak = Trajectory(grid, xs=[S.q_sample(0.7 * x0, t, torch.randn(x0.shape, generator=g))
                                for t in grid])
    ref = digits.sample(600, g)[0]
    d_fwd = im.covariate_shift_per_step(fwd, ref, S, generator=g)
    d_weak = im.covariate_shift_per_step(weak, ref, S, generator=g)
    assert list(d_fwd) == grid
    assert abs(d_weak[999] - d_fwd[999]) < 0.05  # at t = 999 everything is noise
    assert d_weak[250] > 3 * d_fwd[250] and d_weak[250] > d_weak[749]


class DataSampler:
    """An oracle 'student' whose states are forward-diffused data and whose samples are data."""

    def __init__(self, data, schedule, grid):
        self.data, self.S, self.grid = data, schedule, grid

    def sample(self, x_T, cond=None):
        g = torch.Generator().manual_seed(len(x_T))
        x0 = self.data.sample(len(x_T), g)[0]
        xs = [self.S.q_sample(x0, t, torch.randn(x0.shape, generator=g)) for t in self.grid]
        return Trajectory(self.grid, xs=xs + [x0])


def test_evaluator_on_an_oracle_sampler(digits):
    be = ImageBackend(digits, PredV(tiny_unet(), Schedule()), conditional=False)
    ev = im.ImageEvaluator(be, im.pooled_pixels, None, n=300, diversity="features")
    data_row = ev.data_row()
    row = ev.evaluate(DataSampler(digits, be.schedule, ev.grid))
    assert row["fid"] < 1.5 * data_row["fid"] + 0.1  # data-like samples: FID at the data floor
    assert row["diversity"] == pytest.approx(data_row["diversity"], rel=0.15)
    for t in ev.grid:  # forward states: shift at the floor of two forward sets
        assert abs(row[f"shift_t{t}"] - ev.shift_floor[t]) < 0.25 * ev.shift_floor[t] + 0.05


# ---- the experiment and the notebook, end to end on the offline digits ----
ROOT = Path(__file__).resolve().parents[1]


def _load_image_table():
    spec = importlib.util.spec_from_file_location("image_table",
                                                  ROOT / "experiments" / "image_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_image_table_quick_writes_table(tmp_path):
    """The table end to end with tiny settings: 3 seeds per arm trained as one ensemble, each
    cell the seeds' mean and 95% t-interval, paired ddil - baseline differences."""
    from scipy.stats import t as student_t

    mod = _load_image_table()
    threads = torch.get_num_threads()
    try:
        out = mod.main(["--quick", "--out", str(tmp_path), "--no-progress", "--methods", "lcm",
                        "--arms", "baseline,ddil"])
    finally:
        torch.set_num_threads(threads)
    assert {Path(f).name for f in out["files"]} == {"results.json", "table.md", "samples.png",
                                                    "shift.png"}
    saved = json.loads((tmp_path / "results.json").read_text())
    res, per_seed = saved["results"], saved["per_seed"]
    assert set(res) == {"data (held out)", "teacher 32-step", "teacher DDIM 4-step",
                        "lcm baseline", "lcm ddil"}
    assert saved["config"]["seeds"] == [0, 1, 2] and len(per_seed["lcm ddil"]) == 3
    for name, row in res.items():
        keys = ("fid", "tv", "diversity") + (("shift_sum",) if "data" not in name else ())
        assert all(math.isfinite(row[k]) for k in keys)
        assert 0.0 <= row["coverage"] <= 1.0
    fids = [r["fid"] for r in per_seed["lcm ddil"]]
    assert len(set(fids)) == 3  # the seeds differ
    mu, hw = mod.interval(fids)
    assert mu == pytest.approx(np.mean(fids))
    assert hw == pytest.approx(student_t.ppf(0.975, 2) * np.std(fids, ddof=1) / 3 ** 0.5)
    table = (tmp_path / "table.md").read_text()
    assert f"| lcm ddil | {mu:.1f} ± {hw:.1f} |" in table
    assert "| lcm: ddil - baseline |" in table
    with pytest.raises(ValueError, match="methods=\\['gan'\\]"):
        mod.run(str(tmp_path), quick=True, methods=("gan",))


def test_notebook_05_runs_under_papermill(tmp_path):
    """The offline image tier end to end (teacher, PD/LCM/DMD2 with and without DDIL,
    metrics, figures) under papermill with tiny parameters; every figure shown once and no
    stray outputs (ddil_lab.notebook.output_problems)."""
    pm = pytest.importorskip("papermill")
    from ddil_lab.notebook import output_problems

    params = dict(out_dir=str(tmp_path / "out"), teacher_dir="", teacher_steps=10, net="tiny",
                  steps=2, batch_size=8, buffer_size=16, critic_steps=1, n_eval=40,
                  classifier_steps=20, diversity="features", n_diag=24)
    pm.execute_notebook(str(ROOT / "notebooks" / "05_image_toy.ipynb"),
                        str(tmp_path / "out.ipynb"), parameters=params, kernel_name="python3",
                        cwd=str(ROOT), progress_bar=False, start_timeout=600)
    rec = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(rec["figures"]) == {"teacher", "samples", "shift"}
    assert all(Path(p).stat().st_size > 2000 for p in rec["figures"].values())
    for arm in ("pd", "lcm", "dmd2"):
        for kind in ("baseline", "ddil"):
            assert math.isfinite(rec["metrics"][f"table/{arm} {kind}/fid"])
    assert math.isfinite(rec["metrics"]["diagnostic/summary"])  # section 6, before training
    executed = json.loads((tmp_path / "out.ipynb").read_text())
    assert output_problems(executed) == []
    pngs = [o for c in executed["cells"] for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert len(pngs) == 3  # teacher, samples, shift: each once


# ---- the standard FID: torch-fidelity's network and maths, our Frechet maths as the oracle ----
class _U8(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def _u8_images(n, seed, shift=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 200, (n, 3, 16, 16), generator=g)
    return (base + shift).clamp(0, 255).to(torch.uint8)


def test_standard_fid_equals_torch_fidelity_and_our_maths():
    """Our InceptionFeatures(extractor=...) + fid_score on [-1, 1] images == torch-fidelity's own
    calculate_metrics on the uint8 images (same extractor), and == our Frechet maths on the
    same features."""
    import torch_fidelity

    feats = cm.InceptionFeatures(extractor=cm.tiny_fid_extractor("ddil-tiny-test"))
    a, b = _u8_images(60, 0), _u8_images(50, 1, shift=30)
    lib = torch_fidelity.calculate_metrics(input1=_U8(a), input2=_U8(b), fid=True,
                                           feature_extractor="ddil-tiny-test", cuda=False,
                                           cache=False, verbose=False, save_cpu_ram=True,
                                           batch_size=16)["frechet_inception_distance"]
    assert feats.network == "ddil-tiny-test"
    fa, fb = (cm.extract(feats, x.float() / 127.5 - 1) for x in (a, b))  # [-1, 1] in, uint8 inside
    assert torch.equal(cm.to_uint8(a.float() / 127.5 - 1), a)  # quantisation is exact
    assert lib > 0.01
    assert cm.fid_score(fa, fb) == pytest.approx(lib, rel=1e-6)
    assert cm.frechet_distance(fa, fb) == pytest.approx(lib, rel=1e-4)  # the oracle
    sa, sb = cm.fid_stats(fa), cm.fid_stats(fb)
    assert cm.fid_score(sa, sb) == pytest.approx(lib, rel=1e-6)
    torch.testing.assert_close(torch.as_tensor(sa["sigma"]), cm.gaussian_stats(fa)[1])


def test_reference_stats_cached_as_npz(tmp_path):
    feats = torch.randn(40, 5, generator=torch.Generator().manual_seed(0)).double()
    calls = []

    def compute():
        calls.append(1)
        return feats

    f = im.pooled_pixels  # any features; its type name is the network key
    s1 = cm.reference_fid_stats("cifar10-train", 32, 40, f, compute, tmp_path)
    s2 = cm.reference_fid_stats("cifar10-train", 32, 40, f, lambda: 1 / 0, tmp_path)  # cached
    assert len(calls) == 1
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["cifar10-train_32px_n40_function.npz"]
    with np.load(tmp_path / files[0], allow_pickle=False) as z:  # no pickles inside
        assert set(z.files) == {"mu", "sigma", "meta"}
        assert json.loads(str(z["meta"]))["n"] == 40
    np.testing.assert_allclose(s2["mu"], feats.mean(0).numpy())
    np.testing.assert_allclose(s2["sigma"], s1["sigma"])
    cm.reference_fid_stats("cifar10-train", 32, 30, f, lambda: feats[:30], tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # another count is another file
    with pytest.raises(ValueError, match="computed 40 feature vectors, expected 20"):
        cm.reference_fid_stats("cifar10-train", 32, 20, f, lambda: feats, tmp_path)
    with pytest.raises(ValueError, match="dataset='a/b'"):
        cm.fid_stats_key("a/b", 32, 5)


class _NotATensor:
    pass


def test_standard_inception_loads_local_weights_and_fails_fast_offline(tmp_path, monkeypatch):
    """The TF-Inception path with weights of the right layout (random here: the real file cannot
    be downloaded in the tests): offline it names the file and the folder within seconds; a
    file with anything but tensors is refused before torch-fidelity unpickles it."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hub, "host_reachable", lambda host, **kw: False)
    t0 = time.time()
    with pytest.raises(hub.OfflineError, match="weights-inception-2015-12-05-6726825d.pth into "
                                               f"{tmp_path / 'torch' / 'hub' / 'checkpoints'}"):
        cm.InceptionFeatures()
    assert time.time() - t0 < 5
    with pytest.raises(FileNotFoundError, match="weights='/nonexistent.pth'"):
        cm.InceptionFeatures(weights="/nonexistent.pth")
    # a state dict of the standard layout, random values
    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        sd = fe.FeatureExtractorInceptionV3("x", ["2048"]).state_dict()
    torch.save(sd, tmp_path / "w.pth")
    feats = cm.InceptionFeatures(weights=tmp_path / "w.pth")
    assert feats.network == cm.FID_NETWORK
    out = feats(torch.rand(2, 1, 16, 16) * 2 - 1)  # grayscale, any size: resized inside
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    torch.save({"w": torch.zeros(1), "obj": _NotATensor()}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a plain state dict of tensors"):
        cm.InceptionFeatures(weights=tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="kind='tf' is not one of"):
        cm.InceptionFeatures("tf")


# ---- CIFAR-10 from a pretrained DDPM (google/ddpm-cifar10-32's layout, random weights) ----
@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    from ddil_lab.image.pretrained import make_ddpm_folder
    return make_ddpm_folder(tmp_path_factory.mktemp("ddpm") / "ddpm-cifar10-32")


def _rand_cifar(n=8):
    from ddil_lab.image import ImageData
    g = torch.Generator().manual_seed(0)
    return ImageData("cifar10-like", torch.randint(0, 256, (n, 3, 32, 32), generator=g,
                                                   dtype=torch.uint8),
                     torch.randint(0, 10, (n,), generator=g), [str(k) for k in range(10)])


def test_pretrained_ddpm_folder_loads_as_eps_teacher(ddpm_folder):
    """A DDPMPipeline folder with the DDPM CIFAR-10 UNet (35.7M parameters) loads through
    ImageBackend.from_pretrained; its x0 is the eps conversion with the scheduler's own betas."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from ddil_lab.image.backend import num_params

    be = ImageBackend.from_pretrained(ddpm_folder, data=_rand_cifar())
    assert isinstance(be.teacher, PredEps) and not be.conditional
    assert num_params(be.teacher) == 35746307  # Ho et al.'s 35.7M
    assert be.schedule.kind == "linear" and be.shape == (3, 32, 32)
    pipe = DDPMPipeline.from_pretrained(ddpm_folder)  # diffusers reads the same folder
    ab = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    betas = torch.linspace(1e-4, 0.02, 1000)
    torch.testing.assert_close(ab, torch.cumprod(1 - betas, 0))
    x_t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 300])
    with torch.no_grad():
        eps = pipe.unet(x_t, t).sample
        got = be.teacher(x_t, t)
    a = ab[t].sqrt()[:, None, None, None]
    want = (x_t - (1 - a ** 2).sqrt() * eps) / a
    assert eps.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_pretrained_hub_id_fails_fast_offline(monkeypatch, tmp_path):
    from ddil_lab.image.pretrained import make_ddpm_folder

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "host_reachable", lambda host, **kw: False)
    import huggingface_hub  # noqa: F401  (the import is not what is timed)
    t0 = time.time()
    with pytest.raises(hub.OfflineError, match="'google/ddpm-cifar10-32'.*cannot be downloaded"):
        ImageBackend.from_pretrained("google/ddpm-cifar10-32", data=_rand_cifar())
    assert time.time() - t0 < 10
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ImageBackend.from_pretrained("/nonexistent/ddpm", data=_rand_cifar())
    with pytest.raises(ValueError, match="shape \\(1, 16, 16\\)"):
        ImageBackend.from_pretrained(make_ddpm_folder(tmp_path / "d", (32, 32, 32, 32), 8),
                                     data="digits")


@pytest.mark.parametrize("method", ["pd", "lcm", "dmd2"])
def test_one_step_of_each_method_on_the_ddpm_layout(method, tmp_path):
    """One distillation step of PD, LCM and DMD2, with DDIL's rollouts, on a reduced-width copy
    of the DDPM CIFAR-10 block layout; the student is exported as a DDPMPipeline folder and
    reloads to the same outputs."""
    from ddil_lab.image.pretrained import export_student, load_student, make_ddpm_folder
    from ddil_lab.train import distill, make_arm

    folder = make_ddpm_folder(tmp_path / "ddpm", channels=(16, 32, 32, 32), norm_groups=8)
    be = ImageBackend.from_pretrained(folder, data=_rand_cifar())
    m, sampler = make_arm(method, "ddil", n_steps=4, method_kw={"critic_steps": 1}
                          if method == "dmd2" else ({"substeps": 2} if method == "pd" else None))
    res = distill(be, m, sampler, steps=1, batch_size=2, lr=1e-3, progress=False)
    assert math.isfinite(res.history[-1]["loss/student"])
    x_t, t = torch.randn(2, 3, 32, 32), torch.tensor([999, 500])
    with torch.no_grad():
        assert not torch.allclose(res.student(x_t, t), be.teacher(x_t, t))
    out = export_student(res.student, tmp_path / "student", 4,
                         "ddim" if method == "pd" else "consistency", folder)
    den, info = load_student(out)
    assert info["timesteps"] == [999, 749, 500, 250]
    t = torch.tensor([500, 250])  # (at t = 999, x0 = (x_t - sigma eps) / 0.006 magnifies float noise)
    with torch.no_grad():
        torch.testing.assert_close(den(x_t, t), res.student(x_t, t), atol=1e-5, rtol=1e-4)


def test_backend_checks_its_parameters_up_front(digits):
    """ImageBackend raises ConfigError naming the parameter, its value and what is allowed before
    any data is read or teacher trained; check_params (configs) gives the same, as backend.*."""
    from ddil_lab.image.backend import check_params
    from ddil_lab.train.settings import ConfigError

    cases = [({"guidance": 0.5}, r"guidance=0.5 is not allowed.*a number >= 1"),
             ({"guidance": True}, r"guidance=True is not allowed"),
             ({"teacher_steps": 0}, r"teacher_steps=0 is not allowed.*a positive int"),
             ({"conditional": "yes"}, r"conditional='yes' is not allowed.*True, False or None"),
             ({"data": 3}, r"data=3 is not allowed.*or an ImageData"),
             ({"data": "cifar10"}, r"root=None is not allowed: data='cifar10' needs root"),
             ({"teacher": 3.0}, r"teacher='float' is not allowed.*wrapped Denoiser"),
             ({"device": "gpu0"}, r"device='gpu0' is not allowed")]
    for kw, msg in cases:
        t0 = time.time()
        with pytest.raises(ConfigError, match=msg):
            ImageBackend(**{"data": digits, **kw})
        with pytest.raises(ConfigError, match="backend." + msg):
            check_params({"data": "digits", **kw})
        assert time.time() - t0 < 2  # nothing was trained


@pytest.mark.slow
def test_small_unconditional_digits_teacher_is_usable_after_600_steps(digits):
    """The laptop recipe of notebook 05 and the image table (SMALL_NET, unconditional, 600 steps
    at lr 2e-3): 32-step samples within 1.5x of held-out data's classifier-feature FID, plain
    4-step DDIM clearly worse (room for a student). Measured: 21.1 / 48.8 vs 17.5 (n = 300)."""
    from ddil_lab.image import SMALL_NET

    teacher = train_teacher(digits, steps=600, net=SMALL_NET, conditional=False, lr=2e-3,
                            progress=False)
    ev = im.ImageEvaluator.for_backend(ImageBackend(digits, teacher, conditional=False), 300,
                                       n=300, diversity="none")
    rows = ev.reference_rows()
    data, fine, ddim4 = (rows[k]["fid"] for k in ("data (held out)", "teacher 32-step",
                                                  "teacher DDIM 4-step"))
    assert fine < 1.5 * data and ddim4 > 1.5 * fine
