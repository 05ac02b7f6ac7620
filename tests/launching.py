"""Helpers of the multi-process tests: ``accelerate launch`` of experiments/train_toy.py with
two CPU processes (gloo) and a shipped accelerate config, and what the processes wrote."""
import json
import os
import socket
import subprocess
import sys

import torch

from ddil_lab.rollout import States, StateSampler
from ddil_lab.train import rank_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
CONFIGS = os.path.join(EXPERIMENTS, "configs")


def gloo() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_gloo_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config, out, per, sets=(), resume=False, kind="ddp", launch_args=()):
    """Two processes of train_toy.py under ``accelerate launch`` with
    ``configs/accelerate_{kind}.yaml``; each writes its final weights and history to ``per``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", os.path.join(CONFIGS, f"accelerate_{kind}.yaml"), *launch_args,
           "--num_processes", "2", "--main_process_port", str(free_port()),
           os.path.join(EXPERIMENTS, "train_toy.py"), "--config", config, "--out", str(out),
           "--per-process-dir", str(per)] + (["--resume"] if resume else []) \
        + (["--set", *sets] if sets else [])
    return subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc):
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log.decode()[-4000:]


def per_process(per):
    """([weights of process 0, of process 1], [their json records])."""
    from safetensors.torch import load_file
    return ([load_file(str(per / f"process{r}.safetensors")) for r in (0, 1)],
            [json.loads((per / f"process{r}.json").read_text()) for r in (0, 1)])


class TwoProcessSampler(StateSampler):
    """Draws a global batch the way two processes do: half from process 0's random stream,
    half from process 1's (seeded with ``rank_seed``); with a shared ``plan``, both halves
    follow the same plan, as the processes do."""

    def __init__(self, seed, **kw):
        super().__init__(**kw)
        self.seed, self.streams = seed, None

    def sample(self, backend, spec, student, n, step=0, plan=None):
        if self.streams is None:
            self.streams = [torch.get_rng_state(),
                            torch.Generator().manual_seed(rank_seed(self.seed, 1)).get_state()]
        plan_state = plan.get_state() if plan is not None else None
        parts = []
        for r in (0, 1):
            torch.set_rng_state(self.streams[r])
            if plan is not None:
                plan.set_state(plan_state)
            parts.append(super().sample(backend, spec, student, n // 2, step, plan))
            self.streams[r] = torch.get_rng_state()
        torch.set_rng_state(self.streams[0])
        return States.cat(parts)
