"""Main job: distil a guided toy teacher into a 4-step PD student, with and without DDIL.

    python -m ddil_lab.toy.demo --out runs/demo

The teacher is the exact posterior mean of a class-conditional 2D mixture under classifier-free
guidance (w = 9 by default), as text-to-image students are distilled under guidance: the
regime map's ring of 12 modes in 3 classes with unequal weights (``guided12``, here at mode std
0.06 by default; ``--std``). Two students, trained with the same steps, batch and learning
rate:

    baseline   PD on forward-diffused states x_t ~ q_t(x | c) only
    ddil       PD on half forward states, half states of mixed teacher/student rollouts
               (the student-selection ramp over the first quarter of training, as in the map)

Both are evaluated from the same noise and labels against the guided 32-step teacher, per
class. The demo prints the metrics of both (mean +- std over the seeds, trained as one batched
ensemble), and, at each student timestep, the train/inference mismatch: the covariate shift of
the student's inference states from q_t(x | c), and the distance between the states each
student was trained on and the states it visits at inference. Figures go to ``--out``.

The default is a regime-map cell where DDIL pays for students that are also reasonable
samplers: students that start from the pretrained MLP (width 128) under strong guidance (w = 9)
on the 12-mode, 3-class ring at mode std 0.06, at the table's budget (300 steps x batch 256);
in the map (``--full``, 5 seeds) ΔSW x1e3 was -9.5 ± 6.0 there, and at w <= 3 the same
students gained nothing measurable. Randomly initialised students (``--init random --hidden 32
--guidance 6``) gain far more but remain poor samplers (most samples off their class's modes).
See docs/results.md.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

DEFAULT_INIT = "pretrained"  # the map cell shown by default (see the docstring)
DEMO_GUIDANCE, DEMO_STD = 9.0, 0.06
KEYS = [("nll", "NLL", "{:.2f}", 1), ("mmd_x1e3", "MMD x1e3", "{:.0f}", 1),
        ("sw_x1e3", "SW x1e3", "{:.0f}", 1), ("tv", "mode TV", "{:.3f}", 1),
        ("off_mode", "off-mode %", "{:.1f}", 100),
        ("off_mode_class", "own-class off-mode %", "{:.1f}", 100), ("shift_sum", "sum abs shift", "{:.2f}", 1),
        ("drift_sum", "sum drift x1e3", "{:.0f}", 1)]


def _cell(rows, key, fmt, scale):
    from .experiments import mean_std
    mu, sd = mean_std(r[key] for r in rows if key in r)
    if mu != mu:  # NaN: not measured here (e.g. own-class off-mode without classes)
        return ""
    return fmt.format(mu * scale) + (f" ± {fmt.format(sd * scale)}" if len(rows) > 1 else "")


def table(res, arms) -> str:
    """Markdown: the teacher's reference rows, then one row per arm (mean +- std over seeds),
    then the per-step train/inference mismatch of each arm."""
    grid = res.ref.grid
    head = ["student"] + [h for _, h, _, _ in KEYS] + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res.rows:
        if r["method"] == "teacher":
            lines.append(f"| {r['arm']} | " + " | ".join(_cell([r], k, f, s)
                                                        for k, _, f, s in KEYS) + " | |")
    for arm in arms:
        rows = [r for r in res.rows if r["arm"] == arm and r["method"] != "teacher"]
        cells = [_cell(rows, k, f, s) for k, _, f, s in KEYS]
        lines.append(f"| {rows[0]['method']} {arm} | " + " | ".join(cells)
                     + f" | {rows[0]['wall_s']:.0f} |")
    head = (["student"] + [f"shift t={t} (nats)" for t in grid]
            + [f"train-gap t={t} (SW x1e3)" for t in grid])
    step = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        rows = [r for r in res.rows if r["arm"] == arm and r["method"] != "teacher"]
        cells = ([_cell(rows, f"shift_t{t}", "{:.3f}", 1) for t in grid]
                 + [_cell(rows, f"train_gap_t{t}", "{:.0f}", 1) for t in grid])
        step.append(f"| {rows[0]['method']} {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(step)


def main(argv=None):
    torch.set_num_threads(1)  # tiny tensors: one thread is much faster on a shared CPU
    from . import experiments as tx

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for the figures and table.md")
    p.add_argument("--setting", default="guided12", help=f"one of {tuple(tx.SETTINGS)}")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default: 9 on guided12, the map cell shown by default; "
                        "other settings: their own)")
    p.add_argument("--std", type=float, default=None,
                   help="mode std of the guided12 ring (default 0.06: the map cell shown by "
                        "default; guided12's own is 0.04)")
    p.add_argument("--method", default="pd", help=f"one of {tx.METHODS}")
    p.add_argument("--reflected", action="store_true", help="clamp x0 to the data support too")
    p.add_argument("--steps", type=int, default=300, help="gradient steps per student")
    p.add_argument("--batch", type=int, default=256, help="states per step per seed")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated; trained as one ensemble")
    p.add_argument("--n-eval", type=int, default=4000, help="evaluation samples")
    p.add_argument("--hidden", type=int, default=128,
                   help="width of the student MLP (128: the regime-map cell shown by default)")
    p.add_argument("--ramp", type=float, default=0.25,
                   help="DDIL's student-selection ramp, as a fraction of the steps (0: none)")
    p.add_argument("--init-steps", type=int, default=3000,
                   help="training steps of the MLP the students start from")
    p.add_argument("--init", default=DEFAULT_INIT, choices=("pretrained", "random"),
                   help="students start from the pretrained MLP or from random weights "
                        "(seeded by each run's seed)")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds; for tests)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.batch, a.seeds, a.n_eval, a.init_steps = 5, 32, "0", 300, 100
    if a.setting == "guided12":  # the map cell shown by default
        a.guidance = DEMO_GUIDANCE if a.guidance is None else a.guidance
        a.std = DEMO_STD if a.std is None else a.std
    seeds = tuple(int(s) for s in a.seeds.split(",") if s)
    arms = ("reflected", "ddil+reflected") if a.reflected else ("baseline", "ddil")

    ramp = {"prior_schedule": "student_selection", "ramp_steps": int(a.ramp * a.steps)} \
        if a.ramp > 0 else {}
    t0 = time.perf_counter()
    if a.std is not None and a.setting != "guided12":
        raise SystemExit(f"--std applies to --setting guided12 only (got {a.setting!r})")
    if a.std is not None:  # the regime map's 12-mode, 3-class ring at another mode std
        from .backend import Toy2dBackend, ring12_cond3
        from ..validation import check_number

        check_number("std", a.std, 0.0, 1.0, lo_open=True)
        backend = Toy2dBackend(ring12_cond3(a.std), guidance=a.guidance, hidden=a.hidden,
                               init_steps=a.init_steps, student_init=a.init)
    else:
        backend = tx.make_backend(a.setting, guidance=a.guidance, init_steps=a.init_steps,
                                  hidden=a.hidden, student_init=a.init)
    res = tx.run_setting(backend, a.setting, (a.method,), arms, seeds, a.steps, a.batch,
                         n_eval=a.n_eval, train_gap=True,
                         method_kw={"dmd2": {"critic_steps": 5}},
                         sampler_kw={"buffer_size": 1024, "refresh_every": 10,
                                     "refresh_size": 256, **ramp})
    files = tx.save_figures(res, a.out, "demo")
    md = table(res, arms)
    elapsed = time.perf_counter() - t0
    w = backend.guidance
    head = (f"{a.method.upper()} 4-step students (MLP width {a.hidden}, {a.init} init) on "
            f"{backend.gmm.name}" + (f" (mode std {a.std:g})" if a.std is not None else "")
            + f"{f' under CFG w = {w:g}' if w != 1 else ''} (exact teacher), {a.steps} steps x "
            f"batch {a.batch}, seeds {list(seeds)}; reference: the 32-step teacher.")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(head + "\n\n" + md + "\n")
    print(head + "\n\n" + md)
    print("\nMMD: the unbiased MMD² estimate (x1e3; slightly negative when two sets match); MMD "
          "and SW per class, averaged over classes; own-class off-mode: samples > 4 sigma from "
          "every mode of their own class.")
    print("\nshift: covariate shift of the inference states from q_t(x | c), what forward-only "
          "training sees;\ntrain-gap: distance between the states the student trained on and the "
          "states it visits at inference.")
    print(f"figures: {', '.join(files)}\ntime: {elapsed:.0f} s")
    return res


if __name__ == "__main__":
    main()
