"""Stopping ``distill`` on SIGINT (Ctrl-C) or SIGTERM without losing work: while a run
checkpoints (``out_dir`` with ``ckpt_every`` or ``resume``), the signal only sets a flag; the
loop finishes the current step, writes a checkpoint at it (the same atomic save as the periodic
ones) and raises ``Interrupted`` (a ``KeyboardInterrupt``). A second signal stops at once. The
previous handlers come back when the loop ends. With several processes the flag is combined
across them every step, so they all stop (and save) at the same step."""

from __future__ import annotations

import signal
import sys
import threading

import torch


class Interrupted(KeyboardInterrupt):
    """``distill`` was stopped by SIGINT (Ctrl-C) or SIGTERM; ``.checkpoint`` is the checkpoint
    written at the step it stopped at (``.step``), from which ``resume=True`` continues."""

    def __init__(self, msg: str, step: int, checkpoint: str | None, signum: int):
        super().__init__(msg)
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


class StopSignals:
    """While active, SIGINT and SIGTERM only set ``.signum`` (the loop checkpoints at the end of
    the current step and stops); a second signal stops at once, as before. The previous
    handlers come back on exit. Only the main thread can install handlers; elsewhere this does
    nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, wanted: bool):
        self.wanted = wanted  # the same on every process
        self.enabled = wanted and threading.current_thread() is threading.main_thread()
        self.signum, self.old = 0, {}

    def _handle(self, signum, frame):
        if self.signum:  # the second one: stop now, without waiting for the step to end
            self.__exit__()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopped at once, "
                                    "without a checkpoint of this step")
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: writing a checkpoint at the end of this step, "
              "then stopping (send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if self.enabled:
            self.old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}
        return False


def signalled(stop: StopSignals, procs) -> bool:
    """Whether a stop signal arrived, on any process (they stop at the same step)."""
    if not stop.wanted or procs.world == 1:
        return bool(stop.signum)
    flag = torch.tensor([stop.signum], device=procs.device)
    stop.signum = int(procs.all_reduce(flag, "max").item())
    return bool(stop.signum)


__all__ = ["Interrupted", "StopSignals", "signalled"]
