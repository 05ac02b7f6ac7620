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


def fail(param: str, value, allowed: str, why: str = ""):
    raise ConfigError(f"{param}={value!r} is not allowed{': ' + why if why else ''}; "
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


__all__ = ["ConfigError", "check_bool", "check_callable", "check_choice", "check_int",
           "check_number", "check_out_dir", "fail", "is_int", "is_number"]
