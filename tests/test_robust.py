"""Robust runs: kill-and-resume is bitwise, corrupt checkpoints are survived, non-finite values
stop the run with a precise message, bad settings fail fast with a message naming them, and
two accelerate processes train like one process with the same global batch."""
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ddil_lab.toy.backend import Toy2dBackend
from ddil_lab.train.checkpoint import CheckpointError, flatten_state, latest_checkpoint, load_checkpoint
from ddil_lab.config import ConfigError, RunConfig, build
from ddil_lab.methods import DMD2, PD
from ddil_lab.hub import OfflineError
from ddil_lab.rollout import SOURCES, StateSampler
from ddil_lab.train import NonFiniteError, distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
sys.path.insert(0, EXPERIMENTS)
import train_toy
from launching import TwoProcessSampler, finish, gloo, interrupted_copy, launch, per_process

# Every piece of state a checkpoint must carry: DMD2's critic + GAN head and two optimizers,
# EMA, a warmup + cosine schedule, mixed / student rollouts and the aggregation buffer.
DMD2_RUN = {
    "backend": {"name": "toy2d", "mixture": "ring8_cond", "guidance": 2.0, "init_steps": 100},
    "method": {"name": "dmd2", "critic_steps": 2, "gan_weight": 0.1},
    "sampler": {"beta_frwd": 0.25, "beta_student_bckwrd": 0.25, "beta_mixed": 0.5,
                "buffer_size": 48, "refresh_every": 4},
    "train": {"steps": 24, "batch_size": 16, "lr": 1e-3, "critic_lr": 2e-3, "warmup": 3,
              "lr_schedule": "cosine", "ema_decay": 0.9, "ckpt_every": 4, "seed": 5,
              "progress": False},
    "sample": {"num_samples": 200},
}
# LCM's EMA target network, student trajectories through the buffer.
LCM_RUN = {
    "backend": {"name": "toy2d", "mixture": "ring8", "init_steps": 100},
    "method": {"name": "lcm", "n_steps": 4},
    "sampler": {"beta_frwd": 0.5, "beta_student_bckwrd": 0.5, "buffer_size": 64,
                "refresh_every": 3},
    "train": {"steps": 20, "batch_size": 32, "lr": 1e-3, "ema_decay": 0.9, "ckpt_every": 5,
              "seed": 3, "progress": False},
    "sample": {"num_samples": 200},
}

# The child process a test kills. "slow": the test SIGKILLs it from outside, mid-run;
# "in_save": it SIGKILLs itself halfway through writing the tensors of its n-th checkpoint.
CHILD = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import train_toy
mode, n, argv = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
if mode == "slow":
    from ddil_lab.rollout import StateSampler
    sample = StateSampler.sample
    def slow(self, *a, **k):
        time.sleep(0.05)
        return sample(self, *a, **k)
    StateSampler.sample = slow
