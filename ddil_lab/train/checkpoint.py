"""Checkpoints as safetensors + JSON, written atomically; nothing is ever unpickled.

A checkpoint is a folder ``step_0000123/`` holding ``tensors.safetensors`` (model weights,
optimizer moments, RNG states, the aggregation buffer) and ``meta.json`` (step, config,
history, optimizer hyper-parameters, and the SHA-256 of the tensor file). It is written into a
temporary folder and renamed into place, so a crash while saving never leaves a half-written
checkpoint under a final name and never touches the previous one; ``latest`` only ever names a
complete checkpoint. On resume a checkpoint that fails to load, to match its checksums (of the
tensor file and of ``meta.json`` itself) or to pass the checks of its metadata (``check_meta``)
is corrupt: it is skipped with a warning, and the newest good one is used (``load_latest``).
A save that fails (a full disk, say) raises ``CheckpointError`` naming the folder and the step,
and removes its partial temporary folder at once; when the disk is short of room for the new
checkpoint, the old ones that this save would prune anyway are pruned first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings

import torch
from safetensors.torch import load_file, save_file

TENSORS, META, LATEST = "tensors.safetensors", "meta.json", "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """A checkpoint is corrupt, incomplete, or cannot be used for this run."""


def flatten_state(prefix: str, obj, tensors: dict, meta: dict | None = None):
    """Split a nested state (dicts/lists of tensors and plain values) into a flat tensor dict
    (keys joined by '.') and a JSON-able skeleton with tensor placeholders."""
    if torch.is_tensor(obj):
        if prefix in tensors:
            raise CheckpointError(f"two entries of the state map to the same key {prefix!r}")
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


def map_tensors(obj, fn):
    """A nested state (dicts / lists of tensors and plain values) with ``fn`` applied to every
    tensor, in a fixed order."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def unshare(tensors: dict) -> dict:
    """Copy tensors that share memory with an earlier one (tied weights, views of one buffer):
    safetensors refuses to write shared memory."""
    seen = set()
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            tensors[k] = t.clone()
        seen.add(ptr)
    return tensors


def _key(k):
    return {"int": k} if isinstance(k, int) else k


def unflatten_state(skel, tensors: dict):
    """Inverse of ``flatten_state``."""
    if isinstance(skel, dict) and "__tensor__" in skel:
        return tensors[skel["__tensor__"]]
    if isinstance(skel, dict) and "__dict__" in skel:
        return {(k["int"] if isinstance(k, dict) else k): unflatten_state(v, tensors)
                for k, v in skel["__dict__"]}
    if isinstance(skel, dict) and "__list__" in skel:
        return [unflatten_state(v, tensors) for v in skel["__list__"]]
    return skel


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str):
    try:  # make a rename durable (not supported on every platform / file system)
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def meta_digest(meta: dict) -> str:
    """SHA-256 of ``meta`` (canonical JSON, without its own ``meta_sha256``)."""
    body = json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def first_nonfinite(obj, prefix: str = "s") -> str | None:
    """The key of the first floating tensor in a nested state holding NaN or inf, else None."""
    if torch.is_tensor(obj):
        bad = obj.is_floating_point() and not bool(torch.isfinite(obj).all())
        return prefix if bad else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) \
        if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = first_nonfinite(v, f"{prefix}.{k}")
        if found:
            return found
    return None


def _make_room(root: str, keep: int, need: int) -> None:
    """Prune first the checkpoints this save would prune afterwards (never the newest), when
    the disk is short of ``need`` bytes: then the disk must hold ``keep`` checkpoints, not
    ``keep`` + 1 (with keep=1 it still needs 2: the newest stays until the new one is in)."""
    if not keep or shutil.disk_usage(root).free >= need:
        return
    for old in reversed(checkpoints(root)[max(keep - 1, 1):]):  # oldest first
        shutil.rmtree(old, ignore_errors=True)
        if shutil.disk_usage(root).free >= need:
            return


