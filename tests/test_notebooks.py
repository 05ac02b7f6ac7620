"""The teaching notebooks and their library (``ddil_lab.toy.lessons``, ``ddil_lab.notebook``).

- every ``notebooks/*.ipynb`` is in sync with its jupytext ``.py`` pair and has no outputs;
  a teaching notebook's ``parameters`` cell holds literals in ``name: type = value  # help``
  form;
- each teaching notebook runs headless under papermill with tiny parameters (the four run
  side by side in subprocesses) and records its figures and finite metrics in ``out_dir``;
- in the executed notebooks, progress-bar labels are distinct within a cell, and every number
  the text quotes comes from the run: markdown cells quote no measured numbers, and the
  paragraphs written from the run (``nb.fill``) quote exactly the values the run logged;
- run folders resolve against the repository root wherever a notebook runs;
- the helpers the notebooks call behave (oracles where there are any).
"""
import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")

# Tiny parameters: seconds of compute each (most of a run is kernel start and imports).
TINY = {
    "01_covariate_shift": {"steps": 3, "batch_size": 32, "seeds": [0, 1], "n_eval": 200,
                           "init_steps": 30, "substeps": 2},
    "02_mode_loss": {"steps": 3, "batch_size": 32, "seeds": [0, 1], "n_eval": 200,
                     "init_steps": 30, "pd_substeps": 2, "critic_steps": 1, "fine_steps": 8},
    "03_ddil_methods": {"table_overrides": {}, "steps": 6, "batch_size": 32,
                        "snapshot_every": 2, "n_snapshot": 200, "init_steps": 30,
                        "ramp_steps": 4},
    "04_reflected": {"dmd2_steps": 4, "seeds": [0, 1], "n_eval": 200, "init_steps": 30,
                     "critic_steps": 1, "eval_every": 2},
}
FIGURES = {  # figures each notebook must record
    "01_covariate_shift": {"teacher_uncond", "states_uncond", "shift_uncond", "step_error_uncond",
                           "teacher_guided", "states_guided", "shift_guided",
                           "step_error_guided", "samples_guided"},
    "02_mode_loss": {"samples", "reachable_modes", "effective_modes", "final_modes", "reach_map"},
    "03_ddil_methods": {"sources_over_training", "source_fractions", "source_losses",
                        "source_preview"},
    "04_reflected": {"teacher_x0", "targets", "dmd2_stability", "dmd2_critic"},
}
METRIC_PREFIXES = {  # metric families each notebook must record
    "01_covariate_shift": ("uncond/ddil/mmd_x1e3", "guided/baseline/gap_sum",
                           "guided/ddil/train_gap_sum"),
    "02_mode_loss": ("modes/pd ddil/tv", "modes/dmd2 backward/effective_modes_final",
                     "effective_modes/teacher/0"),
    "03_ddil_methods": ("table/", "sources_final/forward", "source_loss_final/"),
    "04_reflected": ("teacher_x0_outside/t999", "targets/pd reflected/outside",
                     "dmd2/reflected/final_mmd", "dmd2/reflected/raw_outside"),
}
PARAM_LINE = re.compile(r"^[A-Za-z_]\w*: [A-Za-z_][\w\[\], |.]* = \S.*  # \S.*$")


def _ipynbs():
    return sorted(glob.glob(os.path.join(NB_DIR, "*.ipynb")))


