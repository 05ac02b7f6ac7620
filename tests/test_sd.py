"""The sd backend on tiny random SD1.5- and SDXL-shaped pipelines (CPU, offline).

Oracles: our teacher Denoiser + CFG + DDIM sampler reproduce ``pipe(...)`` with a DDIM scheduler;
an exported student, reloaded with ``from_pretrained``, reproduces our student's sampler.
"""
import json
import time

import pytest
import torch

from ddil_lab.sd.backend import (
    LatentThreshold,
    SDBackend,
    load_pipeline,
    schedule_from_scheduler,
    unet_of,
)
from ddil_lab.sd.tiny import make_tiny_pipeline
from ddil_lab.sd.data import LatentCache, load_image_captions, make_imagefolder, read_captions
from ddil_lab.denoiser import CFG
from ddil_lab.diffusion import timesteps
from ddil_lab.hub import OfflineError
from ddil_lab.sampling import ConsistencyPolicy, sample

PROMPTS = ["a photo of a cat", "a red car", "two dogs on a beach"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd")
    return {k: make_tiny_pipeline(root / k, k) for k in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(5, 3, 20, 24, generator=g) * 2 - 1
    caps = ["a cat", "a dog", ["a bird", "one small bird"], "a fish", "a red car"]
    return make_imagefolder(tmp_path_factory.mktemp("imgs"), imgs, caps)


def _max_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


# ---- schedule and loading ----
def test_schedule_from_scheduler_and_errors(tiny):
    from diffusers import DDIMScheduler

    pipe = load_pipeline(tiny["sd15"])
    S = schedule_from_scheduler(pipe.scheduler)
    torch.testing.assert_close(S.alpha_bar[:-1], pipe.scheduler.alphas_cumprod, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        schedule_from_scheduler(DDIMScheduler(rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="trained_betas"):
        schedule_from_scheduler(DDIMScheduler(trained_betas=[0.1] * 1000))
    cos = schedule_from_scheduler(DDIMScheduler(beta_schedule="squaredcos_cap_v2"))
    assert cos.kind == "cosine"


def test_offline_fails_fast(tmp_path):
    t0 = time.time()
    with pytest.raises(OfflineError, match="nobody/not-a-model"):
        load_pipeline("nobody/not-a-model")
    with pytest.raises(OfflineError, match="nobody/not-a-dataset"):
        load_image_captions("nobody/not-a-dataset", 16)
    assert time.time() - t0 < 20
    with pytest.raises(ValueError, match="data= .* or prompts="):
        SDBackend(str(tmp_path))


# ---- the oracle ----
@pytest.mark.parametrize("kind,prediction", [("sd15", "epsilon"), ("sd15", "v_prediction"),
                                             ("sdxl", "epsilon")])
def test_teacher_ddim_reproduces_pipeline(tiny, kind, prediction):
    """CFG(PredEps/PredV(UNet)) + our DDIM == pipe(prompt, guidance_scale=w) with DDIM
    (set_alpha_to_one, trailing spacing: 999, 749, 499, 249)."""
    from diffusers import DDIMScheduler

    pipe = load_pipeline(tiny[kind])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True,
                                               timestep_spacing="trailing", clip_sample=False,
                                               prediction_type=prediction)
    pipe.set_progress_bar_config(disable=True)
    be = SDBackend(pipe, prompts=PROMPTS, guidance=5.0)
    assert be.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    prompts = PROMPTS[:2]
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, output_type="latent",
               generator=torch.Generator().manual_seed(3)).images
    pipe.scheduler.set_timesteps(4)
    grid = pipe.scheduler.timesteps.tolist()
    assert grid == [999, 749, 499, 249]
    x_T = be.sample_noise(2, torch.Generator().manual_seed(3))
    ours = sample(be.teacher, x_T, grid, be.encode_prompts(prompts), schedule=be.schedule)
    assert _max_err(ours.sample, ref) < 1e-4
    # the batched guidance wrapper equals the core CFG wrapper (two calls)
    plain = CFG(be.cond_teacher, 5.0, uncond=be.uncond)
    cond, t = be.encode_prompts(prompts), torch.tensor([999, 400])
    torch.testing.assert_close(be.teacher(x_T, t, cond), plain(x_T, t, cond), atol=1e-4, rtol=1e-5)


# ---- students ----
def test_w_embedding_and_lora_students_start_at_teacher(tiny):
    pytest.importorskip("peft")
    be = SDBackend(tiny["sd15"], prompts=PROMPTS, guidance=(2.0, 8.0), lora_rank=4)
    assert be.w_embed and be.teacher.w is None  # per-sample w read from cond["w"]
    st = be.make_student()
    unet = unet_of(st)
    assert unet.config.time_cond_proj_dim == 256
    trainable = {n for n, p in st.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n or "cond_proj" in n for n in trainable)
    g = torch.Generator().manual_seed(0)
    cond = be.sample_cond(3, g)
    assert cond["w"].min() >= 2.0 and cond["w"].max() <= 8.0
    x, t = be.sample_noise(3, g), torch.tensor([999, 500, 20])
    with torch.no_grad():
        torch.testing.assert_close(st(x, t, cond), be.cond_teacher(x, t, cond),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,sampler,guidance,lora", [("sd15", "ddim", 5.0, 0),
                                                        ("sdxl", "consistency", (2.0, 8.0), 0),
                                                        ("sd15", "ddim", (2.0, 8.0), 4)])
def test_export_reload_samples_like_the_student(tiny, tmp_path, kind, sampler, guidance, lora):
    """The exported folder loads with from_pretrained and samples the student's grid
    (999, 749, 500, 250) exactly like our sampler does."""
    from diffusers import DiffusionPipeline

    from ddil_lab.methods.lcm import ConsistencyFn
    from ddil_lab.sd.export import export_pipeline, pipeline_kwargs

    if lora:
        pytest.importorskip("peft")
    be = SDBackend(tiny[kind], prompts=PROMPTS, guidance=guidance, student_prediction="v",
                   lora_rank=lora)
    st = be.make_student()
    with torch.no_grad():  # a "trained" student: move every trainable weight
        g = torch.Generator().manual_seed(1)
        for p in st.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    st = ConsistencyFn(st) if sampler == "consistency" else st
    out = export_pipeline(be, st, tmp_path / "student", n_steps=4, guidance_scale=6.0)
    kw = pipeline_kwargs(out)
    info = json.loads((tmp_path / "student" / "ddil_student.json").read_text())
    assert info["sampler"] == sampler and info["timesteps"] == [999, 749, 500, 250]
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is type(be.pipe)
    ref = pipe(PROMPTS[:2], output_type="latent", generator=torch.Generator().manual_seed(3),
               **kw).images
    g = torch.Generator().manual_seed(3)
    x_T = be.sample_noise(2, g)
    policy = ConsistencyPolicy(st, be.schedule, generator=g) if sampler == "consistency" else st
    ours = sample(policy, x_T, timesteps(4), be.encode_prompts(PROMPTS[:2], w=kw["guidance_scale"]),
                  schedule=be.schedule)
    assert _max_err(ours.sample, ref) < 1e-4
    if sampler == "ddim":  # the pipeline walks our grid by itself
        pipe.scheduler.set_timesteps(4)
        assert pipe.scheduler.timesteps.tolist() == [999, 749, 500, 250]
    img = pipe(PROMPTS[0], output_type="pt", generator=torch.Generator().manual_seed(0), **kw)
    assert img.images.shape == (1, 3, be.resolution, be.resolution)


# ---- training: one step of each method (+DDIL) on each pipeline shape ----
def _changed(a, b) -> float:
    return max(float((x - y).abs().max()) for (n, x), (_, y) in
               zip(a.state_dict().items(), b.state_dict().items()) if x.dtype.is_floating_point)


@pytest.fixture(scope="module")
def backends(tiny, folder):
    return {k: SDBackend(tiny[k], data=folder, guidance=(2.0, 6.0)) for k in ("sd15", "sdxl")}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("method", ["pd", "lcm", "dmd2"])
@pytest.mark.parametrize("ddil", [False, True], ids=["base", "ddil"])
def test_one_training_step_changes_the_student(backends, kind, method, ddil, tmp_path):
    from ddil_lab.methods import DMD2, LCM, PD
    from ddil_lab.rollout import StateSampler
    from ddil_lab.train import distill

    be = backends[kind]
    m = {"pd": lambda: PD(n_steps=4, substeps=2, reflected=ddil),
         "lcm": lambda: LCM(n_steps=4, reflected=ddil),
         "dmd2": lambda: DMD2(n_steps=4, critic_steps=1, reflected=ddil)}[method]()
    sampler = StateSampler(beta_frwd=0.4, beta_teacher_bckwrd=0.2, beta_student_bckwrd=0.2,
                           beta_mixed=0.2) if ddil else None
    res = distill(be, m, sampler, steps=1, batch_size=6, lr=1e-3, progress=False, seed=0)
    rec = res.history[-1]
    assert torch.isfinite(torch.tensor(rec["loss/student"]))
    if ddil:
        assert rec["nfe/teacher"] + rec["nfe/student"] > 0
    student = m.student.denoiser if method == "lcm" else m.student
    assert _changed(student, be.make_student()) > 1e-5
    if kind == "sd15" and not ddil:  # a DistillResult exports with the method's sampler
        from ddil_lab.sd.export import export_pipeline, pipeline_kwargs

        out = export_pipeline(be, res, tmp_path / "export")
        kw = pipeline_kwargs(out)
        assert ("num_inference_steps" in kw) == (method == "pd")
        assert kw.get("timesteps", [999, 749, 500, 250]) == [999, 749, 500, 250]


def test_data_free_backend_trains_on_teacher_rollouts(tiny, tmp_path):
    from ddil_lab.methods import PD
    from ddil_lab.rollout import StateSampler
    from ddil_lab.train import distill

    pf = tmp_path / "prompts.txt"
    pf.write_text("a cat\n\na dog\n")
    be = SDBackend(tiny["sdxl"], prompts=str(pf), guidance=4.0)
    assert not be.has_data and be.prompts == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="data-free"):
        be.sample_data(2)
    with pytest.raises(ValueError, match="beta_frwd must be 0"):
        distill(be, PD(n_steps=2), None, steps=1, batch_size=2, progress=False)
    m = PD(n_steps=2, substeps=2)
    distill(be, m, StateSampler(beta_frwd=0.0, beta_teacher_bckwrd=1.0), steps=1, batch_size=2,
            lr=1e-3, progress=False)
    assert _changed(m.student, be.make_student()) > 1e-5


