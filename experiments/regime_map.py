"""Where does DDIL pay? A regime map of paired DDIL - baseline differences over toy settings,
and whether the shift diagnostic (``ddil_lab.shift``) predicts them.

    python experiments/regime_map.py --out runs/regime_map            # the default map
    python experiments/regime_map.py --quick --out /tmp/regime_quick   # seconds (the tests use it)
    python experiments/regime_map.py --full --out runs/regime_full     # 5 seeds, larger sets

Mixtures: ``class_mixture`` rings of 12 modes with unequal weights, mode i in class i % C.
Blocks (each a factorial; every arm of a block shares one ``Budget``):

- ``pd``: PD, factorial over mode std x classes x CFG guidance w x student width x
  initialisation (pretrained / random) x student steps, arms baseline and DDIL (mixed
  rollouts), at the table's budget (300 steps x batch 256 per seed);
- ``pd_source``: a slice with the rollout source (mixed / student / teacher) and the budget
  (the table's, and a converged 1500 x 512) as factors;
- ``lcm``: LCM baseline, LCM+DDIL (the student's 3/4/5-step trajectories, as in the paper) and
  LCM+DDIL re-noised (those trajectories' x0 estimates diffused again to uniformly drawn solver
  times: the same states' content at the forward timestep distribution);
- ``dmd2``: DMD2 forward-only, with backward simulation (student rollouts only, DMD2's own
  baseline) and with DDIL (half forward, half mixed rollouts), in DMD2's working regime on this
  toy (``DMD2_TOY_RECIPE``: DMD's regression loss on; its own budget, 1000 x 64, lr 3e-4,
  critic lr 1e-3; issue 25, ``docs/dmd2.md``).

Per cell: ``seeds`` paired seeds (same initialisation, same evaluation noise and labels), all
cells of a mixture x steps x arm trained as one batched ensemble (``train_cells``). Metrics
against the cell's (guided) 32-step teacher, per class (``ddil_lab.toy.evaluate_student``):
sliced W1 (SW), MMD (unbiased MMD^2 estimate: can be slightly negative) and the own-class
off-mode fraction; paired Δ (arm - baseline) with 95% t-intervals. The shift diagnostic runs
once per (mixture, w, steps), before training; its summary is rank-correlated (Spearman, with a
bootstrap interval over cells) with the PD gain -ΔSW.

Writes under ``--out``: ``rows.csv`` (one row per cell x arm x seed), ``deltas.csv``,
``map.json`` (config, deltas, diagnostic, correlation, times), ``summary.md`` (printed too),
``heatmap_pd.png`` (colour = ΔSW, * where the interval excludes 0) and ``diagnostic.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from ddil_lab import toy as tx
from ddil_lab.shift import shift_diagnostic
from ddil_lab.toy import Toy2dBackend, class_mixture
from ddil_lab.toy.backend import RING12_WEIGHTS
from ddil_lab.train.arms import DMD2_TOY_RECIPE, Budget, train_cells
from ddil_lab.train.runstore import RunStore
from ddil_lab.validation import ConfigError

WEIGHTS12 = RING12_WEIGHTS  # unequal weights of the 12 modes (ring12_cond3 is the 3-class case)
BUDGETS = {"table": Budget(300, 256, 1e-3), "converged": Budget(1500, 512, 1e-3),
           # DMD2's working regime (issue 25, docs/dmd2.md: experiments/dmd2_search.py)
           "dmd2": Budget(1000, 64, 3e-4, critic_lr=1e-3)}
# arm label -> (arm of train.ARMS, make_sampler overrides)
ARM_SPECS = {
    "baseline": ("baseline", {}),
    "ddil": ("ddil", {}),                                          # the method's DDIL source
    "ddil-student": ("ddil", {"source": "beta_student_bckwrd"}),
    "ddil-teacher": ("ddil", {"source": "beta_teacher_bckwrd"}),
    "ddil-renoised": ("ddil", {"renoise": True}),                  # LCM: keep the solver times
    "backsim": ("ddil", {"source": "beta_student_bckwrd", "share": 1.0}),  # DMD2's own
}
DEFAULTS = {
    "seeds": (0, 1, 2),
    "modes": 12, "radius": 0.7, "weights": WEIGHTS12,
    "n_eval": 2000,          # evaluation samples per cell (per class: n_eval / classes)
    "n_diag": 2000,          # states per set of the shift diagnostic
    "init_steps": 3000,      # pretraining steps of the MLP a "pretrained" student starts from
    "share": 0.5, "ramp": 0.25,  # DDIL: rollout share; student-selection ramp (fraction of steps)
    "buffer_size": 1024, "refresh_every": 10, "refresh_size": 256,
    "dmd2_recipe": DMD2_TOY_RECIPE,  # DMD2's method settings (critic steps, regression loss)
    "teacher_dtype": "float32",  # the exact teacher's arithmetic (float32: within 1e-5, faster)
    "blocks": {
        "pd": {"method": "pd", "stds": (0.04, 0.06, 0.1), "classes": (2, 3),
               "guidance": (1.0, 3.0, 6.0, 9.0), "widths": (32, 128),
               "inits": ("pretrained", "random"), "n_steps": (2, 4),
               "arms": ("baseline", "ddil"), "budgets": ("table",)},
        "pd_source": {"method": "pd", "stds": (0.06,), "classes": (3,), "guidance": (6.0,),
                      "widths": (128,), "inits": ("pretrained", "random"), "n_steps": (4,),
                      "arms": ("baseline", "ddil", "ddil-student", "ddil-teacher"),
                      "budgets": ("table", "converged")},
        "lcm": {"method": "lcm", "stds": (0.06, 0.1), "classes": (3,), "guidance": (1.0, 6.0),
                "widths": (128,), "inits": ("pretrained",), "n_steps": (4,),
                "arms": ("baseline", "ddil", "ddil-renoised"), "budgets": ("table",)},
        "dmd2": {"method": "dmd2", "stds": (0.06, 0.1), "classes": (3,), "guidance": (1.0, 6.0),
                 "widths": (128,), "inits": ("pretrained",), "n_steps": (4,),
                 "arms": ("baseline", "backsim", "ddil"), "budgets": ("dmd2",)},
    },
}
QUICK = {"seeds": (0, 1), "n_eval": 240, "n_diag": 200, "init_steps": 40, "buffer_size": 64,
         "refresh_size": 32, "dmd2_recipe": {**DMD2_TOY_RECIPE, "critic_steps": 1,
                                             "regression_pairs": 16, "regression_steps": 8},
         "budgets": {"table": Budget(4, 32, 1e-3), "converged": Budget(6, 32, 1e-3),
                     "dmd2": Budget(4, 16, 3e-4, critic_lr=1e-3)},
         "blocks": {
             "pd": {"method": "pd", "stds": (0.1,), "classes": (2,), "guidance": (1.0, 6.0),
                    "widths": (16,), "inits": ("pretrained", "random"), "n_steps": (4,),
                    "arms": ("baseline", "ddil"), "budgets": ("table",)},
             "pd_source": {"method": "pd", "stds": (0.1,), "classes": (2,), "guidance": (6.0,),
                           "widths": (16,), "inits": ("pretrained",), "n_steps": (4,),
                           "arms": ("baseline", "ddil-teacher"),
                           "budgets": ("table", "converged")},
             "lcm": {"method": "lcm", "stds": (0.1,), "classes": (2,), "guidance": (6.0,),
                     "widths": (16,), "inits": ("pretrained",), "n_steps": (4,),
                     "arms": ("baseline", "ddil-renoised"), "budgets": ("table",)},
             "dmd2": {"method": "dmd2", "stds": (0.1,), "classes": (2,), "guidance": (6.0,),
                      "widths": (16,), "inits": ("pretrained",), "n_steps": (4,),
                      "arms": ("baseline", "backsim"), "budgets": ("dmd2",)},
         }}
FULL = {"seeds": (0, 1, 2, 3, 4), "n_eval": 4000, "n_diag": 4000}
KEYS = ("sw_x1e3", "mmd_x1e3", "off_mode_class", "off_mode", "nll", "tv")
DELTA_KEYS = ("sw_x1e3", "mmd_x1e3", "off_mode_class")


def cell_id(block, std, classes, w, width, init, n_steps, budget) -> str:
    return f"{block}|std{std:g}|c{classes}|w{w:g}|h{width}|{init}|n{n_steps}|{budget}"


def parse_cell(cid: str) -> dict:
    block, std, c, w, h, init, n, budget = cid.split("|")
    return {"block": block, "std": float(std[3:]), "classes": int(c[1:]), "w": float(w[1:]),
            "width": int(h[1:]), "init": init, "n_steps": int(n[1:]), "budget": budget}


# ---------------------------------------------------------------- statistics

def ranks(v: list[float]) -> list[float]:
    """Ranks 1..n with ties averaged."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the ranks); NaN if constant."""
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman_ci(x, y, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(rho, lo, hi): Spearman's rho and a 95% percentile bootstrap interval over the pairs."""
    rho = spearman(x, y)
    g = torch.Generator().manual_seed(seed)
    boots = []
    for _ in range(n_boot):
        idx = torch.randint(0, len(x), (len(x),), generator=g).tolist()
        r = spearman([x[i] for i in idx], [y[i] for i in idx])
        if not math.isnan(r):
            boots.append(r)
    if not boots:
        return rho, math.nan, math.nan
    boots.sort()
    return rho, boots[int(0.025 * len(boots))], boots[min(len(boots) - 1, int(0.975 * len(boots)))]


# ---------------------------------------------------------------- running

def _verdict(d: dict, key: str = "sw_x1e3") -> str:
    if not d[f"{key}_sig"]:
        return "nothing"
    return "helps" if d[key] < 0 else "hurts"


def _config(quick: bool, full: bool, overrides: dict) -> tuple[dict, dict]:
    """(cfg, budgets) of a run: DEFAULTS, then QUICK or FULL, then ``overrides``."""
    cfg = json.loads(json.dumps(DEFAULTS, default=str))  # a deep copy
    cfg["weights"] = WEIGHTS12
    budgets = dict(BUDGETS)
    if quick:
        q = dict(QUICK)
        budgets = q.pop("budgets")
        cfg.update(q)
    if full:
        cfg.update(FULL)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}: allowed {sorted(cfg)}")
    cfg.update(overrides)
    return cfg, budgets


