"""Notebook helpers every tier's notebooks share: one thread and a seed (``setup``), a
``Recorder`` that saves figures as PNG and scalars in ``metrics.json`` for readers and tests,
Markdown tables of per-seed metrics (mean ± std), a verdict between two arms from their seeds,
``explore``: one figure with widget controls, redrawn in place, with a static fallback for
headless runs, and ``output_problems``: what a reader should not see in an executed notebook.
``repo_path`` resolves a relative run folder against the repository root, so a notebook writes
to the same ``runs/`` from JupyterLab (working directory ``notebooks/``) and from papermill
(run from the root). ``fill`` writes a sentence from a run's numbers (never typed in).
Nothing here knows a tier: it imports matplotlib, IPython and ipywidgets lazily or not at all.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

import torch


def setup(threads: int = 1, seed: int = 0) -> None:
    """One intra-op thread (toy tensors are tiny: ~30x faster on a busy 2-core machine) and a
    seed."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def repo_root() -> str | None:
    """The ddil_lab checkout this package runs from (the folder holding ``pyproject.toml`` and
    ``notebooks/`` above the package), else the first such folder above the working directory;
    None for an installed package used outside a checkout."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    starts = [pkg, os.getcwd()]
    for start in starts:
        d = start
        while True:
            if os.path.isfile(os.path.join(d, "pyproject.toml")) and \
                    os.path.isdir(os.path.join(d, "notebooks")):
                return d
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
    return None


def repo_path(path: str) -> str:
    """A run folder or file as the notebooks use it: an absolute path unchanged, a relative one
    (``runs/notebooks/01_covariate_shift``) against the repository root (``repo_root``; the
    working directory outside a checkout). JupyterLab starts a notebook's kernel in
    ``notebooks/`` and papermill in the folder it runs from: both then share one ``runs/``
    (and, e.g., notebook 05's cached teacher). "" stays "" (no folder)."""
    if not path or os.path.isabs(path):
        return path
    return os.path.join(repo_root() or os.getcwd(), path)


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def png_bytes(fig, dpi: int = 90, tight: bool = True) -> bytes:
    """A figure rendered to PNG. ``tight=False`` keeps the canvas at figsize x dpi pixels, so
    every redraw of a figure of the same figsize has the same size on screen."""
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return buf.getvalue()


def _show_png(png: bytes) -> None:
    """Display PNG bytes once in a notebook (nothing outside IPython)."""
    if not _in_ipython():
        return
    from IPython.display import Image, display
    display(Image(data=png))


def _scalar_items(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _scalar_items(v, key + "/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield key, float(v)


class Recorder:
    """What a notebook run leaves behind for readers and tests: figures as PNG files and
    scalar metrics in ``metrics.json`` under ``out_dir`` (a relative ``out_dir`` is resolved
    against the repository root: ``repo_path``).

    ``rec.figure("name", fig)`` saves the figure and shows the saved PNG;
    ``rec.log(prefix, {...})`` adds scalars (nested dicts are flattened as ``a/b``, non-scalars
    are dropped); ``rec.save()`` writes ``metrics.json``: ``{"metrics": {name: value},
    "figures": {name: png path}}``.
    """

    def __init__(self, out_dir: str):
        out_dir = repo_path(out_dir)  # relative: under the repository root (``repo_path``)
        self.out_dir = out_dir
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        os.makedirs(out_dir, exist_ok=True)
        self.metrics: dict[str, float] = {}
        self.paths: dict[str, str] = {}  # figure name -> PNG

    def figure(self, name: str, fig, dpi: int = 90, show: bool = True, tight: bool = True
               ) -> None:
        """Save ``fig`` as ``name.png`` and, with ``show``, display that PNG (rendered once:
        the same bytes the tests read from ``self.paths[name]``). Returns None, so a cell
        ending with it echoes nothing."""
        png = png_bytes(fig, dpi, tight)
        self.save_png(name, png)
        if show:
            _show_png(png)

    def save_png(self, name: str, png: bytes) -> str:
        """Write PNG bytes as ``name.png`` and list it as a figure of this run."""
        path = os.path.join(self.out_dir, f"{name}.png")
        with open(path, "wb") as f:
            f.write(png)
        self.paths[name] = path
        return path

    def image(self, name: str, path: str, show: bool = True) -> None:
        """List an existing PNG (e.g. a figure the toy table wrote) as a figure of this run
        under ``name`` and, with ``show``, display it."""
        self.paths[name] = path
        if show:
            with open(path, "rb") as f:
                _show_png(f.read())

    def log(self, prefix: str, values: dict) -> None:
        for k, v in _scalar_items(values, f"{prefix}/" if prefix else ""):
            self.metrics[k] = v

    def save(self) -> str:
        """Write ``metrics.json``, with the run's wall and CPU seconds so far (``run/*``)."""
        self.metrics["run/wall_s"] = time.perf_counter() - self._t0
        self.metrics["run/cpu_s"] = time.process_time() - self._c0
        path = os.path.join(self.out_dir, "metrics.json")
        with open(path, "w") as f:
            json.dump({"metrics": self.metrics, "figures": self.paths}, f, indent=1,
                      allow_nan=True)
        return path


def mean_sd(v) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of a list of numbers."""
    v = [float(x) for x in v]
    mu = sum(v) / len(v)
    sd = math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mu, sd


def plus_minus(mu: float, sd: float, digits: int = 2, fmt: str = "{:.3g}") -> str:
    """``mu ± sd`` with both rounded to the same decimal place: the spread to ``digits``
    significant digits, the mean to the spread's last digit (``0.0235 ± 0.00071``,
    ``1216 ± 98``). A zero or non-finite spread: both with ``fmt``."""
    if not (math.isfinite(mu) and math.isfinite(sd)) or sd <= 0:
        return f"{fmt.format(mu)} ± {fmt.format(sd)}"
    place = digits - 1 - math.floor(math.log10(sd))  # decimals that keep `digits` of sd
    sd_r = round(sd, place)
    if sd_r >= 10 ** (digits - place):  # rounding carried over (e.g. 99.6 -> 100)
        place -= 1
        sd_r = round(sd, place)
    if place > 0:
        return f"{mu:.{place}f} ± {sd_r:.{place}f}"
    return f"{round(mu, place):.0f} ± {sd_r:.0f}"


def markdown_table(rows: dict[str, dict], keys, fmt: str = "{:.3g}") -> str:
    """A Markdown table, one row per name; a value given as a list of seeds shows as
    mean ± std, both rounded to the std's precision (``plus_minus``), a missing or NaN value
    as "–"."""
    def cell(v):
        if isinstance(v, (list, tuple)):
            v = [float(x) for x in v]
            if len(v) > 1:
                return plus_minus(*mean_sd(v), fmt=fmt)
            v = v[0]
        if isinstance(v, float) and math.isnan(v):
            return "–"  # not measured for this row (e.g. a teacher has no training states)
        return fmt.format(v) if isinstance(v, (int, float)) else str(v)
    lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r.get(k, float("nan"))) for k in keys) + " |"
              for name, r in rows.items()]
    return "\n".join(lines)


def seed_lists(rows: list[dict]) -> dict:
    """Per-seed metric dicts -> one dict of lists (scalars only), for tables and logging."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
    return {k: [r[k] for r in rows] for k in keys}


def seed_mean(rows: list[dict]) -> dict:
    """Per-seed metric dicts -> their mean (scalars only)."""
    return {k: sum(v) / len(v) for k, v in seed_lists(rows).items()}


def verdict(rows: dict, a: str, b: str, key: str = "mmd_x1e3", lower_is_better: bool = True,
            label: str | None = None) -> str:
    """One honest sentence comparing arm ``b`` with arm ``a`` on a metric over seeds: the
    change of the mean, in units of its standard error (from the seeds' spread). Within 1 SE:
    no difference; 1-2 SE: suggestive; above 2 SE: clear. One seed: no error bar. ``label``
    names the metric as the table above it does (default: ``key``)."""
    va, vb = [r[key] for r in rows[a]], [r[key] for r in rows[b]]
    ma, mb = sum(va) / len(va), sum(vb) / len(vb)
    if len(va) > 1 and len(vb) > 1:
        sa = sum((x - ma) ** 2 for x in va) / (len(va) - 1)
        sb = sum((x - mb) ** 2 for x in vb) / (len(vb) - 1)
        se = math.sqrt(sa / len(va) + sb / len(vb))
    else:
        se = float("nan")
    word = "better" if ((mb < ma) if lower_is_better else (mb > ma)) else "worse"
    d = abs(mb - ma)
    if math.isnan(se):
        tail = "one seed only: no error bar; rerun with more seeds before concluding"
    elif d <= se:
        tail = f"within 1 standard error ({se:.3g}): no difference"
    elif d <= 2 * se:
        tail = f"{d / se:.1f} standard errors ({se:.3g}): suggestive, not clear"
    else:
        tail = f"{d / se:.1f} standard errors ({se:.3g}): clear"
    return (f"{label or key}: {a} {ma:.3g} -> {b} {mb:.3g}, {word} by {d:.3g} "
            f"({len(va)} vs {len(vb)} seeds); {tail}.")


def show_lines(lines, title: str | None = None) -> None:
    """Display sentences (e.g. ``verdict`` lines) as a Markdown list, which the browser wraps
    between words (printed lines wrap mid-word in JupyterLab); printed outside IPython."""
    lines = list(lines)
    text = (f"{title}\n\n" if title else "") + "\n".join(f"- {line}" for line in lines)
    if not _in_ipython():
        print(text)
        return
    from IPython.display import Markdown, display
    display(Markdown(text))


_FILLED = "ddil_lab/filled"  # metadata key of a sentence written from a run's numbers


def fill(template: str, recorder: Recorder | None = None, name: str = "text", **values
         ) -> None:
    """A paragraph of the notebook's text written from the run: ``template.format(**values)``,
    displayed as Markdown (marked as filled, with the values, in the output's metadata, so the
    tests can check that the numbers it quotes are the run's) and returned. With a recorder
    the numeric values are logged as ``said/<name>/<key>``. Use it for every number a
    notebook's text quotes, instead of typing one into a markdown cell. Outside IPython the
    text is printed. Returns None (nothing for a cell to echo)."""
    text = template.format(**values)
    nums = {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if recorder is not None:
        recorder.log(f"said/{name}", nums)
    if _in_ipython():
        from IPython.display import Markdown, display
        display(Markdown(text), metadata={_FILLED: {"name": name, "values": nums}})
    else:
        print(text)


def _control(name: str, spec, value):
    import ipywidgets as w
    style = {"description_width": "initial"}
    if isinstance(spec, w.ValueWidget):
        return spec
    if isinstance(value, bool) or spec is bool:
        return w.Checkbox(value=bool(value), description=name, style=style)
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(v, str) for v in spec):
        return w.Dropdown(options=list(spec), value=value, description=name, style=style)
    if isinstance(spec, tuple) and len(spec) in (2, 3):
        lo, hi = spec[0], spec[1]
        if all(isinstance(v, int) for v in spec) and isinstance(value, int):
            return w.IntSlider(value=value, min=lo, max=hi, step=spec[2] if len(spec) == 3 else 1,
                               description=name, style=style, continuous_update=False)
        return w.FloatSlider(value=float(value), min=lo, max=hi,
                             step=spec[2] if len(spec) == 3 else (hi - lo) / 20,
                             description=name, style=style, continuous_update=False)
    raise ValueError(f"control {name}={spec!r}: give (min, max[, step]), a list of strings, "
                     f"bool, or an ipywidgets widget")


class Explorer:
    """One figure with controls: ``draw(**values) -> Figure``, redrawn in place.

    ``static()`` draws the figure for the starting ``values``. ``show()`` displays the controls
    above one ipywidgets ``Output`` that holds the figure; moving a control replaces the PNG in
    that output (``self.output.outputs`` always holds exactly one image, rendered at the same
    dpi on a fixed canvas, so a figure of fixed figsize keeps its size). The displayed bundle
    also carries the starting PNG as ``image/png``: frontends without widgets (papermill's
    output, nbconvert, GitHub) show that static figure instead, exactly once. ``fixed``
    keywords are passed to every draw. The kernel runs one request at a time: controls moved
    while later cells are still running redraw only once those cells have finished.
    """

    def __init__(self, draw: Callable, controls: dict, values: dict, dpi: int = 90, **fixed):
        self.draw, self.controls, self.values, self.fixed = draw, controls, dict(values), fixed
        self.dpi = dpi
        self.widgets: dict = {}
        self.output = self.box = None
        self.redraws = 0

    def static(self):
        return self.draw(**self.values, **self.fixed)

    def render(self, fig) -> bytes:
        return png_bytes(fig, self.dpi, tight=False)

    @staticmethod
    def _png_output(png: bytes) -> dict:
        import base64
        return {"output_type": "display_data", "metadata": {},
                "data": {"image/png": base64.b64encode(png).decode("ascii"),
                         "text/plain": "<figure>"}}

    def _update(self, _change=None):
        self.values.update({k: wd.value for k, wd in self.widgets.items()})
        self.output.outputs = (self._png_output(self.render(self.static())),)  # in place
        self.redraws += 1

    def show(self, enabled: bool = True, png: bytes | None = None, display: bool = True):
        """Display the controls above the figure (``png``: the starting figure already
        rendered, else drawn now). Returns the box, or None when disabled or without
        ipywidgets (then nothing is displayed: show the static figure yourself)."""
        if not enabled:
            return None
        try:
            import ipywidgets as w
        except ImportError:  # no widgets: the static figure is all there is
            return None
        png = png if png is not None else self.render(self.static())
        self.widgets = {k: _control(k, spec, self.values[k]) for k, spec in self.controls.items()}
        self.output = w.Output(outputs=(self._png_output(png),))  # the figure, in its state
        for wd in self.widgets.values():
            wd.observe(self._update, names="value")
        controls = w.HBox(list(self.widgets.values()), layout=w.Layout(flex_flow="row wrap"))
        self.box = w.VBox([controls, self.output])
        if display and _in_ipython():
            from IPython.display import display as show
            show(self.mimebundle(png), raw=True)
        return self.box

    def mimebundle(self, png: bytes) -> dict:
        """What ``show`` displays: the widget view (controls and figure) and, for frontends
        without widgets, the starting figure as ``image/png``."""
        import base64
        bundle = self.box._repr_mimebundle_()
        bundle["image/png"] = base64.b64encode(png).decode("ascii")
        return bundle


def explore(draw: Callable, controls: dict, values: dict, recorder: Recorder | None = None,
            name: str | None = None, widgets: bool = True, **fixed) -> None:
    """Draw ``draw(**values, **fixed)`` once, save it through the recorder as ``name``, and
    show it: with ``widgets``, under ``controls`` (``name -> (min, max, step)``, a list of
    choices, or bool) that redraw it in place (see ``Explorer``); else as a plain PNG. The
    figure is shown exactly once either way. Returns None (nothing for a cell to echo); use
    ``Explorer`` directly to keep a handle."""
    ex = Explorer(draw, controls, values, **fixed)
    png = ex.render(ex.static())
    if recorder is not None and name:
        recorder.save_png(name, png)
    if ex.show(widgets, png) is None:
        _show_png(png)


def _assigned_names(src: str) -> list[str]:
    return list(_assignments(src))


def _assignments(src: str) -> dict:
    """name -> (annotation text or None, literal value or ``_NOT_LITERAL``) of a cell's
    top-level assignments."""
    import ast
    out = {}
    for node in ast.parse(src).body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)):
            continue  # imports, calls, ... assign no parameter
        targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
        ann = ast.unparse(node.annotation) if isinstance(node, ast.AnnAssign) else None
        try:
            value = ast.literal_eval(node.value) if node.value is not None else _NOT_LITERAL
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            value = _NOT_LITERAL
        out.update({t.id: (ann, value) for t in targets if isinstance(t, ast.Name)})
    return out


