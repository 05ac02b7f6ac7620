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
           ("progressive", "kw")}


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
