"""Lazy re-exports for package ``__init__`` files: a name is imported from its module the first
time it is used, so ``import ddil_lab`` (or ``ddil_lab.sd``) stays fast and a toy run never
imports diffusers."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package`` that resolve ``name`` as
    ``importlib.import_module(exports[name], package).name`` on first use; an entry whose name
    is the module itself (``"toy": ".toy"``) returns the module."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name], package)
        return module if exports[name].rsplit(".", 1)[-1] == name else getattr(module, name)

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__
