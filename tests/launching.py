"""Helpers of the multi-process tests: ``accelerate launch`` of experiments/train_toy.py with
two CPU processes (gloo) and a shipped accelerate config, and what the processes wrote.

Launches run in parallel (they mostly wait for imports), so each takes a rendezvous port that
no other launch of this session takes, chosen below the OS's ephemeral range: the local ports of
the many connections gloo opens between processes come from that range, so one of them can
never take a port chosen here between ``free_port`` and the launcher's bind. A launch whose
port was taken anyway (another program on the machine) is started again on a new port.
Also ``interrupted_copy``, a run folder cut back to an earlier checkpoint (the resume tests)."""
import json
from pathlib import Path
import os
import random
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


_TAKEN: set[int] = set()  # ports handed out in this session
_RANDOM = random.Random(os.getpid())


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free port that no earlier call returned, below the ephemeral range when it has room."""
    low = _ephemeral_low()
    lo, hi = max(1024, low - 10000), low - 1
    for _ in range(1000 if hi - lo > 1000 else 0):
        port = _RANDOM.randint(lo, hi)
        if port not in _TAKEN and _bindable(port):
            _TAKEN.add(port)
            return port
    while True:  # no room below the range: the OS's choice, never the same twice
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def launch(config, out, per, sets=(), resume=False, kind="ddp", launch_args=()):
    """Two processes of train_toy.py under ``accelerate launch`` with
    ``configs/accelerate_{kind}.yaml``; each writes its final weights and history to ``per``."""
    def start():
        cmd = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", os.path.join(CONFIGS, f"accelerate_{kind}.yaml"), *launch_args,
               "--num_processes", "2", "--main_process_port", str(free_port()),
               os.path.join(EXPERIMENTS, "train_toy.py"), "--config", config, "--out", str(out),
               "--per-process-dir", str(per)] + (["--resume"] if resume else []) \
            + (["--set", *sets] if sets else [])
        proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        proc.restart = start
        return proc
    return start()


PORT_TAKEN = ("EADDRINUSE", "Address already in use")


def finish(proc, tries: int = 3):
    """Wait for a launch; one whose rendezvous port was taken is started again (it failed
    before any training: the port is bound before the processes start)."""
    for attempt in range(tries):
        log, _ = proc.communicate(timeout=600)
        text = log.decode(errors="replace")
        if proc.returncode == 0 or not any(p in text for p in PORT_TAKEN) or attempt == tries - 1:
            break
        proc = proc.restart()
    assert proc.returncode == 0, text[-4000:]


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


def interrupted_copy(reference, dst, at: int = 6) -> str:
    """A copy of the run folder ``reference`` as if the run had died after its step-``at``
    checkpoint: later checkpoints removed, ``latest`` pointing at step ``at``."""
    import shutil

    shutil.copytree(reference, dst)
    for d in os.listdir(dst):
        if d.startswith("step_") and int(d[5:]) > at:
            shutil.rmtree(os.path.join(dst, d))
    (Path(dst) / "latest").write_text(f"step_{at:07d}")
    return str(dst)
