"""One source, two versions: ``notebooks/exercises/source/NAME.py`` (jupytext percent format)
holds each exercise with its solutions marked; ``build`` writes the student version (solutions
removed, TODOs left) and the instructor version (markers removed), each a jupytext pair
(``.py`` + ``.ipynb`` without outputs) under ``notebooks/exercises/{student,instructor}/``.

Markers, in code or markdown cells, each on its own line::

    # BEGIN SOLUTION
    ...                      the solution (kept for the instructor, removed for the student)
    # END SOLUTION

In the student version the region becomes ``# TODO: your code here`` and ``raise
NotImplementedError(...)`` at the marker's indentation, or, with ``# BEGIN SOLUTION (student:
TEXT)``, the line TEXT (e.g. ``answer = None`` or, in a markdown cell, ``# *Your answer:*``).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXERCISES_DIR = ROOT / "notebooks" / "exercises"
VERSIONS = ("student", "instructor")
BEGIN = re.compile(r"^(?P<indent>\s*)#\s*BEGIN SOLUTION(?:\s*\(student:\s*(?P<stub>.*)\))?\s*$")
END = re.compile(r"^\s*#\s*END SOLUTION\s*$")


class MarkerError(ValueError):
    """An unbalanced or nested solution marker (names the file and line)."""


def strip(text: str, version: str, name: str = "<source>") -> str:
    """The ``version`` ("student" or "instructor") of a marked source."""
    if version not in VERSIONS:
        raise ValueError(f"version={version!r} is not one of {VERSIONS}")
    out, inside = [], None
    for i, line in enumerate(text.splitlines(), 1):
        m = BEGIN.match(line)
        if m:
            if inside:
                raise MarkerError(f"{name}:{i}: BEGIN SOLUTION inside the region opened at "
                                  f"line {inside}")
            inside = i
            if version == "student":
                ind = m["indent"]
                out += [ind + m["stub"]] if m["stub"] else \
                    [f"{ind}# TODO: your code here",
                     f'{ind}raise NotImplementedError("write this part (see the TODO above)")']
            continue
        if END.match(line):
            if not inside:
                raise MarkerError(f"{name}:{i}: END SOLUTION without BEGIN SOLUTION")
            inside = None
            continue
        if not (inside and version == "student"):
            out.append(line)
    if inside:
        raise MarkerError(f"{name}:{inside}: BEGIN SOLUTION is never closed")
    return "\n".join(out) + "\n"


def sources(src_dir: Path | None = None) -> list[Path]:
    return sorted((src_dir or EXERCISES_DIR / "source").glob("ex*.py"))


def render(source: Path, version: str) -> dict[str, str]:
    """The files of one version of one exercise: {".py": text, ".ipynb": text}."""
    import jupytext

    text = strip(source.read_text(), version, str(source))
    nb = jupytext.reads(text, fmt="py:percent")
    nb.metadata.setdefault("coursework", {}).update({"exercise": source.stem,
                                                     "version": version})
    for i, cell in enumerate(nb.cells):  # stable ids: a rebuild of the same source is identical
        cell["id"] = hashlib.sha1(f"{source.stem}/{i}".encode()).hexdigest()[:8]
    return {".py": jupytext.writes(nb, fmt="py:percent"), ".ipynb": jupytext.writes(nb, "ipynb")}


def build(out_dir: Path | str | None = None, src_dir: Path | str | None = None,
          check: bool = False) -> list[str]:
    """Write both versions of every exercise under ``out_dir`` (default
    ``notebooks/exercises``). ``check=True`` writes nothing and returns the files that are
    missing or differ from what the source gives (empty: in sync). Returns the paths."""
    out_dir = Path(out_dir) if out_dir else EXERCISES_DIR
    src = sources(Path(src_dir) if src_dir else None)
    if not src:
        where = src_dir or EXERCISES_DIR / "source"
        raise FileNotFoundError(f"no exercise sources ex*.py in {where}")
    paths = []
    for source in src:
        for version in VERSIONS:
            for ext, text in render(source, version).items():
                path = out_dir / version / f"{source.stem}{ext}"
                if check:
                    if not path.exists() or path.read_text() != text:
                        paths.append(str(path))
                    continue
                os.makedirs(path.parent, exist_ok=True)
                path.write_text(text)
                paths.append(str(path))
    return paths
