"""The standard evaluation protocols and ``python -m ddil_lab.evaluate`` on tiny pipelines with
tiny evaluation networks: COCO captions and reference images chosen as the protocol says, FID
equal to torch-fidelity's maths on features computed by hand, the protocol's name and version in
the JSON, the same code for an exported student and a plain pipeline, and fast failures."""
import hashlib
import json
import math
import pickle
import time

import numpy as np
import pytest
import torch

from ddil_lab import hub
from ddil_lab import metrics as cm
from ddil_lab.evaluate import evaluate, main


@pytest.fixture(scope="module")
def tiny_nets(tmp_path_factory):
    """(FID features, (clip, tokenizer), LPIPS): tiny random networks, no download."""
    import open_clip

    d = tmp_path_factory.mktemp("clip")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                          "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    (d / "tiny-eval-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / "tiny-eval-test-clip.json")
    torch.manual_seed(0)
    clip = (open_clip.create_model("tiny-eval-test-clip").eval(),
            open_clip.get_tokenizer("tiny-eval-test-clip"))
    feats = cm.InceptionFeatures(extractor=cm.tiny_fid_extractor("ddil-tiny-eval"))
    return feats, clip, cm.lpips_model(pretrained=False)


# ---- COCO: captions file and images in COCO's layout ----
@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("coco")
    (root / "val2017").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for k, img_id in enumerate([42, 7, 19, 3, 88, 51]):  # ids out of order, as in COCO
        name = f"{img_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (24 + k, 20, 3), dtype=np.uint8)).save(
            root / "val2017" / name, quality=95)
        images.append({"id": img_id, "file_name": name})
        # two captions each; the first (lowest annotation id) is the protocol's
        anns += [{"id": 1000 + img_id, "image_id": img_id, "caption": f"second {img_id}"},
                 {"id": 10 + img_id, "image_id": img_id, "caption": f" photo number {img_id} "}]
    (root / "captions_val2017.json").write_text(json.dumps({"images": images,
                                                            "annotations": anns}))
    return root


def test_coco_captions_follow_the_protocol(coco):
    from ddil_lab.sd.metrics import coco_captions

    pairs = coco_captions(coco / "captions_val2017.json", 4)
    assert pairs == [(f"{i:012d}.jpg", f"photo number {i}") for i in (3, 7, 19, 42)]
    rnd = coco_captions(coco / "captions_val2017.json", 4, subset="random")
    assert len(set(rnd)) == 4 and rnd == coco_captions(coco / "captions_val2017.json", 4,
                                                       subset="random")  # seeded
    with pytest.raises(ValueError, match="not a COCO captions file"):
        bad = coco / "bad.json"
        bad.write_text("[]")
        coco_captions(bad)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from ddil_lab.sd.tiny import make_tiny_pipeline
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd15")