def plan(cfg: dict, budgets: dict, names: list[str]) -> list[dict]:
    """The map's units of work: one per (block, steps, mixture, budget, arm) -- one ensemble of
    all the block's cells x seeds -- each with the settings it trains and evaluates."""
    units = []
    for bname in names:
        blk = cfg["blocks"][bname]
        cells = [(w, h, init) for w in blk["guidance"] for h in blk["widths"]
                 for init in blk["inits"]]
        for n_steps in sorted(blk["n_steps"], reverse=True):
            for std in blk["stds"]:
                for C in blk["classes"]:
                    for bud in blk["budgets"]:
                        for label in blk["arms"]:
                            b = budgets[bud]
                            units.append({
                                "key": f"{bname}|std{std:g}|c{C}|n{n_steps}|{bud}|{label}",
                                "block": bname, "method": blk["method"], "std": std, "C": C,
                                "n_steps": n_steps, "budget": bud, "label": label,
                                "cells": cells,
                                "cost": b.steps * b.batch_size * len(cells) * len(cfg["seeds"])
                                * (1 + cfg["dmd2_recipe"].get("critic_steps", 5)
                                   if blk["method"] == "dmd2" else 1)})
    return units


class _Worker:
    """Runs units of one map in one process: builds (and caches) the mixtures, backends, shift
    diagnostics and evaluation references they need, trains each unit's ensemble, evaluates
    it, and records the rows in the run's store as soon as the unit is done."""

    def __init__(self, cfg, budgets, store, t0, progress):
        self.cfg, self.budgets, self.store, self.t0 = cfg, budgets, store, t0
        self.progress = progress
        self.mixtures, self.backends, self.refs = {}, {}, {}

    def backend(self, std, C, cell):
        cfg = self.cfg
        if (std, C) not in self.mixtures:
            self.mixtures[(std, C)] = class_mixture(cfg["modes"], C, std, cfg["radius"],
                                                    weights=cfg["weights"])
        if (std, C, cell) not in self.backends:
            w, h, init = cell
            self.backends[(std, C, cell)] = Toy2dBackend(
                self.mixtures[(std, C)], guidance=w, hidden=h, student_init=init,
                init_steps=cfg["init_steps"], teacher_dtype=cfg["teacher_dtype"])
        return self.backends[(std, C, cell)]

    def diagnostic(self, std, C, w, n_steps, be) -> dict:
        key = f"diag|std{std:g}|c{C}|w{w:g}|n{n_steps}"
        if key not in self.store:  # per teacher, before any student of it trains
            rep = shift_diagnostic(be, n=self.cfg["n_diag"], n_steps=n_steps)
            self.store.add(key, [{"std": std, "classes": C, "w": w, "n_steps": n_steps,
                                  "summary": rep.summary, "per_t": rep.teacher,
                                  "grid": rep.grid}])
        return self.store.rows(key)[0]

    def __call__(self, u: dict) -> list[dict]:
        cfg, std, C, n_steps = self.cfg, u["std"], u["C"], u["n_steps"]
        tu = time.perf_counter()
        cells = [tuple(c) for c in u["cells"]]
        bes = [self.backend(std, C, c) for c in cells]
        diag = {}
        for w in dict.fromkeys(c[0] for c in cells):
            be = bes[next(i for i, c in enumerate(cells) if c[0] == w)]
            diag[w] = self.diagnostic(std, C, w, n_steps, be)["summary"]
            if (std, C, w, n_steps) not in self.refs:
                self.refs[(std, C, w, n_steps)] = tx.make_reference(be, cfg["n_eval"], n_steps)
        budget = self.budgets[u["budget"]]
        arm, extra = ARM_SPECS[u["label"]]
        skw = {**{k: cfg[k] for k in ("buffer_size", "refresh_every", "refresh_size")}, **extra}
        if arm != "baseline":
            skw.setdefault("share", cfg["share"])
            if cfg["ramp"]:
                skw["prior_schedule"] = "student_selection"
                skw["ramp_steps"] = int(cfg["ramp"] * budget.steps)
        mkw = dict(cfg["dmd2_recipe"]) if u["method"] == "dmd2" else None
        if self.progress:
            print(f"[{time.perf_counter() - self.t0:6.0f} s] pid {os.getpid()}: {u['key']}: "
                  f"{len(cells)} cells x {len(cfg['seeds'])} seeds", flush=True)
        views = train_cells(bes, u["method"], arm, cfg["seeds"], n_steps=n_steps, method_kw=mkw,
                            sampler_kw=skw, **budget.train_kw())
        rows = []
        for c, be, vs in zip(cells, bes, views):
            ref = self.refs[(std, C, c[0], n_steps)]
            cid = cell_id(u["block"], std, C, c[0], c[1], c[2], n_steps, u["budget"])
            for v, e in zip(vs, tx.evaluate_members(vs, be, ref, per_step=False)):
                e.pop("hist", None)
                rows.append({"setting": cid, "method": u["method"], "arm": u["label"],
                             "seed": v.seed, **parse_cell(cid), **e,
                             "train_s": v.run["wall_s"], "diag": diag[c[0]]})
        unit_s = time.perf_counter() - tu
        for r in rows:
            r["unit_s"] = unit_s
        self.store.add(u["key"], rows)
        return rows


