"""Coursework (``ddil_lab.coursework``, ``notebooks/exercises``): the built versions stay in sync
with their one source; every exercise's solution passes its checks, its student version fails
each with a hint (no traceback), and plausible wrong answers get the right hint; the grader
grades a folder (progress bar, CSV) and gives a clear result for crashing and hanging
submissions.

The notebooks run in this process (their code cells, in order) with tiny parameters; only the
grader tests start kernels.
"""
import json
import math
import re
from pathlib import Path

import nbformat
import pytest
import torch

from ddil_lab import Toy2dBackend, threshold, timesteps
from ddil_lab.coursework import EXERCISES, build, checks, grade, record, study
from ddil_lab.toy import TeacherSampler, covariate_shift

ROOT = Path(__file__).resolve().parents[1]
EX_DIR = ROOT / "notebooks" / "exercises"
PARAM_LINE = re.compile(r"^[A-Za-z_]\w*: [A-Za-z_][\w\[\], |.]* = \S.*  # \S.*$")
TINY = {  # seconds each; ex5's study range needs the default budget (slow test below)
    "ex1_ddim": {}, "ex2_pd_target": {}, "ex4_mixed_rollout": {"n": 64},
    "ex3_shift": {"train_steps": 10, "n_eval": 400},
    "ex5_study": {"seeds": [0, 1], "steps": 4, "batch_size": 32, "n_eval": 120},
    "ex6_reflection": {"dmd2_steps": 2, "seeds": [0], "init_steps": 20},
}


def run_notebook(path: Path, params: dict, rec_path: Path) -> dict:
    """Execute a jupytext notebook's code cells in one namespace, injecting ``params`` after
    the parameters cell (as papermill does), and return the JSON record its checks wrote."""
    import jupytext
    ns = {"__name__": "__main__"}
    for cell in jupytext.read(path).cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, str(path), "exec"), ns)
            if "parameters" in cell.metadata.get("tags", ()):
                ns.update(params, record=str(rec_path))
    return json.loads(rec_path.read_text())


def notebook_checks(ex):
    spec = EXERCISES[ex]
    return [c for c in spec["checks"] if c not in spec.get("grader_checks", ())]


# ---------------------------------------------------------------- one source, two versions

def test_built_versions_are_in_sync_with_the_sources():
    assert build.build(check=True) == [], "run `python -m ddil_lab.coursework build`"
    assert sorted(p.stem for p in build.sources()) == sorted(EXERCISES)


def test_build_writes_both_versions_without_leaking_solutions(tmp_path):
    import jupytext
    paths = build.build(tmp_path)
    assert len(paths) == len(EXERCISES) * 2 * 2
    for src in build.sources():
        text = src.read_text()
        solution = [ln.strip() for block in re.findall(r"BEGIN SOLUTION.*?\n(.*?)END SOLUTION",
                                                        text, re.S)
                    for ln in block.splitlines() if len(ln.strip()) > 12]
        student = (tmp_path / "student" / f"{src.stem}.py").read_text()
        instructor = (tmp_path / "instructor" / f"{src.stem}.py").read_text()
        assert "SOLUTION" not in student and "SOLUTION" not in instructor
        assert solution and not any(ln in student for ln in solution), src.stem
        assert all(ln in instructor for ln in solution), src.stem
        assert "NotImplementedError" in student or "TODO" in student
        for version in build.VERSIONS:
            ipynb = tmp_path / version / f"{src.stem}.ipynb"
            nb = nbformat.read(ipynb, as_version=4)
            assert nb.metadata["coursework"] == {"exercise": src.stem, "version": version}
            py = jupytext.read(tmp_path / version / f"{src.stem}.py")
            assert [c.source for c in nb.cells] == [c.source for c in py.cells]
            assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_strip_replaces_regions_and_refuses_broken_markers():
    src = "def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n" \
          "# BEGIN SOLUTION (student: x = None  # TODO)\nx = 2\n# END SOLUTION\n"
    student = build.strip(src, "student")
    assert "return 1" not in student and "    raise NotImplementedError(" in student
    assert "x = None  # TODO" in student and "x = 2" not in student
    assert build.strip(src, "instructor") == "def f():\n    return 1\nx = 2\n"
    for bad in ("# BEGIN SOLUTION\n", "# END SOLUTION\n",
                "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n"):
        with pytest.raises(build.MarkerError):
            build.strip(bad, "student")


