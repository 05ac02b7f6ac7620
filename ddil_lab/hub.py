"""Fail fast, with a clear message, when weights or data must be downloaded and cannot be.

Every loader that may reach a hub (diffusers/transformers ``from_pretrained`` of a hub id,
torchvision / LPIPS / Inception / open_clip weights, CIFAR-10) checks first with
``require_download(what, host)``: if the files are not cached and the host is unreachable
(or ``HF_HUB_OFFLINE=1``), it raises ``OfflineError`` within seconds instead of hanging in
retries.

Pipeline folders are checked here too, for every tier (``check_pipeline_folder``): a folder
without ``model_index.json`` or without a component it lists names what is missing, and a
component whose weights are only pickles (``.bin``) is refused unless the caller opts in
(``allow_pickle``; unpickling runs code). ``missing_model`` says what a name that is neither
a folder nor a cached hub id is: a missing folder first, and a hub id only if it has the hub's
``owner/name`` form.
"""

from __future__ import annotations

import json
import os
import re
import socket

from .validation import MissingPath, fail

NO_WEIGHTS = ("Tokenizer", "TokenizerFast", "Scheduler", "ImageProcessor", "FeatureExtractor")
PICKLE_EXTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class OfflineError(RuntimeError):
    """A download was needed and is not possible here."""


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def require_download(what: str, host: str = "huggingface.co", hint: str = "") -> None:
    """Raise ``OfflineError`` naming ``what`` when ``host`` cannot be reached (or the HF hub is
    set offline and the host is the hub)."""
    offline_hub = hub_offline() and host.endswith("huggingface.co")
    if offline_hub or not host_reachable(host):
        why = "HF_HUB_OFFLINE is set" if offline_hub else f"{host} is unreachable"
        raise OfflineError(f"{what} is not available locally and cannot be downloaded ({why}). "
                           + (hint or "Download it on a machine with internet access and pass "
                              "its local path instead."))


def is_hub_id(name: str) -> bool:
    """``owner/name`` as the hub spells repository ids (one '/', no leading '.', '~' or '/')."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not name.endswith(".")


def missing_model(model: str, param: str = "model") -> None:
    """Raise for a model that is not a local folder: ``MissingPath`` when it cannot be a hub id
    (a relative or absolute path, 'name' alone, 'a/b/c'), or a file that is not a folder."""
    where = os.path.abspath(model)
    if os.path.exists(model):
        fail(param, model, "a pipeline folder or a hub id 'owner/name'",
             f"{where} is a file, not a pipeline folder", cls=MissingPath)
    if not is_hub_id(model):
        fail(param, model, "an existing pipeline folder, or a hub id 'owner/name'",
             f"no such folder: the folder does not exist ({where}), and it is not a hub id",
             cls=MissingPath)


def hub_id_what(model: str, param: str = "model") -> str:
    """``require_download``'s ``what`` for ``model`` of ``owner/name`` form that is no local
    folder: it says that no such folder exists either (it may be a mistyped relative path)."""
    return (f"{param}={model!r}: no folder {os.path.abspath(model)} exists, and the hub id "
            f"{model!r}")


def check_pipeline_folder(folder, allow_pickle: bool = False, param: str = "model",
                          switch: str = "allow_pickle=True") -> dict:
    """The ``model_index.json`` of a local pipeline folder, after checking that every component
    it lists has its subfolder and, for networks, safetensors weights (pickled ``.bin`` weights
    only with ``allow_pickle=True``: unpickling runs code). Raises ``MissingPath`` (a
    ``ConfigError`` and a ``FileNotFoundError``) naming the missing component, or
    ``ConfigError`` naming the pickles and the ``switch`` that allows them."""
    folder = os.fspath(folder)
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        fail(param, folder, "a diffusers pipeline folder (save one with "
             "pipe.save_pretrained(folder))", "the folder holds no model_index.json",
             cls=MissingPath)
    try:
        with open(index, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        fail(param, folder, "a diffusers pipeline folder", f"its model_index.json cannot be "
             f"read ({e})")
    if not isinstance(config, dict):
        fail(param, folder, "a diffusers pipeline folder", "its model_index.json is not a mapping")
    for name, spec in config.items():
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2 and spec[1]):
            continue
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            fail(param, folder, "a pipeline folder holding every component its "
                 "model_index.json lists", f"component {name!r} ({spec[1]}) is listed in "
                 f"model_index.json but the folder has no {name}/", cls=MissingPath)
        if spec[1].endswith(NO_WEIGHTS):
            continue
        files = os.listdir(sub)
        if any(f.endswith(".safetensors") for f in files):
            continue
        pickles = sorted(f for f in files if f.endswith(PICKLE_EXTS))
        if not pickles:
            fail(param, folder, "a pipeline folder whose networks have weights",
                 f"component {name!r} ({spec[1]}) has no weights in {sub} (no .safetensors "
                 "file)", cls=MissingPath)
        if not allow_pickle:
            fail(param, folder, f"safetensors weights, or pickles with {switch} for a folder "
                 "you trust", f"component {name!r} holds only pickled weights "
                 f"({', '.join(pickles)}), which are not loaded (unpickling runs code); "
                 f"convert them to safetensors, or pass {switch}")
    return config


__all__ = ["NO_WEIGHTS", "OfflineError", "PICKLE_EXTS", "check_pipeline_folder",
           "hub_id_what", "hub_offline", "host_reachable", "is_hub_id", "missing_model",
           "require_download"]
