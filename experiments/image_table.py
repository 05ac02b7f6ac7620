"""The image tier's DDIL table: 4-step PD, LCM and DMD2 students of a small UNet teacher, each
without and with DDIL (and optionally reflected), on pixels, over several seeds with intervals.

    python experiments/image_table.py --out runs/image_table              # offline digits, CPU
    python experiments/image_table.py --quick --out /tmp/image_quick       # seconds (the tests)
    python experiments/image_table.py --data cifar10 --root ~/data/cifar10 \\
        --teacher runs/cifar_teacher --device cuda --steps 2000 --batch-size 128 \\
        --n-eval 10000 --out runs/image_cifar                               # one GPU

The seeds of an arm train as one batched ensemble (``train_arm``); every seed is evaluated on
the same noise, and each cell is the mean over seeds with a 95% Student-t interval
(mean +- t_{0.975, n-1} sd / sqrt(n)); ``ddil - baseline`` rows give the paired per-seed
differences (arms paired by seed; every seed is scored on the same noise), which is the
comparison the intervals are for. The teacher and data rows do not depend on a student seed.

Every arm trains with the same gradient steps, batch and learning rate and is evaluated from
the same noise (and labels) against the data: FID (digits: in the features of a classifier
trained here; CIFAR-10: Inception), precision/recall, mode coverage and TV of the class
histogram to the data's class weights, diversity (LPIPS among samples of the same
conditioning, or classifier-feature distances offline), and covariate shift per student step
(Frechet distance, in 8x8-pooled pixels, between the student's states and forward-diffused
data at the same t). Writes ``results.json``, ``table.md`` (printed too), ``samples.png`` and
``shift.png`` under ``--out``. The arms are ``ddil_lab.train.make_arm``'s.

Every option is checked before the teacher is built (a bad one exits with status 2 and one line
naming it). A run keeps its finished ensembles across a kill (``ddil_lab.train.runstore``): each
(method, arm) is recorded in ``--out`` (``done.jsonl``, its first seed's samples in ``units/``)
as soon as it is evaluated; a rerun over the same folder with the same settings skips the
finished ones (and says so), other settings over it are refused naming the difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from ddil_lab import train
from ddil_lab.image import NETS, ImageBackend
from ddil_lab.image import metrics as im
from ddil_lab.image.data import DATASETS
from ddil_lab.train.runstore import RunStore
from ddil_lab.validation import (check_bool, check_choice, check_device, check_int, check_number,
                                 check_out_dir, cli_exit, fail, parse_list, parse_seeds)

DEFAULTS = dict(
    data="digits",        # "digits" (offline) or "cifar10" (needs --root)
    root=None,            # CIFAR-10 folder (holding cifar-10-batches-py/)
    teacher=None,         # a train_teacher checkpoint folder; None: train one in teacher_dir
    teacher_dir="runs/image_teacher_digits_small",
    teacher_steps=600,    # teacher training steps when it is trained here
    teacher_batch=64,
    teacher_lr=2e-3,
    net="small",          # teacher UNet: "small" (laptop), "digits" (4x wider), "tiny" (tests)
    conditional=False,    # distil class-conditionally (else: unconditional, modes = classes)
    guidance=1.0,         # CFG scale of the teacher (needs conditional)
    methods=train.METHODS,
    arms=("baseline", "ddil"),
    seeds=(0, 1, 2),      # student seeds (>= 2 for intervals), trained as one ensemble
    steps=100,            # distillation steps per arm
    batch_size=32,        # per seed
    lr=3e-4,
    n_steps=4,            # student inference steps
    share=0.5,            # DDIL: fraction of each batch from rollouts
    buffer_size=64,       # DDIL aggregation buffer per seed (0: fresh rollouts every batch)
    refresh_every=10,
    refresh_size=16,
    critic_steps=2,       # DMD2 critic updates per generator update (10 in the paper)
    n_eval=300,           # evaluation samples per arm and seed
    classifier_steps=300,  # digits classifier (FID features, mode coverage)
    diversity="auto",     # "auto", "lpips", "features" or "none"
    device="cpu",
    seed=0,               # teacher seed
)
QUICK = dict(teacher_dir=None, teacher_steps=10, teacher_batch=16, net="tiny", steps=2,
             batch_size=8, buffer_size=16, refresh_size=8, critic_steps=1, n_eval=40,
             classifier_steps=20, diversity="features")

COLUMNS = [("fid", "FID", "{:.1f}"), ("precision", "precision", "{:.2f}"),
           ("recall", "recall", "{:.2f}"), ("tv", "TV", "{:.3f}"),
           ("diversity", "diversity", "{:.3g}"), ("shift_sum", "shift above floor", "{:.2f}")]


POSITIVE = ("teacher_steps", "teacher_batch", "steps", "batch_size", "n_steps", "refresh_every",
            "refresh_size", "critic_steps", "classifier_steps")


def check_config(cfg: dict) -> dict:
    """Every setting, before any work: ``ConfigError`` naming the option, its value and what is
    allowed. Returns the config with its list options as tuples."""
    cfg = dict(cfg)
    check_choice("data", cfg["data"], DATASETS)
    if cfg["root"] is not None and not os.path.isdir(cfg["root"]):
        fail("root", cfg["root"], "a folder holding cifar-10-batches-py/", "no such folder")
    if cfg["data"] == "cifar10" and cfg["root"] is None:
        fail("root", None, "the folder holding cifar-10-batches-py/", "data cifar10 needs it")
    if cfg["teacher"] is not None and not os.path.isdir(cfg["teacher"]):
        fail("teacher", cfg["teacher"], "a teacher checkpoint folder (image.train_teacher), or "
             "none to train one in teacher_dir", "no such folder")
    if cfg["teacher_dir"] is not None:
        check_out_dir("teacher_dir", cfg["teacher_dir"])
    check_choice("net", cfg["net"], tuple(NETS))
    for key in POSITIVE:
        check_int(key, cfg[key], 1)
    check_int("n_eval", cfg["n_eval"], 2, why="FID and the intervals need 2 or more samples")
    check_int("buffer_size", cfg["buffer_size"], 0)
    check_int("seed", cfg["seed"], 0)
    for key in ("lr", "teacher_lr"):
        check_number(key, cfg[key], 0.0, 1.0, lo_open=True)
    check_number("share", cfg["share"], 0.0, 1.0)
    check_number("guidance", cfg["guidance"], 1.0, why="1 is no guidance")
    check_bool("conditional", cfg["conditional"])
    check_choice("diversity", cfg["diversity"], im.DIVERSITY)
    check_device("device", cfg["device"])
    cfg["methods"] = parse_list("methods", cfg["methods"], str, train.METHODS)
    cfg["arms"] = parse_list("arms", cfg["arms"], str, train.ARMS)
    cfg["seeds"] = parse_seeds("seeds", cfg["seeds"], 2, why="each cell's interval and the "
                               "paired differences need 2 or more")
    return cfg


def make_backend(cfg: dict, progress: bool = True) -> ImageBackend:
    """The backend of a config: a loaded, resumed or freshly trained teacher."""
    return ImageBackend(cfg["data"], cfg["teacher"], root=cfg["root"], guidance=cfg["guidance"],
                        conditional=cfg["conditional"] or cfg["guidance"] != 1.0,
                        teacher_dir=cfg["teacher_dir"], teacher_steps=cfg["teacher_steps"],
                        device=cfg["device"], seed=cfg["seed"], batch_size=cfg["teacher_batch"],
                        lr=cfg["teacher_lr"], warmup=50, net=NETS[cfg["net"]], progress=progress)


def interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval) of per-seed values (nan width for 1)."""
    from scipy.stats import t as student_t

    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(student_t.ppf(0.975, len(v) - 1) * v.std() / len(v) ** 0.5)


