"""Checkpoints as safetensors + JSON, written atomically; nothing is ever unpickled.

A checkpoint is a folder ``step_000123/`` holding ``tensors.safetensors`` (model weights,
optimizer moments, RNG states, the aggregation buffer) and ``meta.json`` (step, config,
history, optimizer hyper-parameters). It is written into a temporary folder and renamed into
place, so a crash while saving never leaves a half-written checkpoint under a final name, and
``latest`` only ever names a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file


def flatten_state(prefix: str, obj, tensors: dict, meta: dict | None = None):
    """Split a nested state (dicts/lists of tensors and plain values) into a flat tensor dict
    (keys joined by '.') and a JSON-able skeleton with tensor placeholders."""
    if torch.is_tensor(obj):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), flatten_state(f"{prefix}.{k}", v, tensors)]
                             for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten_state(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _key(k):
    return {"int": k} if isinstance(k, int) else k


def unflatten_state(skel, tensors: dict):
    if isinstance(skel, dict) and "__tensor__" in skel:
        return tensors[skel["__tensor__"]]
    if isinstance(skel, dict) and "__dict__" in skel:
        return {(k["int"] if isinstance(k, dict) else k): unflatten_state(v, tensors)
                for k, v in skel["__dict__"]}
    if isinstance(skel, dict) and "__list__" in skel:
        return [unflatten_state(v, tensors) for v in skel["__list__"]]
    return skel


def save_checkpoint(root: str, step: int, state: dict, meta: dict, keep: int = 2) -> str:
    """Atomically write ``state`` (nested tensors/values) and ``meta`` to root/step_XXXXXXX."""
    os.makedirs(root, exist_ok=True)
    tensors: dict = {}
    skeleton = flatten_state("s", state, tensors)
    tmp = tempfile.mkdtemp(prefix=".tmp_ckpt_", dir=root)
    save_file(tensors, os.path.join(tmp, "tensors.safetensors"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"step": step, "state": skeleton, **meta}, f)
    for name in os.listdir(tmp):  # flush file contents before the rename makes them visible
        with open(os.path.join(tmp, name), "rb") as fh:
            os.fsync(fh.fileno())
    final = os.path.join(root, f"step_{step:07d}")
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(os.path.join(root, "latest"), os.path.basename(final))
    done = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in done[:-keep] if keep else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def _write_atomic(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint folder under root, or None."""
    p = os.path.join(root, "latest")
    if not os.path.exists(p):
        return None
    path = os.path.join(root, open(p).read().strip())
    return path if os.path.exists(os.path.join(path, "meta.json")) else None


def load_checkpoint(path: str) -> tuple[dict, dict]:
    """(state, meta) of a checkpoint folder. Raises ValueError on a corrupt or partial one."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        tensors = load_file(os.path.join(path, "tensors.safetensors"))
        state = unflatten_state(meta.pop("state"), tensors)
    except Exception as e:  # any unreadable piece means the checkpoint is unusable
        raise ValueError(f"checkpoint {path} is corrupt or incomplete: {e}") from e
    return state, meta
