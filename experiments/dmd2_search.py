"""Where does DMD2 work on the toy tier? A one-factor-at-a-time map around a centre recipe, and
the paper's small-batch claims (reflection, DDIL) measured in the regime it finds.

    python experiments/dmd2_search.py --out runs/dmd2_search             # the recipe map
    python experiments/dmd2_search.py --claims --out runs/dmd2_claims    # batch x reflection x DDIL
    python experiments/dmd2_search.py --quick --out /tmp/dmd2_quick      # seconds (the tests)

Mixture: the regime map's ring of 12 unequal modes in 3 classes (std 0.1). Every recipe trains
4-step DMD2 students for the unguided (w = 1) and the guided (w = 6) teacher, ``seeds`` seeds
each, as one batched ensemble (``train_cells``), from the pretrained MLP. Quality: per-class
sliced W1 (x1e3) against the 32-step (guided) teacher, and its ratio to the teacher's own second
draw on the same evaluation set (the noise floor): a recipe *works* (issue 25) where the mean
ratio is at most 2 for every seed.

Recipe map: a centre recipe (``CENTRE``) and each factor of ``FACTORS`` varied alone: the
regression loss of DMD's first version (weight; 0 is DMD2's own recipe), the distribution-
matching term (0: regression alone), critic updates per generator update (TTUR), generator and
critic learning rates, the critic's initialisation, the tau range of the DM gradient, batch
size, training steps and the GAN head (recipes with it train member by member: DMD2's head is
one module, which ensemble members would share).

Claims (``--claims``): the centre recipe at batch 7, 16 and 64, each with and without reflection
and with and without DDIL (half the states from mixed teacher/student rollouts, rolled out to
t = 500 as the paper does), same seeds. Per arm: final quality, seed-to-seed spread, and how
often a run *fails*: its loss turned non-finite (diverged), or its final SW is above the
teacher's own 4-step DDIM sampler's (distillation then made things worse than not distilling).

Writes ``rows.csv`` (one row per recipe x w x seed), ``summary.md`` (printed), ``search.png``
(SW ratio per factor level) and ``settings.json`` / ``done.jsonl`` (a rerun over the same
``--out`` skips finished recipes; other settings are refused).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from types import SimpleNamespace

import torch

from ddil_lab import toy as tx
from ddil_lab.toy import Toy2dBackend, class_mixture
from ddil_lab.toy.backend import RING12_WEIGHTS
from ddil_lab.train import distill
from ddil_lab.train.arms import make_arm, train_cells
from ddil_lab.train.loop import NonFiniteError
from ddil_lab.train.runstore import RunStore
from ddil_lab.validation import check_out_dir, cli_exit, fail, parse_seeds

MIXTURE = {"modes": 12, "classes": 3, "std": 0.1, "radius": 0.7}
GUIDANCE = (1.0, 6.0)
# the centre recipe (what the probes before the search pointed to; DMD2's own is
# regression_weight 0, lr 1e-3 here, critic_steps 5)
CENTRE = {"regression_weight": 10.0, "dm_weight": 1.0, "critic_steps": 5, "lr": 3e-4,
          "critic_lr": 1e-3, "critic_init": "teacher", "tau_hi": 0.98, "batch_size": 64,
          "steps": 1000, "gan_weight": 0.0}
FACTORS = {
    "regression_weight": (0.0, 1.0, 10.0, 100.0),
    "dm_weight": (0.0, 1.0),
    "critic_steps": (1, 5, 10),
    "lr": (1e-4, 3e-4, 1e-3),
    "critic_lr": (3e-4, 1e-3, 3e-3),
    "critic_init": ("teacher", "random"),
    "tau_hi": (0.5, 0.98),
    "batch_size": (16, 64, 256),
    "steps": (300, 1000, 3000),
    "gan_weight": (0.0, 0.1),
}
CLAIM_BATCHES = (7, 16, 64)
CLAIM_REGRESSION = (10.0, 0.0)  # the working recipe, and DMD2's own (no regression loss)
CLAIM_ARMS = ("baseline", "reflected", "ddil", "ddil+reflected")
DEFAULTS = {"seeds": (0, 1, 2), "n_eval": 2000, "init_steps": 3000, "rollout_until": 500,
            "share": 0.5}
# digits (``--digits``): the image slice's teacher; a smaller budget (CPU), the same factors
# that mattered on the toy
DIGITS = {"seeds": (0, 1, 2), "n_eval": 500, "teacher_root": "runs/image_teachers",
          "regression_pairs": 64, "regression_steps": 16,
          "centre": {"regression_weight": 10.0, "dm_weight": 1.0, "critic_steps": 2, "lr": 3e-4,
                     "critic_lr": 1e-3, "critic_init": "teacher", "tau_hi": 0.98,
                     "batch_size": 8, "steps": 200},
          "factors": {"regression_weight": (0.0,), "dm_weight": (0.0,)}}
DIGITS_QUICK = {"seeds": (0,), "n_eval": 40, "teacher_root": None, "quick": True,
                "regression_pairs": 4, "regression_steps": 4,
                "centre": {**DIGITS["centre"], "steps": 2, "batch_size": 2, "critic_steps": 1},
                "factors": {"regression_weight": (0.0,)}}
QUICK = {"seeds": (0, 1), "n_eval": 200, "init_steps": 40,
         "centre": {**CENTRE, "steps": 3, "batch_size": 8, "critic_steps": 1},
         "factors": {"regression_weight": (0.0, 10.0), "critic_init": ("teacher", "random")},
         "batches": (7,)}


def recipe_key(r: dict, arm: str = "baseline") -> str:
    return arm + "|" + "|".join(f"{k}={r[k]}" for k in sorted(r))


def recipes(centre: dict, factors: dict) -> list[tuple[str, object, dict]]:
    """(factor, level, recipe) for the centre and each factor level, without repeats (the
    centre's own level of every factor is the centre recipe)."""
    out, seen = [("centre", "", dict(centre))], {recipe_key(centre)}
    for f, levels in factors.items():
        for v in levels:
            r = {**centre, f: v}
            if recipe_key(r) not in seen:
                seen.add(recipe_key(r))
                out.append((f, v, r))
    return out


def method_kw(r: dict, cfg: dict) -> dict:
    return {"regression_weight": r["regression_weight"], "dm_weight": r["dm_weight"],
            "critic_steps": r["critic_steps"], "critic_init": r["critic_init"],
            "tau_range": (0.02, r["tau_hi"]), "gan_weight": r.get("gan_weight", 0.0),
            "regression_pairs": cfg.get("regression_pairs", 1024),
            "regression_steps": cfg.get("regression_steps", 32)}


class Runner:
    """Builds the toy mixture's backends and references once and trains / evaluates recipes.
    Quality is ``sw_x1e3`` (per-class sliced W1 to the teacher's samples)."""

    metric, limit = "sw_x1e3", 2.0  # issue 25: within 2x of the teacher's second draw

    def __init__(self, cfg: dict, store: RunStore):
        self.cfg, self.store = cfg, store
        gmm = class_mixture(MIXTURE["modes"], MIXTURE["classes"], MIXTURE["std"],
                            MIXTURE["radius"], weights=RING12_WEIGHTS)
        self.bes = [Toy2dBackend(gmm, guidance=w, hidden=128, student_init="pretrained",
                                 init_steps=cfg["init_steps"], teacher_dtype="float32")
                    for w in GUIDANCE]
        self.refs = [tx.make_reference(b, cfg["n_eval"], 4) for b in self.bes]
        self.floor = {}
        for w, b, ref in zip(GUIDANCE, self.bes, self.refs):
            rows = tx.reference_rows(b, ref)
            self.floor[w] = {"teacher2": rows["teacher 32-step (2nd draw)"]["sw_x1e3"],
                             "ddim4": rows["teacher DDIM 4-step"]["sw_x1e3"]}

    def train(self, r: dict, arm: str, skw: dict) -> list[list]:
        """Per cell (w), one trained student per seed: all as one batched ensemble, except
        recipes with a GAN head, which train member by member (a plain ``distill`` per cell and
        seed, seeded by the seed): DMD2's head is one module, which ensemble members would
        share, coupling the seeds."""
        seeds = list(self.cfg["seeds"])
        kw = {"steps": r["steps"], "batch_size": r["batch_size"], "lr": r["lr"],
              "critic_lr": r["critic_lr"]}
        if not r.get("gan_weight"):
            return train_cells(self.bes, "dmd2", arm, seeds, n_steps=4,
                               method_kw=method_kw(r, self.cfg), sampler_kw=skw, **kw)
        out = []
        for be in self.bes:
            cell = []
            for s in seeds:
                m, sampler = make_arm("dmd2", arm, 4, method_kw(r, self.cfg), **skw)
                res = distill(be, m, sampler, grad_clip=None, seed=s, progress=False, **kw)
                cell.append(SimpleNamespace(method=res.method, grid=res.method.grid.tolist(),
                                            sample=res.method.sample))
            out.append(cell)
        return out

    def evaluate(self, i: int, views) -> list[dict]:
        return [{k: e[k] for k in ("sw_x1e3", "mmd_x1e3", "off_mode_class")}
                for e in tx.evaluate_members(views, self.bes[i], self.refs[i], per_step=False)]

    def __call__(self, key: str, r: dict, arm: str = "baseline", **tags) -> list[dict]:
        if key in self.store:
            return self.store.rows(key)
        cfg, seeds = self.cfg, list(self.cfg["seeds"])
        skw = {}
        if "ddil" in arm:
            skw = {"share": cfg["share"], "rollout_until": cfg["rollout_until"]}
        t0 = time.perf_counter()
        try:
            views = self.train(r, arm, skw)
        except NonFiniteError as e:  # the whole ensemble stops: every member counts as diverged
            views, err = None, str(e).splitlines()[0]
        wall = time.perf_counter() - t0
        rows = []
        for i, w in enumerate(GUIDANCE):
            evals = self.evaluate(i, views[i]) if views else [None] * len(seeds)
            fl = self.floor[w]
            for seed, e in zip(seeds, evals):
                q = e[self.metric] if e else math.nan
                rows.append({**tags, "arm": arm, "w": w, "seed": seed, **r,
                             **(e or {self.metric: math.nan}),
                             "ratio": q / fl["teacher2"], "teacher2": fl["teacher2"],
                             "ddim4": fl["ddim4"],
                             "failed": bool(not e or not math.isfinite(q) or q > fl["ddim4"]),
                             "error": "" if e else err, "train_s": wall})
        self.store.add(key, rows)
        return rows


class DigitsRunner(Runner):
    """The same recipes on the digits tier: the image slice's cached class-conditional teacher
    (``experiments/image_map.py``), guided at w 1 and 6; quality is ``fid_class`` (classifier-
    feature FID per class to the 32-step teacher's samples, ``image.ClassReference``), its
    floor the teacher's own second 32-step draw from other noise."""

    metric, limit = "fid_class", 1.5  # issue 25: within 1.5x of the teacher's FID

    def __init__(self, cfg: dict, store: RunStore):
        import image_map

        from ddil_lab.diffusion import timesteps
        from ddil_lab.image import metrics as im

        self.cfg, self.store = cfg, store
        icfg = image_map.make_config(guidance=GUIDANCE, teacher_root=cfg["teacher_root"])
        if cfg.get("quick"):
            icfg = image_map.make_config(quick=True, guidance=GUIDANCE)
        backends = image_map.make_backends(icfg)
        self.bes = [backends[w] for w in GUIDANCE]
        classifier = im.train_classifier(self.bes[0].data, steps=icfg["classifier_steps"])
        grid = timesteps(4).tolist()
        self.refs = [im.ClassReference(b, classifier, cfg["n_eval"], grid) for b in self.bes]
        self.floor = {}
        for w, b, ref in zip(GUIDANCE, self.bes, self.refs):
            key = f"floor|w{w:g}"
            if key not in store:
                store.add(key, [{
                    "teacher2": ref.evaluate(tx.TeacherSampler(b, grid, 32))["fid_class"],
                    "ddim4": ref.evaluate(tx.TeacherSampler(b, grid, None))["fid_class"]}])
            self.floor[w] = store.rows(key)[0]

    def evaluate(self, i: int, views) -> list[dict]:
        return [{k: e[k] for k in ("fid_class", "fid", "precision", "recall", "acc")}
                for e in (self.refs[i].evaluate(v) for v in views)]


NAMES = {"sw_x1e3": ("SW x1e3", "toy"), "fid_class": ("FID (per class)", "digits")}


def _cell(rows, key) -> str:
    m, ci = tx.mean_ci([r[key] for r in rows])
    if math.isnan(m):
        return "non-finite"
    return f"{m:.1f}" + ("" if math.isnan(ci) else f" ± {ci:.1f}")


def works(rows, limit: float) -> bool:
    return all(math.isfinite(r["ratio"]) and r["ratio"] <= limit for r in rows)


def search_markdown(rows: list[dict], cfg: dict, floor: dict, metric: str, limit: float,
                    elapsed: float) -> str:
    name, tier = NAMES[metric]
    what = (f"Mixture: ring of 12 modes, 3 classes, std {MIXTURE['std']}; 4-step students "
            "from the pretrained MLP (width 128)" if tier == "toy" else
            "Digits, the image slice's class-conditional teacher; 4-step students from it")
    lines = [f"# DMD2 recipe map ({tier})", "",
             f"{what}; seeds {list(cfg['seeds'])}; {cfg['n_eval']} evaluation samples per "
             "(w, seed). Centre recipe: "
             + ", ".join(f"{k} {v}" for k, v in cfg["centre"].items()) + ".",
             "", f"Teacher floor ({name} of its own 2nd 32-step draw; of its 4-step DDIM): "
             + "; ".join(f"w {w:g}: {f['teacher2']:.1f}, DDIM-4 {f['ddim4']:.1f}"
                         for w, f in floor.items()), "",
             f"Mean ± 95% t-interval over seeds; ratio = {name} / the teacher's 2nd-draw value; "
             f"**works**: every seed's ratio <= {limit:g}.", "",
             f"| factor | level | w 1: {name} | ratio | w 6: {name} | ratio | works (w 1 / w 6) |",
             "|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["factor"], str(r["level"])) for r in rows))
    for f, lv in keys:
        sel = [r for r in rows if r["factor"] == f and str(r["level"]) == lv]
        by = {w: [r for r in sel if r["w"] == w] for w in GUIDANCE}
        ok = ["yes" if works(by[w], limit) else "no" for w in GUIDANCE]
        lines.append(f"| {f} | {lv} | {_cell(by[1.0], metric)} | {_cell(by[1.0], 'ratio')} | "
                     f"{_cell(by[6.0], metric)} | {_cell(by[6.0], 'ratio')} | {' / '.join(ok)} |")
    lines += ["", f"Time: {elapsed:.0f} s (this process; recipes done earlier in the same "
              "--out are reused, not re-timed)."]
    return "\n".join(lines)


def claims_markdown(rows: list[dict], cfg: dict, metric: str, elapsed: float) -> str:
    name, tier = NAMES[metric]
    lines = [f"# DMD2 at small batches: reflection and DDIL ({tier})", "",
             f"The search's centre recipe with regression weight "
             f"{' and '.join(f'{r:g}' for r in cfg['claim_regression'])} (0: DMD2's own "
             f"recipe) at batch {', '.join(map(str, cfg['batches']))}; "
             f"seeds {list(cfg['seeds'])}; DDIL: half the states from mixed rollouts down to "
             f"t = {cfg['rollout_until']}. Failed: a non-finite loss, or a final {name} above "
             "the teacher's own 4-step DDIM sampler's.", "",
             f"| regression | batch | arm | w 1: {name} | seed spread (sd) | failed | "
             f"w 6: {name} | seed spread (sd) | failed |",
             "|---|---|---|---|---|---|---|---|---|"]

    def sd(v):
        v = [x for x in v if math.isfinite(x)]
        return f"{tx.mean_std(v)[1]:.1f}" if len(v) > 1 else "n/a"
    for reg in cfg["claim_regression"]:
        for b in cfg["batches"]:
            for arm in CLAIM_ARMS:
                sel = [r for r in rows if r["batch_size"] == b and r["arm"] == arm
                       and r["regression_weight"] == reg]
                parts = []
                for w in GUIDANCE:
                    s = [r for r in sel if r["w"] == w]
                    parts += [_cell(s, metric), sd([r[metric] for r in s]),
                              f"{sum(r['failed'] for r in s)}/{len(s)}"]
                lines.append(f"| {reg:g} | {b} | {arm} | " + " | ".join(parts) + " |")
    lines += ["", f"Paired by seed (same initialisation and evaluation noise): Δ{name} = arm − "
              "baseline, mean ± 95% t-interval; * where the interval excludes 0.", "",
              "| regression | batch | arm | w 1: Δ | w 6: Δ |", "|---|---|---|---|---|"]
    for reg in cfg["claim_regression"]:
        for b in cfg["batches"]:
            def seeds_of(arm, w, b=b, reg=reg):
                return {r["seed"]: r[metric] for r in rows if r["batch_size"] == b
                        and r["arm"] == arm and r["regression_weight"] == reg and r["w"] == w}
            for arm in CLAIM_ARMS[1:]:
                cells = []
                for w in GUIDANCE:
                    base, other = seeds_of("baseline", w), seeds_of(arm, w)
                    m, ci = tx.mean_ci([other[k] - base[k] for k in base if k in other])
                    sig = not math.isnan(ci) and abs(m) > ci
                    cells.append("n/a" if math.isnan(m) else
                                 f"{m:+.1f}" + ("" if math.isnan(ci) else f" ± {ci:.1f}")
                                 + (" *" if sig else ""))
                lines.append(f"| {reg:g} | {b} | {arm} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Time: {elapsed:.0f} s."]
    return "\n".join(lines)


def figure(rows: list[dict], path: str, metric: str, limit: float) -> str:
    """Per factor, the ratio to the teacher's floor (mean ± 95% interval over seeds) at each
    level, w 1 and w 6; the dashed line is the "works" limit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    factors = [f for f in dict.fromkeys(r["factor"] for r in rows) if f != "centre"]
    fig, axes = plt.subplots(1, max(1, len(factors)), figsize=(2.6 * max(1, len(factors)), 3),
                             sharey=True, squeeze=False)
    centre = [r for r in rows if r["factor"] == "centre"]
    for ax, f in zip(axes[0], factors):
        levels = list(dict.fromkeys([r["level"] for r in rows if r["factor"] == f]
                                    + ([centre[0][f]] if centre else [])))
        levels = sorted(levels, key=lambda v: (isinstance(v, str), v))
        for w, colour in zip(GUIDANCE, ("C0", "C3")):
            ms, cis = [], []
            for lv in levels:
                sel = [r for r in rows if r["w"] == w and (
                    (r["factor"] == f and r["level"] == lv) or (r["factor"] == "centre"
                                                                 and r[f] == lv))]
                m, ci = tx.mean_ci([r["ratio"] for r in sel])
                ms.append(m), cis.append(0 if math.isnan(ci) else ci)
            ax.errorbar(range(len(levels)), ms, yerr=cis, color=colour, marker="o",
                        capsize=3, label=f"w {w:g}")
        ax.axhline(limit, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(levels)), [f"{v:g}" if isinstance(v, float) else str(v)
                                           for v in levels], fontsize=7)
        ax.set_title(f, fontsize=8)
        ax.set_yscale("log")
    axes[0][0].set_ylabel(f"{NAMES[metric][0]} / teacher's 2nd draw")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_csv(path: str, rows: list[dict]) -> None:
    import csv
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)


def run(out: str, claims: bool = False, quick: bool = False, seeds=None, digits: bool = False,
        recipe: dict | None = None, progress: bool = True) -> dict:
    """The recipe map (default), the small-batch claims (``claims``), the digits check
    (``digits``) or one recipe (``recipe``: the centre with these settings changed, no
    factors) into ``out``; returns {"rows", "markdown", "floor"}."""
    cfg = dict(DEFAULTS, centre=dict(CENTRE), factors=dict(FACTORS), batches=CLAIM_BATCHES)
    if claims:
        cfg["claim_regression"] = CLAIM_REGRESSION
    if quick:
        cfg.update(QUICK)
    if digits:
        cfg.update(DIGITS_QUICK if quick else DIGITS)
    if seeds is not None:
        cfg["seeds"] = tuple(seeds)
    if recipe:
        cfg.update(centre={**cfg["centre"], **recipe}, factors={})
    if claims and quick:
        cfg["claim_regression"] = (10.0,)
    torch.set_num_threads(1)
    store = RunStore(out, {**cfg, "claims": claims, **({"digits": True} if digits else {})})
    t0 = time.perf_counter()
    runner = (DigitsRunner if digits else Runner)(cfg, store)
    rows = []
    if claims:
        todo = [(reg, b, arm) for reg in cfg["claim_regression"] for b in cfg["batches"]
                for arm in CLAIM_ARMS]
        for i, (reg, b, arm) in enumerate(todo):
            r = {**cfg["centre"], "batch_size": b, "regression_weight": reg}
            if progress:
                print(f"[{time.perf_counter() - t0:5.0f} s] {i + 1}/{len(todo)}: regression "
                      f"{reg:g}, batch {b}, {arm}", flush=True)
            rows += runner(recipe_key(r, arm), r, arm, factor="batch", level=b)
        md = claims_markdown(rows, cfg, runner.metric, time.perf_counter() - t0)
    else:
        todo = recipes(cfg["centre"], cfg["factors"])
        for i, (f, lv, r) in enumerate(todo):
            if progress:
                print(f"[{time.perf_counter() - t0:5.0f} s] {i + 1}/{len(todo)}: {f} = {lv}",
                      flush=True)
            rows += runner(recipe_key(r), r, factor=f, level=lv)
        md = search_markdown(rows, cfg, runner.floor, runner.metric, runner.limit,
                             time.perf_counter() - t0)
        figure(rows, os.path.join(out, "search.png"), runner.metric, runner.limit)
    write_csv(os.path.join(out, "rows.csv"), rows)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md + "\n")
    if progress:
        print(md)
    return {"rows": rows, "markdown": md, "floor": runner.floor}


def main(argv=None) -> dict:
    """The command line; a bad option raises ``ConfigError`` naming it (from the shell: one
    line and exit status 2), before any backend is built."""
    if argv is None:
        import sys
        raise SystemExit(cli_exit(main, "dmd2_search", sys.argv[1:]))
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/dmd2_search", help="output folder (resumable)")
    ap.add_argument("--claims", action="store_true",
                    help="the small-batch table (batch x reflection x DDIL) instead of the map")
    ap.add_argument("--digits", action="store_true",
                    help="the recipes on the digits tier (the image slice's cached teacher)")
    ap.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                    help="run one recipe: the centre with KEY changed (repeatable), e.g. "
                         "--recipe regression_weight=100 --recipe batch_size=256")
    ap.add_argument("--quick", action="store_true", help="a few steps, for tests")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    args = ap.parse_args(argv)
    check_out_dir("--out", args.out)
    seeds = parse_seeds("--seeds", args.seeds) if args.seeds is not None else None
    recipe = {}
    for item in args.recipe:
        key, _, value = item.partition("=")
        if key not in CENTRE or not value:
            fail("--recipe", item, f"KEY=VALUE with KEY one of {tuple(CENTRE)}")
        kind = type(CENTRE[key])
        if kind is str:
            recipe[key] = value
            continue
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or (kind is int and not number.is_integer()):
            fail("--recipe", item, f"a finite {kind.__name__} value for {key}")
        recipe[key] = kind(number)
    if recipe and args.claims:
        fail("--recipe", args.recipe, "no --recipe with --claims (the claims use the centre)")
    return run(args.out, claims=args.claims, quick=args.quick, seeds=seeds, digits=args.digits,
               recipe=recipe or None)


if __name__ == "__main__":
    main()