def _jsonable(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str, list))}


def _scalars(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float))}


def run_arms(backend, ev: im.ImageEvaluator, cfg: dict, progress: bool = True,
             store: RunStore | None = None) -> tuple:
    """(rows, per_seed): metrics (with samples and trajectory) of the teacher references and, per
    arm, of its first seed's students; per_seed maps an arm to its seeds' scalar metrics. With
    a ``store``, arms it holds are read back instead of trained, and each newly finished arm is
    recorded in it (its rows, and its first seed's samples in ``units/``)."""
    from safetensors.torch import load_file, save_file

    res, per_seed = ev.reference_rows(), {}
    sampler_kw = {k: cfg[k] for k in ("share", "buffer_size", "refresh_every", "refresh_size")}
    for method in cfg["methods"]:
        for arm in cfg["arms"]:
            name = f"{method} {arm}"
            samples = os.path.join(store.out, "units", f"{method}_{arm}.safetensors") \
                if store is not None else None
            if store is not None and name in store and os.path.isfile(samples):
                rows = store.rows(name)
                print(f"image_table: {name}: finished in an earlier run of {store.out}, "
                      "not trained again", flush=True)
                res[name] = {**rows[0], "samples": load_file(samples)["samples"]}
                per_seed[name] = [_scalars(r) for r in rows]
                continue
            views = train.train_arm(backend, method, arm, seeds=cfg["seeds"], steps=cfg["steps"],
                                    batch_size=cfg["batch_size"], lr=cfg["lr"],
                                    n_steps=cfg["n_steps"], ensemble=True,
                                    method_kw={"critic_steps": cfg["critic_steps"]}
                                    if method == "dmd2" else None,
                                    sampler_kw=sampler_kw, progress=progress)
            rows = [ev.evaluate(v, with_samples=k == 0) for k, v in enumerate(views)]
            for r in rows:
                r.update({k: views[0].run[k] for k in ("wall_s", "nfe_teacher", "nfe_student")})
            res[name] = rows[0]
            per_seed[name] = [_scalars(r) for r in rows]
            if store is not None:  # the samples first: a unit in done.jsonl is complete
                os.makedirs(os.path.dirname(samples), exist_ok=True)
                save_file({"samples": rows[0]["samples"][:64].contiguous()}, samples + ".tmp")
                os.replace(samples + ".tmp", samples)
                store.add(name, [_jsonable(r) for r in rows])
    return res, per_seed