def test_coco5k_on_a_tiny_pipeline(coco, sd_folder, tiny_nets, tmp_path):
    """The coco5k protocol (4 captions: a smaller run of it) on a tiny SD1.5 pipeline: FID is
    torch-fidelity's maths on features of the same images computed by hand; the reference
    statistics are cached; the JSON names the protocol, its version and that it is not full."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    from ddil_lab.sd.data import preprocess
    from ddil_lab.sd.metrics import pipeline_generator

    feats, clip, lp = tiny_nets
    kw = dict(captions=str(coco / "captions_val2017.json"), images=str(coco / "val2017"), n=4,
              steps=2, guidance_scale=1.0, features=feats, clip=clip, lpips_model=lp,
              lpips_prompts=2, lpips_seeds=2, hps=False, batch_size=2, cache_dir=tmp_path / "c",
              progress=False)
    res = evaluate(sd_folder, "coco5k", str(tmp_path / "eval"), **kw)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["protocol"]["name"] == "coco2017-val-5k" and saved["protocol"]["version"] == 1
    assert saved["protocol"]["n_captions"] == 4 and saved["protocol"]["full"] is False
    assert saved["n_images"] == 4 and saved["fid_features"] == "ddil-tiny-eval"
    assert saved["sampling"]["call"] == {"num_inference_steps": 2, "guidance_scale": 1.0}
    assert -1 <= saved["clip_score"] <= 1 and saved["lpips_diversity"] > 0
    assert (tmp_path / "eval" / "samples.png").is_file()
    assert [p.name for p in (tmp_path / "c").iterdir()] == [
        "coco2017-val_16px_n4_ddil-tiny-eval.npz"]
    # the oracle: the same images by hand, reference = the first 4 images by id
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    gen = pipeline_generator(pipe, num_inference_steps=2, guidance_scale=1.0)
    caps = [f"photo number {i}" for i in (3, 7, 19, 42)]
    x = torch.cat([gen(caps[:2], [0, 1]), gen(caps[2:], [2, 3])])
    ref = []
    for i in (3, 7, 19, 42):
        with Image.open(coco / "val2017" / f"{i:012d}.jpg") as im:
            ref.append(preprocess(im, 16))
    want = cm.fid_score(cm.extract(feats, x * 2 - 1), cm.extract(feats, torch.stack(ref)))
    assert res["fid"] == pytest.approx(want, rel=1e-5)
    assert res["fid"] == pytest.approx(cm.frechet_distance(cm.extract(feats, x * 2 - 1),
                                                           cm.extract(feats, torch.stack(ref))),
                                       rel=1e-3, abs=1e-4)  # our maths agrees


def test_an_exported_student_is_evaluated_by_the_same_code(coco, sd_folder, tiny_nets,
                                                            tmp_path):
    """A student exported by sd.export_pipeline samples with its recorded call (2 steps on its
    grid) through the same evaluate(); without --images FID is skipped with a note."""
    from ddil_lab.sd import SDBackend
    from ddil_lab.sd.export import export_pipeline

    feats, clip, lp = tiny_nets
    be = SDBackend(sd_folder, prompts=["a cat"], guidance=1.0)
    out = export_pipeline(be, be.make_student(), tmp_path / "student", n_steps=2, sampler="ddim")
    res = evaluate(out, "coco5k", str(tmp_path / "eval"), captions=str(coco /
                   "captions_val2017.json"), n=2, features=feats, clip=clip, lpips_model=lp,
                   lpips_prompts=0, hps=False, batch_size=2, progress=False)
    assert res["sampling"]["call"] == {"guidance_scale": 1.0, "num_inference_steps": 2}
    assert res["fid"] is None and any("FID skipped" in n for n in res["notes"])
    assert res["n_images"] == 2 and math.isfinite(res["clip_score"])


# ---- CIFAR-10 FID-50k: files in CIFAR-10's format, a tiny DDPM pipeline ----
@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                         "labels": [0, 1, 2]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(k) for k in range(10)]}, f)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setattr(CIFAR10, "train_list", [[f, md5[f]] for f, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", dict(CIFAR10.meta, md5=md5["batches.meta"]))
    return tmp_path / "cifar"


@pytest.fixture(scope="module")
def ddpm_small(tmp_path_factory):
    from ddil_lab.image.pretrained import make_ddpm_folder
    return make_ddpm_folder(tmp_path_factory.mktemp("ddpm") / "ddpm", (16, 32, 32, 32), 8)


def test_cifar10_protocol_our_sampler_and_the_pipeline(cifar_root, ddpm_small, tiny_nets,
                                                      tmp_path):
    """cifar10-50k (6 samples: a smaller run) on a DDPM pipeline folder: with our DDIM sampler
    on the 2-step grid FID equals torch-fidelity's maths on the same samples against the 15
    training images' statistics (cached as npz); --sampler pipeline runs the pipeline's own call
    through the same evaluation."""
    from ddil_lab.diffusion import timesteps
    from ddil_lab.image import load_cifar10
    from ddil_lab.image.pretrained import load_pretrained
    from ddil_lab.image.protocol import policy_generator

    feats = tiny_nets[0]
    kw = dict(root=str(cifar_root), n=6, steps=2, features=feats, batch_size=4,
              cache_dir=tmp_path / "c", progress=False)
    res = evaluate(ddpm_small, "cifar10-50k", str(tmp_path / "ours"), **kw)
    assert res["protocol"]["name"] == "cifar10-50k" and res["protocol"]["full"] is False
    assert res["sampling"] == {"sampler": "ddim", "timesteps": [999, 500], "student": False}
    assert [p.name for p in (tmp_path / "c").iterdir()] == [
        "cifar10-train_32px_n15_ddil-tiny-eval.npz"]
    den = load_pretrained(ddpm_small)
    gen = policy_generator(den, den.schedule, timesteps(2), "ddim")
    x = torch.cat([gen([0, 1, 2, 3]), gen([4, 5])])
    train = load_cifar10(cifar_root, download=False)
    want = cm.fid_score(cm.extract(feats, x), cm.extract(feats, train.images))
    assert res["fid"] == pytest.approx(want, rel=1e-5)
    pipe = evaluate(ddpm_small, "cifar10-50k", str(tmp_path / "pipe"), sampler="pipeline", **kw)
    assert pipe["sampling"] == {"pipeline": "DDPMPipeline", "call": {"num_inference_steps": 2}}
    assert math.isfinite(pipe["fid"]) and (tmp_path / "pipe" / "samples.png").is_file()


def test_cifar10_protocol_on_an_exported_student(cifar_root, ddpm_small, tiny_nets, tmp_path):
    """An LCM student exported as a DDPMPipeline folder is sampled as trained: consistency
    sampling with its boundary scalings on its 4-step grid."""
    from ddil_lab.image import ImageBackend, ImageData
    from ddil_lab.image.pretrained import export_student
    from ddil_lab.methods.lcm import ConsistencyFn

    data = ImageData("rand", torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
                     torch.zeros(4), ["a"])
    be = ImageBackend.from_pretrained(ddpm_small, data=data)
    student = ConsistencyFn(be.make_student(), 0.5, 10.0)
    out = export_student(student, tmp_path / "lcm", 4, "consistency", ddpm_small)
    res = evaluate(out, "cifar10-50k", str(tmp_path / "eval"), root=str(cifar_root), n=4,
                   features=tiny_nets[0], batch_size=4, cache_dir=tmp_path / "c",
                   progress=False)
    assert res["sampling"] == {"sampler": "consistency", "timesteps": [999, 749, 500, 250],
                               "student": True}
    assert math.isfinite(res["fid"])


# ---- the command line and its failures ----
def test_command_line_checks_before_loading(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["x", "--protocol", "coco99", "--out", str(tmp_path)])
    assert "invalid choice: 'coco99'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="captions=None: protocol coco5k needs"):
        main(["x", "--protocol", "coco5k", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="root=None: protocol cifar10-50k needs"):
        main(["x", "--protocol", "cifar10-50k", "--out", str(tmp_path)])
    caps = tmp_path / "c.json"
    caps.write_text("{}")
    with pytest.raises(ValueError, match="n=1 must be an int >= 2"):
        main(["x", "--protocol", "coco5k", "--out", str(tmp_path), "--captions", str(caps),
              "--n", "1"])


def test_offline_networks_and_hub_ids_fail_fast(tmp_path, monkeypatch, cifar_root, tiny_nets):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "host_reachable", lambda host, **kw: False)
    import huggingface_hub  # noqa: F401  (the imports are not what is timed)
    import torch_fidelity  # noqa: F401
    t0 = time.time()
    with pytest.raises(hub.OfflineError, match="TF-Inception weights"):  # before any model
        main(["google/ddpm-cifar10-32", "--protocol", "cifar10-50k", "--out", str(tmp_path),
              "--root", str(cifar_root)])
    with pytest.raises(hub.OfflineError, match="'google/ddpm-cifar10-32'.*cannot be downloaded"):
        evaluate("google/ddpm-cifar10-32", "cifar10-50k", str(tmp_path), root=str(cifar_root),
                 features=tiny_nets[0])
    assert time.time() - t0 < 10