elif mode == "in_save":
    import ddil_lab.train.checkpoint as ck
    save_file, calls = ck.save_file, [0]
    def crash(tensors, path, *a, **k):
        calls[0] += 1
        if calls[0] < n:
            return save_file(tensors, path, *a, **k)
        save_file(tensors, path + ".full", *a, **k)
        data = open(path + ".full", "rb").read()
        with open(path, "wb") as f:  # half a file, then the process dies
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    ck.save_file = crash
sys.exit(train_toy.cli(argv))
"""


def _write(tmp_path, name, run) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def _child(mode, n, config, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, EXPERIMENTS, mode, str(n),
                             "--config", config, "--out", out], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _flat(out: str) -> tuple[dict, dict]:
    """(every tensor, meta) of the newest checkpoint in out."""
    state, meta = load_checkpoint(latest_checkpoint(out))
    tensors: dict = {}
    flatten_state("s", state, tensors)
    return tensors, meta


def assert_same_run(a: str, b: str):
    """The newest checkpoints of two runs hold bitwise-equal states and the same history."""
    ta, ma = _flat(a)
    tb, mb = _flat(b)
    assert ma["step"] == mb["step"]
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert ma["history"] == mb["history"]


def _log_steps(out: str) -> list[int]:
    with open(os.path.join(out, "history.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


# ---------------------------------------------------------------------------------------------
# kill and resume
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def background(request, tmp_path_factory):
    """The subprocesses of the slow tests, all started at once (they mostly wait for imports):
    two training runs to kill, and the first two-process accelerate launch."""
    tmp = tmp_path_factory.mktemp("background")
    cfg = {"dmd2": _write(tmp, "dmd2", DMD2_RUN), "lcm": _write(tmp, "lcm", LCM_RUN),
           "two": _write(tmp, "two", TWO_PROC_RUN)}
    procs = {"outside": _child("slow", 0, cfg["dmd2"], str(tmp / "killed_dmd2")),
             "in_save": _child("in_save", 3, cfg["lcm"], str(tmp / "killed_lcm"))}  # dies writing step 15
    if gloo() and any(i.get_closest_marker("multiprocess") for i in request.session.items):
        # half the run, with the optimizer sharded (ZeRO-1); the test resumes it unsharded
        procs["launch1"] = launch(cfg["two"], tmp / "two", tmp / "per1",
                                   ["train.steps=6", "train.shard_optimizer=true"])
    yield tmp, cfg, procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def test_killed_subprocess_resumes_bitwise(background):
    """Two runs die by SIGKILL: one from outside, mid-run (between checkpoints), one in the
    middle of writing a checkpoint. Each resumes and ends bitwise equal to an uninterrupted run."""
    tmp, cfg, procs = background
    outside, in_save = procs["outside"], procs["in_save"]
    killed_dmd2, killed_lcm = str(tmp / "killed_dmd2"), str(tmp / "killed_lcm")
    # meanwhile, the uninterrupted references, in this process
    train_toy.main(["--config", cfg["dmd2"], "--out", str(tmp / "ref_dmd2")])
    train_toy.main(["--config", cfg["lcm"], "--out", str(tmp / "ref_lcm")])

    deadline = time.time() + 120
    while time.time() < deadline:  # kill once the second checkpoint (step 8) is on disk
        ck = latest_checkpoint(killed_dmd2)
        if ck and ck.endswith("step_0000008") or outside.poll() is not None:
            break
        time.sleep(0.02)
    assert outside.poll() is None, "the run finished before it could be killed"
    outside.send_signal(signal.SIGKILL)
    assert outside.wait() == -signal.SIGKILL
    assert in_save.wait(timeout=120) == -signal.SIGKILL, in_save.stdout.read().decode()[-2000:]

    # the crash while saving left a partial temp folder and never touched the previous checkpoint
    assert latest_checkpoint(killed_lcm).endswith("step_0000010")
    assert any(d.startswith(".tmp_ckpt_") for d in os.listdir(killed_lcm))
    for killed, config, ref in ((killed_dmd2, cfg["dmd2"], "ref_dmd2"),
                                (killed_lcm, cfg["lcm"], "ref_lcm")):
        before = latest_checkpoint(killed)
        res = train_toy.main(["--config", config, "--out", killed, "--resume"])
        assert res.resumed_from == before
        assert_same_run(killed, str(tmp / ref))
        assert _log_steps(killed) == list(range(1, res.history[-1]["step"] + 1))
    assert not any(d.startswith(".tmp_ckpt_") for d in os.listdir(killed_lcm))  # cleaned up


# ---------------------------------------------------------------------------------------------
# corrupt and partial checkpoints
# ---------------------------------------------------------------------------------------------
PD_RUN = {"steps": 12, "batch_size": 32, "lr": 1e-3, "ema_decay": 0.9, "ckpt_every": 3, "seed": 1,
          "keep_checkpoints": 0, "progress": False, "lr_schedule": "linear", "warmup": 2}


@pytest.fixture(scope="module")
def ring():
    return Toy2dBackend("ring8", init_steps=100)


def _pd_run(ring, out, resume=False, **kw):
    sampler = StateSampler(beta_frwd=0.5, beta_mixed=0.5, buffer_size=32, refresh_every=2)
    return distill(ring, PD(substeps=2), sampler, out_dir=str(out), resume=resume,
                   **{**PD_RUN, **kw})


@pytest.fixture(scope="module")
def pd_reference(ring, tmp_path_factory):
    out = tmp_path_factory.mktemp("pd_ref")
    _pd_run(ring, out)
    return str(out)



def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip_byte(p):  # in the tensor data, so that the file still parses
    data = bytearray(p.read_bytes())
    data[-7] ^= 0xFF
    p.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated tensors": lambda ck: _truncate(ck / "tensors.safetensors"),
    "flipped byte (checksum)": lambda ck: _flip_byte(ck / "tensors.safetensors"),
    "garbage meta.json": lambda ck: (ck / "meta.json").write_text("{not json"),
    "tensors missing": lambda ck: (ck / "tensors.safetensors").unlink(),
    "latest names a missing folder": lambda ck: shutil.rmtree(ck),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_bitwise(ring, pd_reference, tmp_path, kind):
    out = interrupted_copy(pd_reference, tmp_path / "run")
    (tmp_path / "run" / ".tmp_ckpt_crashed").mkdir()  # a save that died half-way
    CORRUPTIONS[kind](tmp_path / "run" / "step_0000006")
    with pytest.warns(UserWarning, match="corrupt or incomplete") if kind in (
            "truncated tensors", "flipped byte (checksum)", "garbage meta.json") else _no_op():
        res = _pd_run(ring, out, resume=True)
    assert res.resumed_from.endswith("step_0000003")
    assert_same_run(out, pd_reference)


class _no_op:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_all_checkpoints_corrupt_is_an_error_not_a_silent_restart(ring, pd_reference, tmp_path):
    out = interrupted_copy(pd_reference, tmp_path / "run")
    for d in ("step_0000003", "step_0000006"):
        _truncate(tmp_path / "run" / d / "tensors.safetensors")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        _pd_run(ring, out, resume=True)


def test_resume_unpickles_nothing(ring, pd_reference, tmp_path, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("something was unpickled")
    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    out = interrupted_copy(pd_reference, tmp_path / "run")
    _pd_run(ring, out, resume=True)
    assert_same_run(out, pd_reference)


def test_resume_with_other_settings_is_refused(ring, pd_reference, tmp_path):
    out = interrupted_copy(pd_reference, tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"batch_size=32.*batch_size=16"):
        _pd_run(ring, out, resume=True, batch_size=16)


def test_no_trust_remote_code_by_default():
    for folder, _, files in os.walk(os.path.join(ROOT, "ddil_lab")):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(folder, f)) as fh:
                    assert "trust_remote_code=True" not in fh.read(), f


# ---------------------------------------------------------------------------------------------
# non-finite losses and gradients
# ---------------------------------------------------------------------------------------------
def _poison(method, at_steps, group="student", source="student"):
    """Make ``group``'s loss NaN at the given training steps, on the samples of one source."""
    losses, calls = method.losses, itertools.count(1)

    def poisoned(states):
        step = next(calls)
        for g, loss, logs in losses(states):
            if step in at_steps and g == group:
                bad = states.source == SOURCES.index(source)
                loss = torch.where(bad, torch.full_like(loss, math.nan), loss)
            yield g, loss, logs
    method.losses = poisoned
    return method


