"""How checks report: inside the executed notebook, each check's result is printed for the
student and appended to a JSON record at the path the grader passes as the papermill parameter
``record``; the grader reads it back after the run.

Numbers the grader must reproduce (``Record.numbers``) are also printed on one marked line, so
that the grader finds them in the outputs of the notebook *as submitted* and compares them with
its own re-run.
"""
from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from typing import NamedTuple

from .exercises import EXERCISES, points_of

NUMBERS_MARK = "[coursework numbers]"


class Result(NamedTuple):
    """What every check returns: passed, the points earned, and a hint (empty when passed)."""
    passed: bool
    points: float
    hint: str


class Record:
    """The results of one exercise's checks. ``path``: where to write the JSON record ("" or
    None: only print)."""

    def __init__(self, exercise: str, path: str | None = None):
        if exercise not in EXERCISES:
            raise ValueError(f"exercise={exercise!r} is not one of {tuple(EXERCISES)}")
        self.exercise, self.path = exercise, path or None
        self.checks: dict[str, dict] = {}
        self.extra: dict = {}
        self.save()  # an empty record: the grader can tell "ran, no check reached" from "never ran"

    def check(self, name: str, fn: Callable[..., Result], *args, **kw) -> Result:
        """Run check ``fn(*args, **kw)``, print its verdict, record it and return it. A check
        that fails internally is recorded as failed with a note (never a traceback)."""
        max_pts = points_of(self.exercise, name)
        try:
            res = Result(*fn(*args, **kw))
        except Exception as e:  # a bug in the check itself: say so, do not blame the student
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            res = Result(False, 0, f"the check itself failed ({tb}); tell your instructor")
        res = Result(bool(res.passed), min(float(res.points), max_pts), res.hint)
        mark = "PASS" if res.passed else "FAIL"
        line = f"[{mark}] {name}: {res.points:g}/{max_pts} points"
        print(line + ("" if res.passed else f"\n       hint: {res.hint}"))
        self.checks[name] = {"passed": res.passed, "points": res.points, "max_points": max_pts,
                             "hint": res.hint}
        self.save()
        return res

    def numbers(self, key: str, values: dict) -> None:
        """Record numbers the grader re-derives (rounded floats), and print them marked."""
        values = {k: round(float(v), 6) for k, v in values.items()}
        self.extra[key] = values
        print(f"{NUMBERS_MARK} {json.dumps({key: values}, sort_keys=True)}")
        self.save()

    def summary(self) -> str:
        got = sum(c["points"] for c in self.checks.values())
        total = sum(points_of(self.exercise, n) for n in EXERCISES[self.exercise]["checks"]
                    if n not in EXERCISES[self.exercise].get("grader_checks", ()))
        return f"{self.exercise}: {got:g}/{total} points from the checks run in this notebook"

    def save(self) -> None:
        if not self.path:
            return
        data = {"exercise": self.exercise, "checks": self.checks, "extra": self.extra}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)


def read_numbers(outputs_text: str) -> dict:
    """The marked numbers printed in a notebook's outputs (the last line per key wins)."""
    found = {}
    for line in outputs_text.splitlines():
        if line.startswith(NUMBERS_MARK):
            try:
                found.update(json.loads(line[len(NUMBERS_MARK):]))
            except json.JSONDecodeError:
                continue
    return found
