"""Every parameter of every entry point refuses bad input up front with ONE error type,
``ConfigError`` (a ``ValueError``), naming the parameter, its value and what is allowed.

Type errors are generated from the signatures (a bool, a non-integer float, NaN, a string
where a count or a weight is expected...), so a new parameter is covered or the coverage test
fails; range errors and objects of the wrong type are listed by hand. The table sizes are
counted in docs/robust.md."""
import inspect
import math
import os
import sys

import pytest
import torch

from ddil_lab.config import RunConfig, apply_overrides, build
from ddil_lab.diffusion import Schedule
from ddil_lab.methods import DMD2, LCM, PD
from ddil_lab.rollout import StateSampler
from ddil_lab.train import distill, progressive
from ddil_lab.train.settings import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
NAN, INF = math.nan, math.inf


class Heavy(AssertionError):
    pass


class FakeBackend:
    """The Backend contract, failing on any real work: validation must come first."""
    schedule, has_data, support, shape = Schedule(), True, None, (2,)

    def teacher(self, x, t, cond=None):
        raise Heavy("the teacher was called before the settings were checked")

    def _heavy(self, *a, **k):
        raise Heavy("heavy work started before the settings were checked")

    sample_data = sample_cond = sample_noise = make_student = make_critic = _heavy


def _distill(**kw):
    return distill(FakeBackend(), kw.pop("method", PD()), kw.pop("sampler", None), **kw)


def _progressive(**kw):
    return progressive(FakeBackend(), **kw)


# entry point -> (callable taking keyword arguments, its signature's owner)
ENTRY = {"PD": (PD, PD), "LCM": (LCM, LCM), "DMD2": (DMD2, DMD2),
         "StateSampler": (StateSampler, StateSampler), "Schedule": (Schedule, Schedule),
         "distill": (_distill, distill), "progressive": (_progressive, progressive)}
# bad values by the annotation's kind (generated for every parameter of that kind)
BAD_BY_KIND = {
    "int": [True, 2.5, NAN, "3", None],
    "float": [True, NAN, INF, "0.1", None, 10 ** 400],
    "bool": ["no", 1, None],
    "str": [3, None, "no-such-choice"],
    "tuple": ["ab", 3],
}
# parameters that take objects, or whose annotation says nothing generic: checked by hand below
BY_HAND = {("PD", "teacher"), ("StateSampler", "nfe"), ("distill", "backend"),
           ("distill", "method"), ("distill", "sampler"), ("distill", "accelerator"),
           ("distill", "optimizer_class"), ("distill", "out_dir"), ("progressive", "backend"),
           ("progressive", "sampler_factory"), ("progressive", "steps_per_stage"),
           ("progressive", "kw"), ("distill", "desc")}


def _kind(annotation: str):
    """('int' | 'float' | ..., None allowed?) of a string annotation, or None."""
    parts = [a.strip() for a in str(annotation).split("|")]
    none = "None" in parts
    parts = [p for p in parts if p != "None"]
    if len(parts) == 1 and parts[0] in BAD_BY_KIND:
        return parts[0], none
    return None


def generated():
    for entry, (_, owner) in ENTRY.items():
        for name, p in inspect.signature(owner).parameters.items():
            if (entry, name) in BY_HAND or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            kind = _kind(p.annotation)
            assert kind, f"{entry}({name}: {p.annotation}) has no generated cases: add it BY_HAND"
            kind, none_ok = kind
            for bad in BAD_BY_KIND[kind]:
                if bad is None and none_ok:
                    continue
                if kind == "str" and bad == "no-such-choice" and name == "out_dir":
                    continue
                yield pytest.param(entry, name, bad, id=f"{entry}.{name}={bad!r}")


GENERATED = list(generated())


@pytest.mark.parametrize("entry,name,bad", GENERATED)
def test_generated_type_errors_are_named(entry, name, bad):
    fn, _ = ENTRY[entry]
    with pytest.raises(ConfigError) as e:
        fn(**{name: bad})
    msg = str(e.value)
    assert msg.startswith(f"{name}={bad!r} is not allowed") and "; allowed: " in msg, msg