_NOT_LITERAL = object()
# the types a parameter's annotation names (``Optional[X]``: None or X)
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list,),
          "dict": (dict,)}


def _check_value(name: str, ann: str, value) -> None:
    """One injected parameter against its annotation and, for the names the notebooks share,
    its range; ``ConfigError`` naming it."""
    from .validation import (check_int, check_number, check_out_dir, fail, is_number,
                             parse_seeds)

    optional = ann.startswith("Optional[") and ann.endswith("]")
    base = ann[9:-1] if optional else ann
    if value is None and optional:
        return
    kinds = _TYPES.get(base)
    if kinds is not None:
        ok = isinstance(value, kinds) and (base == "bool" or not isinstance(value, bool))
        if ok and base == "float":
            ok = is_number(value)
        if not ok:
            fail(name, value, ("None or " if optional else "") + f"a {base} (the parameter's "
                 f"annotation)")
    if name in _POSITIVE:
        check_int(name, value, 1)
    elif name in _FRACTIONS:
        check_number(name, value, 0.0, 1.0)
    elif name == "lr":
        check_number(name, value, 0.0, 1.0, lo_open=True)
    elif name == "seeds":
        parse_seeds(name, value, 1)
    elif name == "out_dir":
        check_out_dir(name, value)


# ranges of the parameter names the notebooks share (their annotations give the types)
_POSITIVE = ("n_eval", "n_steps", "steps", "batch_size", "substeps", "pd_substeps",
             "critic_steps", "fine_steps", "init_steps", "dmd2_steps", "dmd2_batch_size",
             "eval_every", "n_snapshot", "snapshot_every", "teacher_steps", "classifier_steps")
