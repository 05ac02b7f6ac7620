"""The autograder: runs each submission headless in its own kernel (papermill), with a time
limit and without network, and writes a JSON and a short Markdown report per submission, and a
CSV summary for a folder of them.

Only the submission runs, in a fresh kernel started from this interpreter (a private
kernelspec), in its own working folder. The notebook's checks write their results to the JSON
record whose path the grader passes as the papermill parameter ``record``; the grader reads it
back after the run. A submission that crashes or hangs gets a result (status "error" or
"timeout", the checks it reached, the error's cell and message), never a crash of the grader.
Network: the run goes into a fresh network namespace (``unshare -rn``: loopback only) where the
system allows it; elsewhere only offline environment variables are set (the report says which).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .exercises import EXERCISES, max_points, points_of
from .record import read_numbers

STATUSES = ("ok", "error", "timeout", "invalid")
REPRO_RTOL = 0.02  # the numbers may move a little between machines (float reductions)


def _can_unshare() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    r = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True,
                       check=False)
    return r.returncode == 0


def kernel_env(base: Path) -> dict:
    """A ``python3`` kernelspec for this interpreter on a private JUPYTER_PATH (it shadows any
    user kernel of another environment), and offline settings."""
    spec = base / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    env = {**os.environ, "JUPYTER_PATH": str(base / "jupyter"), "MPLBACKEND": "Agg",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PIP_NO_INDEX": "1", "OMP_NUM_THREADS": "1",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                          os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("NO_PROXY", None), env.pop("no_proxy", None)
    return env


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill the papermill process and everything it started (the kernel runs in its own
    session, so a process-group kill alone would leave it behind)."""
    try:
        import psutil
        kids = psutil.Process(proc.pid).children(recursive=True)
    except Exception:
        kids = []
    for p in kids:
        try:
            p.kill()
        except Exception:
            pass
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def exercise_of(nb: dict, path: Path) -> str | None:
    """The exercise a notebook is for: its ``coursework`` metadata, else its file name."""
    name = nb.get("metadata", {}).get("coursework", {}).get("exercise")
    if name in EXERCISES:
        return name
    return next((e for e in EXERCISES if e in path.stem), None)


def outputs_text(nb: dict) -> str:
    """All text outputs of a notebook, one string."""
    parts = []
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            t = out.get("text") or out.get("data", {}).get("text/plain", "")
            parts.append("".join(t) if isinstance(t, list) else str(t))
    return "\n".join(parts)


def first_error(nb: dict) -> str | None:
    """'cell N: Name: message' of the first error output of an executed notebook."""
    code = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        code += 1
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"code cell {code}: {out.get('ename')}: {out.get('evalue')}"[:500]
    return None


def check_reproducible(submitted: dict, rerun: dict) -> tuple[bool, str]:
    """The numbers the submitted notebook shows equal the grader's re-run (``REPRO_RTOL``)."""
    if not submitted:
        return False, ("the submission shows no study numbers: run the notebook top to bottom "
                       "and submit it with its outputs.")
    if not rerun:
        return False, "the re-run did not reach the study: nothing to compare."
    diffs = []
    for key, vals in submitted.items():
        for k, v in vals.items():
            w = rerun.get(key, {}).get(k)
            if w is None or abs(v - w) > REPRO_RTOL * max(1.0, abs(w)):
                diffs.append(f"{key}.{k}: submitted {v:g}, re-run {w}")
    if diffs:
        return False, ("the re-run gives other numbers than the submitted notebook shows (was it "
                       "run with other settings or edited after running?): " + "; ".join(diffs[:4]))
    return True, ""