@pytest.mark.parametrize("version", build.VERSIONS)
@pytest.mark.parametrize("ex", sorted(EXERCISES))
def test_exercise_notebooks_follow_the_notebook_conventions(ex, version):
    import jupytext
    cells = jupytext.read(EX_DIR / version / f"{ex}.ipynb").cells
    assert cells[0].cell_type == "markdown" and "Learning goal" in cells[0].source
    assert "Questions" in "".join(c.source for c in cells[-3:])
    i = next(k for k, c in enumerate(cells) if "parameters" in c.metadata.get("tags", ()))
    lines = [ln for ln in cells[i].source.splitlines() if ln.strip()]
    assert lines[0].startswith("record: str = ")
    assert all(PARAM_LINE.match(ln) for ln in lines), lines
    after = next(c for c in cells[i + 1:] if c.cell_type == "code")
    assert "nb.check_parameters()" in after.source


# ---------------------------------------------------------------- solutions, student versions

@pytest.mark.parametrize("ex", sorted(EXERCISES))
def test_the_solution_passes_every_check(ex, tmp_path):
    rec = run_notebook(EX_DIR / "instructor" / f"{ex}.py", TINY[ex], tmp_path / "r.json")
    assert set(rec["checks"]) == set(notebook_checks(ex))
    for name, c in rec["checks"].items():
        if ex == "ex5_study" and name == "study_range":  # tiny budget: not comparable
            assert not c["passed"] and "budget" in c["hint"]
            continue
        assert c["passed"] and c["points"] == c["max_points"] and not c["hint"], (name, c)


@pytest.mark.parametrize("ex", sorted(EXERCISES))
def test_the_student_version_fails_each_check_with_a_hint(ex, tmp_path):
    rec = run_notebook(EX_DIR / "student" / f"{ex}.py", TINY[ex], tmp_path / "r.json")
    assert set(rec["checks"]) == set(notebook_checks(ex))
    for name, c in rec["checks"].items():
        assert not c["passed"] and c["points"] == 0, name
        assert c["hint"] and "Traceback" not in c["hint"] and "check itself" not in c["hint"]
        assert re.search(r"not implemented yet|not answered yet|must work first|write your",
                         c["hint"]), (name, c["hint"])


@pytest.mark.slow
def test_the_study_solution_lands_in_its_reference_range(tmp_path):
    rec = run_notebook(EX_DIR / "instructor" / "ex5_study.py", {}, tmp_path / "r.json")
    assert all(c["passed"] for c in rec["checks"].values()), rec["checks"]


# ---------------------------------------------------------------- plausible wrong answers

def test_ex1_wrong_grids_and_ddim_steps_get_their_hints():
    def truncated(n, T=1000):
        return torch.linspace(0, T - 1, n + 1).long().flip(0)[:-1]

    def to_T(n, T=1000):
        return torch.linspace(0, T, n + 1).round().long().flip(0)[:-1]

    def ascending(n, T=1000):
        return timesteps(n, T).flip(0)

    for fn, word in ((truncated, "round"), (to_T, "off by one"), (ascending, "ascending")):
        ok, pts, hint = checks.check_timesteps(fn)
        assert not ok and pts == 0 and word in hint, hint

    def eps_unclamped(S, x_t, x0_hat, t, s, lo=-1.0, hi=1.0):
        eps = (x_t - S.alpha(t) * x0_hat) / S.sigma(t)
        return S.alpha(s) * x0_hat.clamp(lo, hi) + S.sigma(s) * eps

    def off_by_one(S, x_t, x0_hat, t, s, lo=-1.0, hi=1.0):
        x0 = x0_hat.clamp(lo, hi)
        eps = (x_t - S.alpha(t) * x0) / S.sigma(t)
        return S.alpha(s + 1) * x0 + S.sigma(s + 1) * eps

    def raises(S, x_t, x0_hat, t, s, lo=-1.0, hi=1.0):
        return S.alpha(float(s)) * x0_hat

    for fn, word in ((eps_unclamped, "unclamped x0"), (off_by_one, "off by one"),
                     (raises, "raised TypeError")):
        ok, pts, hint = checks.check_ddim_step(fn)
        assert not ok and word in hint, hint
    assert checks.check_ddim_step(lambda S, x, x0, t, s, lo, hi: S.ddim_step(
        x, x0.clamp(lo, hi), t, s)).passed


