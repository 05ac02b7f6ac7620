"""The full tier at real size: full-size SD1.5 / SSD-1B / SDXL architectures with random weights
(``ddil_lab.sd.random_pipeline``), the memory planner (``ddil_lab.sd.memory``) and run tracking
(``ddil_lab.train.tracking``).

Oracles: the published parameter counts of the UNets; the planner's parts follow from the counts
(AdamW = 2 x fp32 weights, sharding divides what it shards); its activation constants re-measured;
its total against the peak RSS of real-size CPU training steps (``--runslow``).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# ---- the architectures (meta device: no memory) ----
def test_random_configs_have_the_published_parameter_counts():
    from ddil_lab.sd.random_pipeline import PUBLISHED_UNET, build_component

    def count(shape, part):
        return sum(p.numel() for p in build_component(shape, part, device="meta").parameters())

    assert count("sd15", "unet") == PUBLISHED_UNET["sd15"] == 859_520_964
    assert count("sd15", "vae") == 83_653_863
    assert count("sd15", "text_encoder") == 123_060_480  # CLIP ViT-L/14 text tower
    with pytest.raises(ValueError, match="shape='sd3' is not one of"):
        build_component("sd3", "unet", device="meta")


@pytest.mark.slow
def test_ssd1b_and_sdxl_at_published_size():
    from ddil_lab.sd.random_pipeline import parameter_counts

    from ddil_lab.sd.random_pipeline import PUBLISHED_UNET

    ssd, xl = parameter_counts("ssd1b"), parameter_counts("sdxl")
    assert xl["unet"] == PUBLISHED_UNET["sdxl"] == 2_567_463_684
    assert 1.25e9 < ssd["unet"] < 1.35e9  # "1.3B"
    assert xl["text_encoder_2"] == ssd["text_encoder_2"] == 694_659_840  # OpenCLIP bigG


# ---- the memory planner ----
def test_memory_plan_follows_from_the_parameter_counts():
    from ddil_lab.sd.memory import architecture, fitting_settings, plan_memory

    shape = "tiny-sd15"
    P = architecture(shape)["unet"]
    full = plan_memory(shape, "pd", batch_size=2, mixed_precision="bf16", latent_cache=True)
    parts = full.parts
    assert parts["teacher UNet (frozen)"] == 2 * P  # bf16
    assert parts["student weights (fp32 trained)"] == parts["student gradients"] == 4 * P
    assert parts["student AdamW moments"] == 8 * P
    assert parts["previous stage's student (teacher)"] == 4 * P
    assert full.total == pytest.approx(sum(parts.values()))
    # activations are linear in batch and latent pixels
    big = plan_memory(shape, "pd", batch_size=4, resolution=32, latent_cache=True).parts
    assert big["activations"] == pytest.approx(parts["activations"] * 2 * 4)
    # sharding: ZeRO-1 divides the moments, FSDP every trained part, never the teacher
    z = plan_memory(shape, "dmd2", sharding="zero1", num_processes=4).parts
    f = plan_memory(shape, "dmd2", sharding="fsdp", num_processes=4).parts
    assert z["student AdamW moments"] == f["student AdamW moments"] == 2 * P
    assert f["student weights (fp32 trained)"] == P and z["student weights (fp32 trained)"] == 4 * P
    assert f["teacher UNet (frozen)"] == 2 * P and f["critic weights + gradients"] == 2 * P
    # LoRA: only the adapters train; students share the teacher's frozen weights
    lora = plan_memory(shape, "lcm", lora_rank=4).parts
    r = architecture(shape, 4)["lora"]
    assert 0 < r < P and lora["student AdamW moments"] == 8 * (r + 256 * 1280)
    assert lora["EMA target"] == 4 * (r + 256 * 1280) + 2 * P  # the copy holds its own base
    # the settings that fit a GPU are the ones whose plan fits
    fits = fitting_settings("sdxl", "dmd2", gpu_gib=80, resolution=1024)
    assert fits and all(p.total <= 80 * 2 ** 30 for p in fits)
    assert not plan_memory("sdxl", "dmd2", resolution=1024, gradient_checkpointing=False).fits(40)
    assert "total (peak, per process)" in str(fits[0])
    with pytest.raises(ValueError, match="method='gan' is not one of"):
        plan_memory(shape, "gan")


@pytest.mark.slow
def test_activation_constants_are_measured():
    from ddil_lab.sd.memory import ACTIVATIONS, activation_bytes_per_pixel

    for (shape, ckpt), v in ACTIVATIONS.items():
        if shape in ("sd15", "ssd1b", "sdxl"):
            assert activation_bytes_per_pixel(shape, ckpt) == pytest.approx(v, rel=0.02)


# ---- run tracking ----
def test_tracker_writes_history_images_and_metrics(tmp_path):
    from ddil_lab.train.tracking import Tracker, event_files, read_scalars

    class Result:
        history = [{"step": 1, "loss/student": 0.5, "source/forward": 0.4, "lr": 1e-4,
                    "nfe/teacher": 2, "skipped_terms": ["x"], "flag": True},
                   {"step": 2, "loss/student": 0.25, "lr": 2e-4, "nfe/teacher": 4}]

    tr = Tracker(tmp_path / "tb", config={"method": "pd"})
    tr.start_stage("a", offset=10)
    tr(1, Result)
    tr(2, Result)  # records already written are not written twice
    tr.log_images("samples/a", torch.rand(2, 3, 8, 8), 12)
    tr.log_scalars({"eval/fid": 3.5, "eval/none": None}, 12)
    tr.close()
    s = read_scalars(tmp_path / "tb")
    assert s["loss/student"] == [(11, 0.5), (12, 0.25)] and s["nfe/teacher"] == [(11, 2), (12, 4)]
    assert s["eval/fid"] == [(12, 3.5)] and "flag" not in s and "skipped_terms" not in s
    none = Tracker(tmp_path / "off", log_with="none")
    none(1, Result)
    assert not event_files(tmp_path / "off") and not (tmp_path / "off").exists()
    with pytest.raises(ValueError, match="log_with='tb' is not allowed"):
        Tracker(tmp_path, log_with="tb")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match="needs the 'wandb' package.*pip install wandb"):
            Tracker(tmp_path, log_with="wandb")


# ---- real size on CPU (--runslow): one step of each method, export, reload, RSS vs plan ----
WORKER = r'''
import ctypes, gc, json, sys, threading, time
import psutil, torch
torch.manual_seed(0)
from diffusers import DiffusionPipeline
from ddil_lab.methods import DMD2, LCM, PD
from ddil_lab.rollout import StateSampler
from ddil_lab.sd.backend import SDBackend, unet_of
from ddil_lab.sd.export import export_pipeline, pipeline_kwargs
from ddil_lab.sd.memory import plan_memory
from ddil_lab.train import distill

a = json.loads(sys.argv[1])
proc = psutil.Process()
peak = [0]
def watch():
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
def settle():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    time.sleep(0.1)
    rss = proc.memory_info().rss
    peak[0] = rss
    return rss
out = {"rows": []}
rss0 = settle()
t0 = time.time()
lo, hi = a["guidance"]
be = SDBackend(a["folder"], data=a["data"], guidance=(lo, hi) if lo != hi else lo,
               mixed_precision=a["precision"], gradient_checkpointing=True,
               lora_rank=a["lora_rank"],
               resolution=a["resolution"])
out["load_s"] = time.time() - t0
out["backend"] = repr(be)
for name in a["methods"]:
    for ddil in (False, True):
        base = settle()
        method = {"pd": lambda: PD(n_steps=2, substeps=2, reflected=ddil),
                  "lcm": lambda: LCM(n_steps=2, reflected=ddil, ddil_steps=(2, 3)),
                  "dmd2": lambda: DMD2(n_steps=2, critic_steps=1, reflected=ddil)}[name]()
        if name == "dmd2":
            sampler = StateSampler(beta_frwd=0.0, beta_student_bckwrd=0.5, beta_mixed=0.5,
                                   rollout_until=500) if ddil else \
                 StateSampler(beta_frwd=0.0, beta_student_bckwrd=1.0)
        elif name == "lcm":  # batch 1: the DDIL arm's one state is a rollout state
            sampler = StateSampler(beta_frwd=0.0, beta_student_bckwrd=1.0) if ddil else None
        else:
            sampler = StateSampler(beta_frwd=0.0, beta_mixed=1.0) if ddil else None
        t = time.time()
        res = distill(be, method, sampler, steps=1, batch_size=1, lr=1e-4, progress=False, seed=0)
        dt = time.time() - t
        st = method.student.denoiser if name == "lcm" else method.student
        lora_b = [p for n, p in unet_of(st).named_parameters() if "lora_B" in n]
        plan = plan_memory(a["shape"], name, 1, a["resolution"], a["precision"], True,
                           a["lora_rank"], w_embed=be.w_embed, cuda=False,
                           teacher_copy=False)  # PD here: the backend's teacher
        rec = res.history[-1]
        out["rows"].append({"method": name, "ddil": ddil, "s_per_step": dt,
                            "loss": rec["loss/student"],
                            "nfe": [rec["nfe/teacher"], rec["nfe/student"]],
                            "lora_B_moved": max(float(p.abs().max()) for p in lora_b),
                            "rss_before_GiB": base / 2**30, "peak_rss_GiB": peak[0] / 2**30,
                            "plan_GiB": plan.total / 2**30,
                            "plan_plus_process_GiB": (plan.total + rss0) / 2**30})
        print(json.dumps(out["rows"][-1]), flush=True)
        with open(a["log"], "a") as f:  # as it goes: a slow machine may not finish
            f.write(json.dumps({"shape": a["shape"], **out["rows"][-1]}) + "\n")
        if name == a["export_method"] and ddil:
            dtype = getattr(torch, a["export_dtype"])
            t = time.time()
            folder = export_pipeline(be, res, a["export"], dtype=dtype)
            out["export_s"] = time.time() - t
        del method, res, st, lora_b
out["rss0_GiB"] = rss0 / 2**30
if a["export"] is None:
    print("RESULT " + json.dumps(out), flush=True)
    sys.exit(0)
del be
settle()
t = time.time()
pipe = DiffusionPipeline.from_pretrained(a["export"], torch_dtype=getattr(torch, a["export_dtype"]),
                                         use_safetensors=True)
pipe.set_progress_bar_config(disable=True)
kw = pipeline_kwargs(a["export"])
img = pipe("a photo of a cat", height=a["resolution"], width=a["resolution"], output_type="pt",
           generator=torch.Generator().manual_seed(0), **kw).images
out.update(reload_sample_s=time.time() - t, sample_shape=list(img.shape),
           sample_finite=bool(torch.isfinite(img).all()), pipeline=type(pipe).__name__,
           unet_params=sum(p.numel() for p in pipe.unet.parameters()), kwargs=kw)
print("RESULT " + json.dumps(out), flush=True)
'''


def _run(cmd, env, timeout):
    t = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout, time.time() - t


@pytest.mark.slow
def test_real_size_steps_export_and_memory(tmp_path):
    """Full-size random SD1.5 (all methods, each with and without DDIL) and SSD-1B (DMD2, the
    paper's recipe) at 64 px (8x8 latents), batch 1, bf16 frozen parts, gradient checkpointing,
    LoRA students (full fine-tuning of SD1.5 needs ~14 GB with AdamW: over this machine's
    budget): one training step each, export, reload with plain diffusers and sample; the
    planner's prediction against the peak RSS of each step."""
    from ddil_lab.sd.data import make_imagefolder
    from ddil_lab.sd.random_pipeline import PUBLISHED_UNET

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT),
               MPLBACKEND="Agg")
    g = torch.Generator().manual_seed(0)
    data = make_imagefolder(tmp_path / "data", torch.rand(4, 3, 64, 64, generator=g) * 2 - 1,
                            ["a cat", "a dog", "a red car", "a boat"])
    log = Path(os.environ.get("DDIL_FULL_SIZE_REPORT", tmp_path / "report.json")).with_suffix(
        ".jsonl")
    for shape, dtype in (("sd15", "fp32"), ("ssd1b", "bf16")):  # the CLI, timed
        t = time.time()
        _run([sys.executable, "-m", "ddil_lab.sd.random_pipeline", "--shape", shape, "--out",
              str(tmp_path / shape), "--dtype", dtype], env, 900)
        with open(log, "a") as f:
            f.write(json.dumps({"shape": shape, "make_s": time.time() - t}) + "\n")
    # two workers at a time (each process's own peak RSS is measured; together < 12 GB)
    jobs = [[("sd15", "pd", "float32"), ("sd15", "lcm", None)],
            [("sd15", "dmd2", None), ("ssd1b", "dmd2", "bfloat16")]]
    report = {}
    for wave in jobs:
        procs = []
        for shape, method, export_dtype in wave:
            args = {"folder": str(tmp_path / shape), "data": data, "shape": shape,
                    "precision": "bf16", "lora_rank": 4, "resolution": 64, "methods": [method],
                    "guidance": [2.0, 8.0] if shape == "sd15" else [8.0, 8.0],
                    "export_method": method if export_dtype else None,
                    "export": str(tmp_path / f"{shape}_{method}") if export_dtype else None,
                    "export_dtype": export_dtype or "float32", "log": str(log)}
            procs.append((shape, method, time.time(), subprocess.Popen(
                [sys.executable, "-c", WORKER, json.dumps(args)], env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        for shape, method, t0, proc in procs:
            stdout = proc.communicate(timeout=3000)[0]
            assert proc.returncode == 0, stdout[-4000:]
            res = json.loads(stdout.split("RESULT ", 1)[1])
            res["run_s"] = time.time() - t0
            report[f"{shape}/{method}"] = res
    for key, res in report.items():
        shape = key.split("/")[0]
        for row in res["rows"]:
            assert torch.isfinite(torch.tensor(row["loss"])), row
            assert row["lora_B_moved"] > 0, row  # the adapters trained
            if row["ddil"]:
                assert sum(row["nfe"]) > 0, row  # rollouts ran
            # the planner: within 40% of what the step really held (CPU, peak RSS)
            used = row["peak_rss_GiB"]
            assert 0.6 * used < row["plan_plus_process_GiB"] < 1.4 * used, row
        if "sample_shape" in res:  # exported, reloaded with plain diffusers, sampled
            assert res["sample_finite"] and res["sample_shape"] == [1, 3, 64, 64]
            # the published UNet, plus the guidance embedding (256 x 320) of w-embedded students
            assert res["unet_params"] - PUBLISHED_UNET[shape] in (0, 256 * 320) \
                or shape == "ssd1b"
            assert res["pipeline"] == ("StableDiffusionPipeline" if shape == "sd15"
                                       else "StableDiffusionXLPipeline")
    assert sum("sample_shape" in r for r in report.values()) == 2
    out = os.environ.get("DDIL_FULL_SIZE_REPORT")
    if out:
        Path(out).write_text(json.dumps(report, indent=1))


# ---- the benchmark, on the tiny pipeline (the CPU form of experiments/bench_full.py) ----
def test_bench_full_table_on_the_tiny_pipeline(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_full", ROOT / "experiments" / "bench_full.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    info = bench.main(["--device", "cpu", "--shapes", "tiny-sd15", "--methods", "pd,dmd2",
                       "--resolution", "32", "--batch", "2", "--steps", "2", "--refresh", "2",
                       "--buffer", "4", "--bound-repeats", "1", "--models", str(tmp_path / "m"),
                       "--out", str(tmp_path / "out")])
    rows = {(r["method"], r["ddil"]): r for r in info["rows"]}
    assert set(rows) == {("pd", False), ("pd", True), ("dmd2", False), ("dmd2", True)}
    for (m, ddil), r in rows.items():
        assert r["loss_finite"] and r["s_per_step"] > 0 and r["bound_s"] > 0
        assert r["calls"].get("student+bwd", 0) >= 1  # the step's own UNet calls were recorded
        # buffers fill before step 0, apart from the timed steps (DMD2's baseline: backward
        # simulation without a buffer)
        assert (r["fill_s"] > 0) == ddil, r
    assert json.loads((tmp_path / "out" / "bench_full.json").read_text())["rows"]
    assert "x bound" in capsys.readouterr().out