@pytest.mark.parametrize("ipynb", _ipynbs(), ids=os.path.basename)
def test_pair_in_sync_stripped_with_literal_parameters(ipynb):
    jupytext = pytest.importorskip("jupytext")
    py = ipynb[:-len(".ipynb")] + ".py"
    assert os.path.exists(py), f"{ipynb} has no jupytext pair {py}"
    a, b = jupytext.read(ipynb), jupytext.read(py)
    cells_a = [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ()))) for c in a.cells]
    cells_b = [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ()))) for c in b.cells]
    for i, (ca, cb) in enumerate(zip(cells_a, cells_b)):
        assert ca == cb, (f"{os.path.basename(ipynb)} cell {i} differs from its .py: run "
                          f"`jupytext --to ipynb {os.path.relpath(py, ROOT)}`")
    assert len(cells_a) == len(cells_b), f"{ipynb}: {len(cells_a)} cells vs {len(cells_b)} in .py"
    with open(ipynb) as f:
        raw = json.load(f)
    for i, c in enumerate(raw["cells"]):
        if c["cell_type"] == "code":
            assert not c.get("outputs") and c.get("execution_count") is None, \
                f"{ipynb} cell {i} has outputs committed: strip them"
    params = [c for c in b.cells if "parameters" in c.metadata.get("tags", ())]
    name = os.path.basename(py)[:-len(".py")]
    if name not in TINY:  # another team's notebook: only pairing and stripping are checked here
        return
    assert len(params) == 1, f"{py} needs exactly one cell tagged parameters"
    for c in params:
        for line in c.source.splitlines():
            if line.strip() and not line.startswith("#"):
                assert PARAM_LINE.match(line), f"{py}: parameter line not `name: type = value  # help`: {line!r}"


@pytest.mark.parametrize("ipynb", _ipynbs(), ids=os.path.basename)
def test_the_cell_after_parameters_checks_injected_names(ipynb):
    """Every notebook's first cell after ``parameters`` calls ``nb.check_parameters()``, so a
    mistyped papermill ``-p`` name fails there instead of running with the defaults."""
    jupytext = pytest.importorskip("jupytext")
    cells = jupytext.read(ipynb).cells
    i = next(k for k, c in enumerate(cells) if "parameters" in c.metadata.get("tags", ()))
    after = next(c for c in cells[i + 1:] if c.cell_type == "code")
    assert "nb.check_parameters()" in after.source, os.path.basename(ipynb)


def test_check_parameters_names_the_unknown_and_the_closest_known():
    from ddil_lab.notebook import check_parameters
    params = 'out_dir: str = "x"  # h\nsteps: int = 3  # h\nseeds: list = [0]  # h\n'
    with pytest.raises(ValueError, match=r"'stepz' \(did you mean 'steps'\?\)"):
        check_parameters(["", params, "# Parameters\nstepz = -1\n"])
    assert check_parameters(["", params, "# Parameters\nsteps = 2\nseeds = [1]\n"]) == \
        ["steps", "seeds"]
    assert check_parameters(["", params]) == []  # not run by papermill