@pytest.fixture(scope="module")
def toy():
    return Toy2dBackend("ring8_cond", teacher="exact", guidance=3.0, hidden=16,
                        student_init="random")


def test_ex2_wrong_pd_targets_get_their_hints(toy):
    def one_step(teacher, S, x_t, points, cond):
        t, s = points[0], points[-1]
        x_s = S.ddim_step(x_t, teacher(x_t, torch.full((len(x_t),), t), cond), t, s)
        r = S.sigma(s) / S.sigma(t)
        return (x_s - r * x_t) / (S.alpha(s) - r * S.alpha(t)), x_s

    def right_steps(teacher, S, x_t, points, cond):
        x = x_t
        for a, b in zip(points[:-1], points[1:]):
            x = S.ddim_step(x, teacher(x, torch.full((len(x),), a), cond), a, b)
        return x, x

    def teacher_x0(teacher, S, x_t, points, cond):
        return teacher(x_t, torch.full((len(x_t),), points[0]), cond), right_steps(
            teacher, S, x_t, points, cond)[1]

    def no_alpha_t(teacher, S, x_t, points, cond):
        x_s = right_steps(teacher, S, x_t, points, cond)[1]
        t, s = points[0], points[-1]
        return (x_s - S.sigma(s) / S.sigma(t) * x_t) / S.alpha(s), x_s

    with torch.no_grad():
        ok, _, hint = checks.check_pd_teacher(one_step, toy)
        assert not ok and "one step" in hint
        assert checks.check_pd_teacher(teacher_x0, toy).passed
        for fn, word in ((teacher_x0, "teacher's own x0"), (no_alpha_t, "denominator"),
                         (one_step, "fix the teacher's steps first")):
            ok, _, hint = checks.check_pd_target(fn, toy)
            assert not ok and word in hint, hint


def test_ex3_wrong_shifts_get_their_hints(toy):
    g = torch.Generator().manual_seed(0)
    label = toy.sample_cond(500, g)
    traj = TeacherSampler(toy, timesteps(4).tolist(), None).sample(toy.sample_noise(500, g),
                                                                   label)
    gmm, S = toy.gmm, toy.schedule

    def right(x, t, gmm, S, label):
        return covariate_shift(x, t, gmm, S, label=label)

    def flipped(x, t, gmm, S, label):
        return -right(x, t, gmm, S, label)

    def no_entropy(x, t, gmm, S, label):
        return float(-gmm.log_prob(x, torch.full((len(x),), t), S, label).mean())

    def unconditional(x, t, gmm, S, label):
        return covariate_shift(x, t, gmm, S, label=None)

    assert checks.check_shift(right, traj, gmm, S, label).passed
    for fn, word in ((flipped, "sign"), (no_entropy, "entropy"), (unconditional, "labels")):
        ok, _, hint = checks.check_shift(fn, traj, gmm, S, label)
        assert not ok and word in hint, hint
    ok, _, hint = checks.check_largest_shift_step(123, traj, gmm, S, label)
    assert not ok and "not a timestep" in hint