def _run_group(args) -> int:
    """One process's share: the units of one mixture, in order (its backends are built once)."""
    cfg, budgets, out, settings, units, t0, progress = args
    torch.set_num_threads(1)
    work = _Worker(cfg, budgets, RunStore(out, settings), t0, progress)
    for u in units:
        work(u)
    return len(units)


def _in_processes(args: list, workers: int) -> None:
    """Run ``_run_group`` on every task in ``workers`` forked processes, each taking the next
    task when it finishes one (the longest first). Results travel through the run's store,
    so nothing is pickled but the task numbers; a failed process fails the map."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("fork")
    todo = ctx.Queue()
    for i in range(len(args)):
        todo.put(i)

    def work():
        while True:
            try:
                i = todo.get(timeout=1)
            except queue.Empty:
                return
            _run_group(args[i])

    procs = [ctx.Process(target=work, daemon=True) for _ in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {workers} map processes failed (exit codes "
                           f"{failed}; their tracebacks are above); the units they finished are "
                           "kept: rerun the same command to continue")


def run(out: str = "runs/regime_map", quick: bool = False, full: bool = False,
        only=None, progress: bool = True, workers: int | None = None, **overrides) -> dict:
    """Run the map's blocks (``only``: a subset of their names; default all) and write the
    files; overrides are keys of ``DEFAULTS`` (``blocks`` replaces the block definitions).

    The work is split into units (one ensemble each, ``plan``) that ``workers`` processes
    (default: 2, or 1 on a 1-core machine) run, one mixture at a time per process. Each
    finished unit is recorded in ``out`` at once (``RunStore``), so a killed run loses only
    the units in progress: a rerun with the same settings skips the finished ones (and says
    so); other settings over the same ``out`` are refused. Returns {"rows", "deltas",
    "diagnostic", "spearman", "markdown", "time_s", "config", "files"}."""
    cfg, budgets = _config(quick, full, overrides)
    names = list(cfg["blocks"]) if only is None else list(only)
    bad = [b for b in names if b not in cfg["blocks"]]
    if bad or not names:
        raise ValueError(f"blocks={names!r}: each must be one of {tuple(cfg['blocks'])}")
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    if not (isinstance(workers, int) and workers >= 1):
        raise ConfigError(f"workers={workers!r} is not allowed; allowed: an int >= 1")
    torch.set_num_threads(1)
    settings = {**cfg, "budgets": {k: vars(v) for k, v in budgets.items()}}
    store = RunStore(out, settings)
    t0, load0 = time.perf_counter(), os.getloadavg()
    units = plan(cfg, budgets, names)
    todo = [u for u in units if u["key"] not in store]
    if progress and len(todo) < len(units):
        print(f"{out}: {len(units) - len(todo)} of {len(units)} units already done with these "
              f"settings; running the other {len(todo)}", flush=True)
    groups: dict = {}
    for u in todo:  # one task per mixture, so a process builds each backend once
        groups.setdefault((u["std"], u["C"]), []).append(u)
    tasks = sorted(groups.values(), key=lambda g: -sum(u["cost"] for u in g))  # longest first
    args = [(cfg, budgets, out, settings, g, t0, progress) for g in tasks]
    if workers == 1 or len(tasks) <= 1:
        for a in args:
            _run_group(a)
    else:
        _in_processes(args, min(workers, len(tasks)))
    store = RunStore(out, settings)  # what every process recorded
    rows = [r for u in units for r in store.rows(u["key"])]
    diag = {}
    for key in list(store.done):
        if key.startswith("diag|"):
            d = store.rows(key)[0]
            diag[(d["std"], d["classes"], d["w"], d["n_steps"])] = d
    times = {b: sum(store.rows(u["key"])[0]["unit_s"] for u in units
                    if u["block"] == b and store.rows(u["key"])) for b in names}
    return _finish(out, cfg, budgets, names, rows, diag, times, t0, load0, print_md=progress,
                   workers=workers)


def _finish(out, cfg, budgets, names, rows, diag, times, t0, load0, print_md=True,
            workers: int = 1) -> dict:
    elapsed = time.perf_counter() - t0
    load = [tuple(round(x, 2) for x in la) for la in (load0, os.getloadavg())]
    deltas = []
    for bname in names:
        blk_rows = [r for r in rows if r["block"] == bname]
        bases = ("baseline", "backsim") if blocks_have(blk_rows, "backsim") else ("baseline",)
        for base in bases:
            for d in tx.paired_deltas(blk_rows, DELTA_KEYS, base_arm=base):
                cell = parse_cell(d["setting"])
                d.update(cell, base=base,
                         diag=diag[(cell["std"], cell["classes"], cell["w"],
                                    cell["n_steps"])]["summary"])
                d["verdict"] = _verdict(d)
                deltas.append(d)
    corr = correlations(deltas)
    md = markdown(cfg, budgets, names, deltas, corr, diag, elapsed, times, load, workers)
    files = _write(out, rows, deltas, md, {
        "config": {**cfg, "budgets": {k: v.describe() for k, v in budgets.items()}},
        "blocks_done": names, "deltas": deltas, "spearman": corr, "time_s": elapsed,
        "block_time_s": times, "load": load, "workers": workers,
        "diagnostic": [{"std": k[0], "classes": k[1], "w": k[2], "n_steps": k[3], **v}
                       for k, v in diag.items()]})
    files += figures(out, deltas, diag)
    if print_md:
        print(md)
        print(f"regime map: {elapsed:.0f} s; files in {out}")
    return {"rows": rows, "deltas": deltas, "diagnostic": diag, "spearman": corr,
            "markdown": md, "time_s": elapsed, "config": cfg, "files": files}


def compare(old: str, new: str) -> str:
    """The cells whose verdict differs between two runs' ``deltas.csv`` (folders ``old``,
    ``new``), as Markdown: both ΔSW (± interval) and whether each run's point estimate lies in
    the other's interval (the two runs agree within their noise)."""
    import csv

    def load(d):
        with open(os.path.join(d, "deltas.csv")) as f:
            return {(r["setting"], r["arm"], r["base"]): r for r in csv.DictReader(f)}
    a, b = load(old), load(new)
    rows = []
    for key in [k for k in b if k in a and a[k]["verdict"] != b[k]["verdict"]]:
        (ma, ca), (mb, cb) = ((float(r["sw_x1e3"]), float(r["sw_x1e3_ci"])) for r in (a[key], b[key]))
        rows.append(f"| {key[0]} | {key[1]} vs {key[2]} | {a[key]['verdict']}: {ma:+.1f} ± {ca:.1f} "
                    f"| {b[key]['verdict']}: {mb:+.1f} ± {cb:.1f} | "
                    f"{'yes' if abs(ma - mb) <= max(ca, cb) else 'no'} |")
    return "\n".join([f"{len(rows)} of {len(set(a) & set(b))} cells changed verdict "
                      f"({old} -> {new}):", "",
                      "| cell | arm | before: ΔSW x1e3 | after | within the wider interval |",
                      "|---|---|---|---|---|"] + rows)