_FRACTIONS = ("ddil_share", "share", "p_student")


def check_parameters(history: list[str] | None = None) -> list[str]:
    """Stop a papermill run whose injected parameters the notebook does not define, or whose
    values it does not allow.

    papermill runs a notebook's ``parameters`` cell, then its own injected cell (which starts
    with ``# Parameters``) and only warns about names it does not know, so ``-p stepz 1`` would
    run the whole notebook with its defaults. Call this first in the cell after the parameters:
    it reads the cells this kernel ran (IPython's ``In``, or ``history``), and raises a
    ``ConfigError`` (a ``ValueError``) naming each unknown injected name and the closest known
    one. Each injected value is then checked against its annotation in the parameters cell
    (``n_eval: int``, ``seeds: list``, ``Optional[...]``) and, for the names the notebooks
    share, its range (``n_eval``, ``steps``, ... >= 1; ``seeds`` a non-empty list of distinct
    ints; ``out_dir`` a folder that can be made; shares in [0, 1]; ``lr`` in (0, 1]), so a bad
    value stops the run here, naming the parameter, not in papermill or torch later. Returns
    the injected names (empty outside papermill)."""
    import difflib

    from .validation import ConfigError

    if history is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return []
        ip = get_ipython()
        history = list(ip.user_ns.get("In", [])) if ip is not None else []
    injected = [i for i, src in enumerate(history) if src.lstrip().startswith("# Parameters")]
    if not injected or injected[-1] == 0:
        return []
    i = injected[-1]
    known, given = _assignments(history[i - 1]), _assignments(history[i])
    unknown = [n for n in given if n not in known]
    if unknown:
        lines = []
        for n in unknown:
            close = difflib.get_close_matches(n, list(known), n=1, cutoff=0.5)
            lines.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown notebook parameter(s) {', '.join(lines)}; this notebook's "
                          f"parameters are: {', '.join(known)}")
    for name, (_, value) in given.items():
        ann = known[name][0]
        if ann is not None and value is not _NOT_LITERAL:
            _check_value(name, ann, value)
    return list(given)


def output_problems(nb: dict) -> list[str]:
    """What a reader should not see in an executed notebook (its JSON as a dict): the same image
    shown twice, and stray values echoed as a cell's last expression: a string (e.g. a path),
    bytes, a matplotlib object or an ``<... object at 0x...>`` repr.
    Returns one message per problem (empty: clean). The notebook tests run it on every notebook.
    """
    problems, seen = [], {}
    for i, cell in enumerate(nb.get("cells", [])):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            png = data.get("image/png")
            if png:
                key = "".join(png) if isinstance(png, list) else png
                if key in seen:
                    problems.append(f"cell {i} shows the same image as cell {seen[key]}")
                seen.setdefault(key, i)
            if out.get("output_type") == "execute_result" and set(data) == {"text/plain"}:
                text = "".join(data["text/plain"]).strip()
                if text[:1] in "'\"" or text.startswith(("b'", 'b"', "<Figure", "<matplotlib",
                                                          "[<matplotlib")) \
                        or (text.startswith("<") and " object at 0x" in text):
                    problems.append(f"cell {i} echoes a stray value: {text[:80]}")
    return problems
