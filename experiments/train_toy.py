"""Train a toy-tier student from a YAML run configuration; resumable, and multi-process under
accelerate (see docs/robust.md).

    python experiments/train_toy.py --config experiments/configs/toy_lcm.yaml --out runs/lcm
    python experiments/train_toy.py --config experiments/configs/toy_lcm.yaml --out runs/lcm --resume
    accelerate launch --config_file experiments/configs/accelerate_ddp.yaml --num_processes 2 \\
        experiments/train_toy.py --config experiments/configs/toy_lcm.yaml --out runs/lcm_2proc

Settings come from the config (``ddil_lab.config``: backend / method / sampler / train / sample
sections), then ``--set section.key=value`` overrides, then ``--out`` / ``--resume``. Without
``--config`` a tiny built-in run (``TINY``) is used. Process 0 writes, under the out folder,
the checkpoints, ``history.jsonl``, ``final/student.safetensors`` (and ``final/ema.safetensors``)
and ``summary.json`` (losses, wall time and, for the toy backend, sample metrics against the
true mixture). A bad setting exits with status 2 and a message naming it, a non-finite loss or
gradient with status 3, a checkpoint that cannot be resumed or written with status 4. Ctrl-C
(SIGINT) or SIGTERM during training writes a checkpoint at the current step (with ``--out``)
and exits with status 130 / 143; ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# the tiny built-in run (seconds on a CPU): 4-step LCM + DDIL on ring8 with the exact teacher
TINY = {
    "backend": {"name": "toy2d", "mixture": "ring8", "teacher": "exact", "init_steps": 300},
    "method": {"name": "lcm", "n_steps": 4},
    "sampler": {"beta_frwd": 0.5, "beta_student_bckwrd": 0.5},
    "train": {"steps": 100, "batch_size": 128, "lr": 1e-3, "ema_decay": 0.95, "ckpt_every": 25},
    "sample": {"num_samples": 2000},
}


def positive_int(text: str) -> int:
    """An argparse type: '0' or 'x' is refused with a message naming what is allowed."""
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: a positive int")
    return n


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML run configuration (default: the tiny built-in run)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="overrides, e.g. train.steps=200 method.name=pd")
    p.add_argument("--out", help="output folder (train.out_dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in the output folder")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads per process (1 is fastest for toy tensors)")
    p.add_argument("--log-with", default="tensorboard", choices=("tensorboard", "wandb", "none"),
                   help="run tracking in <out>/tensorboard (only with --out or train.out_dir)")
    p.add_argument("--per-process-dir", help="each process writes its final weights and "
                   "history here (process<r>.safetensors / .json), to compare processes")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace):
    from ddil_lab.config import RunConfig, apply_overrides

    sets = list(args.set)
    if args.out:
        sets.append(f"train.out_dir={args.out}")
    if args.resume:
        sets.append("train.resume=true")
    if args.config:
        return RunConfig.from_yaml(args.config, sets)
    return RunConfig.from_dict(apply_overrides(TINY, sets))


def main(argv=None, accelerator=None):
    """Run the CLI; returns the ``DistillResult`` (usable from tests and notebooks)."""
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ddil_lab.config import build
    from ddil_lab.train import distill

    cfg = load_config(args)
    own = accelerator is None and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if own:
        from accelerate import Accelerator  # started by accelerate launch / torchrun
        accelerator = Accelerator(cpu=True)  # the toy tier runs on CPUs (gloo between them)
    try:
        backend, method, sampler, kw = build(cfg, accelerator)  # validates before heavy work
        tracker = None
        if cfg.train.out_dir and args.log_with != "none":
            from ddil_lab.train.tracking import Tracker
            rank = accelerator.process_index if accelerator is not None else 0
            tracker = Tracker(os.path.join(cfg.train.out_dir, "tensorboard"), args.log_with,
                              config=cfg.to_dict(), enabled=rank == 0)
            kw = {**kw, "callbacks": (tracker,), "eval_every": kw["eval_every"] or kw["log_every"]}
        t0 = time.time()
        result = distill(backend, method, sampler, **kw)
        if tracker is not None:
            tracker.write_history(result.history)  # the steps after the last callback
            tracker.close()
        if args.per_process_dir:
            write_process_files(args.per_process_dir, result)
        out = cfg.train.out_dir
        if out and result.rank == 0:
            write_outputs(out, cfg, backend, result, time.time() - t0)
        if own:  # no process leaves while another still writes or talks to it
            accelerator.wait_for_everyone()
    finally:
        if own:
            end_processes()
    return result


def end_processes():
    """Tear the process group down before the interpreter exits: a gloo group left to the
    interpreter's shutdown can abort the process ("terminate called without an active
    exception") while its threads still run, which ``accelerate launch`` reports as a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _weights(result) -> dict:
    w = {f"student.{k}": v for k, v in result.method.student.state_dict().items()}
    if result.ema is not None:
        w.update({f"ema.{k}": v for k, v in result.ema.module.state_dict().items()})
    return {k: v.detach().cpu().contiguous().clone() for k, v in w.items()}


def write_process_files(folder: str, result):
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    r = result.rank
    save_file(_weights(result), os.path.join(folder, f"process{r}.safetensors"))
    with open(os.path.join(folder, f"process{r}.json"), "w") as f:
        json.dump({"rank": r, "num_processes": result.num_processes, "history": result.history,
                   "checkpoints_written": result.checkpoints, "skipped": result.skipped,
                   "resumed_from": result.resumed_from, "sharded": result.sharded,
                   "local_params": result.local_params}, f)


def write_outputs(out: str, cfg, backend, result, seconds: float):
    import torch
    from safetensors.torch import save_file

    final = os.path.join(out, "final")
    os.makedirs(final, exist_ok=True)
    w = _weights(result)
    save_file({k[8:]: v for k, v in w.items() if k.startswith("student.")},
              os.path.join(final, "student.safetensors"))
    if result.ema is not None:
        save_file({k[4:]: v for k, v in w.items() if k.startswith("ema.")},
                  os.path.join(final, "ema.safetensors"))
    summary = {"config": cfg.to_dict(), "steps": cfg.train.steps,
               "num_processes": result.num_processes, "seconds": seconds,
               "resumed_from": result.resumed_from, "skipped": result.skipped,
               "final_loss": result.losses()[-1] if result.losses() else None}
    gmm = getattr(backend, "gmm", None)
    if gmm is not None:  # exact sample metrics against the true mixture
        from ddil_lab.sampling import sample
        from ddil_lab.toy.metrics import toy_metrics

        g = torch.Generator().manual_seed(cfg.sample.seed)
        n = cfg.sample.num_samples
        x_T, cond = backend.sample_noise(n, g), backend.sample_cond(n, g)
        grid = cfg.sample.grid(result.method.n_steps, backend.schedule.T)
        x = sample(result.method.student_policy(result.student), x_T, grid, cond,
                   schedule=backend.schedule, threshold=cfg.sample.make_threshold()).sample
        m = toy_metrics(x, gmm)
        summary["metrics"] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def cli(argv=None) -> int:
    """The command line: exit status 2 for a bad setting, 3 for non-finite values, 4 for a
    checkpoint that cannot be used or written."""
    from ddil_lab.config import ConfigError
    from ddil_lab.hub import OfflineError
    from ddil_lab.train import CheckpointError, NonFiniteError
    from ddil_lab.train.loop import Interrupted

    try:
        main(argv)
    except Interrupted as e:
        print(f"train_toy: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, OfflineError) as e:
        print(f"train_toy: configuration error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"train_toy: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:
        print(f"train_toy: checkpoint error: {e}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(cli())
