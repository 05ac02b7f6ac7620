"""Speed benchmark (not a timed test): what DDIL and the train loop cost per training step.

    python experiments/bench.py                    # ring8, exact teacher, 200 steps x batch 256
    python experiments/bench.py --steps 5 --batch 32 --repeats 1     # tiny (the tests use it)

1. Per method (PD, LCM, DMD2): time per training step with DDIL (rollout states reused through
   the aggregation buffer, and without the buffer for comparison) against the forward-only
   baseline at the same batch. Target: DDIL (buffered) at most 1.3x baseline.
2. ``distill(...)`` against a minimal hand-written PyTorch loop doing the same PD update
   (x0 target from the teacher's 8 DDIM substeps, max(SNR, 1) weight, AdamW, clipping).
   Target: at most 1.1x.

Runs are interleaved (baseline, ddil, ... repeated) and the fastest repeat is reported (the least
disturbed one, as ``timeit`` does; the median is kept in the JSON), as wall time and as this
process's CPU time. On a shared machine even CPU time varies by tens of percent between
identical runs, so the load average before and after is printed too.
"""

from __future__ import annotations

import argparse
import itertools
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
                    k: int = 8, seed: int = 0):
    """The PD update written out by hand: forward states on the student grid, the x0 target that
    makes one student DDIM step land where k teacher DDIM steps land, weight max(SNR, 1)."""
    torch.manual_seed(seed)
    S, teacher = backend.schedule, backend.teacher
    student = backend.make_student()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    grid = timesteps(n_steps, S.T)
    # per student timestep t: the teacher's k + 1 points from t to the next student timestep
    walk = {int(t): substeps(int(t), int(grid[i + 1]) if i + 1 < n_steps else -1, n_steps, k, S.T)
            for i, t in enumerate(grid)}
    for _ in range(steps):
        x0, cond = backend.sample_data(batch)
        t = grid[torch.randint(0, n_steps, (batch,))]
        x_t = S.q_sample(x0, t, torch.randn_like(x0))
        x0_tgt = torch.empty_like(x_t)
        with torch.no_grad():
            for tt in t.unique().tolist():
                idx = (t == tt).nonzero().squeeze(1)
                c = None if cond is None else cond[idx]
                x, pts = x_t[idx], walk[tt]
                for a, b in itertools.pairwise(pts):
                    x = S.ddim_step(x, teacher(x, torch.full((len(x),), a), c), a, b)
                r = S.sigma(pts[-1]) / S.sigma(tt)
                x0_tgt[idx] = (x - r * x_t[idx]) / (S.alpha(pts[-1]) - r * S.alpha(tt))
        w = S.snr(t).clamp_min(1.0)
        loss = (w * ((student(x_t, t, cond) - x0_tgt) ** 2).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
    return student


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
    lines = [(f"Setting {c['setting']}, {c['teacher']} teacher, {c['steps']} steps x batch {c['batch']}, fastest of "
              f"{c['repeats']} interleaved repeats; DDIL buffer {c['buffer_size']} states, "
              f"{c['refresh_size']} new every {c['refresh_every']} steps."),
             f"Load average (1, 5, 15 min) before {load[0]}, after {load[1]}.", "",
             "| run | ms/step wall | ms/step CPU | ms/step wall (median) |", "|---|---|---|---|"]
    for k, v in res["per_step"].items():
        lines.append(f"| {k} | {1e3 * v['wall']:.1f} | {1e3 * v['cpu']:.1f} | "
                     f"{1e3 * v['wall_median']:.1f} |")
    lines += ["", "| ratio | wall | CPU | target |", "|---|---|---|---|"]
    for k, v in res["ratios"].items():
        target = "<= 1.1" if "distill" in k else ("<= 1.3" if "no buffer" not in k else "")
        lines.append(f"| {k} | {v['wall']:.2f} | {v['cpu']:.2f} | {target} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
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
    a = p.parse_args(argv)
    methods = tuple(m for m in a.methods.split(",") if m)
    bad = [m for m in methods if m not in train.METHODS]
    if bad:
        raise ValueError(f"methods={bad} must be in {train.METHODS}")
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
