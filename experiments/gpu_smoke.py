"""GPU smoke check of the full tier's CUDA paths (tiny random SD1.5 / SDXL-shaped pipelines).

    python experiments/gpu_smoke.py --out runs/gpu_smoke            # needs a CUDA device

For each pipeline shape, precision ("no" = fp32, "bf16") and method (PD, LCM, DMD2; each with
and without DDIL, reflected on the DDIL arm), runs a few ``distill`` steps on the GPU and
records seconds per step, peak GPU memory, whether the loss is finite and whether the student
moved; then exports the last student and samples it from the reloaded pipeline on the GPU.
Writes ``gpu_smoke.json`` and prints a table. Tiny models: this checks the code paths, not the
speed of real checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _moved(a, b) -> float:
    return max((p - q.to(p.device)).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def main(argv=None):
    from ddil_lab.sd.backend import SDBackend
    from ddil_lab.sd.tiny import make_tiny_pipeline
    from ddil_lab.methods import DMD2, LCM, PD
    from ddil_lab.sd.export import export_pipeline, load_student_pipeline
    from ddil_lab.rollout import StateSampler
    from ddil_lab.train import distill

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/gpu_smoke")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=7)
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run)")
    a = p.parse_args(argv)
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_smoke needs a CUDA device (or --device cpu for a dry run)")
    cuda = dev == "cuda"
    os.makedirs(a.out, exist_ok=True)
    prompts = ["a red cube", "a blue sphere", "a cat on a mat", "two green trees"]
    rows = []
    for kind in ("sd15", "sdxl"):
        folder = make_tiny_pipeline(os.path.join(a.out, f"tiny_{kind}"), kind)
        for precision in ("no", "bf16"):
            be = SDBackend(folder, prompts=prompts, guidance=(2.0, 8.0), mixed_precision=precision,
                           gradient_checkpointing=True, device=dev)
            for name in ("pd", "lcm", "dmd2"):
                for ddil in (False, True):
                    m = {"pd": lambda: PD(n_steps=4, substeps=2, reflected=ddil),
                         "lcm": lambda: LCM(n_steps=4, reflected=ddil),
                         "dmd2": lambda: DMD2(n_steps=4, critic_steps=10, reflected=ddil)}[name]()
                    sampler = (StateSampler(beta_frwd=0.0, beta_teacher_bckwrd=0.5, beta_mixed=0.5)
                               if ddil else StateSampler(beta_frwd=0.0, beta_teacher_bckwrd=1.0))
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                        torch.cuda.synchronize()
                    t0 = time.time()
                    res = distill(be, m, sampler, steps=a.steps, batch_size=a.batch, lr=1e-4,
                                  progress=False, seed=0)
                    if cuda:
                        torch.cuda.synchronize()
                    student = m.student.denoiser if name == "lcm" else m.student
                    rows.append({"shape": kind, "precision": precision, "method": name,
                                 "ddil": ddil, "s_per_step": (time.time() - t0) / a.steps,
                                 "peak_mem_MiB": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                                 "loss_finite": all(torch.isfinite(torch.tensor(v)).item()
                                                    for v in res.losses("loss/student")),
                                 "moved": _moved(student, be.make_student())})
                    print(rows[-1], flush=True)
            out = export_pipeline(be, res, os.path.join(a.out, f"export_{kind}_{precision}"))
            pipe, kw = load_student_pipeline(out)
            pipe.to(dev)
            img = pipe(prompts[:2], output_type="pt", generator=torch.Generator(dev).manual_seed(0),
                       **kw).images
            rows.append({"shape": kind, "precision": precision, "export_sample_shape": list(img.shape),
                         "export_finite": bool(torch.isfinite(img).all())})
            print(rows[-1], flush=True)
    with open(os.path.join(a.out, "gpu_smoke.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
