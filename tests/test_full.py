"""The full tier's papermill notebooks and accelerate entry (ddil_lab.sd.recipes, ddil_lab.sd.run) on tiny random
SD1.5 / SDXL pipelines, on CPU.

Each notebook runs under papermill with ``model_id="tiny"`` and 2 training steps per stage (the
three, and a run with a bad parameter, in parallel kernels) and must write its sample grids, loss
plot, metrics and an exported pipeline that reloads with ``load_student_pipeline``; a bad
parameter fails in the validation cell, naming it. Oracles: the PD plan is the paper's protocol;
the notebooks' parameter defaults are the recipes' defaults; a resumed run loads the finished
student bit for bit.
"""
import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CONFIGS = ROOT / "experiments" / "configs"
METHODS = ("pd", "lcm", "dmd2")

# 2 training steps per stage, 2-step students, tiny evaluation
TINY = dict(model_id="tiny", n_steps=2, max_steps=2, mixed_precision="no",
            gradient_checkpointing=False, n_samples=4, n_eval=4, lpips_prompts=2, lpips_seeds=2,
            log_every=1, sample_every=1)
PER_METHOD = {
    "pd": dict(start_steps=4, match_grid=16, batch_size=4, sample_every=2),  # v, gc, 4->2 (2 parts)
    "lcm": dict(batch_size=4),
    "dmd2": dict(gan_weight=0.1, sample_every=2),  # the paper's batch 7, 10 critic updates, GAN
}


def tiny_params(method: str, out_dir) -> dict:
    return {**TINY, **PER_METHOD[method], "out_dir": str(out_dir)}