RANGES = [  # (entry, kwargs, message pattern): values of the right type out of range
    ("PD", {"n_steps": 0}, r"n_steps=0 is not allowed; allowed: an int >= 1"),
    ("PD", {"substeps": 0}, r"substeps=0 .*an int >= 1"),
    ("PD", {"space": "eps"}, r"space='eps' .*one of \('x0', 'v'\)"),
    ("PD", {"teacher": 3}, r"teacher='<int>' .*None or a teacher denoiser"),
    ("LCM", {"skip": 50}, r"skip=50 .*an int in \[1, 49\]"),
    ("LCM", {"solver_steps": 1}, r"solver_steps=1 .*an int >= 2"),
    ("LCM", {"ema_decay": 1.0}, r"ema_decay=1.0 .*\[0, 1\)"),
    ("LCM", {"huber_c": 0.0}, r"huber_c=0.0 .*> 0"),
    ("LCM", {"ddil_steps": ()}, r"ddil_steps=\(\) .*non-empty list of ints"),
    ("LCM", {"ddil_steps": (3, 0)}, r"ddil_steps=\(3, 0\)"),
    ("DMD2", {"critic_steps": 0}, r"critic_steps=0"),
    ("DMD2", {"tau_range": (0.5, 0.2)}, r"tau_range=\(0.5, 0.2\) .*0 <= lo < hi <= 1"),
    ("DMD2", {"tau_range": (0.1, 0.2, 0.3)}, r"tau_range=\(0.1, 0.2, 0.3\)"),
    ("DMD2", {"gan_weight": -1.0}, r"gan_weight=-1.0 .*>= 0"),
    ("DMD2", {"norm_floor": 0.0}, r"norm_floor=0.0 .*> 0"),
    ("StateSampler", {"beta_frwd": -0.5, "beta_mixed": 1.5}, r"beta_frwd=-0.5 .*>= 0"),
    ("StateSampler", {"beta_frwd": 0.5}, r"priors=.*they sum to 0.5"),
    ("StateSampler", {"p_student": 1.5}, r"p_student=1.5 .*\[0, 1\]"),
    ("StateSampler", {"refresh_every": 0}, r"refresh_every=0 .*>= 1"),
    ("StateSampler", {"rollout_until": -2}, r"rollout_until=-2 .*>= -1"),
    ("StateSampler", {"nfe": {"teacher": 0}}, r"nfe=\{'teacher': 0\}"),
    ("Schedule", {"T": 1}, r"T=1 .*>= 2"),
    ("Schedule", {"beta_end": 0.0}, r"beta_end=0.0 .*exceed beta_start"),
    ("Schedule", {"kind": "cosine", "beta_end": 0.02}, r"beta_end=0.02 .*None for kind='cosine'"),
    ("distill", {"steps": 0}, r"steps=0 .*an int >= 1"),
    ("distill", {"lr": 2.0}, r"lr=2.0 is not allowed: AdamW moves each weight by about lr"),
    ("distill", {"lr": 1e30}, r"lr=1e\+30 .*\(0, 1\]"),
    ("distill", {"lr": 0.0}, r"lr=0.0 .*\(0, 1\]"),
    ("distill", {"critic_lr": 5.0}, r"critic_lr=5.0"),
    ("distill", {"ema_decay": 0.0}, r"ema_decay=0.0 is not allowed: 0 would be an EMA equal to "
                                    r"the student; None turns EMA off"),
    ("distill", {"ema_decay": 1.0}, r"ema_decay=1.0 .*\(0, 1\)"),
    ("distill", {"seed": 2 ** 64}, r"seed=18446744073709551616 .*\[0, 9223372036854775807\]"),
    ("distill", {"seed": -1}, r"seed=-1"),
    ("distill", {"warmup": -1}, r"warmup=-1 .*>= 0"),
    ("distill", {"grad_clip": 0.0}, r"grad_clip=0.0 .*None or a finite number > 0"),
    ("distill", {"weight_decay": -0.1}, r"weight_decay=-0.1"),
    ("distill", {"log_every": 0}, r"log_every=0"),
    ("distill", {"batch_size": 0}, r"batch_size=0"),
    ("distill", {"keep_checkpoints": -1}, r"keep_checkpoints=-1"),
    ("distill", {"max_consecutive_skips": -1}, r"max_consecutive_skips=-1"),
    ("distill", {"max_skips": -1}, r"max_skips=-1 .*None or an int >= 0"),
    ("distill", {"resume": True}, r"out_dir=None .*resume=True writes / reads checkpoints"),
    ("distill", {"callbacks": (print,)}, r"eval_every=0 is not allowed: the 1 callback\(s\) run "
                                         r"every eval_every steps, so with 0 they would never run"),
    ("distill", {"callbacks": (print, 3), "eval_every": 2}, r"callbacks=.* a tuple or list of "
                                                            r"functions f\(step, result\)"),
    ("distill", {"out_dir": 3}, r"out_dir=3 .*a folder path"),
    ("distill", {"method": "pd"}, r"method='<str>' .*a Method"),
    ("distill", {"method": PD}, r"method='<type>' .*a Method"),
    ("distill", {"sampler": {"beta_frwd": 1.0}}, r"sampler='<dict>' .*ddil_lab.StateSampler"),
    ("distill", {"optimizer_class": "adamw"}, r"optimizer_class='adamw' .*Optimizer subclass"),
    ("distill", {"optimizer_class": torch.nn.Linear}, r"optimizer_class=<class .*Linear'>"),
    ("distill", {"accelerator": object()}, r"accelerator='<object>' .*accelerate.Accelerator"),
    ("distill", {"desc": 3}, r"desc=3 .*None or a string"),
    ("progressive", {"start": 12, "end": 4}, r"start=12 .*end=4 times a power of two"),
    ("progressive", {"end": 0}, r"end=0 .*>= 1"),
    ("progressive", {"steps_per_stage": [5]}, r"steps_per_stage=\[5\] .*list of 3 ints"),
    ("progressive", {"steps_per_stage": 2.5}, r"steps_per_stage=2.5 .*an int >= 1"),
    ("progressive", {"steps_per_stage": True}, r"steps_per_stage=True"),
    ("progressive", {"sampler_factory": 3}, r"sampler_factory=3 .*None or a function"),
    ("progressive", {"substeps": 4}, r"substeps=4 .*not a distill parameter"),
    ("progressive", {"lr": NAN}, r"lr=nan"),
    ("progressive", {"steps": 5}, r"steps=5 .*steps come from steps_per_stage"),
]


@pytest.mark.parametrize("entry,kw,pattern", RANGES,
                         ids=[f"{e}-{'-'.join(f'{k}={v!r}' for k, v in kw.items())}"
                              for e, kw, _ in RANGES])
