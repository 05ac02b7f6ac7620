"""Full-tier speed and memory benchmark (not a timed test): seconds per training step and peak
memory of PD, LCM and DMD2, each with and without DDIL, on full-size random SD1.5 / SSD-1B, next
to the bound: the same network calls timed in a bare loop.

    python experiments/bench_full.py --device cuda --out runs/bench_full     # GPU: SD1.5 at 512
        # px and SSD-1B at 1024 px, bf16 frozen parts, gradient checkpointing, full students
    python experiments/bench_full.py --device cpu --shapes sd15 --resolution 64 --steps 1
        # CPU: the same table at a tiny resolution (--shapes tiny-sd15 for the tiny pipeline)

Per arm: ``distill`` runs ``warmup + steps`` steps at the recipe's per-GPU batch (PD 28, LCM 60,
DMD2 7 by default; ``--batch``) and the mean time of the timed steps is reported (DDIL arms:
the buffers are filled at the start of the first warmup step, ``StateSampler.fill``, timed
apart as ``fill_s``; the timed steps hold one refresh per ``--refresh`` steps), with peak
memory (CUDA: ``max_memory_allocated``; CPU: peak RSS of the process), next to the memory
planner's prediction (``ddil_lab.sd.plan_memory``; on CPU it leaves out the process itself and
the full attention matrices CPU attention keeps). The UNet calls of the last step are
recorded (which network, batch, with or without gradient); the *bound* replays exactly those
calls on random inputs in a bare loop, with a backward through each call that had gradient
enabled and one AdamW step per trained network: the network work a step cannot avoid.
The data's latents come from a latent cache (``--no-latent-cache``: the VAE encodes every
batch, work outside the bound; on a CPU in bf16 it costs more than a UNet call).
Targets: step <= 1.15 x bound; DDIL (aggregation buffer on) <= 1.3 x its baseline at equal
batch. DDIL arms: PD mixed rollouts, LCM student rollouts, DMD2 student + mixed rollouts down
to t = 500, each with a buffer (``--buffer``, refreshed every ``--refresh`` steps).

Writes ``bench_full.json`` (rows, device, torch, settings) under ``--out`` and prints a table.
Random weights: speeds and memory are those of the real architectures; losses mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

DEFAULTS = {"sd15": 512, "ssd1b": 1024, "sdxl": 1024}
BATCH = {"pd": 28, "lcm": 60, "dmd2": 7}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or this process's RSS sampled at 50 Hz."""

    def __init__(self, dev):
        self.dev, self.peak, self._stop = dev, 0, None

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            proc, self._stop = psutil.Process(), threading.Event()
            self.peak = proc.memory_info().rss

            def watch():
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(0.02)
            self._thread = threading.Thread(target=watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


class CallLog:
    """Records every UNet call (which network, batch, grad enabled) through forward pre-hooks."""

    def __init__(self):
        self.calls, self.handles, self.on = [], [], False

    def watch(self, name, unet):
        def hook(module, args, kwargs):
            if self.on:
                x = args[0] if args else kwargs["sample"]
                self.calls.append((name, x.shape[0], torch.is_grad_enabled()))
        self.handles.append(unet.register_forward_pre_hook(hook, with_kwargs=True))

    def close(self):
        for h in self.handles:
            h.remove()


def make_method(name, ddil, n_steps):
    from ddil_lab.methods import DMD2, LCM, PD

    return {"pd": lambda: PD(n_steps=n_steps, substeps=2, reflected=ddil),
            "lcm": lambda: LCM(n_steps=n_steps, reflected=ddil),
            "dmd2": lambda: DMD2(n_steps=n_steps, critic_steps=10, reflected=ddil)}[name]()


def make_sampler(name, ddil, buffer, refresh):
    from ddil_lab.rollout import StateSampler

    if not ddil:
        return StateSampler(beta_frwd=0.0, beta_student_bckwrd=1.0) if name == "dmd2" else None
    buf = dict(buffer_size=buffer, refresh_every=refresh, refresh_size=max(1, buffer // refresh))
    if name == "pd":
        return StateSampler(beta_frwd=0.5, beta_mixed=0.5, **buf)
    if name == "lcm":
        return StateSampler(beta_frwd=0.5, beta_student_bckwrd=0.5, **buf)
    return StateSampler(beta_frwd=0.0, beta_student_bckwrd=0.5, beta_mixed=0.5,
                        rollout_until=500, **buf)


def bare_loop(backend, nets: dict, calls: list, trained: list, repeats: int, dev) -> float:
    """Seconds per step of the recorded UNet calls alone (random inputs; backward where the call
    had gradient; one AdamW step per trained network)."""
    from ddil_lab.sd.backend import UNetNet

    opts = [torch.optim.AdamW([p for p in nets[n].parameters() if p.requires_grad], lr=1e-6)
            for n in trained if n in nets]
    C, h, w = backend.shape
    conds, t_all = {}, []
    for _, b, _ in calls:
        if b not in conds:
            conds[b] = backend.sample_cond(b)
    run = {n: UNetNet(m, backend._autocast() if n != "teacher" else None) for n, m in nets.items()}
    times = []
    for r in range(repeats + 1):
        _sync(dev)
        t0 = time.perf_counter()
        for name, b, grad in calls:
            x = torch.randn(b, C, h, w, device=dev)
            t = torch.randint(0, 1000, (b,), device=dev)
            with torch.set_grad_enabled(grad):
                out = run[name](x, t, conds[b])
                if grad:
                    out.float().square().mean().backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        _sync(dev)
        t_all.append(time.perf_counter() - t0)
        if r:  # the first pass warms up
            times.append(t_all[-1])
    return sum(times) / len(times)


def bench_arm(backend, name, ddil, a, dev):
    from ddil_lab.sd.backend import unet_of
    from ddil_lab.train import distill

    method = make_method(name, ddil, a.n_steps)
    sampler = make_sampler(name, ddil, a.buffer, a.refresh)
    log, stamps, fill_s = CallLog(), [], [0.0]
    if sampler is not None and sampler.buffer_size:  # the one-off buffer fill: before step 0
        draw = sampler.sample

        def sample(backend_, spec, student, n, step=0, plan=None):
            if not sampler.buffer:
                _sync(dev)
                t = time.perf_counter()
                sampler.fill(backend_, spec, student, step, plan)
                _sync(dev)
                fill_s[0] = time.perf_counter() - t
            return draw(backend_, spec, student, n, step, plan)
        sampler.sample = sample

    total = a.warmup + a.steps
    log.on = total == 1  # record the UNet calls of the last step only

    def tick(step, result):  # eval_every=1: a time stamp after every step
        _sync(dev)
        stamps.append(time.perf_counter())
        log.on = step == total - 1

    log.watch("teacher", backend.pipe.unet)
    orig_setup = method.setup

    def setup(be):  # watch the student / critic / target UNets as soon as they exist
        orig_setup(be)
        for key, mod in method.modules().items():
            try:
                log.watch(key, unet_of(mod))
            except ValueError:
                pass
    method.setup = setup
    batch = a.batch or BATCH[name]
    _sync(dev)
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        res = distill(backend, method, sampler, steps=a.warmup + a.steps, batch_size=batch,
                      lr=1e-6, progress=False, callbacks=[tick], eval_every=1, seed=0)
    log.close()
    step_s = [b - a_ for a_, b in zip([t0] + stamps, stamps)][a.warmup:]  # fill: step 0
    nets = {}
    for key, mod in method.modules().items():
        try:
            nets[key] = unet_of(mod)
        except ValueError:
            pass
    nets["teacher"] = backend.pipe.unet
    trained = list(method.trainable())
    bound = bare_loop(backend, nets, list(log.calls), trained, a.bound_repeats, dev)
    calls = {}
    for n, _, g in log.calls:
        calls[f"{n}{'+bwd' if g else ''}"] = calls.get(f"{n}{'+bwd' if g else ''}", 0) + 1
    row = {"method": name, "ddil": ddil, "batch": batch, "s_per_step": sum(step_s) / len(step_s),
           "bound_s": bound, "fill_s": fill_s[0], "peak_GiB": mem.peak / 2 ** 30,
           "calls": calls,
           "loss_finite": bool(torch.isfinite(torch.tensor(res.losses("loss/student"))).all())}
    row["x_bound"] = row["s_per_step"] / bound
    from ddil_lab.sd.memory import plan_memory

    plan = plan_memory(a.shape, name, batch, backend.size, a.precision, True, a.lora_rank,
                       w_embed=backend.w_embed, cuda=dev.type == "cuda",
                       teacher_copy=False)  # PD here distils the backend's teacher
    row["plan_GiB"] = plan.total / 2 ** 30  # the planner's prediction of peak_GiB
    del method, res
    return row


def check_args(a) -> None:
    """Every option, before any pipeline is written or loaded (``ConfigError`` naming it)."""
    from ddil_lab.sd.random_pipeline import SHAPES
    from ddil_lab.sd.tiny import KINDS
    from ddil_lab.train import METHODS
    from ddil_lab.validation import check_device, check_int, check_out_dir, fail, parse_list

    check_device("--device", a.device)
    parse_list("--shapes", a.shapes, str, SHAPES + tuple(f"tiny-{k}" for k in KINDS))
    parse_list("--methods", a.methods, str, METHODS)
    for flag, lo in (("resolution", 0), ("batch", 0), ("steps", 1), ("warmup", 0),
                     ("bound_repeats", 1), ("n_steps", 1), ("lora_rank", 0), ("buffer", 1),
                     ("refresh", 1)):
        check_int("--" + flag.replace("_", "-"), getattr(a, flag), lo)
    if a.resolution % 8:
        fail("--resolution", a.resolution, "0 (the UNet's native size) or a multiple of 8",
             "the VAE downsamples images by 8")
    check_out_dir("--out", a.out)
    check_out_dir("--models", a.models)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="sd15,ssd1b", help="sd15, ssd1b, sdxl, tiny-sd15, ...")
    p.add_argument("--methods", default="pd,lcm,dmd2")
    p.add_argument("--resolution", type=int, default=0, help="0: 512 (SD1.5) / 1024 (SDXL)")
    p.add_argument("--batch", type=int, default=0, help="per step (0: the recipe's per GPU)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per arm (a multiple of "
                   "--refresh: the timed steps then hold their share of buffer refreshes)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bound-repeats", type=int, default=2)
    p.add_argument("--n-steps", type=int, default=4, help="the student's steps")
    p.add_argument("--precision", default="bf16", choices=("no", "bf16", "fp16"))
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--buffer", type=int, default=64, help="DDIL aggregation buffer (states)")
    p.add_argument("--refresh", type=int, default=8, help="refresh the buffer every k steps")
    p.add_argument("--no-latent-cache", action="store_true",
                   help="encode every batch's images with the VAE (outside the bound) instead "
                        "of reading the dataset's latents from a cache, as a run with "
                        "latent_cache does")
    p.add_argument("--models", default="runs/bench_full/models",
                   help="where the random pipelines are written (reused)")
    p.add_argument("--out", default="runs/bench_full")
    a = p.parse_args(argv)
    check_args(a)  # before anything is loaded
    dev = torch.device(a.device)
    from ddil_lab.sd.backend import SDBackend
    from ddil_lab.sd.data import make_imagefolder
    from ddil_lab.sd.random_pipeline import make_random_pipeline
    from ddil_lab.sd.tiny import make_tiny_pipeline

    os.makedirs(a.out, exist_ok=True)
    rows = []
    for shape in a.shapes.split(","):
        folder = os.path.join(a.models, shape)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            if shape.startswith("tiny-"):
                make_tiny_pipeline(folder, shape[5:])
            else:  # fp32 on disk: full students start from fp32 weights
                make_random_pipeline(folder, shape, dtype="fp32")
        res = a.resolution or DEFAULTS.get(shape, 0) or None
        data = os.path.join(a.models, "data")  # random images: forward states need data
        if not os.path.isfile(os.path.join(data, "metadata.jsonl")):
            g = torch.Generator().manual_seed(0)
            make_imagefolder(data, torch.rand(16, 3, 64, 64, generator=g) * 2 - 1,
                             [f"random image {i}" for i in range(16)])
        cache = None if a.no_latent_cache else os.path.join(a.models, f"latents_{shape}.safetensors")
        be = SDBackend(folder, data=data,
                       guidance=(2.0, 8.0), mixed_precision=a.precision,
                       gradient_checkpointing=True, lora_rank=a.lora_rank, resolution=res,
                       device=dev, latent_cache=cache)
        a.shape = shape
        for name in a.methods.split(","):
            for ddil in (False, True):
                row = {"shape": shape, "resolution": be.resolution,
                       **bench_arm(be, name, ddil, a, dev)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        del be
    for r in rows:
        base = next(b for b in rows if b["shape"] == r["shape"] and b["method"] == r["method"]
                    and not b["ddil"])
        r["x_baseline"] = r["s_per_step"] / base["s_per_step"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    info = {"device": name, "torch": torch.__version__, "settings": vars(a), "rows": rows,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    with open(os.path.join(a.out, "bench_full.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"\n{name}, {a.precision}, gradient checkpointing, "
          + (f"LoRA rank {a.lora_rank}" if a.lora_rank else "full students")
          + f", {a.steps} timed steps after {a.warmup}")
    print(f"{'shape':<10}{'px':>6} {'method':<10}{'batch':>6}{'s/step':>10}{'bound s':>10}"
          f"{'x bound':>9}{'x base':>8}{'fill s':>8}{'peak GiB':>10}{'plan GiB':>10}"
          f"  calls of the last step")
    for r in rows:
        arm = r["method"] + ("+ddil" if r["ddil"] else "")
        px = r["resolution"] if isinstance(r["resolution"], int) else \
            "x".join(map(str, r["resolution"]))
        print(f"{r['shape']:<10}{px:>6} {arm:<10}{r['batch']:>6}{r['s_per_step']:>10.3f}"
              f"{r['bound_s']:>10.3f}{r['x_bound']:>9.2f}{r['x_baseline']:>8.2f}"
              f"{r['fill_s']:>8.1f}"
              f"{r['peak_GiB']:>10.2f}{r['plan_GiB']:>10.2f}  {r['calls']}")
    print("targets: x bound <= 1.15; DDIL x base <= 1.3")
    return info


if __name__ == "__main__":
    from ddil_lab.validation import cli_exit

    raise SystemExit(cli_exit(main, "bench_full"))
