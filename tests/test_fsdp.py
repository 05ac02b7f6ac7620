"""Sharded training (FSDP2) under accelerate: the shipped FSDP config, on two CPU processes
(gloo), trains exactly like data-parallel training that follows the same shared plan, resumes
from its own checkpoints, and each process holds half of the trainable parameters."""
import os

import pytest
import torch
import yaml
from launching import CONFIGS, TwoProcessSampler, finish, gloo, launch, per_process

from ddil_lab.toy.backend import MLP
from ddil_lab.train.checkpoint import flatten_state, latest_checkpoint, load_checkpoint
from ddil_lab.config import RunConfig, build
from ddil_lab.train.fsdp import FSDPSettings, _units, settings_from
from ddil_lab.rollout import StateSampler, StateSpec
from ddil_lab.sampling import DDIMPolicy
from ddil_lab.train import check_distill_args, distill

# DMD2 with its critic, GAN head (a registered `features` call), EMA, mixed and student
# rollouts through the buffer; LCM with its EMA target.
DMD2_RUN = {
    "backend": {"name": "toy2d", "mixture": "ring8_cond", "guidance": 2.0, "init_steps": 100},
    "method": {"name": "dmd2", "critic_steps": 2, "gan_weight": 0.1},
    "sampler": {"beta_frwd": 0.25, "beta_student_bckwrd": 0.25, "beta_mixed": 0.5,
                "buffer_size": 32, "refresh_every": 2},
    "train": {"steps": 6, "batch_size": 16, "lr": 1e-3, "critic_lr": 2e-3, "warmup": 2,
              "lr_schedule": "constant", "ema_decay": 0.9, "ckpt_every": 3, "seed": 5,
              "shared_plan": True, "progress": False},
    "sample": {"num_samples": 100},
}
LCM_RUN = {
    "backend": {"name": "toy2d", "mixture": "ring8", "init_steps": 100},
    "method": {"name": "lcm", "n_steps": 4},
    "sampler": {"beta_frwd": 0.5, "beta_student_bckwrd": 0.5},
    "train": {"steps": 6, "batch_size": 16, "lr": 1e-3, "ema_decay": 0.9, "ckpt_every": 3,
              "seed": 4, "shared_plan": True, "progress": False},
    "sample": {"num_samples": 100},
}


def _launch_fsdp(config, out, per, sets=(), resume=False):
    """The shipped FSDP config with every Linear its own unit (an MLP is then several units)."""
    return launch(config, out, per, sets, resume, kind="fsdp",
                  launch_args=["--fsdp_transformer_layer_cls_to_wrap", "Linear"])


def _checkpoint(out):
    state, meta = load_checkpoint(latest_checkpoint(str(out)))
    tensors: dict = {}
    flatten_state("s", state, tensors)
    return tensors, meta


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """All launches start at once (they mostly wait for imports): DMD2 under FSDP for half
    the run (the test resumes it), and its data-parallel reference; LCM under both."""
    if not gloo():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("fsdp")
    cfg = {}
    for name, run in (("dmd2", DMD2_RUN), ("lcm", LCM_RUN)):
        cfg[name] = str(tmp / f"{name}.yaml")
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(run))
    procs = {"fsdp_dmd2": _launch_fsdp(cfg["dmd2"], tmp / "fsdp_dmd2", tmp / "per_fsdp_dmd2_1",
                                  ["train.steps=3"]),
             "ddp_dmd2": launch(cfg["dmd2"], tmp / "ddp_dmd2", tmp / "per_ddp_dmd2"),
             "fsdp_lcm": _launch_fsdp(cfg["lcm"], tmp / "fsdp_lcm", tmp / "per_fsdp_lcm"),
             "ddp_lcm": launch(cfg["lcm"], tmp / "ddp_lcm", tmp / "per_ddp_lcm")}
    yield tmp, cfg, procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.multiprocess