def save_checkpoint(root: str, step: int, state: dict, meta: dict, keep: int = 2) -> str:
    """Atomically write ``state`` (nested tensors/values) and ``meta`` to root/step_XXXXXXX and
    point ``root/latest`` at it; keep the newest ``keep`` checkpoints (0: all)."""
    os.makedirs(root, exist_ok=True)
    for stale in os.listdir(root):  # leftovers of a save that crashed
        if stale.startswith((".tmp_ckpt_", ".old_ckpt_")):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    tensors: dict = {}
    skeleton = flatten_state("s", state, tensors)
    tensors = unshare(tensors)
    final, old = os.path.join(root, f"step_{step:07d}"), None
    full = {"step": step, "tensors_sha256": None, "state": skeleton, **meta}
    need = sum(t.numel() * t.element_size() for t in tensors.values()) + \
        2 * len(json.dumps(full)) + (64 << 10)  # + headers
    _make_room(root, keep, need)
    tmp = tempfile.mkdtemp(prefix=".tmp_ckpt_", dir=root)
    try:
        save_file(tensors, os.path.join(tmp, TENSORS))
        full["tensors_sha256"] = _sha256(os.path.join(tmp, TENSORS))
        full["meta_sha256"] = meta_digest(full)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(full, f)
        for name in os.listdir(tmp):  # flush file contents before the rename makes them visible
            with open(os.path.join(tmp, name), "rb") as fh:
                os.fsync(fh.fileno())
    except Exception as e:  # e.g. safetensors' "No space left on device"
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write the checkpoint of step {step} to {final} ({type(e).__name__}: "
            f"{e}); its partial folder was removed, the earlier checkpoints in {root} are "
            "untouched") from e
    if os.path.exists(final):  # move an old one of the same step aside: the rename needs the name
        old = tempfile.mkdtemp(prefix=".old_ckpt_", dir=root)
        os.replace(final, os.path.join(old, "ckpt"))
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(os.path.join(root, LATEST), os.path.basename(final))
    if old:
        shutil.rmtree(old, ignore_errors=True)
    if keep:
        for old in checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoints(root: str) -> list[str]:
    """Complete-looking checkpoint folders under root (both files present), newest first."""
    if not root or not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root)
             if (m := _STEP_DIR.match(d))]
    return [p for _, p in sorted(found, reverse=True)
            if os.path.isfile(os.path.join(p, META)) and os.path.isfile(os.path.join(p, TENSORS))]


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint ``root/latest`` names, or (if that is missing) the newest complete one."""
    found = checkpoints(root)
    p = os.path.join(root or "", LATEST)
    if os.path.isfile(p):
        with open(p) as f:
            named = os.path.join(root, f.read().strip())
        if named in found:
            return named
    return found[0] if found else None


def check_meta(path: str, meta) -> None:
    """The metadata every checkpoint written here has; anything else means a corrupt (or
    tampered) checkpoint: raises ``CheckpointError`` saying what is wrong."""
    def bad(what):
        raise CheckpointError(f"{META}: {what}")

    if not isinstance(meta, dict):
        bad(f"holds a {type(meta).__name__}, not a mapping")
    for key, kind in (("step", int), ("tensors_sha256", str), ("meta_sha256", str),
                      ("state", dict), ("config", dict), ("history", list), ("skipped", int)):
        if key not in meta:
            bad(f"{key!r} is missing (distill records it in every checkpoint; one written "
                "before these checks lacks meta_sha256)")
        v = meta[key]
        if not isinstance(v, kind) or isinstance(v, bool):
            bad(f"{key}={v!r:.80} is a {type(v).__name__}, not a {kind.__name__}")
    step = meta["step"]
    if step < 1 or meta["skipped"] < 0:
        bad(f"step={step}, skipped={meta['skipped']}: a step >= 1 and skipped >= 0 expected")
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if m and int(m.group(1)) != step:
        bad(f"step={step} disagrees with the folder name {os.path.basename(path)}")
    for key in ("tensors_sha256", "meta_sha256"):
        if not _SHA256.match(meta[key]):
            bad(f"{key}={meta[key]!r:.80} is not a SHA-256 hex digest")
    for h in meta["history"]:
        if not (isinstance(h, dict) and isinstance(h.get("step"), int)
                and not isinstance(h["step"], bool) and 1 <= h["step"] <= step):
            bad(f"history entry {h!r:.80} is not a record of a step in [1, {step}]")
    if meta_digest(meta) != meta["meta_sha256"]:
        bad("does not match its recorded SHA-256 (meta_sha256): it was changed after writing")


def load_checkpoint(path: str) -> tuple[dict, dict]:
    """(state, meta) of a checkpoint folder. Raises ``CheckpointError`` on a corrupt or partial
    one (unreadable files, metadata that fails ``check_meta``, or tensors that do not match the
    recorded SHA-256)."""
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
        check_meta(path, meta)
        tensor_file = os.path.join(path, TENSORS)
        if _sha256(tensor_file) != meta["tensors_sha256"]:
            raise CheckpointError(f"{TENSORS} does not match the SHA-256 recorded in {META}")
        tensors = load_file(tensor_file)
        state = unflatten_state(meta.pop("state"), tensors)
        bad = first_nonfinite(state)
        if bad:  # distill never writes one: a tampered file or an older version's checkpoint
            raise CheckpointError(f"{bad} holds NaN or inf")
    except Exception as e:  # any unreadable piece means the checkpoint is unusable
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete: {e}") from e
    return state, meta


def load_latest(root: str) -> tuple[str, dict, dict] | None:
    """(path, state, meta) of the newest checkpoint under root that loads, or None when there is
    none. Corrupt checkpoints are skipped with a warning; if every one is corrupt, raises
    ``CheckpointError`` (a silent restart from scratch would look like a resume)."""
    first = latest_checkpoint(root)
    order = ([first] if first else []) + [p for p in checkpoints(root) if p != first]
    errors = []
    for path in order:
        try:
            state, meta = load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
            errors.append(str(e))
            continue
        return path, state, meta
    if errors:
        raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(errors))
    return None
