"""The image tier's DDIL table: 4-step PD, LCM and DMD2 students of a small UNet teacher, each
without and with DDIL (and optionally reflected), on pixels.

    python experiments/image_table.py --out runs/image_table              # offline digits, CPU
    python experiments/image_table.py --quick --out /tmp/image_quick       # seconds (the tests)
    python experiments/image_table.py --data cifar10 --root ~/data/cifar10 \\
        --teacher runs/cifar_teacher --device cuda --steps 2000 --batch-size 128 \\
        --n-eval 10000 --out runs/image_cifar                               # one GPU

Every arm trains with the same gradient steps, batch and learning rate and is evaluated from
the same noise (and labels) against the data: FID (digits: in the features of a classifier
trained here; CIFAR-10: Inception), precision/recall, mode coverage and TV of the class
histogram to the data's class weights, diversity (LPIPS among samples of the same
conditioning, or classifier-feature distances offline), and covariate shift per student step
(Frechet distance, in 8x8-pooled pixels, between the student's states and forward-diffused
data at the same t). Writes ``results.json``, ``table.md`` (printed too), ``samples.png`` and
``shift.png`` under ``--out``. The arms are ``ddil_lab.train.make_arm``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ddil_lab import train
from ddil_lab.image.backend import TINY_NET, ImageBackend
from ddil_lab.image import metrics as im

DEFAULTS = dict(
    data="digits",        # "digits" (offline) or "cifar10" (needs --root)
    root=None,            # CIFAR-10 folder (holding cifar-10-batches-py/)
    teacher=None,         # a train_teacher checkpoint folder; None: train one in teacher_dir
    teacher_dir="runs/image_teacher_digits",
    teacher_steps=2000,   # teacher training steps when it is trained here
    teacher_batch=64,
    tiny_net=False,       # a tiny UNet teacher (quick runs only)
    conditional=False,    # distil class-conditionally (else: unconditional, modes = classes)
    guidance=1.0,         # CFG scale of the teacher (needs conditional)
    methods=train.METHODS,
    arms=("baseline", "ddil"),
    steps=200,            # distillation steps per arm
    batch_size=64,
    lr=1e-4,
    n_steps=4,            # student inference steps
    share=0.5,            # DDIL: fraction of each batch from rollouts
    buffer_size=256,      # DDIL aggregation buffer (0: fresh rollouts every batch)
    refresh_every=10,
    refresh_size=64,
    critic_steps=2,       # DMD2 critic updates per generator update (10 in the paper)
    n_eval=500,           # evaluation samples per arm
    classifier_steps=600,  # digits classifier (FID features, mode coverage)
    diversity="auto",     # "auto", "lpips", "features" or "none"
    device="cpu",
    seed=0,
)
QUICK = dict(teacher_dir=None, teacher_steps=10, teacher_batch=16, tiny_net=True, steps=2,
             batch_size=8, buffer_size=16, refresh_size=8, critic_steps=1, n_eval=40,
             classifier_steps=20, diversity="features")

COLUMNS = [("fid", "FID", "{:.2f}"), ("precision", "prec", "{:.2f}"),
           ("recall", "recall", "{:.2f}"), ("coverage", "cover", "{:.2f}"), ("tv", "TV", "{:.3f}"),
           ("diversity", "diversity", "{:.3f}"), ("shift_sum", "sum shift", "{:.2f}"),
           ("wall_s", "train s", "{:.0f}")]


def make_backend(cfg: dict) -> ImageBackend:
    """The backend of a config: a loaded, resumed or freshly trained teacher."""
    return ImageBackend(cfg["data"], cfg["teacher"], root=cfg["root"], guidance=cfg["guidance"],
                        conditional=cfg["conditional"] or cfg["guidance"] != 1.0,
                        teacher_dir=cfg["teacher_dir"], teacher_steps=cfg["teacher_steps"],
                        device=cfg["device"], seed=cfg["seed"], batch_size=cfg["teacher_batch"],
                        **({"net": TINY_NET} if cfg["tiny_net"] else {}))


def run_arms(backend, ev: im.ImageEvaluator, cfg: dict, progress: bool = True) -> dict:
    """Metrics (with samples and trajectory) of the teacher references and of every arm."""
    res = ev.reference_rows()
    sampler_kw = {k: cfg[k] for k in ("share", "buffer_size", "refresh_every", "refresh_size")}
    for method in cfg["methods"]:
        for arm in cfg["arms"]:
            view = train.train_arm(backend, method, arm, seeds=(cfg["seed"],), steps=cfg["steps"],
                                batch_size=cfg["batch_size"], lr=cfg["lr"],
                                n_steps=cfg["n_steps"], ensemble=False,
                                method_kw={"critic_steps": cfg["critic_steps"]}
                                if method == "dmd2" else None,
                                sampler_kw=sampler_kw, progress=progress)[0]
            row = ev.evaluate(view, with_samples=True)
            row.update({k: view.run[k] for k in ("wall_s", "nfe_teacher", "nfe_student")})
            res[f"{method} {arm}"] = row
    return res


def markdown(res: dict, grid: list[int], cfg: dict, ev) -> str:
    head = ["arm"] + [h for _, h, _ in COLUMNS] + [f"shift t={t}" for t in grid]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    floor = ["(noise floor)"] + [""] * len(COLUMNS) + [f"{ev.shift_floor[t]:.2f}" for t in grid]
    for name, r in res.items():
        cells = [name] + [f.format(r[k]) if k in r else "" for k, _, f in COLUMNS]
        cells += [f"{r[f'shift_t{t}']:.2f}" if f"shift_t{t}" in r else "" for t in grid]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| " + " | ".join(floor) + " |")
    feats = "classifier features" if isinstance(ev.features, im.ClassifierFeatures) else "Inception"
    return (f"# Image DDIL table ({cfg['data']})\n\nFID in {feats}; diversity: "
            f"{ev.diversity_kind}; shift: Frechet distance in 8x8-pooled pixels to q_t, minus "
            "the noise floor in 'sum shift'.\n\nConfig: `" + json.dumps(cfg) + "`\n\n"
            + "\n".join(lines) + "\n")


def run(out: str = "runs/image_table", quick: bool = False, progress: bool = True,
        **overrides) -> dict:
    """Train and evaluate every (method, arm); write results.json, table.md and figures.
    Keyword overrides are the keys of ``DEFAULTS``; ``quick=True`` applies ``QUICK`` first.
    Returns {"results", "markdown", "files", "time_s", "config"}."""
    import matplotlib
    matplotlib.use("Agg")
    from ddil_lab.image.plots import grids, shift_curves

    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}: allowed {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **(QUICK if quick else {}), **overrides}
    for key in ("methods", "arms"):
        allowed = train.METHODS if key == "methods" else train.ARMS
        bad = [v for v in cfg[key] if v not in allowed]
        if bad or not cfg[key]:
            raise ValueError(f"{key}={list(cfg[key])!r}: each must be one of {allowed}")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    backend = make_backend(cfg)
    ev = im.ImageEvaluator.for_backend(backend, cfg["classifier_steps"], n=cfg["n_eval"],
                                       n_steps=cfg["n_steps"], diversity=cfg["diversity"])
    res = run_arms(backend, ev, cfg, progress)
    md = markdown(res, ev.grid, cfg, ev)
    elapsed = time.perf_counter() - t0
    md += f"\nTotal time {elapsed:.0f} s (teacher, classifier, training, evaluation).\n"
    files = [os.path.join(out, f) for f in ("results.json", "table.md", "samples.png",
                                            "shift.png")]
    scalars = {n: {k: v for k, v in r.items() if isinstance(v, (int, float, list))}
               for n, r in res.items()}
    with open(files[0], "w") as f:
        json.dump({"config": cfg, "results": scalars}, f, indent=1)
    with open(files[1], "w") as f:
        f.write(md)
    grids(res).savefig(files[2], dpi=120)
    shift_curves(res, ev.grid, ev.shift_floor).figure.savefig(files[3], dpi=120,
                                                               bbox_inches="tight")
    print(md)
    return {"results": res, "markdown": md, "files": files, "time_s": elapsed, "config": cfg}


def _csv(s: str) -> tuple:
    return tuple(v for v in s.split(",") if v)


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
        kind = _csv if isinstance(default, tuple) else (
            type(default) if default is not None else str)
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                       help=f"default {default!r}" + (" (comma-separated)"
                                                      if isinstance(default, tuple) else ""))
    a = vars(p.parse_args(argv))
    out, quick, progress = a.pop("out"), a.pop("quick"), not a.pop("no_progress")
    torch.set_num_threads(a.pop("threads"))
    return run(out, quick=quick, progress=progress, **{k: v for k, v in a.items() if v is not None})


if __name__ == "__main__":
    main()