def blocks_have(rows, arm) -> bool:
    return any(r["arm"] == arm for r in rows)


def correlations(deltas: list[dict]) -> dict:
    """Spearman rho (95% bootstrap interval) between the diagnostic summary and the DDIL gain
    (-ΔSW of PD+DDIL over PD, per cell of the ``pd`` block), overall and per student."""
    pd = [d for d in deltas if d["block"] == "pd" and d["arm"] == "ddil"]
    out = {}
    groups = {"all": pd}
    for h in sorted({d["width"] for d in pd}):
        for init in sorted({d["init"] for d in pd}):
            groups[f"width {h}, {init}"] = [d for d in pd if d["width"] == h and d["init"] == init]
    for name, ds in groups.items():
        if len(ds) >= 4:
            rho, lo, hi = spearman_ci([d["diag"] for d in ds], [-d["sw_x1e3"] for d in ds])
            out[name] = {"rho": rho, "lo": lo, "hi": hi, "cells": len(ds)}
    return out


# ---------------------------------------------------------------- output

def _f(d, k, fmt="{:+.1f}", scale=1.0):
    v, ci = d[k] * scale, d[f"{k}_ci"] * scale
    s = fmt.format(v) + ("" if math.isnan(ci) else f" ± {fmt.format(ci)[1:]}")
    return s + (" *" if d[f"{k}_sig"] else "")


