"""Speed benchmark (not a timed test): what DDIL and the train loop cost per training step.

    python experiments/bench.py                    # ring8, exact teacher, 200 steps x batch 256
    python experiments/bench.py --steps 5 --batch 32 --repeats 1     # tiny (the tests use it)

1. Per method (PD, LCM, DMD2): time per training step with DDIL (rollout states reused through
   the aggregation buffer, and without the buffer for comparison) against the forward-only
   baseline at the same batch. Target: DDIL (buffered) at most 1.3x baseline.
2. ``distill(...)`` against a minimal hand-written PyTorch loop doing the same PD update
   (x0 target from the teacher's 8 DDIM substeps, max(SNR, 1) weight, AdamW, clipping).
   Target: at most 1.05x.
3. ``--ensemble``: one step of the regime map's largest ensemble (48 students as one batched
   network) against its bound, the same batched work in a bare loop. Targets: at most 1.3x
   the bound; DDIL at most 1.1x forward-only.

Runs are interleaved (baseline, ddil, ... repeated) and the fastest repeat is reported (the least
disturbed one, as ``timeit`` does; the median is kept in the JSON), as wall time and as this
process's CPU time. On a shared machine even CPU time varies by tens of percent between
identical runs, so the load average before and after is printed too.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time

import torch

from ddil_lab import toy as tx
from ddil_lab import train
from ddil_lab.diffusion import substeps, timesteps
from ddil_lab.rollout import StateSampler
from ddil_lab.train import distill


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def hand_written_pd(backend, steps: int, batch: int, lr: float = 1e-3, n_steps: int = 4,
                    k: int = 8, seed: int = 0, grad_clip: float | None = 1.0):
    """The PD update written out by hand: forward states on the student grid, the x0 target that
    makes one student DDIM step land where k teacher DDIM steps land (every state walks its
    own k teacher steps, all states together), weight max(SNR, 1), AdamW. On an
    ``EnsembleBackend`` it is the bound of an ensemble step: the same batched network work in
    a bare loop."""
    torch.manual_seed(seed)
    S, teacher = backend.schedule, backend.teacher
    student = backend.make_student()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    grid = timesteps(n_steps, S.T)
    # per student timestep: the teacher's k + 1 points from it to the next student timestep
    walks = torch.tensor([substeps(int(t), int(grid[i + 1]) if i + 1 < n_steps else -1,
                                   n_steps, k, S.T) for i, t in enumerate(grid)])
    for _ in range(steps):
        x0, cond = backend.sample_data(batch)
        i = torch.randint(0, n_steps, (batch,))
        t, walk = grid[i], walks[i]  # (B,), (B, k + 1)
        x_t = S.q_sample(x0, t, torch.randn_like(x0))
        with torch.no_grad():
            x = x_t
            for j in range(k):
                x = S.ddim_step(x, teacher(x, walk[:, j], cond), walk[:, j], walk[:, j + 1])
            s = walk[:, -1]
            r = (S.sigma(s) / S.sigma(t))[:, None]
            x0_tgt = (x - r * x_t) / (S.alpha(s)[:, None] - r * S.alpha(t)[:, None])
        w = S.snr(t).clamp_min(1.0)
        loss = (w * ((student(x_t, t, cond) - x0_tgt) ** 2).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        opt.step()
    return student


def map_unit(init_steps: int = 3000, std: float = 0.06, classes: int = 3, seeds=(0, 1, 2)):
    """The backends of the regime map's largest ensemble (a ``pd`` block unit): 12 modes, 4
    guidance scales x widths 32 / 128 x pretrained / random students, 3 seeds: 48 members."""
    from ddil_lab.toy import Toy2dBackend, class_mixture
    from ddil_lab.toy.backend import RING12_WEIGHTS

    gmm = class_mixture(12, classes, std, 0.7, weights=RING12_WEIGHTS)
    # the map's float32 teacher (a library from before it had one: its float64 teacher)
    kw = {"teacher_dtype": "float32"} if "teacher_dtype" in inspect.signature(
        Toy2dBackend).parameters else {}
    return [Toy2dBackend(gmm, guidance=w, hidden=h, student_init=i, init_steps=init_steps, **kw)
            for w in (1.0, 3.0, 6.0, 9.0) for h in (32, 128) for i in ("pretrained", "random")]


def bench_ensemble(steps: int = 30, batch: int = 256, repeats: int = 3, init_steps: int = 3000,
                   buffer_size: int = 1024, refresh_every: int = 10, refresh_size: int = 256,
                   seeds=(0, 1, 2), progress: bool = True) -> dict:
    """One step of the map's largest ensemble (``map_unit``: 48 members, batch ``batch`` per
    member) through ``train_cells``, PD forward-only and PD+DDIL as the map trains them,
    against its bound: the same batched teacher walk, student forward, backward and AdamW
    step in a bare loop (``hand_written_pd`` on the ensemble view). Targets: baseline <= 1.3x
    the bound, DDIL <= 1.1x the baseline."""
    from tqdm.auto import tqdm

    bes = map_unit(init_steps, seeds=seeds)
    M = len(bes) * len(seeds)
    view = train.EnsembleBackend(bes[0], M, seeds=list(seeds) * len(bes),
                                 bases=[b for b in bes for _ in seeds])
    skw = {"buffer_size": buffer_size, "refresh_every": refresh_every,
           "refresh_size": refresh_size, "prior_schedule": "student_selection",
           "ramp_steps": steps // 4}
    jobs = {
        "ensemble bare loop (bound)": lambda: hand_written_pd(view, steps, batch * M,
                                                              grad_clip=None),
        "ensemble pd train_cells forward-only": lambda: train.train_cells(
            bes, "pd", "baseline", seeds, steps=steps, batch_size=batch),
        "ensemble pd+ddil train_cells": lambda: train.train_cells(
            bes, "pd", "ddil", seeds, steps=steps, batch_size=batch, sampler_kw=skw)}
    load0 = os.getloadavg()
    times = {k: [] for k in jobs}
    for name in tqdm([k for _ in range(repeats) for k in jobs], desc="ensemble bench",
                     disable=not progress):
        times[name].append(_timed(jobs[name]))
    per_step = {k: {"wall": min(w for w, _ in v) / steps, "cpu": min(c for _, c in v) / steps,
                    "wall_median": statistics.median(w for w, _ in v) / steps}
                for k, v in times.items()}
    base, bound = (per_step["ensemble pd train_cells forward-only"],
                   per_step["ensemble bare loop (bound)"])
    ratios = {"ensemble: forward-only / bound": {u: base[u] / bound[u] for u in ("wall", "cpu")},
              "ensemble: ddil / forward-only": {
                  u: per_step["ensemble pd+ddil train_cells"][u] / base[u]
                  for u in ("wall", "cpu")}}
    return {"per_step": per_step, "ratios": ratios, "load": (load0, os.getloadavg()),
            "config": {"members": M, "steps": steps, "batch": batch, "repeats": repeats,
                       "init_steps": init_steps, "buffer_size": buffer_size,
                       "refresh_every": refresh_every, "refresh_size": refresh_size}}


def bench(setting: str = "ring8", steps: int = 200, batch: int = 256, repeats: int = 5,
          methods=train.METHODS, buffer_size: int = 1024, refresh_every: int = 10,
          refresh_size: int = 256, init_steps: int = 3000, teacher: str = "exact",
          progress: bool = True) -> dict:
    """Measure seconds per training step of every (method, variant) and of the hand-written PD
    loop; returns {"per_step": {name: {"wall", "cpu"}}, "ratios": {...}, "load": (before,
    after)}."""
    from tqdm.auto import tqdm

    backend = tx.make_backend(setting, teacher, init_steps=init_steps)
    buf = {"buffer_size": buffer_size, "refresh_every": refresh_every, "refresh_size": refresh_size}
    jobs = {}
    for m in methods:
        mkw = {"critic_steps": 5} if m == "dmd2" else {}
        for variant, skw in (("baseline", {}), ("ddil", buf), ("ddil, no buffer", {})):
            arm = "baseline" if variant == "baseline" else "ddil"

            def job(m=m, arm=arm, skw=skw, mkw=mkw):
                method, sampler = train.make_arm(m, arm, method_kw=mkw, **skw)
                distill(backend, method, sampler, steps=steps, batch_size=batch, lr=1e-3,
                        progress=False)
            jobs[f"{m} {variant}"] = job
    jobs["hand-written PD loop"] = lambda: hand_written_pd(backend, steps, batch)
    jobs["pd distill() forward-only"] = lambda: distill(
        backend, train.make_arm("pd", "baseline")[0], StateSampler(), steps=steps,
        batch_size=batch, lr=1e-3, progress=False)
    load0 = os.getloadavg()
    times = {k: [] for k in jobs}
    order = [k for _ in range(repeats) for k in jobs]
    for name in tqdm(order, desc="bench", disable=not progress):
        times[name].append(_timed(jobs[name]))
    per_step = {k: {"wall": min(w for w, _ in v) / steps, "cpu": min(c for _, c in v) / steps,
                    "wall_median": statistics.median(w for w, _ in v) / steps}
                for k, v in times.items()}
    ratios = {}
    for m in methods:
        for variant in ("ddil", "ddil, no buffer"):
            ratios[f"{m}: {variant} / baseline"] = {
                u: per_step[f"{m} {variant}"][u] / per_step[f"{m} baseline"][u]
                for u in ("wall", "cpu")}
    ratios["distill() / hand-written PD"] = {
        u: per_step["pd distill() forward-only"][u] / per_step["hand-written PD loop"][u]
        for u in ("wall", "cpu")}
    return {"per_step": per_step, "ratios": ratios, "load": (load0, os.getloadavg()),
            "config": {"setting": setting, "teacher": teacher, "steps": steps, "batch": batch, "repeats": repeats,
                       **buf}}


def report(res: dict) -> str:
    """The benchmark as Markdown."""
    c = res["config"]
    load = [tuple(round(x, 2) for x in la) for la in res["load"]]
    what = (f"The regime map's largest ensemble ({c['members']} members, batch {c['batch']} "
            f"each)" if "members" in c else f"Setting {c['setting']}, {c['teacher']} teacher")
    lines = [(f"{what}, {c['steps']} steps x batch {c['batch']}, fastest of "
              f"{c['repeats']} interleaved repeats; DDIL buffer {c['buffer_size']} states, "
              f"{c['refresh_size']} new every {c['refresh_every']} steps."),
             f"Load average (1, 5, 15 min) before {load[0]}, after {load[1]}.", "",
             "| run | ms/step wall | ms/step CPU | ms/step wall (median) |", "|---|---|---|---|"]
    for k, v in res["per_step"].items():
        lines.append(f"| {k} | {1e3 * v['wall']:.1f} | {1e3 * v['cpu']:.1f} | "
                     f"{1e3 * v['wall_median']:.1f} |")
    lines += ["", "| ratio | wall | CPU | target |", "|---|---|---|---|"]
    for k, v in res["ratios"].items():
        target = ("<= 1.05" if "distill" in k else "<= 1.3" if "bound" in k else
                  "<= 1.1" if "ensemble" in k else "<= 1.3" if "no buffer" not in k else "")
        lines.append(f"| {k} | {v['wall']:.2f} | {v['cpu']:.2f} | {target} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """The command line; every option is checked before the benchmark starts (``ConfigError``
    naming it), ``--out`` included, so a bad one never costs a whole run."""
    from ddil_lab.validation import check_int, check_out_dir, cli_exit, fail, parse_list

    if argv is None:  # the command line: a bad option is one line and exit status 2
        import sys
        raise SystemExit(cli_exit(main, "bench", sys.argv[1:]))

    torch.set_num_threads(1)  # tiny tensors: one thread is much faster on a shared CPU
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="ring8", help=f"one of {tuple(tx.SETTINGS)}")
    p.add_argument("--teacher", default="exact", help="exact | mlp (a cheap network teacher)")
    p.add_argument("--steps", type=int, default=200, help="training steps per timed run")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (fastest kept)")
    p.add_argument("--methods", default=",".join(train.METHODS), help="comma-separated")
    p.add_argument("--buffer-size", type=int, default=1024)
    p.add_argument("--refresh-every", type=int, default=10)
    p.add_argument("--refresh-size", type=int, default=256)
    p.add_argument("--init-steps", type=int, default=3000, help="MLP init training steps")
    p.add_argument("--out", default=None, help="also write bench.json and bench.md here")
    p.add_argument("--ensemble", action="store_true",
                   help="benchmark the regime map's largest ensemble against its bound instead "
                        "(--steps, --batch per member, --repeats, --init-steps, buffer options)")
    a = p.parse_args(argv)
    if a.setting not in tx.SETTINGS:
        fail("--setting", a.setting, f"one of {tuple(tx.SETTINGS)}")
    if a.teacher not in ("exact", "mlp"):
        fail("--teacher", a.teacher, "one of ('exact', 'mlp')")
    for flag, lo in (("steps", 1), ("batch", 1), ("repeats", 1), ("buffer_size", 1),
                     ("refresh_every", 1), ("refresh_size", 1), ("init_steps", 1)):
        check_int("--" + flag.replace("_", "-"), getattr(a, flag), lo)
    methods = parse_list("--methods", a.methods, str, train.METHODS)
    if a.out is not None:
        check_out_dir("--out", a.out)
    if a.ensemble:
        res = bench_ensemble(a.steps, a.batch, a.repeats, a.init_steps, a.buffer_size,
                             a.refresh_every, a.refresh_size)
    else:
        res = bench(a.setting, a.steps, a.batch, a.repeats, methods, a.buffer_size,
                    a.refresh_every, a.refresh_size, a.init_steps, a.teacher)
    md = report(res)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(a.out, "bench.md"), "w") as f:
            f.write(md + "\n")
    return res


if __name__ == "__main__":
    main()