def _papermill(nb: str, out: Path, params: dict) -> subprocess.Popen:
    import yaml

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "papermill", str(NOTEBOOKS / nb), str(out), "-y",
           yaml.safe_dump(params), "-k", "python3", "--cwd", str(ROOT), "--no-progress-bar", "--start-timeout", "600"]  # kernels start slowly under load
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module", autouse=True)
def notebook_jobs(request, tmp_path_factory):
    """Start the three notebooks (and one with a bad parameter) in parallel kernels as soon as
    the module starts, if a selected test needs them, so that they run while the tests that
    need no training do."""
    if not any("runs" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    from jupyter_client.kernelspec import find_kernel_specs

    if "python3" not in find_kernel_specs():
        pytest.fail("papermill needs a Jupyter kernel named python3: "
                    "python -m ipykernel install --user --name python3")
    root = tmp_path_factory.mktemp("full")
    params = {m: tiny_params(m, root / m) for m in METHODS}
    params["bad"] = {**tiny_params("lcm", root / "bad"), "threshold": "bogus"}
    jobs = {name: (root / f"{name}.ipynb", Path(p["out_dir"]),
                   _papermill(f"full_{'lcm' if name == 'bad' else name}.ipynb",
                              root / f"{name}.ipynb", p))
            for name, p in params.items()}
    yield jobs
    for _, _, proc in jobs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def runs(notebook_jobs):
    import ddil_lab.sd.export  # noqa: F401  (the reload test's imports, while the kernels run)

    out = {}
    for name, (nb, run_dir, proc) in notebook_jobs.items():
        log = proc.communicate(timeout=900)[0].decode(errors="replace")
        out[name] = {"nb": nb, "dir": run_dir, "rc": proc.returncode, "log": log}
    return out


# ---- parameters, plans and configs (no training) ----
@pytest.mark.parametrize("method", METHODS)
def test_notebook_parameters_are_the_recipe_defaults(method):
    import dataclasses

    import papermill as pm

    from ddil_lab.sd.recipes import RECIPES

    params = pm.inspect_notebook(str(NOTEBOOKS / f"full_{method}.ipynb"))
    fields = {f.name: f for f in dataclasses.fields(RECIPES[method])}
    assert set(params) == set(fields)
    for name, p in params.items():
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert ast.literal_eval(p["default"]) == default, name
        assert p["help"], f"parameter {name} has no help comment"
    # the .py (jupytext) and .ipynb hold the same parameters cell, with no outputs committed
    nb = json.loads((NOTEBOOKS / f"full_{method}.ipynb").read_text())
    assert all(not c.get("outputs") and not c.get("execution_count")
               for c in nb["cells"] if c["cell_type"] == "code")
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    assert "".join(cell["source"]) in (NOTEBOOKS / f"full_{method}.py").read_text()


def test_pd_plan_is_the_papers_protocol():
    from ddil_lab.sd.recipes import PDRecipe

    plan = PDRecipe(data="x").plan()
    got = [(s.name, s.n_steps, s.substeps, s.steps, s.teacher, s.init) for s in plan]
    assert got == [
        ("v", 256, 1, 4000, "unguided", "teacher"),             # eps -> v, 4K
        ("gc", 256, 1, 6000, "backend", "v"),                   # guidance conditioning: 10K total
        ("32to16", 16, 2, 5000, "gc", "gc"),
        ("16to8_part1", 8, 2, 6000, "32to16", "32to16"),        # 6K, then resume with warmup 4K
        ("16to8_part2", 8, 2, 4000, "32to16", "16to8_part1"),
        ("8to4_part1", 4, 2, 8000, "16to8_part2", "16to8_part2"),
        ("8to4_part2", 4, 2, 6000, "16to8_part2", "8to4_part1")]
    assert [s.ddil for s in plan] == [False, False] + [True] * 5
    assert [s.name for s in PDRecipe(data="x", n_steps=2).plan()][-2:] == ["4to2_part1",
                                                                          "4to2_part2"]


@pytest.mark.parametrize("method", METHODS)
def test_configs_load_and_validate(method):
    from ddil_lab.sd.recipes import RECIPES, load_config

    r = load_config(CONFIGS / f"{method}.yaml")
    assert type(r) is RECIPES[method] and r.ddil and r.threshold == "dynamic"
    assert r.lr == 1e-5 and r.lr_schedule == "linear"
    assert {"pd": 224, "lcm": 360, "dmd2": 7}[method] == r.batch_size
    if method == "dmd2":
        assert r.critic_steps == 10 and r.model_id == "segmind/SSD-1B" and r.rollout_t == 500
    if method == "lcm":
        assert (r.solver_steps, r.target_ema, r.loss, r.ddil_steps) == (50, 0.95, "huber",
                                                                        [3, 4, 5])
    assert r.plan() == RECIPES[method](**{k: getattr(r, k) for k in r.parameters()}).plan()


@pytest.mark.parametrize("params,pattern", [
    ({"lr": -1.0}, r"lr=-1\.0 is not allowed"),
    ({"n_steps": "4"}, r"n_steps='4' is not allowed: must be int"),
    ({"n_steps": 0}, r"n_steps=0 is not allowed: an int in \[1, 1000\]"),
    ({"beta_frwd": 0.9}, r"sum to 1"),
    ({"stage_steps": {16: [5000]}}, r"stage_steps=.*needs an entry 8"),
    ({"start_steps": 24, "match_grid": 48}, r"start_steps=24 is not allowed"),
    ({"batch_size": 5}, r"batch_size=5 is not allowed.*multiple of num_processes=2"),
    ({"log_with": "wandb"} if importlib.util.find_spec("wandb") is None else {"log_with": "x"},
     r"log_with=.* (needs the 'wandb' package|is not allowed)"),
])
def test_bad_parameters_are_named(params, pattern, tmp_path):
    """Each bad parameter alone, in a fresh out_dir (never the working tree's runs/): the
    error names it, and only it."""
    from ddil_lab.sd.recipes import make_recipe

    r = make_recipe("pd", model_id="tiny", out_dir=str(tmp_path / "run"), **params)
    with pytest.raises(ValueError, match=pattern) as e:
        r.validate(num_processes=2)
    assert str(e.value).count("\n  - ") == 1, str(e.value)  # one bad parameter, one message
    make_recipe("pd", model_id="tiny", out_dir=str(tmp_path / "run")).validate(num_processes=2)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['stpes'\]"):
        make_recipe("lcm", stpes=3)


def test_train_full_checks_like_the_notebooks(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import train_full
    finally:
        sys.path.pop(0)
    tiny = ["model_id=tiny", "data=null", "latent_cache=null", "eval_captions=null",
            "fid_reference=null", "mixed_precision=no"]
    for m in METHODS:
        args = ["--config", str(CONFIGS / f"{m}.yaml"), "--check", "--out", str(tmp_path / m)]
        assert train_full.main(args + ["--set", *tiny]) is None
        assert f"full_{m}: model tiny" in capsys.readouterr().out
    rc = train_full.cli(["--config", str(CONFIGS / "dmd2.yaml"), "--check",
                         "--set", *tiny, "critic_steps=0", "tau_min=0.5", "tau_max=0.2"])
    err = capsys.readouterr().err
    assert rc == 2 and "critic_steps=0 is not allowed" in err and "tau_min=0.5" in err


# ---- the notebooks ----
@pytest.mark.parametrize("method", METHODS)
def test_notebook_writes_samples_metrics_and_pipeline(runs, method):
    from ddil_lab.sd.export import load_student_pipeline

    r = runs[method]
    assert r["rc"] == 0, r["log"][-3000:]
    d = r["dir"]
    grids = sorted((d / "samples").glob("*.png"))
    assert grids and (d / "loss.png").is_file() and (d / "eval" / "samples.png").is_file()
    if method == "lcm":  # sample_every=1: a periodic grid at step 1, and the stage's final one
        assert [g.name for g in grids] == ["0000001_lcm.png", "0000002_lcm.png"]
    m = json.loads((d / "eval" / "metrics.json").read_text())
    assert m["n_images"] == 4 and m["fid"] >= 0 and -1 <= m["clip_score"] <= 1
    assert m["lpips_diversity"] > 0 and any("tiny" in n for n in m["notes"])
    history = json.loads((d / "history.json").read_text())
    assert all(torch.isfinite(torch.tensor(h["loss/student"])) for h in history)
    result = json.loads((d / "result.json").read_text())
    assert result["paths"]["pipeline"] == str(d / "pipeline")
    # the exported pipeline reloads and samples the student's 2-step grid
    pipe, kw = load_student_pipeline(d / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    if method == "pd":
        assert kw == {"num_inference_steps": 2, "guidance_scale": 8.0}  # w-embedded, v space
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    else:
        assert kw["timesteps"] == [999, 500]
    img = pipe("a red car", output_type="pt", generator=torch.Generator().manual_seed(0), **kw)
    assert img.images.shape[-2:] == (16, 16) and torch.isfinite(img.images).all()
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if method == "dmd2"
                                   else "StableDiffusionPipeline")
    # the executed notebook shows the grids and loss plots, and the pipeline path
    nb = json.loads(r["nb"].read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
    assert any(str(d / "pipeline") in "".join(o.get("text", "")) for o in outputs)
    from ddil_lab.notebook import output_problems

    assert output_problems(nb) == []
    text = "".join("".join(o.get("text", "")) for o in outputs)
    assert "memory plan:" in text and "total (peak, per process)" in text


def test_full_pd_writes_tensorboard_events(runs):
    """log_with="tensorboard" (the default): the run folder holds event files with the losses
    per state source, the learning rate and NFE at the global step of every stage, and grids."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ddil_lab.train.tracking import event_files, read_scalars

    r = runs["pd"]
    assert r["rc"] == 0, r["log"][-3000:]
    d = r["dir"] / "tensorboard"
    assert event_files(d)
    scalars = read_scalars(d)
    history = json.loads((r["dir"] / "history.json").read_text())
    loss = {s: v for s, v in scalars["loss/student"]}
    assert sorted(loss) == [h["global_step"] for h in history]  # v, gc, 4to2 x2: 8 steps
    for h in history:
        assert loss[h["global_step"]] == pytest.approx(h["loss/student"], rel=1e-6)
    assert {"lr", "nfe/teacher", "nfe/student"} <= set(scalars)
    assert any(k.startswith("source/") for k in scalars)
    acc = EventAccumulator(event_files(d)[0])
    acc.Reload()
    assert any(t.startswith("samples/") for t in acc.Tags()["images"])


def test_pd_runs_every_stage_of_its_plan(runs):
    d = runs["pd"]["dir"]
    stages = sorted(p.name for p in (d / "stages").iterdir())
    assert stages == ["4to2_part1", "4to2_part2", "gc", "v"]
    assert all((d / "stages" / s / "student.safetensors").is_file() for s in stages)
    assert not any((d / "stages" / s / "ckpt").exists() for s in stages)  # pruned when done
    log = (d / "log.txt").read_text()
    assert "teacher=unguided" in log and "teacher=gc, init=4to2_part1" in log


def test_bad_parameter_fails_in_the_validation_cell(runs):
    r = runs["bad"]
    assert r["rc"] != 0
    nb = json.loads(r["nb"].read_text())
    failed = [c for c in nb["cells"] if c["cell_type"] == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert len(failed) == 1 and "from_namespace" in "".join(failed[0]["source"])
    err = next(o for o in failed[0]["outputs"] if o.get("output_type") == "error")
    assert err["ename"] == "ValueError" and "threshold='bogus'" in err["evalue"]
    assert "'none', 'static', 'dynamic'" in err["evalue"]
    assert not (r["dir"] / "stages").exists()  # nothing ran


def test_resume_loads_finished_stages(runs, tmp_path):
    """A run resumed from a finished one loads its student (bit for bit) instead of training."""
    from safetensors.torch import load_file

    from ddil_lab import sd as recipes

    src = runs["lcm"]["dir"]
    assert runs["lcm"]["rc"] == 0
    r = recipes.make_recipe("lcm", **{**tiny_params("lcm", tmp_path / "again"),
                                      "resume_from": str(src), "metrics": "none",
                                      "lpips_prompts": 0, "progress": False})
    res = recipes.run_full(r)
    assert "finished earlier" in (tmp_path / "again" / "log.txt").read_text()
    a = load_file(src / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(Path(res["paths"]["pipeline"]) / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same out_dir without resume_from is refused before any work
    with pytest.raises(ValueError, match="already holds a run"):
        recipes.make_recipe("lcm", **tiny_params("lcm", src)).validate()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind,method,extra", [("ddp", "lcm", []),
                                               ("fsdp", "dmd2", ["gan_weight=0.1"])])
def test_train_full_under_accelerate_with_two_processes(tmp_path, kind, method, extra):
    """``accelerate launch`` of train_full.py with the shipped DDP or FSDP config, two CPU
    processes (gloo): process 0 writes the grids, the pipeline and the metrics. FSDP: DMD2's
    SDXL-shaped student, critic and GAN head sharded by the config's UNet blocks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(CONFIGS / f"accelerate_{kind}.yaml"), "--num_processes", "2",
           "--main_process_port", str(port), str(ROOT / "experiments" / "train_full.py"),
           "--config", str(CONFIGS / f"{method}.yaml"), "--out", str(out), "--set", "model_id=tiny",
           "data=null", "latent_cache=null", "eval_captions=null", "fid_reference=null",
           "max_steps=2", "n_steps=2", "batch_size=4", "mixed_precision=no",
           "gradient_checkpointing=false", "n_eval=4", "lpips_prompts=2", "lpips_seeds=2",
           "sample_every=1", "log_every=1", "progress=false", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    log = (out / "log.txt").read_text()
    assert "over 2 process(es)" in log and ("modules sharded (FSDP)" in log) == (kind == "fsdp")
    assert (out / "pipeline" / "model_index.json").is_file()
    assert json.loads((out / "eval" / "metrics.json").read_text())["n_images"] == 4
    assert len(list((out / "samples").glob("*.png"))) == 2