def test_ex4_wrong_mixed_rollouts_get_their_hints(toy):
    S, teacher = toy.schedule, toy.teacher
    student = toy.make_student().eval()
    g = torch.Generator().manual_seed(0)
    x_T, cond, grid = toy.sample_noise(64, g), toy.sample_cond(64, g), timesteps(4).tolist()

    def rollout(coin, record_after=False):
        @torch.no_grad()
        def fn(teacher, student, S, x_T, cond, grid, p, generator):
            xs, x = [], x_T
            for i, t in enumerate(grid[:-1]):
                xs.append(x)
                by_student = coin(len(x), p, generator)
                x_next = torch.empty_like(x)
                for mask, model in ((by_student, student), (~by_student, teacher)):
                    idx = mask.nonzero().squeeze(1)
                    x0 = model(x[idx], torch.full((len(idx),), t), cond[idx])
                    x_next[idx] = S.ddim_step(x[idx], x0, t, grid[i + 1])
                x = x_next
            xs.append(x)
            return xs[1:] + [x] if record_after else xs
        return fn

    right = rollout(lambda B, p, g: torch.rand(B, generator=g) < p)
    assert checks.check_mixed_rollout(right, teacher, student, S, x_T, cond, grid).passed
    wrong = {"inverted": rollout(lambda B, p, g: torch.rand(B, generator=g) > p),
             "generator": rollout(lambda B, p, g: torch.rand(B) < p),
             "one coin per sample": rollout(lambda B, p, g: (torch.rand((), generator=g) < p)
                                            .expand(B)),
             "x_T itself": rollout(lambda B, p, g: torch.rand(B, generator=g) < p, True)}
    for word, fn in wrong.items():
        ok, _, hint = checks.check_mixed_rollout(fn, teacher, student, S, x_T, cond, grid)
        assert not ok and word in hint, hint


def test_ex5_wrong_intervals_and_the_range_check():
    def interval(baseline, ddil, z=None, ddof=1, sign=1):
        d = [sign * (b - a) for a, b in zip(baseline, ddil)]
        n = len(d)
        mu = sum(d) / n
        sd = math.sqrt(sum((x - mu) ** 2 for x in d) / (n - ddof))
        q = z or {1: 12.706, 2: 4.303, 3: 3.182}[n - 1]
        return mu, q * sd / math.sqrt(n)

    assert study.check_paired_interval(interval).passed
    for kw, word in (({"z": 1.96}, "Student's t"), ({"ddof": 0}, "n - 1"),
                     ({"sign": -1}, "wrong sign")):
        ok, _, hint = study.check_paired_interval(lambda a, b, kw=kw: interval(a, b, **kw))
        assert not ok and word in hint, hint
    run = {"guidance": 9.0, "baseline": [231.2, 272.8, 252.1], "ddil": [177.7, 187.8, 189.4],
           "budget": dict(study.BUDGET)}
    assert study.check_study_range(run, interval).passed
    ok, _, hint = study.check_study_range({**run, "guidance": 1.0}, interval)
    assert not ok and "outside the reference range" in hint
    ok, _, hint = study.check_study_range(run, lambda a, b: interval(a, b, z=1.96))
    assert not ok and "not the paired one" in hint
    assert not study.check_interpretation("DDIL is better.").passed


def test_ex6_wrong_thresholds_get_their_hints():
    def whole_batch(x0, ratio, max_value):
        s = torch.quantile(x0.abs().flatten(), ratio).clamp(1.0, max_value)
        return x0.clamp(-s, s) / s

    def not_divided(x0, ratio, max_value):
        s = torch.quantile(x0.flatten(1).abs(), ratio, dim=1).clamp(1.0, max_value)
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s)

    def s_below_one(x0, ratio, max_value):
        s = torch.quantile(x0.flatten(1).abs(), ratio, dim=1).clamp(max=max_value)
        return checks.scaled_clamp(x0, s)

    assert checks.check_dynamic(lambda x, r, m: threshold(x, "dynamic", ratio=r,
                                                           max_value=m)).passed
    for fn, word in ((whole_batch, "whole batch"), (not_divided, "not divided"),
                     (s_below_one, ">= 1")):
        ok, _, hint = checks.check_dynamic(fn)
        assert not ok and word in hint, hint
    ok, _, hint = checks.check_outside(lambda x, lo, hi: float(((x < lo) | (x > hi))
                                                              .double().mean()))
    assert not ok and "coordinates" in hint
    ok, _, hint = checks.check_static(lambda x, lo, hi: x.clamp(-1, 1))
    assert not ok and "lo=-0.5" in hint