def test_nonfinite_loss_stops_naming_step_method_source_and_term(ring, tmp_path):
    m = _poison(PD(substeps=2), {5})
    with pytest.raises(NonFiniteError) as err:
        distill(ring, m, StateSampler(beta_frwd=0.5, beta_student_bckwrd=0.5), steps=10,
                batch_size=32, out_dir=str(tmp_path), ckpt_every=2, progress=False)
    msg = str(err.value)
    for part in ("step 5 of pd", "the student loss is non-finite (nan)", "source(s): student",
                 "step_0000004 is kept"):
        assert part in msg, msg
    assert (err.value.step, err.value.term, err.value.sources) == (5, "student loss", ["student"])
    assert latest_checkpoint(str(tmp_path)).endswith("step_0000004")  # the last good one
    load_checkpoint(latest_checkpoint(str(tmp_path)))


def test_nonfinite_critic_term_and_gradient_are_named(ring):
    m = _poison(DMD2(critic_steps=2), {2}, group="critic", source="forward")
    with pytest.raises(NonFiniteError, match=r"step 2 of dmd2: the critic loss .*source\(s\): "
                                             r"forward.*no checkpoint was written"):
        distill(ring, m, StateSampler(beta_frwd=0.5, beta_mixed=0.5), steps=4, batch_size=16,
                progress=False)
    pd = PD(substeps=2)
    calls = itertools.count(1)
    orig = pd.losses

    def inf_grad(states):
        step = next(calls)
        for g, loss, logs in orig(states):
            if step == 3:
                w = pd.student.net.out.weight
                w.register_hook(lambda x: x * math.inf)
            yield g, loss, logs
    pd.losses = inf_grad
    with pytest.raises(NonFiniteError, match=r"step 3 of pd: the student gradient is non-finite "
                                             r"\(\w+\) in parameter 'net.out.weight'"):
        distill(ring, pd, None, steps=5, batch_size=16, progress=False)