def test_fsdp_trains_like_ddp_with_the_same_plan_and_resumes(launches):
    """DMD2 (critic, GAN head, EMA, mixed and student rollouts): 3 steps under FSDP, then a
    second launch resumes to 6. It ends where the uninterrupted data-parallel run ends (same
    losses, weights and checkpoint, module states and optimizer moments included); the
    processes agree; only process 0 writes; each process held half the trainable parameters."""
    tmp, cfg, procs = launches
    finish(procs["fsdp_dmd2"])
    w, info = per_process(tmp / "per_fsdp_dmd2_1")
    assert len(info[0]["history"]) == 3 and info[0]["sharded"]
    resume = _launch_fsdp(cfg["dmd2"], tmp / "fsdp_dmd2", tmp / "per_fsdp_dmd2", resume=True)
    finish(procs["ddp_dmd2"])
    finish(resume)
    w, info = per_process(tmp / "per_fsdp_dmd2")
    w_ddp, info_ddp = per_process(tmp / "per_ddp_dmd2")
    assert info[1]["resumed_from"] == str(tmp / "fsdp_dmd2" / "step_0000003")
    assert info[0]["history"] == info[1]["history"]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert info[0]["checkpoints_written"] and info[1]["checkpoints_written"] == []
    # sharded: each process held about half of what a data-parallel process holds
    full = info_ddp[0]["local_params"]
    assert not info_ddp[0]["sharded"] and info_ddp[1]["local_params"] == full
    assert info[0]["local_params"] + info[1]["local_params"] == full
    assert max(info[0]["local_params"], info[1]["local_params"]) < 0.6 * full
    # ... and trained like data-parallel training with the same plan
    _assert_same_weights(w[0], w_ddp[0])
    for a, b in zip(info[0]["history"], info_ddp[0]["history"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    t_fsdp, m_fsdp = _checkpoint(tmp / "fsdp_dmd2")
    t_ddp, m_ddp = _checkpoint(tmp / "ddp_dmd2")
    assert m_fsdp["config"]["fsdp"] and not m_ddp["config"]["fsdp"]
    assert m_fsdp["step"] == m_ddp["step"] == 6
    assert any(".critic." in k for k in t_fsdp) and any("gan_head" in k for k in t_fsdp)
    assert any("exp_avg" in k for k in t_fsdp)
    _assert_same_weights(t_fsdp, t_ddp)


@pytest.mark.multiprocess
def test_fsdp_lcm_with_its_target_network_trains_like_one_process(launches):
    """LCM with its EMA target under FSDP equals data-parallel training with the same plan, and
    one process drawing the same global batch (both halves following the plan), up to the order
    of float sums."""
    tmp, _, procs = launches
    t = LCM_RUN["train"]
    backend, method, _, _ = build(RunConfig.from_dict({**LCM_RUN, "train": {**t, "ckpt_every": 0}}))
    one = distill(backend, method, TwoProcessSampler(t["seed"], **LCM_RUN["sampler"]),
                  steps=t["steps"], batch_size=t["batch_size"], lr=t["lr"],
                  ema_decay=t["ema_decay"], seed=t["seed"], shared_plan=True, progress=False)
    finish(procs["fsdp_lcm"])
    finish(procs["ddp_lcm"])
    w, info = per_process(tmp / "per_fsdp_lcm")
    w_ddp, _ = per_process(tmp / "per_ddp_lcm")
    assert info[0]["sharded"] and info[0]["history"] == info[1]["history"]
    _assert_same_weights(w[0], w_ddp[0])
    t_fsdp, _ = _checkpoint(tmp / "fsdp_lcm")
    t_ddp, _ = _checkpoint(tmp / "ddp_lcm")
    assert any(".target." in k for k in t_fsdp)
    _assert_same_weights(t_fsdp, t_ddp)
    # Adam divides by sqrt(v): on weights whose gradients are ~0 the order of float sums can
    # move an update by a fraction of lr (1e-3); seen here: 1 of 16384 weights off by 3e-5
    for k, v in one.method.student.state_dict().items():
        torch.testing.assert_close(w[0][f"student.{k}"], v, atol=1e-4, rtol=1e-3)
    for a, b in zip(info[0]["history"], one.history):
        assert a["loss/student"] == pytest.approx(b["loss/student"], rel=1e-4)
        assert a["nfe/student"] == b["nfe/student"]


# ---------------------------------------------------------------------------------------------
# without processes
# ---------------------------------------------------------------------------------------------
class _Accelerator:
    distributed_type = "MULTI_CPU"  # what accelerate reports for FSDP configs on CPUs

    class state:
        pass


def test_fsdp_settings_come_from_the_accelerate_config(monkeypatch):
    for k in list(os.environ):
        if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP":
            monkeypatch.delenv(k)
    assert settings_from(None) is None and settings_from(_Accelerator()) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "BasicTransformerBlock,ResnetBlock2D")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    s = settings_from(_Accelerator())
    assert s == FSDPSettings(False, ("BasicTransformerBlock", "ResnetBlock2D"), 0)
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP")
    monkeypatch.setenv("FSDP_MIN_NUM_PARAMS", "1000")
    assert settings_from(_Accelerator()) == FSDPSettings(False, (), 1000)
    for var, value, pattern in (("FSDP_VERSION", "1", "fsdp_version=1 .*allowed: fsdp_version: 2"),
                                ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params=true"),
                                ("FSDP_ACTIVATION_CHECKPOINTING", "true",
                                 "fsdp_activation_checkpointing=true"),
                                ("FSDP_AUTO_WRAP_POLICY", "BY_MAGIC", "fsdp_auto_wrap_policy=")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with pytest.raises(ValueError, match=pattern):
                settings_from(_Accelerator())


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    fsdp = ClusterConfig.from_yaml_file(os.path.join(CONFIGS, "accelerate_fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == \
        "BasicTransformerBlock,ResnetBlock2D"  # a diffusers UNet's blocks
    ddp = ClusterConfig.from_yaml_file(os.path.join(CONFIGS, "accelerate_ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU"


def test_units_by_class_by_size_and_for_features():
    class Wrapper(torch.nn.Module):  # how denoisers wrap a network
        def __init__(self):
            super().__init__()
            self.net = MLP(hidden=16, depth=2)

    root = Wrapper()
    def names(units):
        return [type(u).__name__ for u in units]
    # the MLP has a features() method (DMD2's GAN head calls it): always its own unit
    assert names(_units(root, FSDPSettings())) == ["MLP"]
    # ... unless units below hold all its parameters (its features() then gathers nothing)
    assert names(_units(root, FSDPSettings(wrap_classes=("Linear",)))) == ["Linear"] * 3
    # by size: the first two Linears (560 and 272 elements) reach 200, the last (34) does not
    assert names(_units(root, FSDPSettings(min_num_params=200))) == ["Linear", "Linear", "MLP"]


def test_a_shared_plan_fixes_the_batch_structure_whatever_the_process_stream():
    """Two processes (different torch streams) with one plan draw the same number of states
    per source from rollouts on the same grids: the same sequence of student calls."""
    class Counting(torch.nn.Module):
        def forward(self, x, t, cond=None):
            self.calls.append((len(x), int(t[0])))
            return torch.zeros_like(x)

    from ddil_lab.diffusion import Schedule, timesteps

    class Backend:
        schedule, has_data = Schedule(), True

        def sample_data(self, n, generator=None):
            return torch.randn(n, 2), None

        def sample_cond(self, n, generator=None):
            return None

        def sample_noise(self, n, generator=None):
            return torch.randn(n, 2)

    def run(stream_seed, plan_seed):
        torch.manual_seed(stream_seed)
        student = Counting()
        student.calls = []
        sampler = StateSampler(beta_frwd=0.3, beta_student_bckwrd=0.3, beta_mixed=0.4)
        spec = StateSpec(forward_t=timesteps(4), grids=[timesteps(n) for n in (3, 4, 5)],
                         student_policy=lambda d: DDIMPolicy(d, Backend.schedule),
                         teacher=lambda x, t, c=None: torch.zeros_like(x))
        states = []
        for step in range(4):
            plan = None if plan_seed is None else torch.Generator().manual_seed(plan_seed + step)
            states.append(sampler.sample(Backend(), spec, student, 24, step, plan=plan))
        return student.calls, [torch.bincount(s.source, minlength=4).tolist() for s in states]

    assert run(0, plan_seed=7) == run(1, plan_seed=7)
    assert run(0, plan_seed=None) != run(1, plan_seed=None)


def test_fsdp_refuses_settings_it_cannot_honour():
    with pytest.raises(ValueError, match="shard_optimizer=True .*FSDP already shards"):
        check_distill_args(shard_optimizer=True, fsdp=True)
    with pytest.raises(ValueError, match="shared_plan=False .*one plan"):
        check_distill_args(shared_plan=False, fsdp=True)
    check_distill_args(shared_plan=True, fsdp=True)
