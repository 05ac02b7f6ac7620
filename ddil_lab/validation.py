"""``ConfigError`` and the small checks every public entry point makes on its arguments.

The rule (docs/robust.md): a constructor of a method, the StateSampler or a schedule, ``distill``,
``progressive``, a config file and the experiment scripts check the types and ranges of their
arguments before any heavy work, and raise one error type, ``ConfigError`` (a ``ValueError``, so
``except ValueError`` keeps working), whose message names the parameter, its value and what is
allowed::

    n_steps=2.5 is not allowed; allowed: an int >= 1

A bool is never a count or a weight (``True`` is an ``int`` to Python), NaN and infinities are
never numbers here, and ints too large for a float are refused rather than overflowing later.
This module is core (it imports nothing of ours); ``ddil_lab.train.settings`` re-exports it.
"""

from __future__ import annotations

import math
import os


class ConfigError(ValueError):
    """A setting is not allowed; the message names the parameter, its value and what is."""


class MissingPath(ConfigError, FileNotFoundError):
    """A path the user gave (a folder, a file, a pipeline component) does not exist: a
    ``ConfigError`` that ``except FileNotFoundError`` catches too."""


def fail(param: str, value, allowed: str, why: str = "", cls: type = ConfigError):
    raise cls(f"{param}={value!r} is not allowed{': ' + why if why else ''}; "
              f"allowed: {allowed}")


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A finite int or float (not a bool, not NaN or inf, not an int beyond float range)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _g(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _range(kind: str, lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{_g(lo)}, {_g(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {_g(lo)}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {_g(hi)}"
    return kind


def check_int(name: str, x, lo: int | None = None, hi: int | None = None, *,
              none: bool = False, why: str = "") -> None:
    """``x`` is an int (not a bool) in [lo, hi]; ``none``: None is allowed too."""
    if none and x is None:
        return
    allowed = ("None or " if none else "") + _range("an int", lo, hi)
    if not (is_int(x) and (lo is None or x >= lo) and (hi is None or x <= hi)):
        fail(name, x, allowed, why)


def check_number(name: str, x, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False, none: bool = False,
                 why: str = "") -> None:
    """``x`` is a finite number (int or float, not a bool) in the given (half-)open range."""
    if none and x is None:
        return
    allowed = ("None or " if none else "") + _range("a finite number", lo, hi, lo_open, hi_open)
    ok = is_number(x) and (lo is None or (x > lo if lo_open else x >= lo)) and \
        (hi is None or (x < hi if hi_open else x <= hi))
    if not ok:
        fail(name, x, allowed, why)


def check_bool(name: str, x, *, none: bool = False) -> None:
    """``x`` is True or False (not 'no', not 0 / 1); ``none``: or None."""
    if not (isinstance(x, bool) or (none and x is None)):
        fail(name, x, "None, True or False" if none else "True or False")


def check_choice(name: str, x, choices) -> None:
    if not (isinstance(x, str) and x in choices):
        fail(name, x, f"one of {tuple(choices)}")


def check_callable(name: str, x, what: str, *, none: bool = False) -> None:
    if not (callable(x) or (none and x is None)):
        fail(name, f"<{type(x).__name__}>", ("None or " if none else "") + what)


def check_out_dir(name: str, path) -> None:
    """``path`` can be (or already is) a folder: a str or path, not an existing file, and not
    below one (``mkdir`` would fail deep in the run with FileExistsError / NotADirectoryError)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        fail(name, path, "a folder path (str)")
    p = os.path.abspath(os.fspath(path))
    if os.path.exists(p) and not os.path.isdir(p):
        fail(name, os.fspath(path), "a folder (or a path where one can be made)",
             "it is an existing file")
    parent = p
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail(name, os.fspath(path), "a folder (or a path where one can be made)",
             f"{parent} is a file, so no folder can be made below it")
    if not os.access(parent, os.W_OK):
        fail(name, os.fspath(path), "a folder this process can write",
             f"{parent} is not writable")


def _item(v, kind: type, text: bool):
    """``v`` as ``kind`` (int, float or str), or None if it is not one; ``text``: ``v`` comes
    from a command line's text (so "3" is an int), else it must be one already."""
    if kind is str:
        return v if isinstance(v, str) else None
    if isinstance(v, bool) or (kind is int and isinstance(v, float)):
        return None
    if isinstance(v, str):
        if not text:
            return None
        v = v.strip()
        if kind is int and not v.lstrip("+-").isdigit():
            return None
    try:
        x = kind(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if kind is int or math.isfinite(x) else None


def parse_list(name: str, value, kind: type = str, choices=None, min_len: int = 1) -> tuple:
    """A list option: "a,b" (a command line's text) or a list / tuple, each item converted to
    ``kind`` (int, float or str) and, with ``choices``, one of them; at least ``min_len``
    items. Raises ``ConfigError`` naming ``name``, the value and what is allowed."""
    what = {int: "ints", float: "finite numbers", str: "names"}[kind]
    allowed = (f"a comma-separated list of {min_len} or more {what}"
               + (f" from {tuple(choices)}" if choices is not None else ""))
    shown = list(value) if isinstance(value, tuple) else value
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        fail(name, shown, allowed)
    out = []
    for v in items:
        x = _item(v, kind, isinstance(value, str))
        if x is None:
            fail(name, shown, allowed, f"{v!r} is not " + {int: "an int", float: "a finite "
                                                                   "number", str: "a name"}[kind])
        if choices is not None and x not in choices:
            fail(name, shown, allowed, f"{x!r} is not one of {tuple(choices)}")
        out.append(x)
    if len(out) < min_len:
        fail(name, shown, allowed, f"it holds {len(out)}")
    return tuple(out)


def parse_seeds(name: str, value, min_count: int = 1, why: str = "") -> tuple:
    """Seeds: "0,1,2" or a list of distinct ints >= 0, at least ``min_count`` of them (2 where
    per-seed intervals or paired differences are computed: ``why`` says so)."""
    allowed = (f"{min_count} or more distinct ints >= 0, e.g. "
               + ",".join(map(str, range(max(2, min_count)))))
    shown = list(value) if isinstance(value, tuple) else value
    if not isinstance(value, (str, list, tuple)):
        fail(name, shown, allowed)
    seeds = tuple(_item(v, int, isinstance(value, str)) for v in (value.split(",") if isinstance(value, str) else value)
                  if not (isinstance(v, str) and not v.strip()))
    if any(s is None for s in seeds):
        fail(name, shown, allowed, "not every seed is an int")
    if any(s < 0 for s in seeds):
        fail(name, shown, allowed, "a seed is negative")
    if len(set(seeds)) != len(seeds):
        fail(name, shown, allowed, "a seed is repeated, so its runs would be copies")
    if len(seeds) < min_count:
        fail(name, shown, allowed, f"it holds {len(seeds)} seed(s)" + (f"; {why}" if why else ""))
    return seeds


def check_device(name: str, device) -> None:
    """A torch device this machine has: 'cuda' without a visible CUDA device is refused at once
    (one line naming the option), not by torch after the models are loaded."""
    import torch

    allowed = "'cpu', or 'cuda' / 'cuda:N' on a machine where torch sees a CUDA device"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        fail(name, device, allowed, "not a torch device")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail(name, str(device), allowed, "no CUDA device is visible to torch here "
                 "(torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(name, str(device), allowed, f"only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps", "meta"):
        fail(name, str(device), allowed, f"device type {dev.type!r} is not supported here")


def cli_exit(main, prog: str, argv=None) -> int:
    """Run a script's ``main(argv)``; a ``ConfigError`` becomes one line on stderr and exit
    status 2 (like argparse's own errors), not a traceback."""
    import sys

    try:
        main(argv)
    except ConfigError as e:
        print(f"{prog}: configuration error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["ConfigError", "MissingPath", "check_bool", "check_callable", "check_choice",
           "check_device", "check_int", "check_number", "check_out_dir", "cli_exit", "fail",
           "is_int", "is_number", "parse_list", "parse_seeds"]