def test_nonfinite_skip_counts_and_keeps_weights_finite(ring):
    m = _poison(PD(substeps=2), {3, 5})
    res = distill(ring, m, StateSampler(beta_frwd=0.5, beta_student_bckwrd=0.5), steps=6,
                  batch_size=32, on_nonfinite="skip", progress=False)
    assert res.skipped == 2
    assert [h.get("skipped", 0) for h in res.history] == [0, 0, 1, 0, 1, 0]
    assert res.history[2]["skipped_terms"] == ["student loss"]
    assert all(torch.isfinite(p).all() for p in res.method.student.parameters())


# ---------------------------------------------------------------------------------------------
# bad input: one table, every message names the parameter, the value and what is allowed
# ---------------------------------------------------------------------------------------------
def _empty_prompts(tmp):
    (tmp / "empty.txt").write_text("\n\n")
    return str(tmp / "empty.txt")


def _digits_teacher(tmp):
    (tmp / "teacher").mkdir()
    (tmp / "teacher" / "teacher.json").write_text(json.dumps({"data": "digits",
                                                              "data_shape": [1, 16, 16]}))
    return str(tmp / "teacher")


def _pipeline(tmp):  # a pipeline folder whose VAE has 8x downsampling (4 levels)
    (tmp / "pipe" / "vae").mkdir(parents=True)
    (tmp / "pipe" / "model_index.json").write_text("{}")
    (tmp / "pipe" / "vae" / "config.json").write_text('{"block_out_channels": [1, 2, 3, 4]}')
    return str(tmp / "pipe")


SD = {"name": "sd", "prompts": ["a photo of a cat"]}
BAD_INPUTS = [  # (id, config, exception, message pattern)
    ("unknown method", {"method": {"name": "pdx"}}, ConfigError,
     r"method.name='pdx' .*allowed: one of \('pd', 'lcm', 'dmd2'\)"),
    ("unknown method parameter", {"method": {"name": "pd", "substep": 8}}, ConfigError,
     r"method.substep=8 .*not a parameter of pd; allowed: n_steps, substeps"),
    ("negative prior", {"sampler": {"beta_frwd": 1.5, "beta_mixed": -0.5}}, ConfigError,
     r"sampler.beta_mixed=-0.5 is not allowed; allowed: a finite number >= 0"),
    ("priors do not sum to 1", {"sampler": {"beta_frwd": 0.5, "beta_mixed": 0.2}}, ConfigError,
     r"sampler.priors=.* is not allowed: they sum to 0.7, the priors must sum to 1"),
    ("unknown prior", {"sampler": {"beta_student": 0.5}}, ConfigError,
     r"sampler.beta_student=0.5 .*not a StateSampler setting; allowed: beta_frwd"),
    ("student grid not on the teacher grid", {"method": {"name": "pd", "substeps": 29}},
     ConfigError, (r"method.substeps=29 .*749->500 is not on the 4-step grid refined by k=29; "
                   r"allowed: a substeps whose 116-step teacher grid contains")),
    ("teacher grid longer than T", {"method": {"name": "pd", "n_steps": 4, "substeps": 300}},
     ConfigError, r"method.substeps=300 .*1200-step grid; allowed: n_steps \* substeps <= T=1000"),
    ("student steps beyond T", {"method": {"name": "lcm", "n_steps": 2000}}, ConfigError,
     r"method.n_steps=2000 .*allowed: an int in \[1, T=1000\]"),
    ("timestep out of range", {"sample": {"timesteps": [1000, 500]}}, ConfigError,
     r"sample.timesteps=\[1000, 500\] .*timestep 1000 is out of range; allowed: ints in \[0, 999\]"),
    ("tau out of range", {"method": {"name": "dmd2", "tau_range": [0.5, 1.5]}}, ConfigError,
     r"method.tau_range=\[0.5, 1.5\] is not allowed; allowed: two numbers lo, hi with "
     r"0 <= lo < hi <= 1"),
    ("unknown threshold mode", {"sample": {"threshold": "clip"}}, ConfigError,
     r"sample.threshold='clip' .*allowed: one of \('none', 'static', 'dynamic'\)"),
    ("unknown latent threshold mode", {"backend": {**SD, "model": _pipeline, "support": "clip"}},
     ConfigError, r"backend.support='clip' .*allowed: 'static' or 'dynamic'"),
    ("missing model path", {"backend": {**SD, "model": "/nonexistent/sd15"}}, ConfigError,
     r"backend.model='/nonexistent/sd15' .*does not exist; allowed: a diffusers pipeline folder"),
    ("offline hub weights", {"backend": {**SD, "model": "nobody/not-cached-model"}},
     OfflineError, r"backend.model='nobody/not-cached-model': .*cannot be downloaded"),
    ("missing data folder", {"backend": {**SD, "model": _pipeline, "data": "/nonexistent/coco"}},
     ConfigError, r"backend.data='/nonexistent/coco' .*data folder does not exist; allowed:"),
    ("missing cifar folder", {"backend": {"name": "image", "data": "cifar10",
                                          "root": "/nonexistent", "download": False}},
     ConfigError, r"backend.root='/nonexistent' .*data folder does not exist; allowed:"),
    ("missing prompts file", {"backend": {"name": "sd", "model": _pipeline,
                                          "prompts": "/nonexistent/prompts.txt"}},
     ConfigError, r"backend.prompts='/nonexistent/prompts.txt' .*file does not exist; allowed:"),
    ("empty prompts file", {"backend": {"name": "sd", "model": _pipeline,
                                        "prompts": _empty_prompts}},
     ConfigError, r"backend.prompts='.*empty.txt': .*no captions found"),
    ("missing teacher checkpoint", {"backend": {"name": "image", "teacher": "/nonexistent/t"}},
     ConfigError, r"backend.teacher='/nonexistent/t' .*folder does not exist; allowed:"),
    ("images of the wrong shape", {"backend": {"name": "image", "data": "cifar10",
                                               "root": "/nonexistent", "teacher": _digits_teacher}},
     ConfigError, (r"backend.teacher=.*trained on images of shape \(1, 16, 16\), but "
                   r"data='cifar10' has images of shape \(3, 32, 32\)")),
    ("resolution off the latent grid", {"backend": {**SD, "model": _pipeline, "resolution": 100}},
     ConfigError, r"backend.resolution=100 .*allowed: a positive multiple of the VAE factor 8"),
    ("unknown lr schedule", {"train": {"lr_schedule": "step"}}, ConfigError,
     r"train.lr_schedule='step' .*one of \('constant', 'linear', 'cosine'\)"),
    ("unknown non-finite policy", {"train": {"on_nonfinite": "ignore"}}, ConfigError,
     r"train.on_nonfinite='ignore' .*one of \('raise', 'skip'\)"),
    ("resume without a folder", {"train": {"resume": True}}, ConfigError,
     r"train.out_dir=None is not allowed: ckpt_every > 0 or resume=True .*; allowed: a folder"),
    ("unknown backend", {"backend": {"name": "sdxl"}}, ConfigError,
     r"backend.name='sdxl' .*one of \('toy2d', 'image', 'sd'\)"),
    ("unknown mixture", {"backend": {"name": "toy2d", "mixture": "ring9"}}, ConfigError,
     r"backend[:.] ?mixture='ring9' is not"),
    ("guidance without classes", {"backend": {"name": "toy2d", "guidance": 3.0}}, ConfigError,
     r"backend.guidance=3.0 .*no classes to guide; allowed: 1.0 for this mixture"),
    ("unknown section", {"trian": {"steps": 3}}, ConfigError,
     r"trian=\{'steps': 3\} .*not a configuration section; allowed: the sections"),
]