def test_a_check_that_breaks_is_recorded_not_raised(tmp_path, capsys):
    rec = record.Record("ex1_ddim", str(tmp_path / "r.json"))
    res = rec.check("timesteps", lambda: 1 / 0)
    assert not res.passed and "check itself failed" in res.hint
    assert json.loads((tmp_path / "r.json").read_text())["checks"]["timesteps"]["points"] == 0
    rec.numbers("study", {"a": 1.23456789})
    assert record.read_numbers(capsys.readouterr().out) == {"study": {"a": 1.234568}}


def test_reproducibility_compares_submitted_and_rerun_numbers():
    sub = {"study": {"baseline_seed0": 231.2, "ddil_seed0": 177.7}}
    assert grade.check_reproducible(sub, {"study": {"baseline_seed0": 231.3,
                                                    "ddil_seed0": 177.7}})[0]
    ok, hint = grade.check_reproducible(sub, {"study": {"baseline_seed0": 250.0,
                                                        "ddil_seed0": 177.7}})
    assert not ok and "baseline_seed0" in hint
    ok, hint = grade.check_reproducible({}, sub["study"])
    assert not ok and "with its outputs" in hint


# ---------------------------------------------------------------- the grader

def _submission(path: Path, extra_code: str | None, after_cell: int, base="student") -> Path:
    nb = nbformat.read(EX_DIR / base / "ex1_ddim.ipynb", as_version=4)
    if extra_code is not None:
        code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        nb.cells.insert(code[after_cell] + 1, nbformat.v4.new_code_cell(extra_code))
    nbformat.write(nb, path)
    return path


def test_the_grader_grades_a_folder_with_crashing_and_hanging_submissions(tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    _submission(subs / "alice.ipynb", "import socket\ntry:\n    socket.create_connection("
                "('pypi.org', 443), timeout=5)\n    print('NETWORK: yes')\nexcept OSError:\n"
                "    print('NETWORK: no')", 0, base="instructor")  # correct, tries the network
    _submission(subs / "bob.ipynb", None, 0)  # the untouched student version
    # crashes after the first check ran (code cells: parameters, setup, my_timesteps, check, ...)
    _submission(subs / "carol.ipynb", "raise RuntimeError('boom')", 3, base="instructor")
    _submission(subs / "dave.ipynb", "import time\ntime.sleep(1000)", 1)  # hangs
    (subs / "erin.ipynb").write_text("not a notebook")
    results = {Path(r["submission"]).stem: r for r in
               grade.grade_all([subs], tmp_path / "out", timeout=20, progress=False)}
    assert results["alice"]["status"] == "ok" and results["alice"]["points"] == 5
    if results["alice"]["network"].startswith("none"):  # where unshare works (here it does)
        assert "NETWORK: no" in (tmp_path / "out" / "alice.executed.ipynb").read_text()
    bob = results["bob"]
    assert bob["status"] == "ok" and bob["points"] == 0
    assert all("not implemented yet" in c["hint"] for c in bob["checks"].values())
    carol = results["carol"]
    assert carol["status"] == "error" and "RuntimeError: boom" in carol["error"]
    assert carol["checks"]["timesteps"]["passed"]  # the check it reached counts
    assert "not run" in carol["checks"]["ddim_step"]["hint"]
    dave = results["dave"]
    assert dave["status"] == "timeout" and dave["points"] == 0
    assert results["erin"]["status"] == "invalid"
    for stem in results:
        assert json.loads((tmp_path / "out" / f"{stem}.json").read_text())["status"]
        assert "points" in (tmp_path / "out" / f"{stem}.md").read_text()
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("submission,exercise,status,points,max_points")
    assert len(rows) == 6


@pytest.mark.slow
def test_the_grader_checks_that_a_study_reproduces(tmp_path):
    """The instructor's study, executed once (the 'submitted' outputs), then graded."""
    import subprocess
    import sys
    sub = tmp_path / "ex5_study.ipynb"
    subprocess.run([sys.executable, "-m", "papermill", str(EX_DIR / "instructor" /
                    "ex5_study.ipynb"), str(sub), "-k", "python3", "--no-progress-bar"],
                   check=True, timeout=600, env=grade.kernel_env(tmp_path / "kernel"))
    res = grade.grade(sub, tmp_path / "out", timeout=400)
    assert res["status"] == "ok" and res["points"] == res["max_points"], res["checks"]
