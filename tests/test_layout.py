"""The layout's rules, checked by walking every import with ``ast`` (see shared/DESIGN.md):

- the core (top-level modules and ``methods/``) imports neither ``train/`` nor a tier;
- ``train/`` imports no tier; a tier (``toy/``, ``image/``, ``sd/``) imports no other tier;
  only the package ``__init__`` and ``config.py`` sit above the tiers;
- notebooks and ``experiments/`` use only public names, and every name they import exists;
- no module is over 600 lines.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ddil_lab"
TIERS = ("toy", "image", "sd")
ABOVE = ("ddil_lab", "ddil_lab.config", "ddil_lab.evaluate")  # may import anything
ABOVE_PACKAGES = ("ddil_lab.coursework",)  # graded exercises on the tiers: above them too
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) of every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    mod = module_name(path) if path.is_relative_to(PKG) else ""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append((target, [a.name for a in node.names], node.lineno))
    return out


def layer(mod: str) -> str:
    """'above', 'core', 'train' or the tier's name."""
    if mod in ABOVE or mod.startswith(tuple(p + "." for p in ABOVE_PACKAGES)) \
            or mod in ABOVE_PACKAGES:
        return "above"
    part = mod.split(".")[1] if mod.count(".") >= 1 else ""
    if part == "train":
        return "train"
    return part if part in TIERS else "core"


ALLOWED = {"core": {"core"}, "train": {"core", "train"},
           **{t: {"core", "train", t} for t in TIERS}}


def targets(target: str, names: list[str]) -> list[str]:
    """The ddil_lab modules an import reaches: ``from ddil_lab import toy`` reaches
    ``ddil_lab.toy``, ``from ddil_lab.toy import make_backend`` reaches ``ddil_lab.toy``."""
    if target == "ddil_lab":
        return [f"ddil_lab.{n}" for n in names] or ["ddil_lab"]
    return [target]


PACKAGE_FILES = sorted(PKG.rglob("*.py"))


def test_the_tree_has_the_layout():
    for sub in ("methods", "train", "toy", "image", "sd", "toy/lessons"):
        assert (PKG / sub / "__init__.py").is_file(), sub
    for gone in ("backends", "distill", "recipes.py", "teach.py", "toy_experiments.py",
                 "export.py", "data_t2i.py"):
        assert not (PKG / gone).exists(), f"ddil_lab/{gone} should be gone"


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path):
    mod = module_name(path)
    src = layer(mod)
    if src == "above":
        return
    bad = []
    for target, names, line in imports(path):
        if not target.startswith("ddil_lab"):
            continue
        if importlib.util.find_spec(target) is None:
            bad.append(f"line {line}: {mod} imports {target}, which does not exist")
            continue
        for t in targets(target, names):
            dst = layer(t)
            if dst == "above" and t == "ddil_lab" and names and not any(
                    n in {"toy", "image", "sd", "config"} for n in names):
                dst = "core"  # the package's own helpers (e.g. __version__)
            if dst not in ALLOWED[src]:
                bad.append(f"line {line}: {mod} ({src}) imports {t} ({dst})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_600_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (split it by topic)"


USER_FILES = sorted([*(ROOT / "experiments").glob("*.py"), *(ROOT / "notebooks").glob("*.py")])


@pytest.mark.parametrize("path", USER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebooks_and_experiments_use_public_names_that_exist(path):
    bad = []
    aliases = set()
    for target, names, line in imports(path):
        if not target.startswith("ddil_lab"):
            continue
        if any(p.startswith("_") for p in target.split(".")) or \
                any(n.startswith("_") for n in names):
            bad.append(f"line {line}: private name in 'from {target} import {names}'")
            continue
        module = importlib.import_module(target)
        for n in names:
            if not hasattr(module, n) and importlib.util.find_spec(f"{target}.{n}") is None:
                bad.append(f"line {line}: {target} has no name {n!r}")
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # the names bound by ddil_lab imports, aliases included
        if isinstance(node, (ast.Import, ast.ImportFrom)) and "ddil_lab" in ast.unparse(node):
            aliases.update((a.asname or a.name).split(".")[0] for a in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases and node.attr.startswith("_"):
            bad.append(f"line {node.lineno}: private attribute {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_the_package_exports_the_public_api_lazily():
    import subprocess
    import sys
    code = ("import sys, ddil_lab; assert 'torch' not in sys.modules; "
            "from ddil_lab import PD, LCM, DMD2, StateSampler, Schedule, timesteps, distill, "
            "progressive, Toy2dBackend, make_mixture; "
            "assert 'diffusers' not in sys.modules, 'a toy import loaded diffusers'; "
            "import ddil_lab.methods, ddil_lab.train; "
            "assert callable(ddil_lab.distill) and ddil_lab.methods.PD is PD")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
