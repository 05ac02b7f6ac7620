"""Run tracking: TensorBoard (default) or Weights & Biases, as a ``distill`` callback.

    tracker = Tracker("runs/x/tensorboard")               # or log_with="wandb" / "none"
    distill(..., callbacks=[tracker], eval_every=50)      # every 50 steps: the new history
    tracker.log_images("samples", images, step)           # sample grids, (B, 3, H, W) in [0, 1]
    tracker.log_scalars({"eval/fid": 12.3}, step)         # evaluation metrics
    tracker.close()

``Tracker(step, result)`` writes every numeric entry of the history records the loop logged
since its last call (``result.history``: the loss per optimizer group and per state source
``source/<name>``, the learning rate, gradient norms, teacher / student NFE, a method's own
terms such as ``student/...``), at the record's step plus ``offset`` (the steps of earlier
stages of a multi-stage run). Only process 0 writes (``enabled``). Knows no tier.
"""

from __future__ import annotations

import math
import os

LOG_WITH = ("tensorboard", "wandb", "none")


def check_log_with(log_with) -> None:
    """Raise ValueError unless ``log_with`` is allowed and its package is installed."""
    if log_with not in LOG_WITH:
        raise ValueError(f"log_with={log_with!r} is not allowed; allowed: one of {LOG_WITH}")
    need = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
    if log_with in need:
        import importlib.util

        module, package = need[log_with]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"log_with={log_with!r} needs the {package!r} package, which is "
                             f"not installed: pip install {package} (or log_with='none')")


def _scalars(record: dict) -> dict:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


class Tracker:
    """Writes training records, images and metrics to TensorBoard or wandb.

    :param log_dir: the run's tracking folder (TensorBoard event files; wandb's ``dir``).
    :param log_with: "tensorboard", "wandb" (needs ``wandb``; ``project`` / ``run_name``) or
        "none" (a tracker that writes nothing).
    :param config: the run's settings, recorded once (wandb config; TensorBoard text).
    :param enabled: False on processes other than 0.
    """

    def __init__(self, log_dir: str | os.PathLike, log_with: str = "tensorboard",
                 config: dict | None = None, project: str = "ddil", run_name: str | None = None,
                 enabled: bool = True):
        check_log_with(log_with)
        self.log_dir, self.log_with = os.fspath(log_dir), log_with
        self.enabled = enabled and log_with != "none"
        self.offset, self.stage = 0, None
        self._last = 0  # the last step of the current stage already written
        self._writer = self._run = None
        if not self.enabled:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        if log_with == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir)
            if config:
                import json

                self._writer.add_text("config", "```\n" + json.dumps(config, indent=1,
                                                                     default=str) + "\n```")
        else:
            import wandb

            self._run = wandb.init(project=project, name=run_name, dir=self.log_dir,
                                   config=config or {}, reinit=True)

    def start_stage(self, name: str | None, offset: int):
        """A new stage: its records' steps start after ``offset`` earlier steps."""
        self.stage, self.offset, self._last = name, offset, 0

    # ---- the distill callback ----
    def __call__(self, step: int, result) -> None:
        self.write_history(result.history)

    def write_history(self, history: list[dict]) -> None:
        """Write the records of ``history`` not written yet (steps after the last written)."""
        if not self.enabled:
            return
        for rec in history:
            s = int(rec.get("step", 0))
            if s <= self._last:
                continue
            self.log_scalars(_scalars(rec), self.offset + s)
            self._last = s
        self.flush()

    # ---- anything else ----
    def log_scalars(self, values: dict, step: int) -> None:
        if not self.enabled:
            return
        values = _scalars(values)
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)
        elif values:
            self._run.log(values, step=step)

    def log_images(self, name: str, images, step: int) -> None:
        """Images (B, 3, H, W) or one grid (3, H, W), floats in [0, 1]."""
        if not self.enabled:
            return
        imgs = images.detach().float().clamp(0, 1).cpu()
        if self._writer is not None:
            if imgs.ndim == 4:
                self._writer.add_images(name, imgs, step)
            else:
                self._writer.add_image(name, imgs, step)
        else:
            import wandb

            batch = imgs if imgs.ndim == 4 else imgs[None]
            self._run.log({name: [wandb.Image(im.permute(1, 2, 0).numpy()) for im in batch]},
                          step=step)

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._run is not None:
            self._run.finish()
            self._run = None


def event_files(log_dir: str | os.PathLike) -> list[str]:
    """The TensorBoard event files under ``log_dir``."""
    out = []
    for root, _, files in os.walk(os.fspath(log_dir)):
        out += [os.path.join(root, f) for f in files if f.startswith("events.out.tfevents")]
    return sorted(out)


def read_scalars(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series written under ``log_dir``: {tag: [(step, value), ...]} (tests,
    notebooks)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list] = {}
    for f in event_files(log_dir):
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


__all__ = ["LOG_WITH", "Tracker", "check_log_with", "event_files", "read_scalars"]
