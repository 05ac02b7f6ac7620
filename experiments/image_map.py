"""The image slice of the regime map: does the toy map's prediction hold on pixels?

    python experiments/image_map.py --predict-only --out runs/image_map   # the diagnostic only
    python experiments/image_map.py --out runs/image_map                  # the slice (resumes)
    python experiments/image_map.py --quick --out /tmp/image_map_quick     # seconds (the tests)

A class-conditional digits teacher (``SMALL_NET``, label dropout for classifier-free guidance,
trained once into ``teacher_root`` under a folder named by its recipe, then loaded) is guided
with w in {1, 3, 6, 9}; PD, LCM and DMD2 students of 4 and 2 steps are distilled from each
guided teacher, each baseline (forward states only) and DDIL (the toy map's arms, its
``ARM_SPECS``: half rollouts, student-selection ramp, aggregation buffer). The guidance cells of
one (method, steps, arm) train as one ensemble with the seeds (``train_cells``: the guided
teachers share their conditional calls), so seed s of every cell starts from the same weights
in both arms and is scored on the same noise and labels.

Metrics per cell, against the guided 32-step teacher (the teacher being distilled, as in the
toy map), class by class (``image.metrics.ClassReference``): classifier-feature FID
(``fid_class``), precision / recall, class accuracy under the fixed digits classifier (``acc``),
and per student step the gap of the student's states to q_t(x | c) (``gap_t*``; for the
baseline arm this is its train-visit gap: it trains on q_t) and their drift from the teacher's
states (``drift_t*``), in the shift diagnostic's units. Paired Δ (DDIL - baseline) with 95%
t-intervals (``toy.paired_deltas``, the regime map's statistics).

Before any student trains, ``shift_diagnostic`` runs on every (w, steps) in three state spaces
(8x8 pooled pixels: the one the prediction uses; the digits classifier's features; raw pixels,
which per-pixel noise dominates); ``--predict-only`` stops there and writes ``prediction.md``.
After the run, ``summary.md`` holds the prediction next to the result and the Spearman
correlation between the diagnostic and the gain (-ΔFID) across cells, with a bootstrap interval.

``--out`` is resumable (``RunStore``): finished units (a diagnostic, one trained ensemble) are
skipped on a rerun with the same settings; other settings over the folder are refused. Writes
``rows.csv``, ``deltas.csv``, ``map.json``, ``summary.md`` (printed), ``prediction.md`` and
``heatmap.png`` (ΔFID per method x w, one panel per student steps, * where the interval
excludes 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from regime_map import ARM_SPECS, spearman_ci  # one copy of the map's statistics

from ddil_lab import toy as tx
from ddil_lab.diffusion import timesteps
from ddil_lab.image import NETS, ImageBackend, teacher_cache_dir
from ddil_lab.image import metrics as im
from ddil_lab.shift import shift_diagnostic
from ddil_lab.train.arms import Budget, train_cells
from ddil_lab.train.runstore import RunStore

DEFAULTS = {
    "data": "digits",                        # or "cifar10" (with root; docs/image.md)
    "root": None,
    "device": "cpu",
    # the class-conditional teacher: train_teacher's settings (the cache folder's key)
    "teacher": {"net": "small", "conditional": True, "steps": 1500, "batch_size": 64,
                "lr": 2e-3, "warmup": 50, "p_uncond": 0.2, "prediction": "v", "seed": 0},
    "teacher_root": "runs/image_teachers",   # None: train in memory (quick runs)
    "methods": ("pd", "lcm", "dmd2"),
    "arms": ("baseline", "ddil"),            # labels of regime_map.ARM_SPECS
    "guidance": (1.0, 3.0, 6.0, 9.0),
    "n_steps": (4, 2),
    "seeds": (0, 1, 2),
    "budget": {"steps": 60, "batch_size": 8, "lr": 3e-4},    # per seed and cell (~28 min)
    "share": 0.5, "ramp": 0.25,              # DDIL: rollout share; student-selection ramp
    "buffer_size": 64, "refresh_every": 10, "refresh_size": 16,   # per member
    "critic_steps": 2,                       # DMD2 critic updates per generator update
    "n_eval": 500,                           # evaluation samples per cell (50 per class)
    "n_diag": 300,                           # states per set of the shift diagnostic
    "diag_spaces": ("pooled", "classifier"),  # also "pixels" (raw; a poor metric, docs)
    "classifier_steps": 300,
}
QUICK = {"teacher": {"net": "tiny", "conditional": True, "steps": 20, "batch_size": 16,
                     "lr": 2e-3, "warmup": 5, "p_uncond": 0.2, "prediction": "v", "seed": 0},
         "teacher_root": None, "methods": ("pd", "lcm", "dmd2"), "guidance": (1.0, 6.0),
         "n_steps": (2,), "seeds": (0, 1), "budget": {"steps": 2, "batch_size": 4, "lr": 3e-4},
         "buffer_size": 8, "refresh_size": 4, "critic_steps": 1, "n_eval": 40, "n_diag": 40,
         "classifier_steps": 20}
DELTA_KEYS = ("fid_class", "fid", "precision", "recall", "acc", "gap", "drift")
PREDICTION_SPACE = "pooled"


def cell_id(method: str, w: float, n_steps: int) -> str:
    return f"{method}|w{w:g}|n{n_steps}"


def parse_cell(cid: str) -> dict:
    method, w, n = cid.split("|")
    return {"method": method, "w": float(w[1:]), "n_steps": int(n[1:])}


def make_config(quick: bool = False, **overrides) -> dict:
    cfg = json.loads(json.dumps(DEFAULTS))  # a deep copy, tuples as lists
    if quick:
        cfg.update(json.loads(json.dumps(QUICK)))
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}: allowed {sorted(cfg)}")
    cfg.update(json.loads(json.dumps(overrides)))
    bad = [a for a in cfg["arms"] if a not in ARM_SPECS] + [
        m for m in cfg["methods"] if m not in ("pd", "lcm", "dmd2")]
    if bad or "baseline" not in cfg["arms"] or len(cfg["seeds"]) < 2:
        raise ValueError(f"methods {cfg['methods']}, arms {cfg['arms']} (of {tuple(ARM_SPECS)}, "
                         f"with 'baseline') and at least 2 seeds ({cfg['seeds']}) are needed")
    return cfg


def make_backends(cfg: dict) -> dict:
    """{w: ImageBackend}: one cached class-conditional teacher, guided with each w (every
    backend wraps the same conditional denoiser, so an ensemble of them shares its calls)."""
    recipe = dict(cfg["teacher"])
    root = cfg["teacher_root"]
    folder = teacher_cache_dir(root, cfg["data"], **recipe) if root else None
    net, steps = NETS[recipe.pop("net")], recipe.pop("steps")
    base = ImageBackend(cfg["data"], root=cfg["root"], teacher_dir=folder, teacher_steps=steps,
                        net=net, device=cfg["device"], progress=False, **recipe)
    return {w: ImageBackend(base.data, base.cond_teacher, guidance=w, device=cfg["device"])
            for w in cfg["guidance"]}


def state_spaces(classifier) -> dict:
    """The state spaces of the diagnostic. Raw pixels: per-pixel noise dominates sliced
    distances at high t; pooling to 8x8 averages it out; the classifier's features see digit
    shape (trained on clean digits, so noisy states lie off its training set)."""
    return {"pooled": im.pooled_pixels, "classifier": im.ClassifierFeatures(classifier),
            "pixels": lambda x: x.float().flatten(1)}


def diagnose(backends: dict, cfg: dict, classifier, store: RunStore, progress=True) -> dict:
    """{(w, n_steps): {space: report dict}}: ``shift_diagnostic`` of every guided teacher on
    every student grid, before any student trains (one RunStore unit each)."""
    spaces = state_spaces(classifier)
    out = {}
    for n in cfg["n_steps"]:
        for w, be in backends.items():
            key = f"diag|w{w:g}|n{n}"
            if key not in store:
                rows = []
                for name in cfg["diag_spaces"]:
                    rep = shift_diagnostic(be, n=cfg["n_diag"], n_steps=n, features=spaces[name])
                    rows.append({"space": name, "summary": rep.summary, "per_t": rep.teacher,
                                 "grid": rep.grid, "per_class": rep.per_class,
                                 "seconds": rep.seconds})
                store.add(key, rows)
                if progress:
                    print(f"diagnostic w {w:g}, {n} steps: " + ", ".join(
                        f"{r['space']} {r['summary']:+.3f}" for r in rows), flush=True)
            out[(w, n)] = {r["space"]: r for r in store.rows(key)}
    return out


def prediction(diag: dict, cfg: dict) -> list[dict]:
    """Per cell, what the toy map says (PD: DDIL gains at w >= 6 with 4-step students, little
    with 2-step ones, nothing at w <= 3; LCM and DMD2: no gain) and what the diagnostic says
    (its summary in pooled pixels, its rank among the cells of a method, and "gain" where it
    is at least the toy's w = 6, 4-step value, 0.11: the toy gave no transferable threshold,
    so this one is a guess written down before the run)."""
    out = []
    for method in cfg["methods"]:
        cells = sorted(diag, key=lambda k: -diag[k][PREDICTION_SPACE]["summary"])
        for rank, (w, n) in enumerate(cells, 1):
            s = diag[(w, n)][PREDICTION_SPACE]["summary"]
            toy = "none" if method != "pd" or w <= 3 else ("gain" if n >= 4 else "little")
            out.append({"cell": cell_id(method, w, n), "method": method, "w": w, "n_steps": n,
                        "diag": s, "diag_rank": rank, "toy": toy,
                        "diag_says": "gain" if s >= 0.11 else "none"})
    return out


def teacher_rows(be, ref, n: int, w: float) -> list[dict]:
    """Plain n-step DDIM of the guided teacher on the cell's evaluation set (what a student must
    beat), as a row of method "teacher"."""
    e = ref.evaluate(tx.TeacherSampler(be, timesteps(n, be.schedule.T), fine_steps=None))
    return [{"setting": f"teacher|w{w:g}|n{n}", "method": "teacher", "arm": f"DDIM {n}-step",
             "seed": "", "w": w, "n_steps": n, **e}]


def run(out: str = "runs/image_map", quick: bool = False, predict_only: bool = False,
        progress: bool = True, **overrides) -> dict:
    """Run the slice (or only the diagnostic) into ``out``; overrides are keys of DEFAULTS.
    Returns {"rows", "deltas", "diagnostic", "prediction", "spearman", "markdown", "files",
    "time_s", "config", "skipped"}."""
    cfg = make_config(quick, **overrides)
    torch.set_num_threads(1)
    t0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()
    store = RunStore(out, cfg)
    skipped = len(store)
    if progress and skipped:
        print(f"{out}: {skipped} finished units kept from an earlier run", flush=True)
    backends = make_backends(cfg)
    first = next(iter(backends.values()))
    classifier = im.train_classifier(first.data, steps=cfg["classifier_steps"])
    diag = diagnose(backends, cfg, classifier, store, progress)
    pred = prediction(diag, cfg)
    t_diag = time.perf_counter() - t0
    files = [_write_text(out, "prediction.md", prediction_markdown(pred, diag, cfg))]
    rows, refs = [], {}
    units = [] if predict_only else [(m, n, a) for m in cfg["methods"]
                                     for n in sorted(cfg["n_steps"], reverse=True)
                                     for a in cfg["arms"]]
    grid = sorted({t for n in cfg["n_steps"] for t in timesteps(n).tolist()}, reverse=True)

    def reference(w):
        if w not in refs:
            refs[w] = im.ClassReference(backends[w], classifier, cfg["n_eval"], grid)
        return refs[w]

    budget = Budget(**cfg["budget"])
    for method, n, label in units:
        key = f"{method}|n{n}|{label}"
        if key not in store:
            arm, extra = ARM_SPECS[label]
            skw = {k: cfg[k] for k in ("buffer_size", "refresh_every", "refresh_size")}
            skw.update(extra)
            if arm != "baseline":
                skw.setdefault("share", cfg["share"])
                if cfg["ramp"]:
                    skw.update(prior_schedule="student_selection",
                               ramp_steps=int(cfg["ramp"] * budget.steps))
            if progress:
                print(f"[{time.perf_counter() - t0:6.0f} s] {method} {n}-step {label}: "
                      f"{len(backends)} cells x {len(cfg['seeds'])} seeds", flush=True)
            views = train_cells(list(backends.values()), method, arm, cfg["seeds"], n_steps=n,
                                method_kw={"critic_steps": cfg["critic_steps"]}
                                if method == "dmd2" else None, sampler_kw=skw,
                                **budget.train_kw())
            unit = []
            for w, vs in zip(backends, views):
                for v in vs:
                    unit.append({"setting": cell_id(method, w, n), "method": method,
                                 "arm": label, "seed": v.seed, "w": w, "n_steps": n,
                                 **reference(w).evaluate(v), "train_s": v.run["wall_s"],
                                 "train_cpu_s": v.run["cpu_s"]})
            store.add(key, unit)
        rows += store.rows(key)
    if units:
        for n in cfg["n_steps"]:
            for w in backends:
                key = f"teacher|w{w:g}|n{n}"
                if key not in store:
                    store.add(key, teacher_rows(backends[w], reference(w), n, w))
                rows += store.rows(key)
    return _finish(out, cfg, rows, diag, pred, files, (t0, cpu0), t_diag, load0, skipped,
                   progress)


def _finish(out, cfg, rows, diag, pred, files, start, t_diag, load0, skipped, progress) -> dict:
    t0, cpu = start[0], time.process_time() - start[1]
    deltas = tx.paired_deltas(rows, DELTA_KEYS)
    for d in deltas:
        d.update(parse_cell(d["setting"]), diag=diag[(parse_cell(d["setting"])["w"],
                                                      parse_cell(d["setting"])["n_steps"])]
                 [PREDICTION_SPACE]["summary"])
        d["verdict"] = "nothing" if not d["fid_class_sig"] else (
            "helps" if d["fid_class"] < 0 else "hurts")
    corr = {}
    for name in [*cfg["methods"], "all"]:
        ds = [d for d in deltas if name in ("all", d["method"])]
        if len(ds) >= 4:
            rho, lo, hi = spearman_ci([d["diag"] for d in ds], [-d["fid_class"] for d in ds])
            corr[name] = {"rho": rho, "lo": lo, "hi": hi, "cells": len(ds)}
    elapsed = time.perf_counter() - t0
    load = [tuple(round(x, 2) for x in la) for la in (load0, os.getloadavg())]
    md = markdown(cfg, rows, deltas, pred, corr, (elapsed, cpu), t_diag, load, skipped)
    if rows:
        files += [tx.write_csv(os.path.join(out, "rows.csv"), rows),
                  tx.write_csv(os.path.join(out, "deltas.csv"), deltas),
                  _write_text(out, "summary.md", md)]
        files += heatmap(out, deltas)
    meta = {"config": cfg, "deltas": deltas, "prediction": pred, "spearman": corr,
            "time_s": elapsed, "cpu_s": cpu, "diagnostic_s": t_diag, "load": load,
            "diagnostic": [{"w": w, "n_steps": n, **v} for (w, n), v in diag.items()]}
    files.append(_write_text(out, "map.json", json.dumps(meta, indent=1, default=str)))
    if progress:
        print(md if rows else prediction_markdown(pred, diag, cfg))
        print(f"image map: {elapsed:.0f} s; files in {out}")
    return {"rows": rows, "deltas": deltas, "diagnostic": diag, "prediction": pred,
            "spearman": corr, "markdown": md, "files": files, "time_s": elapsed,
            "config": cfg, "skipped": skipped}


# ---------------------------------------------------------------- output

def _write_text(out: str, name: str, text: str) -> str:
    path = os.path.join(out, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def prediction_markdown(pred: list[dict], diag: dict, cfg: dict) -> str:
    spaces = cfg["diag_spaces"]
    lines = ["# Image slice: the prediction, before any student trains\n",
             f"Shift diagnostic of the guided teacher (n = {cfg['n_diag']} states per set, "
             "teacher on the 32-step grid, summary = mean over the student grid of (SW1 - floor) "
             "/ scale, class by class), in each state space:\n",
             "| w | steps | " + " | ".join(spaces) + " | per step (pooled) |",
             "|---|---|" + "---|" * (len(spaces) + 1)]
    for (w, n), v in sorted(diag.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        per_t = ", ".join(f"{t}: {s:+.3f}" for t, s in zip(v[PREDICTION_SPACE]["grid"],
                                                            v[PREDICTION_SPACE]["per_t"]))
        lines.append(f"| {w:g} | {n} | " + " | ".join(f"{v[s]['summary']:+.3f}" for s in spaces)
                     + f" | {per_t} |")
    lines += ["", "Predicted DDIL gain (−ΔFID per class) per cell: the toy map's rule and the "
              "diagnostic's (pooled pixels; 'gain' at >= 0.11, the toy's w = 6, 4-step value; "
              "rank 1 = largest shift):", "",
              "| method | w | steps | toy map | diagnostic | diag rank |", "|---|---|---|---|---|---|"]
    for p in pred:
        lines.append(f"| {p['method']} | {p['w']:g} | {p['n_steps']} | {p['toy']} | "
                     f"{p['diag_says']} ({p['diag']:+.3f}) | {p['diag_rank']} |")
    return "\n".join(lines) + "\n"


def _f(d, k, fmt="{:+.2f}"):
    v, ci = d[k], d[f"{k}_ci"]
    return fmt.format(v) + ("" if math.isnan(ci) else f" ± {fmt.format(ci)[1:]}") + \
        (" *" if d[f"{k}_sig"] else "")


def markdown(cfg, rows, deltas, pred, corr, times, t_diag, load, skipped) -> str:
    elapsed, cpu = times
    b = Budget(**cfg["budget"])
    lines = ["# Image slice of the regime map\n",
             f"Digits, class-conditional teacher {cfg['teacher']}; seeds {cfg['seeds']} (paired); "
             f"budget {b.describe()}; DDIL: {cfg['share']:.0%} rollouts, ramp {cfg['ramp']:.0%}, "
             f"buffer {cfg['buffer_size']} per member; DMD2 critic steps {cfg['critic_steps']}; "
             f"{cfg['n_eval']} evaluation samples per cell against the guided 32-step teacher, "
             "class by class.\n",
             "Δ = DDIL − baseline, mean ± 95% t-interval, * = excludes 0. FID per class and gap "
             "/ drift: lower is better; precision, recall, accuracy: higher. gap = mean over the "
             "student's steps of the shift of its states from q_t (diagnostic units); drift: from "
             "the teacher's states.\n"]
    teach = {(r["w"], r["n_steps"]): r for r in rows if r["method"] == "teacher"}
    if teach:
        lines += ["Teacher, plain few-step DDIM against its own 32-step samples: " + "; ".join(
            f"w {w:g} {n}-step FID {r['fid_class']:.1f}, acc {r['acc']:.2f}"
            for (w, n), r in sorted(teach.items())) + ".\n"]
    head = ["method", "w", "steps", "diag", "toy says", "ΔFID class", "Δprecision", "Δrecall",
            "Δacc", "Δgap", "Δdrift", "verdict"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    toy = {p["cell"]: p["toy"] for p in pred}
    for d in sorted(deltas, key=lambda d: (d["method"], -d["n_steps"], d["w"], d["arm"])):
        lines.append("| " + " | ".join([
            d["method"] + ("" if d["arm"] == "ddil" else f" {d['arm']}"), f"{d['w']:g}",
            str(d["n_steps"]), f"{d['diag']:+.3f}", toy.get(d["setting"], ""),
            _f(d, "fid_class", "{:+.1f}"), _f(d, "precision"), _f(d, "recall"), _f(d, "acc"),
            _f(d, "gap", "{:+.3f}"), _f(d, "drift", "{:+.3f}"), d["verdict"]]) + " |")
    if corr:
        lines += ["", "Spearman rho between the diagnostic (pooled pixels, before training) and "
                  "the gain −ΔFID per class across cells (95% bootstrap interval):", ""]
        lines += [f"- {k}: rho = {c['rho']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}] "
                  f"({c['cells']} cells)" for k, c in corr.items()]
    lines.append(f"\nTotal time {elapsed:.0f} s wall, {cpu:.0f} s CPU (diagnostic and setup "
                 f"{t_diag:.0f} s wall; "
                 f"{skipped} units kept from an earlier run); one thread; load average "
                 f"{load[0]} at the start, {load[1]} at the end.\n")
    return "\n".join(lines)


def heatmap(out: str, deltas: list[dict]) -> list[str]:
    """``heatmap.png``: ΔFID per class of DDIL − baseline, rows: method, columns: w, one panel
    per student steps, * where the interval excludes 0 (like docs/regime_map/heatmap_pd.png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = [d for d in deltas if d["arm"] == "ddil"]
    if not ds:
        return []
    methods = sorted({d["method"] for d in ds}, key=("pd", "lcm", "dmd2").index)
    ws, panels = sorted({d["w"] for d in ds}), sorted({d["n_steps"] for d in ds}, reverse=True)
    vmax = max(abs(d["fid_class"]) for d in ds) or 1.0
    fig, axs = plt.subplots(1, len(panels), figsize=(1.0 * len(ws) * len(panels) + 2.5,
                                                     0.6 * len(methods) + 2), squeeze=False)
    for ax, n in zip(axs[0], panels):
        grid = torch.full((len(methods), len(ws)), float("nan"))
        for d in ds:
            if d["n_steps"] == n:
                i, j = methods.index(d["method"]), ws.index(d["w"])
                grid[i, j] = d["fid_class"]
                ax.text(j, i, f"{d['fid_class']:+.1f}{'*' if d['fid_class_sig'] else ''}",
                        ha="center", va="center", fontsize=7)
        img = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(ws)), [f"w {w:g}" for w in ws], fontsize=7)
        ax.set_yticks(range(len(methods)), methods, fontsize=7)
        ax.set_title(f"{n}-step students", fontsize=8)
    fig.colorbar(img, ax=axs[0].tolist(), shrink=0.8,
                 label="ΔFID per class (DDIL − baseline; blue = DDIL better)")
    fig.suptitle("Digits: DDIL − baseline against the guided 32-step teacher "
                 "(* = 95% interval excludes 0)", fontsize=9)
    path = os.path.join(out, "heatmap.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv=None) -> dict:
    """The command line; a bad option is one ``ConfigError`` line (exit status 2) before any
    backend is built."""
    from ddil_lab.validation import check_out_dir, cli_exit, fail, parse_list, parse_seeds

    if argv is None:
        raise SystemExit(cli_exit(main, "image_map", sys.argv[1:]))
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/image_map", help="run folder (resumable)")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds; the tests)")
    p.add_argument("--predict-only", action="store_true",
                   help="only the shift diagnostic of every (w, steps) and prediction.md")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="override a setting of DEFAULTS, e.g. --set seeds=0,1,2 --set "
                        "guidance=6,9 --set methods=pd --set steps=20 (the budget's steps) "
                        "--set n_diag=300 --set diag_spaces=pooled,pixels")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    check_out_dir("--out", a.out)
    base = make_config(a.quick)
    settable = ("steps", *sorted(k for k, v in base.items() if not isinstance(v, dict)))
    choices = {"methods": ("pd", "lcm", "dmd2"), "arms": tuple(ARM_SPECS),
               "diag_spaces": ("pooled", "classifier", "pixels")}
    kw = {}
    for item in a.set:
        key, eq, vals = item.partition("=")
        if not eq or key not in settable:
            fail("--set", item, f"KEY=VALUE with KEY in {settable}")
        name = f"--set {key}"
        if key == "steps":
            kw["budget"] = {**base["budget"], "steps": parse_list(name, vals, int)[0]}
        elif key == "seeds":
            kw[key] = list(parse_seeds(name, vals, 2, why="paired intervals need 2"))
        elif isinstance(base[key], list):
            kw[key] = list(parse_list(name, vals, type(base[key][0]), choices.get(key)))
        else:
            kw[key] = parse_list(name, vals, type(base[key]) if base[key] is not None
                                 else str)[0]
    return run(a.out, quick=a.quick, predict_only=a.predict_only, progress=not a.no_progress,
               **kw)


if __name__ == "__main__":
    main()