def _cell(values, fmt) -> str:
    mu, hw = interval(values)
    return fmt.format(mu) + ("" if math.isnan(hw) else " ± " + fmt.replace("+", "").format(hw))


def markdown(res: dict, per_seed: dict, grid: list[int], cfg: dict, ev) -> str:
    head = ["arm"] + [h for _, h, _ in COLUMNS] + [f"shift t={t}" for t in grid]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in res.items():
        rows = per_seed.get(name, [r])
        cells = [name] + [_cell([x[k] for x in rows], f) if k in r else "" for k, _, f in COLUMNS]
        cells += [_cell([x[f"shift_t{t}"] for x in rows], "{:.2f}") if f"shift_t{t}" in r else ""
                  for t in grid]
        lines.append("| " + " | ".join(cells) + " |")
    floor = ["noise floor (forward states, ± 2 sd)"] + [""] * len(COLUMNS) + [
        f"{ev.shift_floor[t]:.2f} ± {2 * ev.shift_floor_sd[t]:.2f}" for t in grid]
    lines.append("| " + " | ".join(floor) + " |")
    deltas = ["", ("Paired differences (arms paired by seed, all scored on the same noise), "
                   "mean ± 95% interval:"),
              "", "| difference | FID | TV | shift above floor |", "|---|---|---|---|"]
    for method in cfg["methods"]:
        for arm in cfg["arms"]:
            a, b = per_seed.get(f"{method} baseline"), per_seed.get(f"{method} {arm}")
            if arm == "baseline" or not a or not b:
                continue
            cells = [_cell([y[k] - x[k] for x, y in zip(a, b)], f)
                     for k, f in (("fid", "{:+.1f}"), ("tv", "{:+.3f}"), ("shift_sum", "{:+.2f}"))]
            deltas.append(f"| {method}: {arm} - baseline | " + " | ".join(cells) + " |")
    feats = "classifier features" if isinstance(ev.features, im.ClassifierFeatures) else \
        "the standard TF-Inception (torch-fidelity)"
    n = len(cfg["seeds"])
    return (f"# Image DDIL table ({cfg['data']})\n\nStudents: mean over {n} seeds ± the 95% "
            f"Student-t interval; FID in {feats}; diversity: {ev.diversity_kind}; shift: "
            "Frechet distance in 8x8-pooled pixels to q_t, summed minus the noise floor in "
            "'shift above floor'. Settings: " + ", ".join(
                f"{k}={cfg[k]}" for k in ("net", "teacher_steps", "steps", "batch_size", "lr",
                                          "critic_steps", "n_eval")) + " (all in results.json)."
            + "\n\n" + "\n".join(lines + (deltas if len(deltas) > 5 else [])) + "\n")