@pytest.mark.parametrize("name,config,exc,pattern", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_fails_fast_naming_parameter_value_and_allowed(name, config, exc, pattern,
                                                                 tmp_path, monkeypatch):
    from ddil_lab.image import backend as image
    from ddil_lab.sd import backend as sd
    from ddil_lab.toy import backend as toy2d

    def heavy(*a, **k):
        raise AssertionError("heavy work started before the settings were checked")
    monkeypatch.setattr(toy2d, "train_denoiser", heavy)
    monkeypatch.setattr(sd, "load_pipeline", heavy)
    monkeypatch.setattr(image, "make_data", heavy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {sec: {k: (v(tmp_path) if callable(v) else v) for k, v in d.items()}
           for sec, d in config.items()}
    t0 = time.time()
    with pytest.raises(exc, match=pattern):
        build(cfg)
    assert time.time() - t0 < 10


def test_batch_must_split_evenly_across_processes():
    cfg = RunConfig.from_dict({"train": {"batch_size": 7}})
    cfg.validate(num_processes=1)
    with pytest.raises(ConfigError, match=r"train.batch_size=7 is not allowed: each process draws "
                                          r"an equal share; allowed: a multiple of num_processes=2"):
        cfg.validate(num_processes=2)


def test_cli_reports_bad_settings_with_exit_status_2(capsys):
    assert train_toy.cli(["--set", "method.name=pdx"]) == 2
    assert "method.name='pdx'" in capsys.readouterr().err


def test_valid_config_round_trips(tmp_path):
    cfg = RunConfig.from_yaml(os.path.join(EXPERIMENTS, "configs", "toy_lcm.yaml"),
                              ["train.steps=7", "train.out_dir=runs/x", "method.name=pd",
                               "method.substeps=2"]).validate()
    assert (cfg.train.steps, cfg.method.name) == (7, "pd")
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


# ---------------------------------------------------------------------------------------------
# two processes under accelerate
# ---------------------------------------------------------------------------------------------
TWO_PROC_RUN = {
    "backend": {"name": "toy2d", "mixture": "ring8", "init_steps": 100},
    "method": {"name": "pd", "substeps": 2},
    "sampler": {"beta_frwd": 0.5, "beta_mixed": 0.5},
    "train": {"steps": 12, "batch_size": 32, "lr": 1e-3, "ema_decay": 0.9, "ckpt_every": 4,
              "seed": 2, "progress": False},
    "sample": {"num_samples": 200},
}


@pytest.mark.multiprocess
@pytest.mark.skipif(not gloo(), reason="torch.distributed with gloo is not available")
def test_two_accelerate_processes_match_one_process_with_the_same_global_batch(background, ring):
    """Two CPU processes under ``accelerate launch`` (gloo): the first launch trains 6 of 12 steps
    with a sharded optimizer (ZeRO-1), the second resumes it unsharded. The processes agree
    exactly, only process 0 writes, and the result matches one process with the same global
    batch up to float summation order."""
    tmp, cfg, procs = background
    out = tmp / "two"
    finish(procs["launch1"])
    w, info = per_process(tmp / "per1")
    assert info[0]["history"] == info[1]["history"] and len(info[0]["history"]) == 6
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    launch2 = launch(cfg["two"], out, tmp / "per2", resume=True)

    # meanwhile, one process drawing the same global batch as the two
    t = TWO_PROC_RUN["train"]
    sampler = TwoProcessSampler(t["seed"], **TWO_PROC_RUN["sampler"])
    one = distill(ring, PD(substeps=2), sampler, steps=t["steps"], batch_size=t["batch_size"],
                  lr=t["lr"], ema_decay=t["ema_decay"], seed=t["seed"], progress=False)

    finish(launch2)
    w, info = per_process(tmp / "per2")
    assert info[1]["resumed_from"] == str(out / "step_0000006")
    # the processes agree exactly: same losses, same weights
    assert info[0]["history"] == info[1]["history"]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    # only process 0 wrote checkpoints and the log
    assert info[0]["checkpoints_written"] and info[1]["checkpoints_written"] == []
    assert _log_steps(str(out)) == list(range(1, 13))
    state, meta = load_checkpoint(latest_checkpoint(str(out)))
    assert meta["config"]["num_processes"] == 2 and len(state["processes"]) == 2
    assert not torch.equal(state["processes"][0]["rng"]["torch"],
                           state["processes"][1]["rng"]["torch"])  # distinct random streams
    # ... and match one process with the same global batch, up to float summation order
    for k, v in one.method.student.state_dict().items():
        torch.testing.assert_close(w[0][f"student.{k}"], v, atol=1e-5, rtol=1e-4)
    for a, b in zip(info[0]["history"], one.history):
        assert a["loss/student"] == pytest.approx(b["loss/student"], rel=1e-4)
        assert a["nfe/teacher"] == b["nfe/teacher"]


# ---------------------------------------------------------------------------------------------
# on a GPU (opt-in: --rungpu)
# ---------------------------------------------------------------------------------------------
class CudaToy:
    """The toy tier with its MLP teacher, everything on the GPU (noise from the CUDA RNG)."""

    def __init__(self, base):
        import copy
        self.base, self.copy = base, copy.deepcopy
        self.teacher = copy.deepcopy(base.teacher).cuda()
        self.schedule, self.support, self.has_data, self.shape = base.schedule, base.support, True, (2,)

    def sample_data(self, n, generator=None):
        x, c = self.base.sample_data(n, generator)
        return x.cuda(), c.cuda()

    def sample_cond(self, n, generator=None):
        return self.base.sample_cond(n, generator).cuda()

    def sample_noise(self, n, generator=None):
        if generator is not None:  # a CPU generator (the checkpoint's teacher probe uses one)
            return torch.randn(n, 2, generator=generator).cuda()
        return torch.randn(n, 2, device="cuda")

    def make_student(self):
        return self.copy(self.base.init_net).cuda().train().requires_grad_(True)

    make_critic = make_student


@pytest.mark.gpu
def test_resume_is_bitwise_on_gpu(tmp_path):
    """CUDA RNG states and the aggregation buffer come back onto the GPU."""
    from accelerate import Accelerator

    be = CudaToy(Toy2dBackend("ring8_cond", teacher="mlp", guidance=2.0, init_steps=100))

    def run(out, steps, resume=False, accelerator=None):
        return distill(be, DMD2(critic_steps=2, gan_weight=0.1),
                       StateSampler(beta_frwd=0.25, beta_student_bckwrd=0.25, beta_mixed=0.5,
                                    buffer_size=64, refresh_every=3),
                       steps=steps, batch_size=64, lr=1e-3, ema_decay=0.9, seed=7,
                       out_dir=str(out), ckpt_every=4, resume=resume, progress=False,
                       accelerator=accelerator)
    run(tmp_path / "ref", 12)
    run(tmp_path / "killed", 8)
    run(tmp_path / "killed", 12, resume=True)
    assert_same_run(str(tmp_path / "killed"), str(tmp_path / "ref"))
    run(tmp_path / "acc", 12, accelerator=Accelerator())  # one process: the same loop
    assert_same_run(str(tmp_path / "acc"), str(tmp_path / "ref"))
    state, _ = load_checkpoint(latest_checkpoint(str(tmp_path / "ref")))
    assert len(state["processes"][0]["rng"]["cuda"]) == torch.cuda.device_count()


def test_train_toy_tracks_the_run_in_tensorboard(tmp_path):
    """``train_toy.py --out`` writes TensorBoard events equal to the run's history (loss, lr,
    gradient norm); ``--log-with none`` writes none."""
    pytest.importorskip("tensorboard")
    from ddil_lab.train.tracking import event_files, read_scalars

    res = train_toy.main(["--out", str(tmp_path / "run"), "--set", "train.steps=4"])
    series = read_scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in series["loss/student"]] == [h["step"] for h in res.history]
    assert [v for _, v in series["loss/student"]] == pytest.approx(
        [h["loss/student"] for h in res.history], rel=1e-6)
    for key in ("grad_norm/student", "lr", "nfe/teacher_target", "source/forward"):
        assert len(series[key]) == len(res.history), key
    train_toy.main(["--out", str(tmp_path / "quiet"), "--set", "train.steps=2", "--log-with", "none"])
    assert event_files(tmp_path / "quiet") == []


# ---------------------------------------------------------------------------------------------
# interrupts: SIGINT / SIGTERM checkpoint the current step (issue 27)
# ---------------------------------------------------------------------------------------------
INTERRUPTED_RUN = {**LCM_RUN, "train": {**LCM_RUN["train"], "steps": 40, "ckpt_every": 40}}


def test_sigint_checkpoints_the_current_step_and_the_run_resumes_bitwise(tmp_path, capfd):
    """Ctrl-C (SIGINT) in the middle of a run with no periodic checkpoint near: the process
    writes a checkpoint at the step it was in (atomically, as the periodic ones), exits with
    status 130 naming it, and the resumed run says where it resumed from and ends bitwise equal
    to an uninterrupted run: nothing is lost."""
    config = _write(tmp_path, "lcm", INTERRUPTED_RUN)
    out = str(tmp_path / "interrupted")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, EXPERIMENTS, "slow", "0", "--config",
                             config, "--out", out, "--log-with", "none"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    train_toy.main(["--config", config, "--out", str(tmp_path / "ref"), "--log-with", "none"])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # a few steps in, then Ctrl-C
        if os.path.exists(os.path.join(out, "history.jsonl")) and len(_log_steps(out)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, log[-3000:]
    ck = latest_checkpoint(out)
    step = int(ck[-7:])
    assert 3 <= step < 40 and step == _log_steps(out)[-1]  # the step it was in: nothing lost
    assert f"SIGINT: lcm stopped after step {step} of 40; checkpoint {ck} written" in log, log
    assert not any(d.startswith(".tmp_ckpt_") for d in os.listdir(out))
    capfd.readouterr()
    res = train_toy.main(["--config", config, "--out", out, "--resume", "--log-with", "none"])
    assert f"resumed from step {step} in folder {out}" in capfd.readouterr().err
    assert res.resumed_from == ck
    assert_same_run(out, str(tmp_path / "ref"))


def test_sigterm_in_process_checkpoints_restores_handlers_and_resumes(ring, pd_reference,
                                                                     tmp_path):
    """SIGTERM (a scheduler's stop) between two periodic checkpoints (every 3 steps) writes
    step 4; distill raises ``Interrupted`` (a KeyboardInterrupt), puts the previous handlers
    back, and a resumed run ends bitwise equal to the uninterrupted one."""
    from ddil_lab.train.loop import Interrupted

    def stop(step, result):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match=r"SIGTERM: pd stopped after step 4 of 12") as e:
        _pd_run(ring, tmp_path / "run", callbacks=(stop,), eval_every=1)
    assert isinstance(e.value, KeyboardInterrupt) and e.value.step == 4
    assert e.value.checkpoint == latest_checkpoint(str(tmp_path / "run"))
    assert e.value.checkpoint.endswith("step_0000004")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    res = _pd_run(ring, tmp_path / "run", resume=True)
    assert res.resumed_from.endswith("step_0000004")
    assert_same_run(str(tmp_path / "run"), pd_reference)


def test_without_checkpointing_signals_are_left_alone(ring, monkeypatch):
    """No out_dir: distill installs no handler (Ctrl-C interrupts as usual)."""
    calls = []
    monkeypatch.setattr(signal, "signal", lambda *a: calls.append(a))
    distill(ring, PD(substeps=2), None, steps=2, batch_size=8, progress=False)
    assert calls == []


# ---------------------------------------------------------------------------------------------
# experiment scripts keep finished work across a kill (issue 27)
# ---------------------------------------------------------------------------------------------
def test_image_table_keeps_finished_arms_across_a_kill(tmp_path, monkeypatch, capsys):
    """The image table records each finished (method, arm) ensemble; a run killed during the
    second arm, rerun with the same settings, trains only that arm and says it kept the first;
    other settings over the folder are refused naming the difference."""
    import importlib.util

    from ddil_lab import train

    spec = importlib.util.spec_from_file_location("image_table_robust",
                                                  os.path.join(EXPERIMENTS, "image_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--quick", "--out", str(tmp_path), "--no-progress", "--methods", "pd", "--arms",
            "baseline,ddil", "--seeds", "0,1", "--n-eval", "24"]
    real, trained = train.train_arm, []

    def killed_in_second(backend, method, arm, **kw):
        trained.append(arm)
        if len(trained) == 2:
            raise KeyboardInterrupt  # the kill, during the second ensemble
        return real(backend, method, arm, **kw)
    monkeypatch.setattr(train, "train_arm", killed_in_second)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            mod.main(argv)
        first = (tmp_path / "done.jsonl").read_text()
        assert len(first.splitlines()) == 1
        trained.clear()
        monkeypatch.setattr(train, "train_arm", lambda *a, **k: trained.append(a[2]) or
                            real(*a, **k))
        out = mod.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert trained == ["ddil"]  # only the unfinished arm
    assert "pd baseline: finished in an earlier run" in capsys.readouterr().out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["per_seed"]) == {"pd baseline", "pd ddil"}
    assert (tmp_path / "done.jsonl").read_text().startswith(first)
    assert "| pd: ddil - baseline |" in out["markdown"]
    with pytest.raises(ConfigError, match=r"out='.*' holds a run with other settings "
                                          r"\(steps: 2 in the folder, 3 now\)"):
        mod.main(argv + ["--steps", "3"])


def test_random_pipeline_replaces_an_earlier_pipeline_without_stale_parts(tmp_path, monkeypatch,
                                                                         capsys):
    """``python -m ddil_lab.sd.random_pipeline --out DIR`` over an SDXL-layout folder writes
    an SD1.5-layout one: text_encoder_2/ and tokenizer_2/ are removed, not left beside it."""
    import ddil_lab.sd.random_pipeline as rp
    from ddil_lab.sd.tiny import make_tiny_pipeline, tiny_pipeline

    out = tmp_path / "pipe"
    make_tiny_pipeline(out, "sdxl")
    assert (out / "text_encoder_2").is_dir()
    monkeypatch.setattr(rp, "random_pipeline", lambda shape, seed, dtype: tiny_pipeline("sd15"))
    monkeypatch.setattr(rp, "parameter_counts", lambda shape: {"unet": 1})
    rp.main(["--shape", "sd15", "--out", str(out)])
    assert "replacing the pipeline" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    listed = {k for k, v in index.items() if isinstance(v, list) and v[0]}
    assert {p.name for p in out.iterdir()} == listed | {"model_index.json"}
    assert "text_encoder_2" not in listed and not (out / "tokenizer_2").exists()
