"""Run a full-tier recipe (PD, LCM or DMD2 on Stable Diffusion, with DDIL) from a YAML config,
on one GPU or on many under accelerate: the same ``ddil_lab.sd.run_full`` as the notebooks
``notebooks/full_{pd,lcm,dmd2}.ipynb``, with the same parameters and the same validation.

    python experiments/train_full.py --config experiments/configs/pd.yaml
    accelerate launch --config_file experiments/configs/accelerate_ddp.yaml \\
        experiments/train_full.py --config experiments/configs/pd.yaml
    accelerate launch --config_file experiments/configs/accelerate_fsdp.yaml \\
        experiments/train_full.py --config experiments/configs/dmd2.yaml   # sharded (SDXL-size)
    python experiments/train_full.py --config experiments/configs/lcm.yaml --check
    python experiments/train_full.py --config experiments/configs/lcm.yaml \\
        --set model_id=tiny max_steps=2 n_steps=2 --out runs/lcm_tiny

A config is a mapping with ``method: pd | lcm | dmd2`` and any parameters of the recipe
(``ddil_lab.sd.PDRecipe`` / ``LCMRecipe`` / ``DMD2Recipe``; the notebooks' parameters
cells list them with help). ``--set key=value`` overrides (values parsed as YAML), ``--out``
sets ``out_dir``, ``--resume`` continues the run in ``out_dir`` (finished stages are loaded, the
unfinished one resumes from its newest checkpoint). Under ``accelerate launch`` with several
processes every process trains on its share of the global ``batch_size`` (gradients averaged by
``distill``; with the FSDP config the modules are sharded too, see ``ddil_lab.train.fsdp``);
process 0 writes the sample grids, the loss plot, the exported pipeline and the
metrics. A bad setting exits with status 2 and a message naming each bad parameter, a
non-finite loss or gradient with status 3.
"""

from __future__ import annotations

import argparse
import os
import sys


def nonneg_int(text: str) -> int:
    """An argparse type: '-1' or 'x' is refused with a message naming what is allowed."""
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: an int >= 0")
    return n


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML recipe config (method: pd | lcm | dmd2)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="parameter overrides, e.g. model_id=tiny max_steps=2")
    p.add_argument("--out", help="output folder (out_dir)")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    p.add_argument("--check", action="store_true",
                   help="validate the config and print the plan, without training")
    p.add_argument("--threads", type=nonneg_int, default=0,
                   help="torch intra-op threads per process (0: torch's default)")
    return p.parse_args(argv)


def overrides(sets: list[str]) -> dict:
    """``["max_steps=2", "stage_steps={4: [2]}"]`` -> a dict (values parsed as YAML)."""
    from ddil_lab.config import ConfigError, parse_yaml

    out = {}
    for s in sets:
        key, sep, value = s.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {s!r} is not allowed; allowed: KEY=VALUE, e.g. max_steps=2")
        if key.strip() in out:
            raise ConfigError(f"--set {s!r} is not allowed: {key.strip()} is set twice; "
                              "allowed: each KEY once")
        out[key.strip()] = parse_yaml(value, key.strip(), "a YAML value, e.g. 2, 1.0e-5, true")
    return out


class SettingsError(Exception):
    """The command line or config is not allowed (exit status 2)."""


def load_recipe(args: argparse.Namespace, num_processes: int = 1):
    """The validated recipe of the command line (the notebooks' checks: ``FullRecipe.validate``)."""
    from ddil_lab import sd as recipes
    from ddil_lab.hub import OfflineError

    try:
        kw = overrides(args.set)
        if args.out:
            kw["out_dir"] = args.out
        recipe = recipes.load_config(args.config, **kw)  # types and recipe rules first
        if args.resume:
            recipe.resume_from = recipe.out_dir
        return recipe.validate(check_paths=True, num_processes=num_processes)
    except (ValueError, OSError, OfflineError) as e:
        raise SettingsError(str(e)) from e


def main(argv=None, accelerator=None) -> dict | None:
    """Run the CLI; returns ``run_full``'s result (None with ``--check``)."""
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ddil_lab import sd as recipes

    world = int(os.environ.get("WORLD_SIZE", "1"))
    own = accelerator is None and world > 1
    if own:  # started by accelerate launch / torchrun
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        n = accelerator.num_processes if accelerator is not None else 1
        recipe = load_recipe(args, n)
        if accelerator is None or accelerator.is_main_process:
            print(recipe.summary(), flush=True)
        if args.check:
            return None
        result = recipes.run_full(recipe, accelerator=accelerator)
        if own:  # no process leaves while another still writes or talks to it
            accelerator.wait_for_everyone()
        return result
    finally:
        if own:  # a gloo / NCCL group left to interpreter shutdown can abort the process
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def cli(argv=None) -> int:
    from ddil_lab.hub import OfflineError
    from ddil_lab.train import NonFiniteError
    from ddil_lab.train.checkpoint import CheckpointError

    try:
        main(argv)
    except (SettingsError, CheckpointError, OfflineError) as e:
        print(f"train_full: configuration error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"train_full: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(cli())