def test_ranges_and_object_types_are_named(entry, kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ENTRY[entry][0](**kw)


def test_every_hand_checked_parameter_has_a_case():
    hand = {(e, k) for e, kw, _ in RANGES for k in kw}
    missing = sorted(p for p in BY_HAND if p not in hand and p[1] not in ("backend", "kw"))
    assert not missing, missing


def test_wrong_backend_objects_are_named():
    class NoTeacher(FakeBackend):
        teacher = None
    for backend, pattern in ((object(), r"backend='<object>' .*it has no schedule, teacher"),
                             (NoTeacher(), r"backend.teacher='<NoneType>' .*a denoiser"),
                             (type("B", (FakeBackend,), {"schedule": 3})(),
                              r"backend.schedule='<int>' .*a ddil_lab.Schedule")):
        with pytest.raises(ConfigError, match=pattern):
            distill(backend, PD(), None, steps=2)
        with pytest.raises(ConfigError, match=pattern):
            progressive(backend, start=8, end=4)


def test_out_dir_that_is_a_file_or_below_one(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"out_dir='.*a_file' is not allowed: it is an existing "
                                          r"file; allowed: a folder"):
        _distill(out_dir=str(f), ckpt_every=1)
    with pytest.raises(ConfigError, match=r"out_dir='.*a_file/run' is not allowed: .*a_file is "
                                          r"a file, so no folder can be made below it"):
        _distill(out_dir=str(f / "run"))


def test_validation_happens_before_the_student_is_made():
    """PD's grid messages name the parameter, and come before any heavy work (the fake
    backend raises ``Heavy`` on any real call)."""
    cases = [(PD(n_steps=1000, substeps=2), r"substeps=2 is not allowed: with n_steps=1000 the "
                                            r"teacher would need a 2000-step grid"),
             (PD(n_steps=4, substeps=29), r"substeps=29 .*749->500 is not on the 4-step grid"),
             (PD(n_steps=2000), r"n_steps=2000 .*an int in \[1, T=1000\]"),
             (LCM(n_steps=2000), r"n_steps=2000 .*an int in \[1, T=1000\]"),
             (LCM(solver_steps=2000, skip=1), r"solver_steps=2000 .*\[2, T=1000\]"),
             (DMD2(tau_range=(0.5, 0.5001)), r"tau_range=\(0.5, 0.5001\) .*a range that holds")]
    for method, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            distill(FakeBackend(), method, None, steps=2)


def test_rollout_until_beyond_the_schedule_fails_before_training():
    s = StateSampler(beta_frwd=0.5, beta_mixed=0.5, rollout_until=1000)
    with pytest.raises(ConfigError, match=r"rollout_until=1000 is not allowed: no timestep of the "
                                          r"schedule is that noisy; allowed: an int in "
                                          r"\[-1, T-1=999\]"):
        distill(FakeBackend(), PD(), s, steps=2)


# ---------------------------------------------------------------------------------------------
# config files, --set overrides and the experiment scripts' flags
# ---------------------------------------------------------------------------------------------
YAML_FILES = [  # (file text, message pattern)
    ("train: {steps: '100'}", r"train.steps='100' is not allowed; allowed: an int >= 1"),
    ("train: {lr: 1e-3}", r"train.lr='1e-3' is not allowed"),  # YAML 1.1 reads 1e-3 as text
    ("train: {resume: 'no'}", r"train.resume='no' is not allowed; allowed: True or False"),
    ("train: {batch_size: 32.0}", r"train.batch_size=32.0"),
    ("train: {seed: .nan}", r"train.seed=nan"),
    ("method: {name: pd, n_steps: '4'}", r"method.n_steps='4' is not allowed"),
    ("method: {name: [pd]}", r"method.name=\['pd'\] .*one of"),
    ("method: {name: lcm, ddil_steps: 3}", r"method.ddil_steps=3"),
    ("sampler: {beta_frwd: yes}", r"sampler.beta_frwd=True is not allowed"),
    ("sample: {threshold: [static]}", r"sample.threshold=\['static'\]"),
    ("sample: {seed: -3}", r"sample.seed=-3"),
    ("- backend\n- method\n", r"config='.*bad.yaml' is not allowed: its top level is a list; "
                              r"allowed: a YAML mapping with sections"),
    ("train: {steps: 3\n", r"config='.*bad.yaml' is not allowed: not valid YAML at line 2"),
    ("train:\n  steps: 3\n  steps: 4\n", r"not valid YAML at line 3.*duplicate key 'steps'"),
    ("train: {steps: 3}\ntrain: {lr: 0.1}\n", r"duplicate key 'train'"),
    ("train: 3", r"train=3 is not allowed; allowed: a mapping of settings"),
]


@pytest.mark.parametrize("text,pattern", YAML_FILES, ids=[t for t, _ in YAML_FILES])
def test_config_files_with_wrong_types_or_syntax_are_named(text, pattern, tmp_path):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        RunConfig.from_yaml(str(tmp_path / "bad.yaml")).validate()


OVERRIDES = [  # (--set values, message pattern)
    (["train.steps"], r"override='train.steps' .*section.key=value"),
    (["steps=3"], r"override='steps=3' .*section.key=value"),
    (["trian.steps=3"], r"'trian' is not a configuration section"),
    (["train.steps=[3"], r"train.steps='\[3' is not allowed: not valid YAML"),
    (["train.steps=0"], r"train.steps=0 is not allowed"),
    (["train.ema_decay=0.0"], r"train.ema_decay=0.0 is not allowed: 0 would be an EMA"),
    (["method.name=pd", "method.substeps=2.0"], r"method.substeps=2.0 is not allowed"),
]


@pytest.mark.parametrize("sets,pattern", OVERRIDES, ids=[" ".join(s) for s, _ in OVERRIDES])
def test_set_overrides_are_checked(sets, pattern):
    with pytest.raises(ConfigError, match=pattern):
        RunConfig.from_dict(apply_overrides({}, sets)).validate()


def test_a_bad_config_object_is_named():
    with pytest.raises(ConfigError, match=r"config=\['train'\] .*a mapping with sections"):
        build(["train"])
    with pytest.raises(ConfigError, match=r"config='/nonexistent.yaml' .*does not exist"):
        build("/nonexistent.yaml")


def test_train_toy_flags_exit_2_naming_the_flag(tmp_path, capsys):
    """Each bad flag exits with status 2 and a message naming it, not a traceback."""
    sys.path.insert(0, EXPERIMENTS)
    import train_toy

    for bad in ("0", "two"):
        with pytest.raises(SystemExit) as e:
            train_toy.cli(["--threads", bad])
        assert e.value.code == 2
        assert f"argument --threads: '{bad}' is not allowed; allowed: a positive int" in \
            capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    for args, pattern in ((["--out", str(f / "run")], f"train.out_dir='{f}/run' is not allowed: "
                                                      f"{f} is a file"),
                          (["--set", "train.steps=[3"], "train.steps='[3' is not allowed: not "
                                                        "valid YAML"),
                          (["--config", str(f)], f"config='{f}' is not allowed: its top level "
                                                 "is a str")):
        assert train_toy.cli(args) == 2, args
        assert pattern in capsys.readouterr().err, args


def test_train_full_flags_and_overrides_are_named(capsys):
    sys.path.insert(0, EXPERIMENTS)
    import train_full

    with pytest.raises(SystemExit) as e:
        train_full.parse_args(["--config", "x.yaml", "--threads", "-1"])
    assert e.value.code == 2
    assert "argument --threads: '-1' is not allowed; allowed: an int >= 0" in \
        capsys.readouterr().err
    for sets, pattern in ((["max_steps=[2"], r"max_steps='\[2' is not allowed: not valid YAML"),
                          (["max_steps=2", "max_steps=3"], r"max_steps is set twice"),
                          (["=2"], r"--set '=2' is not allowed; allowed: KEY=VALUE")):
        with pytest.raises(ConfigError, match=pattern):
            train_full.overrides(sets)


# =============================================================================================
# the newer entry points (issue 27): experiment scripts, evaluate, shift_diagnostic,
# from_pretrained and the notebooks' parameters
# =============================================================================================
import argparse
import importlib.util

from ddil_lab.validation import MissingPath

HAS_CUDA = torch.cuda.is_available()


def _script(name):
    """An experiments/ script as a module (a fresh copy: tests patch its heavy functions)."""
    spec = importlib.util.spec_from_file_location(f"_bad_inputs_{name}",
                                                  os.path.join(EXPERIMENTS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Parser(Exception):
    pass


def _parser_of(main) -> argparse.ArgumentParser:
    """The ArgumentParser a ``main(argv)`` builds (caught at parse_args, before any work)."""
    orig = argparse.ArgumentParser.parse_args

    def catch(self, *a, **k):
        raise _Parser(self)
    argparse.ArgumentParser.parse_args = catch
    try:
        main([])
    except _Parser as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = orig
    raise AssertionError("main() did not parse its arguments")


def _guarded(name, monkeypatch):
    """``main(argv)`` of a script (or module) whose heavy work raises ``Heavy``: every check
    must come before it."""
    def heavy(*a, **k):
        raise Heavy(f"{name}: heavy work started before the options were checked")
    if name == "evaluate":
        import ddil_lab.evaluate as mod
        import ddil_lab.metrics as metrics
        monkeypatch.setattr(mod, "local_pipeline", heavy)
        monkeypatch.setattr(metrics, "InceptionFeatures", heavy)
        return mod.main
    if name == "random_pipeline":
        import ddil_lab.sd.random_pipeline as mod
        monkeypatch.setattr(mod, "parameter_counts", heavy)
        monkeypatch.setattr(mod, "random_pipeline", heavy)
        return mod.main
    mod = _script(name)
    if name == "image_table":
        monkeypatch.setattr(mod, "make_backend", heavy)
    elif name in ("regime_map", "dmd2_search"):
        monkeypatch.setattr(mod, "run", heavy)
    elif name == "bench":
        monkeypatch.setattr(mod, "bench", heavy)
    elif name == "bench_full":
        import ddil_lab.sd.backend as sdb
        import ddil_lab.sd.random_pipeline as rp
        import ddil_lab.sd.tiny as tiny
        for m, attr in ((sdb, "SDBackend"), (rp, "make_random_pipeline"),
                        (tiny, "make_tiny_pipeline")):
            monkeypatch.setattr(m, attr, heavy)
    return mod.main


# the arguments a script needs to get as far as its checks (required ones, valid)
SCRIPT_BASE = {"image_table": [], "regime_map": [], "dmd2_search": [], "bench": [],
               "bench_full": ["--device", "cpu"],
               "evaluate": ["owner/model", "--protocol", "cifar10-50k", "--out", "{tmp}/ev",
                            "--root", "{cifar}"],
               "random_pipeline": ["--shape", "sd15", "--out", "{tmp}/rp"]}
# options that take any text on purpose, or whose cases are hand-written below
FREE_TEXT = {("evaluate", "model"), ("evaluate", "captions"), ("evaluate", "images"),
             ("evaluate", "root"), ("evaluate", "fid_weights"), ("evaluate", "cache_dir"),
             ("evaluate", "timesteps"), ("image_table", "root"), ("image_table", "teacher"),
             ("image_table", "data"), ("image_table", "net"), ("image_table", "diversity"),
             ("regime_map", "set"), ("regime_map", "compare_to"), ("bench", "setting"),
             ("dmd2_search", "recipe"),
             ("bench", "teacher")}
LIST_OPTIONS = {"seeds", "methods", "arms", "blocks", "shapes"}
OUT_OPTIONS = {"out", "models", "teacher_dir"}


def generated_script_cases():
    """One bad value per option, by the option's argparse type: -1 for an int, NaN for a
    float, an empty list for a list option, an existing file for a folder option, 'cuda' for
    a device (where no CUDA device is visible)."""
    import ddil_lab.evaluate as ev
    import ddil_lab.sd.random_pipeline as rp

    mains = {"evaluate": ev.main, "random_pipeline": rp.main}
    for name in SCRIPT_BASE:
        parser = _parser_of(mains.get(name) or _script(name).main)
        for act in parser._actions:
            if isinstance(act, (argparse._HelpAction, argparse._StoreTrueAction)) or act.choices:
                continue
            flag = act.option_strings[0] if act.option_strings else act.dest
            if act.type is int:
                bad = "-1"
            elif act.type is float:
                bad = "nan"
            elif act.dest in LIST_OPTIONS:
                bad = ""
            elif act.dest in OUT_OPTIONS:
                bad = "{file}"
            elif act.dest == "device":
                if HAS_CUDA:
                    continue
                bad = "cuda"
            else:
                assert (name, act.dest) in FREE_TEXT, f"{name} {flag}: no generated case; add " \
                                                      "it to FREE_TEXT with a hand-written one"
                continue
            yield pytest.param(name, flag, act.dest, bad, id=f"{name} {flag}={bad!r}")


SCRIPT_GENERATED = list(generated_script_cases())


@pytest.fixture
def files(tmp_path):
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "a_file").write_text("x")
    return {"tmp": str(tmp_path), "cifar": str(tmp_path / "cifar"),
            "file": str(tmp_path / "a_file")}


def _argv(args, files):
    return [a.format(**files) for a in args]


def _names(msg: str, *names) -> bool:
    return any(msg.startswith(f"{n}=") or msg.startswith(f"{n} ") for n in names)


@pytest.mark.parametrize("script,flag,dest,bad", SCRIPT_GENERATED)
def test_script_options_generated_from_argparse_are_named(script, flag, dest, bad, files,
                                                          monkeypatch):
    main = _guarded(script, monkeypatch)
    with pytest.raises(ConfigError) as e:
        main(_argv(SCRIPT_BASE[script] + [flag, bad], files))
    assert _names(str(e.value), dest, flag, ALIASES.get((script, dest))), str(e.value)


ALIASES = {("evaluate", "out"): "out_dir"}  # the CLI's --out is evaluate()'s out_dir
SCRIPT_CASES = [  # (script, argv, message pattern): the cases and more
    ("dmd2_search", ["--recipe", "batch_size=2.5"], r"--recipe='batch_size=2.5' .*finite int"),
    ("dmd2_search", ["--recipe", "foo=1"], r"--recipe='foo=1' .*KEY one of \('regression_weight'"),
    ("dmd2_search", ["--recipe", "lr=abc"], r"--recipe='lr=abc' .*finite float value for lr"),
    ("dmd2_search", ["--claims", "--recipe", "lr=1e-3"], r"--recipe=\['lr=1e-3'\] .*--claims"),
    ("regime_map", ["--set", "pd.stds=abc"], r"--set pd.stds='abc' .*'abc' is not a finite"),
    ("regime_map", ["--set", "pd.arms=ddl"], r"--set pd.arms='ddl' .*'ddl' is not one of "
                                              r"\('baseline', 'ddil'"),
    ("regime_map", ["--set", "pd.budgets=tabel"], r"--set pd.budgets='tabel' .*\('table', "
                                                   r"'converged', 'dmd2'\)"),
    ("regime_map", ["--set", "pd.classes=2.5"], r"--set pd.classes='2.5' .*not an int"),
    ("regime_map", ["--set", "pd.stds=0.04,-1"], r"--set pd.stds='0.04,-1' .*-1.0 is not"),
    ("regime_map", ["--set", "pd.inits=zeros"], r"--set pd.inits='zeros' .*'pretrained'"),
    ("regime_map", ["--set", "pd.method=lcm"], r"--set='pd.method=lcm' .*BLOCK.FACTOR"),
    ("regime_map", ["--set", "pdd.stds=0.1"], r"--set='pdd.stds=0.1' .*BLOCK in"),
    ("regime_map", ["--set", "pd.stds"], r"--set='pd.stds' .*BLOCK.FACTOR=V1,V2"),
    ("regime_map", ["--seeds", "x"], r"--seeds='x' .*not every seed is an int"),
    ("regime_map", ["--compare-to", "{tmp}/no_map"], r"--compare-to='.*no_map' .*deltas.csv"),
    ("regime_map", ["--seeds", "0,0"], r"--seeds='0,0' .*repeated"),
    ("regime_map", ["--seeds", "0"], r"--seeds='0' .*holds 1 seed.*paired interval"),
    ("regime_map", ["--quick", "--full"], r"--full=True .*--quick or --full, not both"),
    ("regime_map", ["--blocks", "pd,lmc"], r"--blocks='pd,lmc' .*'lmc' is not one of"),
    ("image_table", ["--net", "huge"], r"net='huge' .*one of \('small'"),
    ("image_table", ["--threads", "0"], r"threads=0 .*an int >= 1"),
    ("image_table", ["--steps", "0"], r"steps=0 .*an int >= 1"),
    ("image_table", ["--lr", "-1"], r"lr=-1.0 .*\(0, 1\]"),
    ("image_table", ["--diversity", "lpipz"], r"diversity='lpipz' .*'features'"),
    ("image_table", ["--seeds", ""], r"seeds='' .*holds 0 seed"),
    ("image_table", ["--seeds", "3"], r"seeds='3' .*holds 1 seed"),
    ("image_table", ["--methods", "gan"], r"methods='gan' .*\('pd', 'lcm', 'dmd2'\)"),
    ("image_table", ["--arms", "ddil,x"], r"arms='ddil,x' .*'x' is not one of"),
    ("image_table", ["--data", "mnist"], r"data='mnist' .*\('digits', 'cifar10'\)"),
    ("image_table", ["--teacher", "/nonexistent/t"], r"teacher='/nonexistent/t' .*no such"),
    ("image_table", ["--data", "cifar10"], r"root=None .*data cifar10 needs it"),
    ("image_table", ["--n-eval", "1"], r"n_eval=1 .*>= 2"),
    ("image_table", ["--share", "1.5"], r"share=1.5 .*\[0, 1\]"),
    ("bench", ["--repeats", "0"], r"--repeats=0 .*an int >= 1"),
    ("bench", ["--setting", "ring9"], r"--setting='ring9' .*one of"),
    ("bench", ["--teacher", "big"], r"--teacher='big' .*'exact', 'mlp'"),
    ("bench", ["--methods", "pd,gan"], r"--methods='pd,gan' .*'gan'"),
    ("bench_full", ["--device", "cpu", "--steps", "0"], r"--steps=0 .*an int >= 1"),
    ("bench_full", ["--device", "cpu", "--shapes", "sd99"], r"--shapes='sd99' .*'tiny-sd15'"),
    ("bench_full", ["--device", "cpu", "--resolution", "12"], r"--resolution=12 .*multiple of 8"),
    ("bench_full", ["--device", "gpu"], r"--device='gpu' .*not a torch device"),
    ("evaluate", SCRIPT_BASE["evaluate"] + ["--steps", "0"], r"steps=0 .*an int >= 1"),
    ("evaluate", SCRIPT_BASE["evaluate"] + ["--timesteps", "250,999"],
     r"timesteps=\[250, 999\] .*from the noisiest timestep down"),
    ("evaluate", SCRIPT_BASE["evaluate"] + ["--timesteps", "999,x"], r"timesteps='999,x' .*"
                                                                      r"'x' is not an int"),
    ("evaluate", SCRIPT_BASE["evaluate"] + ["--timesteps", "999,-5"], r"timesteps=\[999, -5\]"),
    ("evaluate", SCRIPT_BASE["evaluate"] + ["--steps", "4", "--timesteps", "999,500"],
     r"steps=4 .*None when timesteps are given"),
    ("evaluate", SCRIPT_BASE["evaluate"] + ["--guidance-scale", "3"],
     r"guidance_scale=3.0 .*None for cifar10-50k"),
    ("evaluate", ["owner/model", "--protocol", "coco5k", "--out", "{tmp}/ev", "--captions",
                  "{file}", "--guidance-scale", "-2"], r"guidance_scale=-2.0 .*>= 0"),
    ("evaluate", ["owner/model", "--protocol", "coco5k", "--out", "{tmp}/ev", "--captions",
                  "{file}", "--lpips-seeds", "1"], r"lpips_seeds=1 .*LPIPS diversity compares"),
    ("evaluate", ["nosuch", "--protocol", "cifar10-50k", "--out", "{tmp}/ev", "--root",
                  "{cifar}"], r"model='nosuch' .*no such folder"),
    ("random_pipeline", ["--shape", "sd15", "--out", "{tmp}"], r"--out='.*' .*holds other "
                                                               r"files .*a_file"),
]


@pytest.mark.parametrize("script,argv,pattern", SCRIPT_CASES,
                         ids=[f"{s} {' '.join(a)}" for s, a, _ in SCRIPT_CASES])
def test_script_options_are_checked_before_any_work(script, argv, pattern, files, monkeypatch):
    main = _guarded(script, monkeypatch)
    with pytest.raises(ConfigError, match=pattern):
        main(_argv(argv, files))


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is visible")
def test_device_cuda_without_cuda_is_one_line_before_loading(files, monkeypatch, capsys):
    """The same message from every entry point, before anything loads; the command line
    prints it as one line and exits with status 2."""
    from ddil_lab.validation import cli_exit

    for script, argv in (("bench_full", ["--device", "cuda"]),
                         ("image_table", ["--device", "cuda"]),
                         ("evaluate", SCRIPT_BASE["evaluate"] + ["--device", "cuda"])):
        main = _guarded(script, monkeypatch)
        assert cli_exit(main, script, _argv(argv, files)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "device='cuda' is not allowed: no CUDA device is visible" in \
            err[0], err


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is visible")
def test_sd_backend_device_cuda_without_cuda_before_loading(tmp_path):
    from ddil_lab.sd import SDBackend

    with pytest.raises(ConfigError, match="device='cuda' is not allowed: no CUDA device"):
        SDBackend(str(tmp_path / "no_pipeline_here"), prompts=["a cat"], device="cuda")


# ---- evaluate(), from its signature ----
EVALUATE_BY_HAND = {"model", "protocol", "out_dir", "captions", "images", "root", "device",
                    "timesteps", "features", "fid_weights", "clip", "lpips_model", "hps",
                    "cache_dir"}


def generated_evaluate_cases():
    from ddil_lab.evaluate import evaluate

    for name, p in inspect.signature(evaluate).parameters.items():
        if name in EVALUATE_BY_HAND:
            continue
        kind = _kind(p.annotation)
        assert kind, f"evaluate({name}: {p.annotation}) has no generated cases: add it BY_HAND"
        kind, none_ok = kind
        for bad in BAD_BY_KIND[kind]:
            if not (bad is None and none_ok):
                yield pytest.param(name, bad, id=f"evaluate.{name}={bad!r}")


@pytest.mark.parametrize("name,bad", list(generated_evaluate_cases()))
def test_evaluate_arguments_generated_from_its_signature(name, bad, files, monkeypatch):
    _guarded("evaluate", monkeypatch)
    from ddil_lab.evaluate import evaluate

    with pytest.raises(ConfigError) as e:
        evaluate("owner/model", "cifar10-50k", files["tmp"] + "/ev", root=files["cifar"],
                 **{name: bad})
    assert str(e.value).startswith(f"{name}={bad!r}"), str(e.value)


EVALUATE_CASES = [  # (kwargs, pattern)
    ({"steps": -3}, r"steps=-3"), ({"timesteps": [250, 999]}, r"timesteps=\[250, 999\]"),
    ({"timesteps": []}, r"timesteps=\[\]"), ({"timesteps": "999"}, r"timesteps='999'"),
    ({"timesteps": [999.0]}, r"timesteps=\[999.0\]"), ({"hps": "yes"}, r"hps='yes'"),
    ({"device": "tpu"}, r"device='tpu'"), ({"out_dir": "{file}"}, r"out_dir='.*a_file'"),
    ({"model": 3}, r"model=3"), ({"model": "a/b/c"}, r"model='a/b/c' .*no such folder"),
    ({"model": "./fx"}, r"model='./fx' .*the folder does not exist"),
    ({"root": None}, r"root=None: protocol cifar10-50k needs"),
    ({"protocol": "coco5k"}, r"captions=None: protocol coco5k needs"),
]


@pytest.mark.parametrize("kw,pattern", EVALUATE_CASES, ids=[str(k) for k, _ in EVALUATE_CASES])
def test_evaluate_ranges_and_paths(kw, pattern, files, monkeypatch):
    _guarded("evaluate", monkeypatch)
    from ddil_lab.evaluate import evaluate

    kw = {k: v.format(**files) if isinstance(v, str) else v for k, v in kw.items()}
    args = {"model": "owner/model", "protocol": "cifar10-50k", "out_dir": files["tmp"] + "/ev",
            "root": files["cifar"], **kw}
    with pytest.raises(ConfigError, match=pattern):
        evaluate(args.pop("model"), args.pop("protocol"), args.pop("out_dir"), **args)


# ---- pipeline folders: pickles, missing components, local paths vs hub ids ----
@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    """A tiny DDPMPipeline folder, a copy whose UNet holds only a pickle, one without unet/ and
    one without model_index.json."""
    import shutil

    from diffusers import UNet2DModel

    from ddil_lab.image.pretrained import make_ddpm_folder

    root = tmp_path_factory.mktemp("ddpm")
    good = make_ddpm_folder(root / "good", (16, 32, 32, 32), 8)
    pickled = shutil.copytree(good, root / "pickled")
    for f in (pickled / "unet").glob("*.safetensors"):
        f.unlink()
    UNet2DModel.from_pretrained(good, subfolder="unet").save_pretrained(
        pickled / "unet", safe_serialization=False)
    no_unet = shutil.copytree(good, root / "no_unet")
    shutil.rmtree(no_unet / "unet")
    no_index = shutil.copytree(good, root / "no_index")
    (no_index / "model_index.json").unlink()
    return {"good": str(good), "pickled": str(pickled), "no_unet": str(no_unet),
            "no_index": str(no_index)}


def _no_unpickling(monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("something was unpickled")
    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                      (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)


def test_pickled_weights_are_refused_on_every_image_path(ddpm, files, monkeypatch):
    """from_pretrained, load_student (the export's reload) and evaluate refuse a UNet held only
    as a pickle, naming the switch that allows it; nothing is unpickled."""
    from ddil_lab.evaluate import evaluate
    from ddil_lab.image import ImageBackend
    from ddil_lab.image.pretrained import load_student

    data = _rand_images()
    _no_unpickling(monkeypatch)
    for call, switch in (
            (lambda: ImageBackend.from_pretrained(ddpm["pickled"], data=data), "allow_pickle=True"),
            (lambda: load_student(ddpm["pickled"]), "allow_pickle=True"),
            (lambda: evaluate(ddpm["pickled"], "cifar10-50k", files["tmp"] + "/ev",
                              root=files["cifar"], steps=2), r"allow_pickle=True \(--allow-pickle\)")):
        with pytest.raises(ConfigError, match=r"model='.*pickled' is not allowed: component "
                                              rf"'unet' holds only pickled weights .*{switch}"):
            call()
    monkeypatch.undo()
    be = ImageBackend.from_pretrained(ddpm["pickled"], data=data, allow_pickle=True)
    assert be.shape == (3, 32, 32)  # the opt-in works


def _rand_images():
    from ddil_lab.image import ImageData
    return ImageData("rand", torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
                     torch.zeros(4), ["a"])


FROM_PRETRAINED_CASES = [  # (model, kwargs, exception, pattern)
    ("no_unet", {}, MissingPath, r"model='.*no_unet' is not allowed: component 'unet' "
                                 r"\(UNet2DModel\) is listed in model_index.json but the folder "
                                 r"has no unet/"),
    ("no_index", {}, MissingPath, r"model='.*no_index' .*holds no model_index.json"),
    ("good", {"allow_pickle": "yes"}, ConfigError, r"allow_pickle='yes' .*True or False"),
    ("good", {"teacher": "x"}, ConfigError, r"teacher='x' .*from_pretrained loads the teacher"),
    ("good", {"guidance": 0.5}, ConfigError, r"guidance=0.5"),
    ("good", {"device": "tpu"}, ConfigError, r"device='tpu'"),
    ("myruns/nosuch/student", {}, MissingPath, r"model='myruns/nosuch/student' .*no such folder"),
    ("nosuch", {}, MissingPath, r"model='nosuch' .*the folder does not exist"),
    (3, {}, ConfigError, r"model=3"),
]


@pytest.mark.parametrize("model,kw,exc,pattern", FROM_PRETRAINED_CASES,
                         ids=[f"{m}-{k}" for m, k, _, _ in FROM_PRETRAINED_CASES])
def test_from_pretrained_names_what_is_wrong_before_loading(model, kw, exc, pattern, ddpm,
                                                           monkeypatch):
    from ddil_lab.image import ImageBackend
    import ddil_lab.image.pretrained as pre

    monkeypatch.setattr(pre, "read_pipeline_configs", lambda *a: (_ for _ in ()).throw(
        Heavy("the folder was read before its checks")))
    with pytest.raises(exc, match=pattern):
        ImageBackend.from_pretrained(ddpm.get(model, model), data=_rand_images(), **kw)


def test_a_relative_path_of_hub_form_is_reported_as_a_folder_and_a_hub_id(tmp_path, monkeypatch):
    """'fx/nosuch' may be a mistyped folder or a hub id: the message says both (offline)."""
    from ddil_lab import hub
    from ddil_lab.image import ImageBackend

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "host_reachable", lambda host, **kw: False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hub.OfflineError, match=r"model='fx/nosuch': no folder .*fx/nosuch "
                                               r"exists, and the hub id 'fx/nosuch' is not "
                                               r"available locally"):
        ImageBackend.from_pretrained("fx/nosuch", data=_rand_images())


def test_sd_export_reload_refuses_pickles(tmp_path, monkeypatch):
    import shutil

    from diffusers import UNet2DConditionModel

    from ddil_lab.sd.export import load_student_pipeline
    from ddil_lab.sd.tiny import make_tiny_pipeline

    folder = make_tiny_pipeline(tmp_path / "p", "sd15")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    shutil.rmtree(tmp_path / "p" / "unet")
    unet.save_pretrained(tmp_path / "p" / "unet", safe_serialization=False)
    _no_unpickling(monkeypatch)
    with pytest.raises(ConfigError, match=r"folder='.*' is not allowed: component 'unet' holds "
                                          r"only pickled weights .*allow_pickle=True"):
        load_student_pipeline(folder)


# ---- shift_diagnostic ----
class FakeShiftBackend(FakeBackend):
    teacher = FakeBackend.teacher


def _shift(**kw):
    from ddil_lab.shift import shift_diagnostic
    return shift_diagnostic(kw.pop("backend", FakeShiftBackend()), **kw)


def generated_shift_cases():
    from ddil_lab.shift import shift_diagnostic

    for name, p in inspect.signature(shift_diagnostic).parameters.items():
        if name in ("backend", "student", "features"):
            continue
        kind = _kind(p.annotation)
        assert kind, f"shift_diagnostic({name}: {p.annotation}): add it by hand"
        kind, none_ok = kind
        for bad in BAD_BY_KIND[kind]:
            if not (bad is None and none_ok):
                yield pytest.param(name, bad, id=f"shift_diagnostic.{name}={bad!r}")


@pytest.mark.parametrize("name,bad", list(generated_shift_cases()))
def test_shift_diagnostic_arguments_generated_from_its_signature(name, bad):
    with pytest.raises(ConfigError) as e:
        _shift(**{name: bad})
    assert str(e.value).startswith(f"{name}={bad!r} is not allowed"), str(e.value)


SHIFT_CASES = [
    ({"n_proj": 0}, r"n_proj=0 .*an int >= 1"), ({"batch": -1}, r"batch=-1 .*None or an int"),
    ({"n_steps": True}, r"n_steps=True"), ({"n_steps": 1001}, r"n_steps=1001 .*\[1, 1000\]"),
    ({"n": 4}, r"n=4 .*>= 8"), ({"fine_steps": 2}, r"fine_steps=2 .*>= 4"),
    ({"backend": "ring8"}, r"backend='ring8' .*a Backend object .*not its name"),
    ({"backend": object()}, r"backend='<object>' .*it has no schedule"),
    ({"features": "pool"}, r"features='<str>' .*a function"),
    ({"student": 3}, r"student='<int>'"),
]


@pytest.mark.parametrize("kw,pattern", SHIFT_CASES, ids=[str(k) for k, _ in SHIFT_CASES])
def test_shift_diagnostic_ranges_and_objects(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _shift(**kw)


def test_shift_diagnostic_per_class_and_features_on_a_real_backend():
    """per_class on an unconditional backend is refused; too few states per class is warned
    about (and noted in the report); features that return nothing are refused before the
    teacher's rollouts."""
    from ddil_lab.shift import shift_diagnostic
    from ddil_lab.toy import Toy2dBackend

    plain = Toy2dBackend("ring8", student_init="random")
    with pytest.raises(ConfigError, match=r"per_class=True .*not integer class labels"):
        shift_diagnostic(plain, n=16, per_class=True, fine_steps=None)
    cond = Toy2dBackend("ring8_cond", student_init="random")
    with pytest.warns(UserWarning, match=r"per_class=True with n=16: some classes have fewer "
                                         r"than 20 states"):
        rep = shift_diagnostic(cond, n=16, per_class=True, fine_steps=None)
    assert any("fewer than 20" in x for x in rep.notes)
    calls = []
    teacher = cond.teacher
    cond.teacher = lambda *a: calls.append(1) or teacher(*a)
    for feats, pattern in ((lambda x: x[:, :0], r"returned a tensor of shape \(16, 0\)"),
                           (lambda x: x.sum(), r"returned a tensor of shape \(\)"),
                           (lambda x: [1], r"returned a list"),
                           (lambda x: x * float("nan"), r"returned NaN or inf")):
        with pytest.raises(ConfigError, match=r"features='<lambda>' is not allowed: it " + pattern):
            shift_diagnostic(cond, n=16, features=feats, fine_steps=None)
    assert not calls  # refused before the teacher rolled anything out


# ---- the notebooks' parameters (01, 02), from their parameters cells ----
def _parameters_cell(nb):
    src = open(os.path.join(ROOT, "notebooks", f"{nb}.py")).read()
    return src.split('tags=["parameters"]')[1].split("# %%")[0].split("\n", 1)[1]


NB_BAD_BY_ANNOTATION = {"int": [True, 2.5, "3"], "float": [True, "0.1"], "bool": ["no", 1],
                        "str": [3], "list": [3, "ab"]}


def generated_notebook_cases():
    from ddil_lab.notebook import _assignments

    for nb in ("01_covariate_shift", "02_mode_loss"):
        for name, (ann, _) in _assignments(_parameters_cell(nb)).items():
            assert ann in NB_BAD_BY_ANNOTATION, f"{nb}: {name}: {ann} has no generated cases"
            for bad in NB_BAD_BY_ANNOTATION[ann]:
                yield pytest.param(nb, name, bad, id=f"{nb}.{name}={bad!r}")


NOTEBOOK_CASES = [("seeds", 3), ("seeds", []), ("seeds", [0, 0]), ("seeds", [0, "1"]),
                  ("n_eval", 0), ("n_eval", -5), ("steps", 0), ("batch_size", -1),
                  ("n_steps", 0), ("lr", 0.0), ("lr", 2.0), ("ddil_share", 1.5),
                  ("out_dir", "{file}"), ("out_dir", "{file}/run")]


@pytest.mark.parametrize("nb,name,bad", list(generated_notebook_cases()) + [
    pytest.param(nb, n, b, id=f"{nb}.{n}={b!r}") for nb in ("01_covariate_shift", "02_mode_loss")
    for n, b in NOTEBOOK_CASES])
def test_notebook_parameters_are_checked_by_the_notebook(nb, name, bad, files):
    """What ``nb.check_parameters()`` (the notebooks' first cell) refuses, as papermill would
    inject it; before any work (the check reads only the cells' text)."""
    from ddil_lab.notebook import check_parameters

    bad = bad.format(**files) if isinstance(bad, str) else bad
    with pytest.raises(ConfigError) as e:
        check_parameters(["", _parameters_cell(nb), f"# Parameters\n{name} = {bad!r}\n"])
    assert str(e.value).startswith(f"{name}={bad!r} is not allowed"), str(e.value)


def test_notebook_good_parameters_pass():
    from ddil_lab.notebook import check_parameters

    inj = "# Parameters\nsteps = 3\nseeds = [0]\nn_eval = 200\nlr = 0.001\nguidance = 6\n"
    assert check_parameters(["", _parameters_cell("01_covariate_shift"), inj]) == \
        ["steps", "seeds", "n_eval", "lr", "guidance"]


def test_evaluate_names_the_missing_component_before_loading(ddpm, files, monkeypatch):
    _guarded("evaluate", monkeypatch)
    from ddil_lab.evaluate import evaluate

    for folder, pattern in ((ddpm["no_unet"], r"component 'unet' .* has no unet/"),
                            (ddpm["no_index"], r"the folder holds no model_index.json")):
        with pytest.raises(MissingPath, match=rf"model='{folder}' is not allowed: {pattern}"):
            evaluate(folder, "cifar10-50k", files["tmp"] + "/ev", root=files["cifar"], steps=2)