def test_a_papermill_typo_stops_the_notebook(tmp_path):
    pytest.importorskip("papermill")
    out = tmp_path / "out.ipynb"
    r = subprocess.run([sys.executable, "-m", "papermill", os.path.join(NB_DIR, "02_mode_loss.ipynb"),
                        str(out), "-p", "stepz", "1", "-p", "out_dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "'stepz' (did you mean 'steps'?)" in r.stderr + r.stdout
    assert not (tmp_path / "run" / "metrics.json").exists()  # nothing ran past the check


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run every teaching notebook headless with its tiny parameters, all at once (separate
    papermill processes), and return name -> (out_dir, executed notebook, returncode, log).
    The kernel is this interpreter: a ``python3`` kernelspec on a private JUPYTER_PATH
    shadows any user-level one (e.g. one CI installed for another virtual environment)."""
    pytest.importorskip("papermill")
    base = tmp_path_factory.mktemp("notebooks")
    spec = base / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": ROOT,
           "JUPYTER_PATH": str(base / "jupyter")}
    procs = {}
    for name, params in TINY.items():
        out_dir = base / name
        out_nb = base / f"{name}.ipynb"
        params = {**params, "out_dir": str(out_dir), "widgets": True}
        cmd = [sys.executable, "-m", "papermill", os.path.join(NB_DIR, f"{name}.ipynb"),
               str(out_nb), "-y", json.dumps(params), "-k", "python3", "--cwd", ROOT,
               "--no-progress-bar", "--start-timeout", "600"]  # slow kernel starts under load
        log = base / f"{name}.log"
        with open(log, "w") as f:
            procs[name] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env),
                           out_dir, out_nb, log)
    results = {}
    for name, (p, out_dir, out_nb, log) in procs.items():
        try:
            rc = p.wait(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = -9
        results[name] = (out_dir, out_nb, rc, log.read_text()[-3000:])
    return results


@pytest.mark.parametrize("name", list(TINY))
def test_notebook_runs_headless_and_records(executed, name):
    out_dir, out_nb, rc, log = executed[name]
    assert rc == 0, f"{name} failed under papermill:\n{log}"
    with open(out_dir / "metrics.json") as f:
        rec = json.load(f)
    figures, metrics = rec["figures"], rec["metrics"]
    assert FIGURES[name] <= set(figures), f"missing figures {FIGURES[name] - set(figures)}"
    for fig, path in figures.items():
        assert os.path.getsize(path) > 2000, f"figure {fig} at {path} is empty"
    assert metrics, "no metrics recorded"
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
    for prefix in METRIC_PREFIXES[name]:
        assert any(k.startswith(prefix) for k in metrics), f"no metric {prefix}*"
    with open(out_nb) as f:  # figures are in the executed notebook too (headless fallback)
        nb = json.load(f)
    pngs = sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
    assert pngs >= len(FIGURES[name]), f"only {pngs} figures shown in the executed notebook"
    from ddil_lab.notebook import output_problems
    assert output_problems(nb) == [], f"{name}: {output_problems(nb)}"
    # progress bars are tqdm.auto widgets (FloatProgress models in the saved widget state),
    # not tqdm's plain-text fallback in a stream
    state = nb["metadata"].get("widgets", {}).get(
        "application/vnd.jupyter.widget-state+json", {}).get("state", {})
    bars = [m for m in state.values() if m.get("model_name") == "FloatProgressModel"]
    assert bars, f"{name}: no widget progress bar in the executed notebook"
    text_bars = [o["text"][:80] for c in nb["cells"] for o in c.get("outputs", [])
                 if o.get("output_type") == "stream" and "it/s]" in "".join(o.get("text", ""))]
    assert not text_bars, f"{name}: text progress bars {text_bars}"
    md = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "What you will see" in md and "What to read" in md, \
        f"{name}: opens with what you will see, ends with what to read / what to try"


def _bar_labels(nb: dict) -> dict[int, list[str]]:
    """cell index -> the labels of the tqdm widget bars it shows: each bar is an HBox whose
    first child is the HTML label (``tqdm.notebook``), found through the cell's widget views
    in the saved widget state."""
    state = nb["metadata"].get("widgets", {}).get(
        "application/vnd.jupyter.widget-state+json", {}).get("state", {})

    def model(ref):
        return state.get(ref.removeprefix("IPY_MODEL_"), {})
    out = {}
    for i, c in enumerate(nb["cells"]):
        for o in c.get("outputs", []):
            view = o.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            if not view:
                continue
            box = state.get(view["model_id"], {})
            kids = box.get("state", {}).get("children", [])
            if box.get("model_name") == "HBoxModel" and len(kids) == 3 and \
                    model(kids[1]).get("model_name") == "FloatProgressModel":
                out.setdefault(i, []).append(model(kids[0]).get("state", {}).get("value", ""))
    return out


@pytest.mark.parametrize("name", list(TINY))
def test_progress_bar_labels_are_distinct_within_a_cell(executed, name):
    _, out_nb, rc, log = executed[name]
    assert rc == 0, f"{name} failed under papermill:\n{log}"
    with open(out_nb) as f:
        nb = json.load(f)
    labels = _bar_labels(nb)
    assert labels, f"{name}: no tqdm widget bars found"
    for cell, names in labels.items():
        labels_ = [n.strip().rstrip(":") for n in names]
        assert all(labels_), f"{name} cell {cell}: a bar without a label: {names}"
        assert len(set(labels_)) == len(labels_), f"{name} cell {cell}: repeated labels {names}"


# Numbers a markdown cell may quote: settings and definitions, not measurements. Anything that
# looks measured (a decimal, a percentage, a duration) must be written by the run (``nb.fill``).
MEASURED = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])|\d\s?%|\d\s?(?:minutes?|seconds?|hours?|s)\b")


def _typed_numbers(text: str) -> list[str]:
    text = re.sub(r"`[^`]*`", "", text)  # code: parameter values and names
    text = re.sub(r"\$[^$]*\$", "", text)  # maths
    text = re.sub(r"Sec\. [\d.–-]+", "", text)  # the paper's sections
    return MEASURED.findall(text)


@pytest.mark.parametrize("name", list(TINY))
def test_text_quotes_only_numbers_from_the_run(executed, name):
    """The numbers a notebook's text quotes come from the run: its markdown cells hold no
    measured-looking numbers (decimals, percentages, ±), and each paragraph written from the
    run (``nb.fill``, marked in the output's metadata) quotes values the run logged in
    ``metrics.json`` (``said/<name>/...``), each number of its text matching one of them."""
    out_dir, out_nb, rc, log = executed[name]
    assert rc == 0, f"{name} failed under papermill:\n{log}"
    with open(out_nb) as f:
        nb = json.load(f)
    typed = {i: _typed_numbers("".join(c["source"])) for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "markdown"}
    typed = {i: v for i, v in typed.items() if v}
    assert not typed, f"{name}: markdown cells quote numbers typed in, not from the run: {typed}"
    with open(out_dir / "metrics.json") as f:
        metrics = json.load(f)["metrics"]
    from ddil_lab.notebook import _FILLED
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            meta = o.get("metadata", {}).get(_FILLED)
            if not meta:
                continue
            logged = {k.split("/")[-1]: v for k, v in metrics.items()
                      if k.startswith(f"said/{meta['name']}/")}
            assert logged == pytest.approx(meta["values"], nan_ok=True), meta["name"]
            text = "".join(o["data"]["text/markdown"])
            text = re.sub(r"`[^`]*`", "", text)  # names in code: `dmd2 backward`
            for num in re.findall(r"(?<![\w.=-])-?\d+(?:\.\d+)?(?![\w.-])", text):
                if re.search(rf"(?:t = |w = |x1e){re.escape(num)}\b", text):
                    continue  # a timestep, the guidance scale or a unit: settings
                x = float(num)
                digits = len(num.split(".")[1]) if "." in num else 0
                ok = any(abs(round(v, digits) - x) <= 10 ** -digits / 2 + 1e-9
                         for v in logged.values() if math.isfinite(v))
                assert ok, f"{name}: {num} in {meta['name']!r} is not one of the run's values"


def test_one_quantity_one_value_in_02(executed):
    """Notebook 02 shows effective modes in a figure, a table and a sentence: one value (the
    mean over seeds) in all three."""
    out_dir, _, rc, log = executed["02_mode_loss"]
    assert rc == 0, log
    with open(out_dir / "metrics.json") as f:
        m = json.load(f)["metrics"]
    last = max(int(k.rsplit("/", 1)[1]) for k in m if k.startswith("effective_modes/teacher/"))
    names = {k.split("/")[1] for k in m if k.startswith("effective_modes/")}
    for name in names:  # figure (summary) == table (mean of per-seed values)
        assert m[f"effective_modes/{name}/{last}"] == pytest.approx(
            m[f"mode_loss/{name}/eff. modes, samples"]), name
    assert m["said/findings/dmd2_eff"] == pytest.approx(m[f"effective_modes/dmd2 backward/{last}"])
    assert m["said/findings/teacher_eff"] == pytest.approx(m[f"effective_modes/teacher/{last}"])


def test_teacher_x0_titles_and_the_printed_shares_agree():
    """Notebook 04 prints the share of the teacher's x0 outside the box under the figure whose
    titles give the same shares: the same states (same n, same noise) for both."""
    from ddil_lab.toy import make_backend
    from ddil_lab.toy.lessons import common, reflection
    torch.set_num_threads(1)
    b = make_backend("guided", guidance=9.0, init_steps=30)
    fig = reflection.teacher_x0(b, guidance=9.0, n_steps=4, n=300)
    traj, cond = common.teacher_trajectory(b, 4, n=300)
    printed = [f"t = {t}: {100 * reflection.outside_support(x0):.0f}% outside"
               for t, x0 in zip(traj.grid, reflection.teacher_x0_along(b, traj, cond))]
    assert [ax.get_title() for ax in fig.axes] == printed


def test_fill_writes_and_logs_the_values(tmp_path, monkeypatch):
    from ddil_lab import notebook
    shown = []
    monkeypatch.setattr(notebook, "_in_ipython", lambda: True)
    monkeypatch.setattr("IPython.display.display",
                        lambda obj, metadata=None: shown.append((obj.data, metadata)))
    rec = notebook.Recorder(str(tmp_path))
    assert notebook.fill("{a:.1f} modes, {b:.0f}%", rec, "x", a=4.567, b=12.4) is None
    assert rec.metrics == {"said/x/a": 4.567, "said/x/b": 12.4}
    assert shown == [("4.6 modes, 12%", {notebook._FILLED: {"name": "x",
                                                            "values": {"a": 4.567, "b": 12.4}}})]
    assert _typed_numbers("w = 9, `lr=1e-3`, $10^{-3}$, t = 749, Sec. 3.1–3.2, 4 steps") == []
    assert _typed_numbers("took 3 minutes, 35% of them, 4.10 ± 0.70") == ["3 minutes", "5%",
                                                                           "4.10", "0.70"]


def test_run_folders_resolve_against_the_repository_root(tmp_path, monkeypatch):
    """JupyterLab runs a notebook in ``notebooks/``, papermill where it is started: a relative
    ``out_dir`` (and 05's ``teacher_dir``) lands in the root's ``runs/`` either way."""
    from ddil_lab import notebook
    assert notebook.repo_root() == ROOT
    for cwd in (ROOT, NB_DIR, str(tmp_path)):
        monkeypatch.chdir(cwd)
        assert notebook.repo_path("runs/x") == os.path.join(ROOT, "runs", "x")
    assert notebook.repo_path(str(tmp_path)) == str(tmp_path) and notebook.repo_path("") == ""
    monkeypatch.chdir(NB_DIR)
    rec = notebook.Recorder("runs/test_notebooks_resolve")
    try:
        assert rec.out_dir == os.path.join(ROOT, "runs", "test_notebooks_resolve")
        assert not os.path.exists(os.path.join(NB_DIR, "runs", "test_notebooks_resolve"))
    finally:
        os.rmdir(rec.out_dir)


def test_plus_minus_rounds_to_the_spread():
    from ddil_lab.notebook import markdown_table, plus_minus
    assert plus_minus(0.0235, 0.000707) == "0.02350 ± 0.00071"
    assert plus_minus(1216.2, 97.56) == "1216 ± 98"
    assert plus_minus(4.1, 0.7) == "4.10 ± 0.70"
    assert plus_minus(2.0, 0.0) == "2 ± 0"
    assert "| a | 1.00 ± 0.10 |" in markdown_table({"a": {"m": [1.0, 1.1, 0.9]}}, ["m"])


# ---------------------------------------------------------------- the library behind them

@pytest.fixture(scope="module")
def ring():
    from ddil_lab.toy.backend import Toy2dBackend
    torch.set_num_threads(1)
    return Toy2dBackend("ring8", init_steps=30)


def test_teacher_reaches_the_same_modes_from_every_step(ring):
    """Oracle: continuing the (deterministic) teacher's own states with the teacher gives its
    own samples, so every row of its reachable-mode histogram is its sample histogram."""
    from ddil_lab.toy.lessons import common, modes
    traj, cond = common.teacher_trajectory(ring, 4, n=400)
    h = modes.reachable_modes(ring, traj, cond, fine_steps=32)
    assert h.shape == (5, ring.gmm.K + 1)
    torch.testing.assert_close(h, h[-1:].expand_as(h), atol=1e-12, rtol=0)
    torch.testing.assert_close(h.sum(1), torch.ones(5, dtype=h.dtype))
    s = modes.mode_summary(h)
    assert max(s["tv"]) < 1e-12 and all(5 < e <= 8 for e in s["effective_modes"])


def test_snapshots_watch_without_disturbing_training(ring):
    from ddil_lab.methods import PD
    from ddil_lab.rollout import SOURCES, StateSampler
    from ddil_lab.toy.lessons import sources
    from ddil_lab.train import distill

    def run(callbacks):
        sampler = StateSampler(beta_frwd=0.4, beta_student_bckwrd=0.3, beta_mixed=0.3,
                               buffer_size=64, refresh_every=2)
        return distill(ring, PD(substeps=2), sampler, steps=6, batch_size=32, lr=1e-3,
                       progress=False, callbacks=callbacks, eval_every=2)
    snap = sources.StateSnapshots(n=120)
    plain, watched = run(()), run((snap,))
    assert [h["loss/student"] for h in plain.history] == [h["loss/student"] for h in watched.history]
    assert plain.sampler.nfe == watched.sampler.nfe
    assert [s for s, _, _ in snap.snapshots] == [2, 4, 6]
    fr = snap.source_fractions()
    assert set(fr) == set(SOURCES) and all(abs(sum(v[i] for v in fr.values()) - 1) < 1e-9
                                           for i in range(3))
    assert fr["forward"][-1] < 1.0  # rollout states are drawn too
    only_student = sources.preview_sources(watched, 0, 0, 1, 0, n=20)
    assert (only_student.source == SOURCES.index("student")).all()
    assert set(only_student.t.tolist()) == set(watched.method.grid.tolist())
    # the snapshot fits a laptop window under its slider; the preview keeps sources apart
    grid = watched.method.grid.tolist()
    for fig in (sources.snapshot_by_source(snap, ring, grid),
                sources.source_preview(watched, ring, n=40)):
        assert fig.get_size_inches()[1] * 90 <= 600, "taller than a laptop window"
        assert len(fig.axes) == len(SOURCES) * len(grid)  # one row per source


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_explorer_redraws_one_figure_in_place():
    """Moving a control replaces the one figure in the same Output (no second figure, same
    pixel size), and the displayed bundle carries the starting figure once as a fallback."""
    pytest.importorskip("ipywidgets")
    import base64

    from matplotlib.figure import Figure

    from ddil_lab import notebook
    calls = []

    def draw(a, b, c=0):
        calls.append((a, b, c))
        fig = Figure(figsize=(3, 2))
        ax = fig.subplots()
        ax.plot([0, 1], [a, a])
        ax.set_title("a long title that a tight bounding box would crop differently" if b else "x")
        return fig
    ex = notebook.Explorer(draw, {"a": (0.0, 1.0, 0.1), "b": bool}, {"a": 0.5, "b": True}, c=3)
    assert isinstance(ex.static(), Figure) and calls == [(0.5, True, 3)]
    start = ex.render(ex.static())
    box = ex.show(png=start, display=False)
    assert box is not None and ex.show(enabled=False) is None
    controls, output = box.children
    assert output is ex.output and len(controls.children) == 2
    bundle = ex.mimebundle(start)
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == box.model_id
    assert base64.b64decode(bundle["image/png"]) == start

    def shown():
        assert len(ex.output.outputs) == 1, "the output must hold exactly one figure"
        return base64.b64decode(ex.output.outputs[0]["data"]["image/png"])
    assert shown() == start
    ex.widgets["a"].value = 0.2
    first = shown()
    assert ex.redraws == 1 and calls[-1] == (0.2, True, 3) and first != start
    ex.widgets["b"].value = False  # another title: a tight bbox would change the size
    second = shown()
    assert ex.redraws == 2 and second != first
    assert _png_size(start) == _png_size(first) == _png_size(second) == (270, 180)


def test_explore_shows_each_figure_once(tmp_path, monkeypatch):
    """``explore`` saves the static figure and displays it once: inside the widget bundle when
    widgets are on, as a plain PNG when off; it returns nothing for a cell to echo."""
    pytest.importorskip("ipywidgets")
    from matplotlib.figure import Figure

    from ddil_lab import notebook
    shown = []
    monkeypatch.setattr(notebook, "_in_ipython", lambda: True)
    monkeypatch.setattr("IPython.display.display",
                        lambda obj, raw=False: shown.append(obj if raw else obj.data))

    def draw(a):
        fig = Figure(figsize=(2, 2))
        fig.subplots().plot([0, 1], [a, a])
        return fig
    rec = notebook.Recorder(str(tmp_path))
    for widgets in (True, False):
        assert notebook.explore(draw, {"a": (0.0, 1.0)}, {"a": 0.5}, rec, f"w{widgets}",
                                widgets) is None
    on, off = shown
    assert set(on) >= {"image/png", "application/vnd.jupyter.widget-view+json"}
    assert isinstance(off, bytes)
    with open(rec.paths["wFalse"], "rb") as f:
        assert f.read() == off


@pytest.mark.slow
def test_explore_redraws_in_place_through_a_kernel():
    """End to end at the protocol level, as JupyterLab sees it: a kernel shows an ``explore``
    figure; the frontend moves the slider (a widget ``comm_msg``); the kernel answers with
    updates of the one ``Output`` widget, each holding one figure of the same size, and no
    new cell output."""
    import base64
    import queue
    import time
    jupyter_client = pytest.importorskip("jupyter_client")
    pytest.importorskip("ipywidgets")
    km, kc = jupyter_client.manager.start_new_kernel(kernel_name="python3")
    log = []

    def pump(seconds):
        end = time.time() + seconds
        while time.time() < end:
            try:
                log.append(kc.get_iopub_msg(timeout=0.05))
            except queue.Empty:
                pass
    try:
        mid = kc.execute(
            "from matplotlib.figure import Figure\nfrom ddil_lab import notebook as nb\n"
            "def draw(a):\n    fig = Figure(figsize=(3, 2))\n    ax = fig.subplots()\n"
            "    ax.plot([0, 1], [0, a])\n    ax.set_title(f'a = {a:.2f}')\n    return fig\n"
            "nb.explore(draw, {'a': (0.0, 1.0, 0.1)}, {'a': 0.5})")
        assert kc.get_shell_msg(timeout=120)["content"]["status"] == "ok"
        while not any(m["msg_type"] == "status" and m["parent_header"].get("msg_id") == mid
                      and m["content"]["execution_state"] == "idle" for m in log):
            pump(0.2)
        shown = [m for m in log if m["msg_type"] in ("display_data", "execute_result")]
        assert len(shown) == 1 and {"image/png", "application/vnd.jupyter.widget-view+json"} \
            <= set(shown[0]["content"]["data"])
        opens = {m["content"]["comm_id"]: m["content"]["data"]["state"] for m in log
                 if m["msg_type"] == "comm_open"}
        slider = next(k for k, st in opens.items() if st["_model_name"] == "FloatSliderModel")
        output = next(k for k, st in opens.items() if st["_model_name"] == "OutputModel")
        figures = [opens[output]["outputs"]]
        n0 = len(log)
        for v in (0.2, 0.9):
            kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": slider, "data": {
                "method": "update", "state": {"value": v}, "buffer_paths": []}}))
        end = time.time() + 60
        while time.time() < end and len(figures) < 3:
            pump(0.2)
            figures = [opens[output]["outputs"]] + [
                m["content"]["data"]["state"]["outputs"] for m in log[n0:]
                if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == output
                and "outputs" in m["content"]["data"].get("state", {})]
        assert not [m for m in log[n0:] if m["msg_type"] in ("display_data", "execute_result")]
        assert [len(f) for f in figures] == [1, 1, 1]
        pngs = [base64.b64decode(f[0]["data"]["image/png"]) for f in figures]
        assert len(set(pngs)) == 3 and {_png_size(p) for p in pngs} == {(270, 180)}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_recorder_and_verdict(tmp_path):
    from matplotlib.figure import Figure

    from ddil_lab import notebook
    rec = notebook.Recorder(str(tmp_path))
    fig = Figure()
    fig.subplots().plot([0, 1])
    rec.figure("line", fig)
    rec.log("a", {"b": {"c": 1.5, "name": "skipped"}, "d": 2})
    with open(rec.save()) as f:
        out = json.load(f)
    assert out["metrics"]["a/b/c"] == 1.5 and out["metrics"]["a/d"] == 2.0
    assert os.path.getsize(out["figures"]["line"]) > 0 and "run/wall_s" in out["metrics"]
    rows = {"x": [{"m": v} for v in (1.0, 1.1, 0.9)], "y": [{"m": v} for v in (0.5, 0.6, 0.4)],
            "z": [{"m": v} for v in (1.0, 1.2, 0.8)], "one": [{"m": 0.0}]}
    assert "clear" in notebook.verdict(rows, "x", "y", "m")
    assert "no difference" in notebook.verdict(rows, "x", "z", "m")
    assert "one seed" in notebook.verdict(rows, "one", "x", "m")
    assert "| x | 1.00 ± 0.10 |" in notebook.markdown_table({"x": {"m": [1.0, 1.1, 0.9]}}, ["m"])
    assert "| t | – | 2 |" in notebook.markdown_table({"t": {"m": [float("nan")], "n": 2}},
                                                      ["m", "n"])


def test_output_problems_finds_repeated_images_and_stray_values():
    from ddil_lab.notebook import output_problems
    img = {"output_type": "display_data", "data": {"image/png": "iVBOR", "text/plain": "<Image>"}}
    stray = {"output_type": "execute_result", "data": {"text/plain": "'runs/x/metrics.json'"}}
    fine = {"output_type": "execute_result", "data": {"text/plain": "3"}}
    nb = {"cells": [{"outputs": [img]}, {"outputs": [img, fine]}, {"outputs": [stray]}]}
    assert output_problems(nb) == ["cell 1 shows the same image as cell 0",
                                   "cell 2 echoes a stray value: 'runs/x/metrics.json'"]
    assert output_problems({"cells": [{"outputs": [img, fine]}]}) == []
    obj = {"output_type": "execute_result",
           "data": {"text/plain": "<ddil_lab.notebook.Explorer object at 0x7f>"}}
    png = {"output_type": "execute_result", "data": {"text/plain": "b'\\x89PNG'"}}
    assert output_problems({"cells": [{"outputs": [obj]}, {"outputs": [png]}]}) == [
        "cell 0 echoes a stray value: <ddil_lab.notebook.Explorer object at 0x7f>",
        "cell 1 echoes a stray value: b'\\x89PNG'"]


def test_compact_toy_table_and_verdicts():
    from ddil_lab.toy.lessons import sources
    rows = [{"setting": "s", "method": "pd", "arm": a, "seed": k, "nll": v, "mmd_x1e3": 10 * v,
             "off_mode": 0.01 * v} for a, vs in (("baseline", (1.0, 1.2)), ("ddil", (0.5, 0.6)))
            for k, v in enumerate(vs)]
    rows.append({"setting": "other", "method": "pd", "arm": "baseline", "seed": 0, "nll": 9.0,
                 "mmd_x1e3": 9.0, "off_mode": 0.0})
    rows.append({"setting": "s", "method": "teacher", "arm": "teacher 32-step (2nd draw)",
                 "seed": "", "nll": 0.1, "mmd_x1e3": -0.5, "off_mode": 0.0})
    t = sources.compact_table(rows, "s")
    assert t.pop("teacher 32-step (2nd draw)") == {"NLL (nats)": [0.1], "MMD² x1e3": [-0.5],
                                                   "off-mode %": [0.0]}
    assert t == {"pd baseline": {"NLL (nats)": [1.0, 1.2], "MMD² x1e3": [10.0, 12.0],
                                 "off-mode %": [1.0, 1.2]},
                 "pd ddil": {"NLL (nats)": [0.5, 0.6], "MMD² x1e3": [5.0, 6.0],
                             "off-mode %": [0.5, 0.6]}}
    (line,) = sources.table_verdicts(rows, "s")
    assert line.startswith("mmd_x1e3: pd baseline 11 -> pd ddil 5.5, better")
    (line,) = sources.table_verdicts(rows, "s", label="MMD² x1e3")
    assert line.startswith("MMD² x1e3: pd baseline 11")
