"""Long experiment runs that survive a kill: finished units of work are kept in the run folder.

An experiment script (the regime map, the image table) runs many independent units (one
ensemble, one cell). ``RunStore(out, settings)`` keeps, under ``out``:

    settings.json   the run's settings: a rerun over the same folder must have the same ones
    done.jsonl      one line per finished unit: {"key": ..., "rows": [...]}, flushed and fsynced

A rerun with the same settings skips every unit whose key is in ``done.jsonl`` (and says so);
other settings over an existing folder are refused with a ``ConfigError`` naming the keys that
differ. A unit cut off mid-way is simply redone. A partly written last line (a kill during the
write) is dropped. Several processes may record into one folder (each line is one locked write).
"""

from __future__ import annotations

import fcntl
import json
import os

from ..validation import ConfigError

SETTINGS_FILE, DONE_FILE = "settings.json", "done.jsonl"


def _canonical(x):
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The keys (dotted) where two settings dicts differ, with both values."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} in the folder, {vb!r} now")
    return out


class RunStore:
    """The finished units of one run folder (see the module docstring).

    :param out: the run folder (created if missing; must not be a file).
    :param settings: everything the results depend on (JSON-able); compared on reopen.
    """

    def __init__(self, out: str, settings: dict):
        if os.path.exists(out) and not os.path.isdir(out):
            raise ConfigError(f"out={out!r} is a file, not allowed; allowed: a folder (new, or "
                              "one holding an earlier run with the same settings)")
        os.makedirs(out, exist_ok=True)
        self.out, self.settings = out, _canonical(settings)
        self.path = os.path.join(out, DONE_FILE)
        spath = os.path.join(out, SETTINGS_FILE)
        self.done: dict[str, list] = {}
        if os.path.exists(spath):
            with open(spath) as f:
                old = json.load(f)
            diff = _diff(old, self.settings)
            if diff:
                raise ConfigError(
                    f"out={out!r} holds a run with other settings ({'; '.join(diff[:8])}"
                    f"{'; ...' if len(diff) > 8 else ''}); not allowed: use a new --out, or "
                    "the same settings to continue that run")
            self.done = self._read()
        else:
            tmp = spath + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.settings, f, indent=1, sort_keys=True)
            os.replace(tmp, spath)
            if os.path.exists(self.path):  # a results file without its settings: start anew
                os.remove(self.path)

    def _read(self) -> dict[str, list]:
        done = {}
        if not os.path.exists(self.path):
            return done
        with open(self.path, "rb+") as f:
            data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):  # a line cut off by a kill: drop it, appends stay line-aligned
                f.truncate(keep)
        for line in data[:keep].decode().splitlines():
            rec = json.loads(line)
            done[rec["key"]] = rec["rows"]
        return done

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def __len__(self) -> int:
        return len(self.done)

    def rows(self, key: str) -> list:
        return self.done[key]

    def add(self, key: str, rows: list) -> None:
        """Record a finished unit (its result rows, JSON-able) durably."""
        rows = _canonical(rows)
        data = (json.dumps({"key": key, "rows": rows}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:  # one locked write: processes sharing the folder never interleave their lines
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)  # (closing releases the lock)
        self.done[key] = rows


__all__ = ["RunStore"]
