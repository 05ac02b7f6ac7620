"""Coursework: graded exercises on the toy tier (``notebooks/exercises``), their checks, the
build of student and instructor versions from one marked source, and the autograder.

- ``Record`` (``record``): runs a check inside the exercise notebook, prints its verdict and
  writes the JSON record the grader reads;
- ``checks`` and ``study``: the checks, each ``-> Result(passed, points, hint)``, against the
  library's oracles;
- ``build`` and ``grade``: ``python -m ddil_lab.coursework build`` / ``grade``.

Importing this package loads neither torch nor the tiers (the grader does not need them).
"""
from .exercises import EXERCISES, max_points
from .record import Record, Result

__all__ = ["EXERCISES", "Record", "Result", "max_points"]