def test_mixed_precision_and_gradient_checkpointing(tiny, tmp_path):
    from ddil_lab.methods import PD
    from ddil_lab.sd.export import export_pipeline, load_student_pipeline
    from ddil_lab.rollout import StateSampler
    from ddil_lab.train import distill

    be = SDBackend(tiny["sd15"], prompts=PROMPTS, guidance=3.0, mixed_precision="bf16",
                   gradient_checkpointing=True)
    assert be.pipe.unet.dtype == torch.bfloat16 and be.fp32_unet().dtype == torch.float32
    st = be.make_student()
    assert unet_of(st).dtype == torch.float32 and unet_of(st).is_gradient_checkpointing
    g = torch.Generator().manual_seed(0)
    x, cond, t = be.sample_noise(2, g), be.sample_cond(2, g), torch.tensor([700, 300])
    assert be.teacher(x, t, cond).dtype == torch.float32
    st(x, t, cond).square().mean().backward()
    assert all(p.grad is not None for p in st.parameters())
    m = PD(n_steps=2)
    res = distill(be, m, StateSampler(beta_frwd=0.0, beta_teacher_bckwrd=1.0), steps=1,
                  batch_size=2, lr=1e-3, progress=False)
    assert _changed(m.student, be.make_student()) > 1e-5
    # the export is one dtype (float32) although the backend holds bf16 frozen parts
    pipe, kw = load_student_pipeline(export_pipeline(be, res, tmp_path / "bf16_export"))
    assert {c.dtype for c in pipe.components.values() if hasattr(c, "dtype")} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    img = pipe(PROMPTS[:1], output_type="pt", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.isfinite(img).all()
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        SDBackend(tiny["sd15"], prompts=PROMPTS, mixed_precision="fp8")


# ---- data ----
def test_data_loaders_and_latent_cache(tiny, folder, tmp_path):
    ds = load_image_captions(folder, 16)
    assert len(ds) == 5 and ds.image(0).shape == (3, 16, 16)
    assert ds.image(0).min() >= -1 and ds.image(0).max() <= 1
    assert ds.caption(2, torch.Generator().manual_seed(0)) in ("a bird", "one small bird")
    cache = tmp_path / "lat.safetensors"
    be = SDBackend(tiny["sd15"], data=folder, latent_cache=str(cache), guidance=3.0)
    assert cache.is_file() and be.moments.shape == (5, 8, 8, 8)
    mtime = cache.stat().st_mtime_ns
    be2 = SDBackend(tiny["sd15"], data=folder, latent_cache=str(cache), guidance=3.0)
    assert cache.stat().st_mtime_ns == mtime  # reused, not rebuilt
    torch.testing.assert_close(be2.moments, be.moments)
    assert LatentCache(cache).load("another key") is None
    x0, cond = be.sample_data(4, torch.Generator().manual_seed(5))
    assert x0.shape == (4, *be.shape) and cond["emb"].shape[0] == 4 and cond["w"].eq(3.0).all()
    # without the cache: the same images give the same latents for the same generator
    be3 = SDBackend(tiny["sd15"], data=folder, guidance=3.0)
    x0b, _ = be3.sample_data(4, torch.Generator().manual_seed(5))
    torch.testing.assert_close(x0b, x0, atol=1e-5, rtol=1e-5)
    assert be.decode(x0).shape == (4, 3, 16, 16)
    # prompts files: txt, jsonl, COCO json
    (tmp_path / "p.jsonl").write_text('{"text": "a"}\n{"caption": "b"}\n')
    coco = {"annotations": [{"image_id": 1, "caption": "c"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert read_captions(tmp_path / "p.jsonl") == ["a", "b"]
    assert read_captions(tmp_path / "coco.json") == ["c"]
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl"):
        from ddil_lab.sd.data import ImageCaptionFolder
        ImageCaptionFolder(tmp_path, 16)


def test_hf_datasets_folder(tmp_path):
    """A ``datasets`` save_to_disk folder with an image and a text column."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    ims = [Image.new("RGB", (20, 16), (i * 40, 0, 0)) for i in range(3)]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": ims, "caption": ["a", "b", "c"]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    d = load_image_captions(tmp_path / "ds", 16, caption_column="caption")
    assert len(d) == 3 and d.image(1).shape == (3, 16, 16) and d.captions() == ["a", "b", "c"]
    with pytest.raises(ValueError, match="no column 'text'"):
        load_image_captions(tmp_path / "ds", 16)


def test_optimizer_helper_and_plot(tiny):
    import importlib.util

    import matplotlib.pyplot as plt

    from ddil_lab.sd.backend import adamw

    be = SDBackend(tiny["sd15"], prompts=PROMPTS, guidance=2.0)
    st = be.make_student()
    unet_of(st).conv_in.requires_grad_(False)
    opt = adamw(st.parameters(), lr=1e-4)
    n_trainable = sum(p.requires_grad for p in st.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match="bitsandbytes"):
            adamw(st.parameters(), lr=1e-4, eight_bit=True)
    fig, ax = plt.subplots()
    be.plot_samples(be.sample_noise(4), ax)
    assert ax.images and ax.images[0].get_array().shape[:2] == (2 * 16 + 6, 2 * 16 + 6)
    plt.close(fig)


def test_latent_threshold():
    th = LatentThreshold("dynamic", -4.0, 4.0, ratio=0.99, max_value=1.5)
    inside = torch.rand(3, 4, 8, 8) * 7 - 3.5
    torch.testing.assert_close(th(inside), inside)
    out = th(inside * 10)
    assert out.abs().max() <= 4.0 + 1e-5
    st = LatentThreshold("static", -2.0, 3.0)
    assert st(inside).min() >= -2 and st(inside).max() <= 3
    assert bool(th) and bool(st)


# ---- metrics ----
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    d = tmp_path_factory.mktemp("clipcfg")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                          "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    (d / "tiny-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / "tiny-test-clip.json")
    torch.manual_seed(0)
    net = open_clip.create_model("tiny-test-clip").eval()
    return net, open_clip.get_tokenizer("tiny-test-clip")


def test_t2i_metrics_on_tiny_networks(tiny, tmp_path, tiny_clip):
    import lpips

    from ddil_lab.sd import metrics as t2i

    be = SDBackend(tiny["sd15"], prompts=PROMPTS, guidance=3.0)
    gen = t2i.backend_generator(be, lambda g: be.teacher, n_steps=2)
    a = gen(PROMPTS[:2], [0, 1])
    assert a.shape == (2, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(gen(PROMPTS[1:2], [1])[0], a[1], atol=1e-5, rtol=1e-5)  # fixed seeds
    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps({"annotations": [{"caption": p} for p in PROMPTS * 2]}))
    feat = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten()).eval()
    dist = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False).eval()
    ref = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    res = t2i.evaluate_t2i(gen, str(caps), tmp_path / "eval", reference=ref, feature_fn=feat,
                           clip=tiny_clip, lpips_model=dist, lpips_prompts=2, lpips_seeds=3,
                           hps="auto", batch_size=4)
    assert res["n_images"] == 6 and -1 <= res["clip_score"] <= 1
    assert res["lpips_diversity"] > 0 and res["fid"] > 0
    # FID against (a copy of) the same images is far below FID against other images
    imgs = t2i.generate_images(gen, PROMPTS, [0, 1, 2])
    assert t2i.fid(imgs, torch.cat([imgs, imgs]), feat) < t2i.fid(imgs, ref, feat)
    assert (tmp_path / "eval" / "samples.png").is_file()
    assert (tmp_path / "eval" / "lpips_grid.png").is_file()
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_images"] == 6


def test_metric_weights_fail_fast_offline():
    from ddil_lab.sd import metrics as t2i

    t0 = time.time()
    with pytest.raises(OfflineError, match="ViT-g-14"):
        t2i.load_clip()
    with pytest.raises((ImportError, OfflineError), match="(?i)hps"):
        t2i.hps_score(torch.rand(1, 3, 8, 8), ["a"])
    assert time.time() - t0 < 20


# ---- what a new user meets (issue 15): shapes, paths, pickles, negative prompts, grids ----
def _ddim_pipe(folder_or_pipe):
    from diffusers import DDIMScheduler

    pipe = load_pipeline(folder_or_pipe)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True,
                                               timestep_spacing="trailing", clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_non_square_unet_and_negative_prompt_match_the_pipeline(tiny, kind):
    """A UNet whose sample_size is a pair trains at its own (H, W): the latent shape and SDXL's
    time ids follow it; and a negative prompt is the teacher's unconditional branch. Oracle:
    pipe(prompt, negative_prompt=..., height=H, width=W) with DDIM."""
    pipe = _ddim_pipe(tiny[kind])
    pipe.unet.register_to_config(sample_size=[8, 12])
    be = SDBackend(pipe, prompts=PROMPTS, guidance=5.0, negative_prompt="blurry, dark")
    assert be.shape == (4, 8, 12) and be.size == (16, 24) and be.resolution == (16, 24)
    if kind == "sdxl":
        assert be.encode_prompts(["a"])["time_ids"].tolist() == [[16, 24, 0, 0, 16, 24]]
    ref = pipe(PROMPTS[:2], negative_prompt=["blurry, dark"] * 2, num_inference_steps=4,
               guidance_scale=5.0, height=16, width=24, output_type="latent",
               generator=torch.Generator().manual_seed(3)).images
    x_T = be.sample_noise(2, torch.Generator().manual_seed(3))
    ours = sample(be.teacher, x_T, [999, 749, 499, 249], be.encode_prompts(PROMPTS[:2]),
                  schedule=be.schedule)
    assert ours.sample.shape == ref.shape and _max_err(ours.sample, ref) < 1e-4
    with pytest.warns(UserWarning, match=r"resolution=16 trains square 16x16 .* 16x24"):
        assert SDBackend(pipe, prompts=PROMPTS, resolution=16).shape == (4, 8, 8)
    with pytest.raises(ValueError, match=r"resolution=\(16, 21\) .* multiples of the VAE"):
        SDBackend(pipe, prompts=PROMPTS, resolution=(16, 21))


def test_loading_names_what_is_missing_and_refuses_pickles(tiny, tmp_path):
    import shutil

    from diffusers import UNet2DConditionModel

    with pytest.raises(FileNotFoundError, match=r"the folder does not exist"):
        load_pipeline(str(tmp_path / "models" / "sd-typo"))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    no_unet = shutil.copytree(tiny["sd15"], tmp_path / "no_unet")
    shutil.rmtree(no_unet / "unet")
    with pytest.raises(FileNotFoundError, match=r"component 'unet' .* has no unet/"):
        load_pipeline(no_unet)
    (no_unet / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"component 'unet' .* has no weights"):
        SDBackend(no_unet, prompts=PROMPTS)
    UNet2DConditionModel.from_pretrained(tiny["sd15"], subfolder="unet").save_pretrained(
        no_unet / "unet", safe_serialization=False)  # a pickled .bin only
    with pytest.raises(ValueError, match=r"'unet' holds only pickled weights .* allow_pickle"):
        load_pipeline(no_unet)
    assert SDBackend(no_unet, prompts=PROMPTS, allow_pickle=True).shape == (4, 8, 8)


def test_schedule_honours_zero_betas():
    """beta_start=0.0 is a value, not 'use the default' (it used to become 0.00085 and then fail
    with "does not reproduce alphas_cumprod")."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(beta_start=0.0, beta_end=0.02, beta_schedule="linear")
    S = schedule_from_scheduler(sch)
    assert S.beta_start == 0.0
    torch.testing.assert_close(S.alpha_bar[:-1], sch.alphas_cumprod, atol=1e-6, rtol=0)


def test_exported_consistency_student_refuses_another_grid(tiny, tmp_path):
    """pipe(prompt, num_inference_steps=n) of an LCM / DMD2 export would walk LCM's grid (999,
    499), not the student's (999, 500): diffusers refuses it; timesteps= from the info works."""
    from diffusers import DiffusionPipeline

    from ddil_lab.methods.lcm import ConsistencyFn
    from ddil_lab.sd.export import export_pipeline, pipeline_kwargs

    be = SDBackend(tiny["sd15"], prompts=PROMPTS, guidance=3.0, negative_prompt="ugly")
    out = export_pipeline(be, ConsistencyFn(be.make_student()), tmp_path / "lcm", n_steps=2)
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    # diffusers: "The combination of `original_steps x strength`: 1 x 1.0 is smaller than ..."
    with pytest.raises(ValueError, match="original_steps"):
        pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    kw = pipeline_kwargs(out)
    assert kw["timesteps"] == [999, 500]
    assert pipe(PROMPTS[0], output_type="latent", **kw).images.shape == (1, *be.shape)
    info = json.loads((tmp_path / "lcm" / "ddil_student.json").read_text())
    assert info["teacher_negative_prompt"] == "ugly"
