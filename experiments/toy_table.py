"""The toy counterpart of the DDIL paper's Tables 2/3: PD, LCM and DMD2, each as baseline,
+DDIL, +reflected and +DDIL+reflected, 4-step students, seeds as one batched ensemble.

    python experiments/toy_table.py --out runs/toy_table            # default: guided + ring8
    python experiments/toy_table.py --quick --out /tmp/toy_quick     # seconds (the tests use it)
    python experiments/toy_table.py --settings imbalanced,grid25 --teacher mlp

Every arm of a setting trains with the same gradient steps, batch and learning rate, and is
evaluated from the same noise and labels against the (guided) 32-step teacher. Writes under
``--out``: ``results.csv`` (one row per seed), ``summary.csv`` (mean and std over seeds),
``table.md`` (printed too: per setting the metrics, the per-step covariate shift / gap to q_t /
drift, and paired differences of every arm to its baseline with 95% intervals) and per setting
``samples_<setting>.png``, ``steps_<setting>.png`` (shift, gap and drift per student timestep,
+-1 std bands) and ``modes_<setting>.png``. ``--deltas-from results.csv`` re-prints the paired
differences of an earlier run. Arms: ``ddil_lab/train/arms.py``; metrics: ``ddil_lab/toy/experiments.py``.
Results and the regime search: docs/results.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time

import torch

from ddil_lab import toy as tx
from ddil_lab import train

DEFAULTS = {
    "settings": ("guided", "ring8"),  # names in tx.SETTINGS
    "methods": train.METHODS,
    "arms": train.ARMS,
    "seeds": (0, 1, 2),
    "steps": 300,            # gradient steps per arm (the same for every arm)
    "batch_size": 256,       # states per step per seed
    "lr": 1e-3,
    "n_steps": 4,            # student inference steps
    "teacher": "exact",      # "exact" (closed-form) or "mlp" (a trained, imperfect teacher)
    "guidance": None,        # override the setting's CFG scale
    "n_eval": 4000,          # evaluation samples per student
    "share": 0.5,            # DDIL: fraction of each batch from rollouts
    "source": None,          # DDIL rollout source (default per method: train.DDIL_SOURCE)
    "buffer_size": 1024,     # DDIL aggregation buffer, states per seed (0: fresh rollouts)
    "refresh_every": 10,     # ... refreshed every k steps
    "refresh_size": 256,     # ... with this many new states per seed
    "critic_steps": 5,       # DMD2 critic updates per generator update
    "grad_clip": None,    # None: ensemble members update exactly as they would alone
    "ensemble": True,        # train the seeds of an arm as one batched ensemble
    "init_steps": 3000,      # training steps of the MLP that students start from
    "hidden": 128,           # width of that MLP (the student's capacity)
}
QUICK = {"settings": ("ring8",), "seeds": (0,), "steps": 6, "batch_size": 64, "n_eval": 400,
         "init_steps": 100, "buffer_size": 64, "refresh_size": 32, "critic_steps": 2}

METRICS = ("nll", "mmd_x1e3", "sw_x1e3", "coverage", "tv", "tv_data", "off_mode",
           "off_mode_class", "shift_sum",
           "gap_sum", "drift_sum", "wall_s", "cpu_s", "nfe_teacher", "nfe_student")
STEP_KEYS = ("shift", "gap", "drift")
METRIC_NOTE = ("MMD x1e3 is the unbiased estimate of MMD² (it can be slightly negative when two "
               "sets match); with classes, MMD and SW are per class (each class against its own "
               "teacher samples, averaged over classes, balanced evaluation labels) and "
               "own-class off-mode counts samples > 4 sigma from every mode of their own class.")
COLUMNS = [  # (key, header, format, scale) of the main Markdown table
    ("nll", "NLL", "{:.2f}", 1), ("mmd_x1e3", "MMD x1e3", "{:.0f}", 1),
    ("sw_x1e3", "SW x1e3", "{:.0f}", 1), ("coverage", "cover", "{:.2f}", 1),
    ("tv", "TV", "{:.3f}", 1), ("off_mode", "off-mode %", "{:.1f}", 100),
    ("off_mode_class", "own-class off-mode %", "{:.1f}", 100), ("shift_sum", "sum abs shift (nats)", "{:.2f}", 1), ("gap_sum", "sum gap x1e3", "{:.0f}", 1),
    ("drift_sum", "sum drift x1e3", "{:.0f}", 1)]


def _fmt(s: dict, key: str, fmt: str, scale: float) -> str:
    mu, sd = s.get(key), s.get(f"{key}_std")
    if mu is None or math.isnan(mu):
        return ""
    if not sd:
        return fmt.format(mu * scale)
    return f"{fmt.format(mu * scale)} ± {fmt.format(sd * scale)}"


def markdown(summary: list[dict], setting: str, grid: list[int]) -> str:
    """The Markdown tables of one setting: sample quality and summed shift/drift with cost,
    then shift and drift per student timestep."""
    rows = [s for s in summary if s["setting"] == setting]
    base_cpu = {s["method"]: s["cpu_s"] for s in rows if s["arm"] == "baseline"}
    head = ["method", "arm"] + [h for _, h, _, _ in COLUMNS] + ["train s", "x baseline",
                                                                "NFE/sample T+S"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        cells = [s["method"], s["arm"]] + [_fmt(s, k, f, sc) for k, _, f, sc in COLUMNS]
        if s["method"] == "teacher":
            cells += ["", "", ""]
        else:
            ratio = s["cpu_s"] / base_cpu[s["method"]] if s["method"] in base_cpu else float("nan")
            cells += [f"{s['wall_s']:.1f}", f"{ratio:.2f}",
                      f"{s['nfe_teacher']:.2f}+{s['nfe_student']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    step_head = (["method", "arm"] + [f"shift t={t}" for t in grid]
                 + [f"gap t={t}" for t in grid] + [f"drift t={t}" for t in grid])
    step = ["| " + " | ".join(step_head) + " |", "|" + "---|" * len(step_head)]
    for s in rows:
        cells = [s["method"], s["arm"]]
        cells += [_fmt(s, f"shift_t{t}", "{:.3f}", 1) for t in grid]
        cells += [_fmt(s, f"gap_t{t}", "{:.0f}", 1) for t in grid]
        cells += [_fmt(s, f"drift_t{t}", "{:.0f}", 1) for t in grid]
        step.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + METRIC_NOTE + "\n\nPer student timestep (shift: nats vs q_t(x|c); gap: sliced " \
        "W1 x1e3 to forward states of q_t(x|c); drift: sliced W1 x1e3 to the teacher's states):" \
        "\n\n" + "\n".join(step) + "\n"


DELTAS = [("nll", "ΔNLL", "{:+.2f}", 1), ("mmd_x1e3", "ΔMMD x1e3", "{:+.0f}", 1),
          ("sw_x1e3", "ΔSW x1e3", "{:+.0f}", 1), ("off_mode", "Δoff-mode pp", "{:+.1f}", 100),
          ("shift_sum", "Δsum abs shift", "{:+.2f}", 1), ("gap_sum", "Δsum gap", "{:+.0f}", 1),
          ("drift_sum", "Δsum drift", "{:+.0f}", 1)]


def delta_markdown(rows: list[dict]) -> str:
    """Paired differences of every arm to its method's baseline (negative = better for every
    column), mean over seeds +- the 95% t-interval half-width; * marks intervals without 0."""
    deltas = tx.paired_deltas(rows, [k for k, _, _, _ in DELTAS])
    if not deltas:
        return ""
    head = ["setting", "method", "arm vs baseline"] + [h for _, h, _, _ in DELTAS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in deltas:
        cells = [d["setting"], d["method"], d["arm"]]
        for k, _, f, sc in DELTAS:
            if math.isnan(d[k]):
                cells.append("")
                continue
            ci = "" if math.isnan(d[f"{k}_ci"]) else f" ± {f.format(d[f'{k}_ci'] * sc)[1:]}"
            cells.append(f.format(d[k] * sc) + ci + (" *" if d[f"{k}_sig"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return ("Paired differences to the baseline arm (same seeds, same evaluation noise): mean "
            "over seeds ± 95% t-interval; * = the interval excludes 0; negative = better.\n\n"
            + "\n".join(lines) + "\n")


def read_rows(path: str) -> list[dict]:
    """The per-seed rows of a results.csv written by ``run``."""
    with open(path) as f:
        return list(csv.DictReader(f))


def _describe(setting: str, backend, cfg: dict) -> str:
    w = backend.guidance
    return (f"{setting}: mixture {backend.gmm.name}, {cfg['teacher']} teacher"
            f"{f', CFG w = {w:g}' if w != 1 else ''}; {cfg['n_steps']}-step students "
            f"(MLP width {cfg['hidden']}), "
            f"{cfg['steps']} steps x batch {cfg['batch_size']} per seed, AdamW lr {cfg['lr']:g} "
            f"(constant), "
            + ("no clipping" if cfg["grad_clip"] is None else f"grad-norm clip {cfg['grad_clip']:g}")
            + f", the same for every arm; seeds {list(cfg['seeds'])}")


def _keys(grid) -> tuple:
    return METRICS + tuple(f"{k}_t{t}" for k in STEP_KEYS for t in grid)


def _validate(cfg: dict):
    for key, allowed in (("settings", tx.SETTINGS), ("methods", train.METHODS), ("arms", train.ARMS)):
        bad = [v for v in cfg[key] if v not in allowed]
        if bad or not cfg[key]:
            raise ValueError(f"{key}={list(cfg[key])!r}: each must be one of {tuple(allowed)}")
    if cfg["teacher"] not in ("exact", "mlp"):
        raise ValueError(f"teacher={cfg['teacher']!r} is not one of ('exact', 'mlp')")
    if not cfg["seeds"]:
        raise ValueError("seeds must name at least one seed")


def run(out: str = "runs/toy_table", quick: bool = False, progress: bool = True,
        **overrides) -> dict:
    """Train and evaluate every (setting, method, arm) and write the CSVs, table and figures.

    Keyword overrides are the keys of ``DEFAULTS``; ``quick=True`` applies ``QUICK`` first.
    Returns {"rows", "summary", "markdown", "files", "time_s", "config"}.
    """
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}: allowed {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **(QUICK if quick else {}), **overrides}
    _validate(cfg)
    os.makedirs(out, exist_ok=True)
    t0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()
    rows, files, md = [], [], [f"# Toy DDIL table\n\nConfig: `{json.dumps(cfg)}`\n"]
    sampler_kw = {k: cfg[k] for k in ("share", "source", "buffer_size", "refresh_every",
                                      "refresh_size")}
    for setting in cfg["settings"]:
        backend = tx.make_backend(setting, cfg["teacher"], cfg["guidance"], cfg["init_steps"],
                                  hidden=cfg["hidden"])
        res = tx.run_setting(backend, setting, cfg["methods"], cfg["arms"], cfg["seeds"],
                             cfg["steps"], cfg["batch_size"], cfg["lr"], cfg["n_steps"],
                             cfg["n_eval"], cfg["ensemble"],
                             method_kw={"dmd2": {"critic_steps": cfg["critic_steps"]}},
                             sampler_kw=sampler_kw, progress=progress,
                             grad_clip=cfg["grad_clip"])
        rows += res.rows
        summary = tx.summarise(res.rows, _keys(res.ref.grid))
        md.append(f"## {_describe(setting, backend, cfg)}\n\n"
                  + markdown(summary, setting, res.ref.grid) + "\n" + delta_markdown(res.rows))
        files += tx.save_figures(res, out, setting)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    load = [tuple(round(x, 1) for x in la) for la in (load0, os.getloadavg())]
    md.append(f"Total time {elapsed:.0f} s wall, {cpu:.0f} s CPU of this process (training, "
              f"evaluation and figures); load average (1, 5, 15 min) {load[0]} at the start, "
              f"{load[1]} at the end.\n")
    summary = tx.summarise(rows, _keys(res.ref.grid))
    files += _write(out, rows, summary, "\n".join(md))
    print("\n".join(md))
    print(f"toy table: {elapsed:.0f} s; files in {out}")
    return {"rows": rows, "summary": summary, "markdown": "\n".join(md), "files": files,
            "time_s": elapsed, "cpu_s": cpu, "config": cfg}


def _write(out: str, rows: list[dict], summary: list[dict], md: str) -> list[str]:
    paths = [tx.write_csv(os.path.join(out, "results.csv"), rows, skip=("hist",)),
             tx.write_csv(os.path.join(out, "summary.csv"), summary, skip=("hist",))]
    paths.append(os.path.join(out, "table.md"))
    with open(paths[-1], "w") as f:
        f.write(md)
    return paths


def _csv(kind):
    return lambda s: tuple(kind(v) for v in s.split(",") if v)


def main(argv=None) -> dict:
    torch.set_num_threads(1)  # tiny tensors: one thread is much faster on a shared CPU
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toy_table", help="run folder")
    p.add_argument("--quick", action="store_true", help="tiny settings (one dataset, one seed)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--deltas-from", default=None, metavar="CSV",
                   help="only print the paired-difference table of an existing results.csv")
    p.add_argument("--no-ensemble", dest="ensemble", action="store_false", default=None,
                   help="train each seed in its own distill() call")
    parsers = {"settings": _csv(str), "methods": _csv(str), "arms": _csv(str),
               "seeds": _csv(int), "teacher": str, "source": str, "guidance": float,
               "lr": float, "share": float,
               "grad_clip": lambda v: None if v.lower() == "none" else float(v)}
    for key, default in DEFAULTS.items():
        if key == "ensemble":
            continue
        kind = parsers.get(key, type(default) if default is not None else str)
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                       help=f"default {default!r}" + (" (comma-separated)" if isinstance(
                           default, tuple) else ""))
    a = vars(p.parse_args(argv))
    deltas_from = a.pop("deltas_from")
    if deltas_from:
        md = delta_markdown(read_rows(deltas_from))
        print(md)
        return {"markdown": md}
    out, quick, progress = a.pop("out"), a.pop("quick"), not a.pop("no_progress")
    return run(out, quick=quick, progress=progress, **{k: v for k, v in a.items() if v is not None})


if __name__ == "__main__":
    main()