def run(out: str = "runs/image_table", quick: bool = False, progress: bool = True,
        **overrides) -> dict:
    """Train and evaluate every (method, arm); write results.json, table.md and figures.
    Keyword overrides are the keys of ``DEFAULTS``; ``quick=True`` applies ``QUICK`` first.
    Every setting is checked first (``check_config``). Finished arms are kept in ``out`` across
    a kill and skipped by a rerun with the same settings (see the module docstring).
    Returns {"results", "markdown", "files", "time_s", "config"}."""
    from ddil_lab.image.plots import grids, shift_curves

    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        fail(sorted(unknown)[0], overrides[sorted(unknown)[0]], f"the keys of DEFAULTS: "
             f"{sorted(DEFAULTS)}", "unknown option")
    check_out_dir("out", out)
    cfg = check_config({**DEFAULTS, **(QUICK if quick else {}), **overrides})
    store = RunStore(out, cfg)
    if len(store):
        print(f"image_table: {out} holds {len(store)} finished arm(s) of a run with the same "
              "settings: they are kept, the rest is trained", flush=True)
    t0 = time.perf_counter()
    backend = make_backend(cfg, progress)
    ev = im.ImageEvaluator.for_backend(backend, cfg["classifier_steps"], n=cfg["n_eval"],
                                       n_steps=cfg["n_steps"], diversity=cfg["diversity"])
    res, per_seed = run_arms(backend, ev, cfg, progress, store)
    md = markdown(res, per_seed, ev.grid, cfg, ev)
    elapsed = time.perf_counter() - t0
    md += f"\nTotal time {elapsed:.0f} s (teacher, classifier, training, evaluation).\n"
    files = [os.path.join(out, f) for f in ("results.json", "table.md", "samples.png",
                                            "shift.png")]
    scalars = {n: {k: v for k, v in r.items() if isinstance(v, (int, float, list))}
               for n, r in res.items()}
    with open(files[0], "w") as f:
        json.dump({"config": cfg, "results": scalars, "per_seed": per_seed}, f, indent=1)
    with open(files[1], "w") as f:
        f.write(md)
    grids(res).savefig(files[2], dpi=120)
    shift_curves(res, ev.grid, ev.shift_floor, floor_sd=ev.shift_floor_sd).figure.savefig(
        files[3], dpi=120, bbox_inches="tight")
    print(md)
    return {"results": res, "markdown": md, "files": files, "time_s": elapsed, "config": cfg}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/image_table", help="run folder")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds; the tests)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: much faster on a shared 2-core machine)")
    for key, default in DEFAULTS.items():
        if isinstance(default, bool):
            p.add_argument("--" + key.replace("_", "-"), action="store_true", default=None,
                           help=f"default {default}")
            continue
        # list options stay text here and are parsed (and checked) by check_config, whose
        # messages name the option; argparse would only say "invalid value"
        kind = str if isinstance(default, tuple) or default is None else type(default)
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                       help=f"default {default!r}" + (" (comma-separated)"
                                                      if isinstance(default, tuple) else ""))
    a = vars(p.parse_args(argv))
    out, quick, progress = a.pop("out"), a.pop("quick"), not a.pop("no_progress")
    threads = a.pop("threads")
    check_int("threads", threads, 1)
    check_out_dir("out", out)
    overrides = {k: v for k, v in a.items() if v is not None}
    check_config({**DEFAULTS, **(QUICK if quick else {}), **overrides})  # before any work
    torch.set_num_threads(threads)
    return run(out, quick=quick, progress=progress, **overrides)


if __name__ == "__main__":
    raise SystemExit(cli_exit(main, "image_table"))