def grade(submission: str | Path, out_dir: str | Path, timeout: float = 300.0,
          isolate: bool | None = None) -> dict:
    """Run and grade one submission; writes ``<stem>.json``, ``<stem>.md`` and the executed
    notebook ``<stem>.executed.ipynb`` under ``out_dir`` and returns the JSON's content.
    ``timeout``: seconds for the whole run (each cell gets the same limit); ``isolate``: run
    without network (None: when the system allows it)."""
    submission, out_dir = Path(submission), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = submission.stem
    res = {"submission": str(submission), "exercise": None, "status": "invalid", "error": None,
           "checks": {}, "points": 0.0, "max_points": 0, "wall_s": 0.0, "network": "n/a"}
    try:
        nb = json.loads(submission.read_text())
        assert isinstance(nb, dict) and "cells" in nb
    except Exception as e:
        res["error"] = f"not a readable notebook: {type(e).__name__}: {e}"[:300]
        return _write(res, out_dir, stem)
    ex = exercise_of(nb, submission)
    if ex is None:
        res["error"] = ("cannot tell which exercise this is: keep the notebook's metadata, or "
                        f"name the file after the exercise ({', '.join(EXERCISES)})")
        return _write(res, out_dir, stem)
    res.update(exercise=ex, max_points=max_points(ex))
    submitted = read_numbers(outputs_text(nb))

    work = Path(tempfile.mkdtemp(prefix=f"grade_{stem}_"))
    record, executed = work / "record.json", out_dir / f"{stem}.executed.ipynb"
    executed.unlink(missing_ok=True)
    env = kernel_env(work)
    cmd = [sys.executable, "-m", "papermill", str(submission.resolve()), str(executed.resolve()),
           "-p", "record", str(record), "-k", "python3", "--cwd", str(work),
           "--execution-timeout", str(int(timeout)), "--no-progress-bar",
           "--start-timeout", "120"]
    isolate = _can_unshare() if isolate is None else isolate
    if isolate:
        cmd = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
    res["network"] = "none (own network namespace)" if isolate else "offline settings only"
    t0 = time.perf_counter()
    log = work / "papermill.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout + 150)  # + kernel start and papermill's own overhead
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            rc, timed_out = -9, True
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    text = log.read_text(errors="replace")
    ran = json.loads(executed.read_text()) if executed.exists() else {}
    timed_out = timed_out or "CellTimeoutError" in text or "Cell execution timed out" in text
    if timed_out:
        res["status"] = "timeout"
        res["error"] = f"stopped after the time limit of {timeout:g} s per run/cell"
    elif rc != 0:
        res["status"] = "error"
        res["error"] = first_error(ran) or ("the notebook did not run: "
                                            + " ".join(text.strip().splitlines()[-2:]))[:500]
    else:
        res["status"] = "ok"
    rec = json.loads(record.read_text()) if record.exists() else {"checks": {}, "extra": {}}
    spec = EXERCISES[ex]
    for name in spec["checks"]:
        if name in spec.get("grader_checks", ()):
            continue
        res["checks"][name] = rec["checks"].get(name) or {
            "passed": False, "points": 0, "max_points": points_of(ex, name),
            "hint": f"not run: the notebook stopped before this check ({res['status']})"}
    for name in spec.get("grader_checks", ()):
        ok, hint = check_reproducible(submitted, rec.get("extra", {}))
        pts = points_of(ex, name)
        res["checks"][name] = {"passed": ok, "points": float(pts if ok else 0),
                               "max_points": pts, "hint": hint}
    res["points"] = sum(c["points"] for c in res["checks"].values())
    shutil.rmtree(work, ignore_errors=True)
    return _write(res, out_dir, stem)


def _write(res: dict, out_dir: Path, stem: str) -> dict:
    with open(out_dir / f"{stem}.json", "w") as f:
        json.dump(res, f, indent=1)
    (out_dir / f"{stem}.md").write_text(report(res))
    return res


def report(res: dict) -> str:
    """The short Markdown report of one graded submission."""
    title = EXERCISES.get(res["exercise"] or "", {}).get("title", "unknown exercise")
    head = (f"**{res['points']:g} / {res['max_points']} points**, status `{res['status']}` "
            f"({res['wall_s']:g} s; network: {res['network']})")
    lines = [f"# {Path(res['submission']).name}: {res['exercise']} ({title})", "", head, ""]
    if res["error"]:
        lines += [f"Error: {res['error']}", ""]
    if res["checks"]:
        lines += ["| check | result | points | hint |", "|---|---|---|---|"]
        for name, c in res["checks"].items():
            hint = c["hint"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {name} | {'pass' if c['passed'] else 'FAIL'} | "
                         f"{c['points']:g}/{c['max_points']} | {hint} |")
    return "\n".join(lines) + "\n"


def grade_all(paths, out_dir: str | Path, timeout: float = 300.0, progress: bool = True,
              isolate: bool | None = None) -> list[dict]:
    """Grade every submission (files, or folders of ``*.ipynb``) one after the other, with a
    progress bar, and write ``summary.csv`` (one row per submission, a column per check)."""
    from tqdm.auto import tqdm

    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.ipynb")) if p.is_dir() else [p]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [f.stem for f in files]
    results = []
    for f in tqdm(files, desc="grading", unit="notebook", disable=not progress):
        sub_out = out_dir / f.parent.name if stems.count(f.stem) > 1 else out_dir
        results.append(grade(f, sub_out, timeout, isolate))
    checks = list(dict.fromkeys(n for r in results for n in r["checks"]))
    with open(out_dir / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["submission", "exercise", "status", "points", "max_points", "wall_s",
                    *checks, "error"])
        for r in results:
            w.writerow([r["submission"], r["exercise"], r["status"], r["points"],
                        r["max_points"], r["wall_s"],
                        *[r["checks"].get(n, {}).get("points", "") for n in checks],
                        r["error"] or ""])
    return results