def markdown(cfg, budgets, names, deltas, corr, diag, elapsed, times, load, workers=1) -> str:
    seeds = list(cfg["seeds"])
    lines = [f"# Regime map: where DDIL pays\n",
             f"Seeds {seeds} (paired: same initialisation, same evaluation noise and labels); "
             f"mixtures: {cfg['modes']} modes on a ring of radius {cfg['radius']}, unequal "
             f"weights, mode i in class i % C; exact teacher, CFG w as listed; evaluation "
             f"{cfg['n_eval']} samples per cell against the cell's 32-step teacher, per class. "
             f"DDIL: {cfg['share']:.0%} rollout states"
             + (f", student-selection ramp over the first {cfg['ramp']:.0%} of the steps"
                if cfg["ramp"] else "")
             + f", aggregation buffer {cfg['buffer_size']} per seed. Budgets: "
             + "; ".join(f"{k} = {v.describe()}" for k, v in budgets.items()) + ".\n",
             "Δ = arm − baseline, mean over seeds ± 95% t-interval, * = the interval excludes 0; "
             "negative = better (SW, MMD x1e3; MMD is the unbiased MMD² estimate and can be "
             "slightly negative; off-mode: % of samples > 4 sigma from every mode of their own "
             "class). diag = the shift diagnostic's teacher summary (0: the teacher's states "
             "follow q_t).\n"]
    for bname in names:
        ds = [d for d in deltas if d["block"] == bname]
        if not ds:
            continue
        lines.append(f"## {bname} ({times.get(bname, 0):.0f} s of process time)\n")
        counts = {}
        for d in ds:
            counts.setdefault((d["arm"], d["base"]), {"helps": 0, "hurts": 0, "nothing": 0})
            counts[(d["arm"], d["base"])][d["verdict"]] += 1
        for (arm, base), c in counts.items():
            lines.append(f"- {arm} vs {base}: helps (ΔSW interval < 0) in {c['helps']}, hurts in "
                         f"{c['hurts']}, nothing in {c['nothing']} of {sum(c.values())} cells")
        lines.append("")
        head = ["std", "C", "w", "width", "init", "steps", "budget", "arm vs", "diag", "ΔSW x1e3",
                "ΔMMD x1e3", "Δoff-mode pp", "verdict"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for d in sorted(ds, key=lambda d: (d["base"], d["arm"], d["n_steps"], d["init"],
                                           d["width"], d["std"], d["classes"], d["w"],
                                           d["budget"])):
            lines.append("| " + " | ".join([
                f"{d['std']:g}", str(d["classes"]), f"{d['w']:g}", str(d["width"]), d["init"],
                str(d["n_steps"]), d["budget"], f"{d['arm']} vs {d['base']}",
                f"{d['diag']:.3f}", _f(d, "sw_x1e3"), _f(d, "mmd_x1e3", "{:+.0f}"),
                _f(d, "off_mode_class", "{:+.1f}", 100), d["verdict"]]) + " |")
        lines.append("")
    if corr:
        lines.append("## Does the diagnostic predict the PD gain?\n")
        lines.append("Spearman rho between the diagnostic summary (per mixture, w and steps, "
                     "measured before training) and the PD+DDIL gain −ΔSW, across the cells of "
                     "the `pd` block (95% bootstrap interval over cells):\n")
        for name, c in corr.items():
            lines.append(f"- {name}: rho = {c['rho']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}] "
                         f"({c['cells']} cells)")
        lines.append("")
    lines.append(f"Total time {elapsed:.0f} s wall, {workers} worker process(es) of one thread "
                 f"each (block times: the sum of their units' times in their process); load "
                 f"average (1, 5, 15 min) {load[0]} at the start, {load[1]} at the end.\n")
    return "\n".join(lines)


def _write(out, rows, deltas, md, meta) -> list[str]:
    paths = [tx.write_csv(os.path.join(out, "rows.csv"), rows),
             tx.write_csv(os.path.join(out, "deltas.csv"), deltas)]
    paths.append(os.path.join(out, "map.json"))
    with open(paths[-1], "w") as f:
        json.dump(meta, f, indent=1, default=str)
    paths.append(os.path.join(out, "summary.md"))
    with open(paths[-1], "w") as f:
        f.write(md)
    return paths


def figures(out: str, deltas: list[dict], diag: dict) -> list[str]:
    """``heatmap_pd.png``: ΔSW of PD+DDIL per cell (rows: std x classes; columns: w x width;
    one panel per steps x init), * where the interval excludes 0; ``diagnostic.png``: the
    diagnostic summary against the gain, one point per cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pd = [d for d in deltas if d["block"] == "pd" and d["arm"] == "ddil"]
    if not pd:
        return []
    rows_k = sorted({(d["std"], d["classes"]) for d in pd})
    cols_k = sorted({(d["width"], d["w"]) for d in pd})
    panels = sorted({(d["n_steps"], d["init"]) for d in pd})
    vmax = max(abs(d["sw_x1e3"]) for d in pd) or 1.0
    fig, axs = plt.subplots(1, len(panels), figsize=(0.7 * len(cols_k) * len(panels) + 2,
                                                       0.55 * len(rows_k) + 2), squeeze=False)
    for ax, (n, init) in zip(axs[0], panels):
        grid = torch.full((len(rows_k), len(cols_k)), float("nan"))
        for d in pd:
            if (d["n_steps"], d["init"]) == (n, init):
                i, j = rows_k.index((d["std"], d["classes"])), cols_k.index((d["width"], d["w"]))
                grid[i, j] = d["sw_x1e3"]
                ax.text(j, i, f"{d['sw_x1e3']:+.0f}{'*' if d['sw_x1e3_sig'] else ''}",
                        ha="center", va="center", fontsize=6)
        im = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(cols_k)), [f"h{h}\nw{w:g}" for h, w in cols_k], fontsize=6)
        ax.set_yticks(range(len(rows_k)), [f"std {s:g}, C {c}" for s, c in rows_k], fontsize=6)
        ax.set_title(f"{n}-step, {init} init", fontsize=8)
    fig.colorbar(im, ax=axs[0].tolist(), shrink=0.8, label="ΔSW x1e3 (DDIL − PD; blue = DDIL better)")
    fig.suptitle("PD+DDIL − PD, per class sliced W1 x1e3 (* = 95% interval excludes 0)",
                 fontsize=9)
    p1 = os.path.join(out, "heatmap_pd.png")
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for k, (h, init) in enumerate(sorted({(d["width"], d["init"]) for d in pd})):
        ds = [d for d in pd if (d["width"], d["init"]) == (h, init)]
        ax.errorbar([d["diag"] for d in ds], [-d["sw_x1e3"] for d in ds],
                    yerr=[0 if math.isnan(d["sw_x1e3_ci"]) else d["sw_x1e3_ci"] for d in ds],
                    fmt="o", ms=3, lw=0.6, color=f"C{k}", label=f"width {h}, {init}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("shift diagnostic (teacher summary, before training)")
    ax.set_ylabel("PD+DDIL gain −ΔSW x1e3")
    ax.legend(fontsize=6)
    fig.tight_layout()
    p2 = os.path.join(out, "diagnostic.png")
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


def main(argv=None) -> dict:
    """The command line. Every option is checked here, before any backend is built: a bad one
    raises ``ConfigError`` naming it (``python experiments/regime_map.py`` prints one line and
    exits with status 2)."""
    from ddil_lab.toy.backend import STUDENT_INITS
    from ddil_lab.validation import check_out_dir, cli_exit, fail, parse_list, parse_seeds

    if argv is None:  # the command line: a bad option is one line and exit status 2
        import sys
        raise SystemExit(cli_exit(main, "regime_map", sys.argv[1:]))

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/regime_map", help="run folder")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds; for tests)")
    p.add_argument("--full", action="store_true", help="5 seeds, 4000 evaluation samples")
    p.add_argument("--blocks", default=None, help=f"comma-separated subset of "
                                                  f"{tuple(DEFAULTS['blocks'])}")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (2 or more: the paired "
                                                 "intervals need 2)")
    p.add_argument("--set", action="append", default=[], metavar="BLOCK.FACTOR=V1,V2",
                   help="override one factor of a block, e.g. --set pd.stds=0.04,0.1 "
                        "(factors: stds, classes, guidance, widths, inits, n_steps, arms, budgets)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes running the map's units (default: 2, or 1 on a 1-core "
                        "machine; each uses one thread)")
    p.add_argument("--compare-to", default=None, metavar="DIR",
                   help="run nothing: list the cells whose verdict differs between DIR's "
                        "deltas.csv and --out's")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.compare_to is not None:
        for flag, d in (("--compare-to", a.compare_to), ("--out", a.out)):
            if not os.path.isfile(os.path.join(d, "deltas.csv")):
                fail(flag, d, "a finished map's folder (holding deltas.csv)")
        print(compare(a.compare_to, a.out))
        return {}
    if a.quick and a.full:
        fail("--full", True, "--quick or --full, not both", "--quick asks for tiny settings, "
             "--full for the largest ones")
    check_out_dir("--out", a.out)
    if a.workers is not None and a.workers < 1:
        fail("--workers", a.workers, "an int >= 1")
    kw = {}
    base = QUICK["blocks"] if a.quick else DEFAULTS["blocks"]
    if a.set:
        blocks_cfg = {k: dict(v) for k, v in base.items()}
        # factor -> (item type, allowed values or None, what a value must be)
        factors = {"stds": (float, None, lambda v: 0 < v <= 0.5, "in (0, 0.5]"),
                   "guidance": (float, None, lambda v: v >= 1, ">= 1 (1: no guidance)"),
                   "classes": (int, None, lambda v: 1 <= v <= DEFAULTS["modes"],
                               f"in [1, {DEFAULTS['modes']}] (the modes)"),
                   "widths": (int, None, lambda v: v >= 1, ">= 1"),
                   "n_steps": (int, None, lambda v: 1 <= v <= 1000, "in [1, 1000]"),
                   "inits": (str, STUDENT_INITS, None, ""),
                   "arms": (str, tuple(ARM_SPECS), None, ""),
                   "budgets": (str, tuple(BUDGETS), None, "")}
        for item in a.set:
            key, eq, vals = item.partition("=")
            bname, _, factor = key.partition(".")
            if not eq or bname not in blocks_cfg or factor not in factors:
                fail("--set", item, f"BLOCK.FACTOR=V1,V2 with BLOCK in {tuple(blocks_cfg)} and "
                     f"FACTOR in {tuple(factors)}")
            kind, choices, ok, rule = factors[factor]
            values = parse_list(f"--set {key}", vals, kind, choices)
            bad = [v for v in values if ok is not None and not ok(v)]
            if bad:
                fail(f"--set {key}", vals, f"values {rule}", f"{bad[0]!r} is not")
            blocks_cfg[bname][factor] = values
        kw["blocks"] = blocks_cfg
    if a.seeds is not None:
        kw["seeds"] = parse_seeds("--seeds", a.seeds, 2, why="a paired interval (and so any "
                                  "verdict but 'nothing') needs 2 or more")
    blocks = list(parse_list("--blocks", a.blocks, str, tuple(base))) if a.blocks is not None \
        else None
    return run(a.out, quick=a.quick, full=a.full, only=blocks, progress=not a.no_progress,
               workers=a.workers, **kw)


if __name__ == "__main__":
    main()
