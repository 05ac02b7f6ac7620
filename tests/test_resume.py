"""Resume never mixes settings silently, tampered checkpoints are corrupt (fallback with a
warning) or refused by name, non-finite runs are bounded and never checkpointed, and a full
disk is named and cleaned up. The tables below are counted in docs/robust.md."""
import hashlib
import itertools
import json
import math
import os
import pickle
import shutil
import warnings

import pytest
import torch

import ddil_lab.train.checkpoint as ck
from ddil_lab.methods import PD
from ddil_lab.rollout import StateSampler
from ddil_lab.toy.backend import Toy2dBackend
from ddil_lab.train import NonFiniteError, distill
from ddil_lab.train.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint,
                                       meta_digest)
from launching import interrupted_copy

RUN = {"steps": 12, "batch_size": 32, "lr": 1e-3, "ema_decay": 0.9, "ckpt_every": 3, "seed": 1,
       "keep_checkpoints": 0, "progress": False, "lr_schedule": "linear", "warmup": 2}


@pytest.fixture(scope="module")
def ring():
    return Toy2dBackend("ring8", init_steps=100)


def _run(backend, out, resume=False, method=None, sampler=None, **kw):
    sampler = sampler or StateSampler(beta_frwd=0.5, beta_mixed=0.5, buffer_size=32,
                                      refresh_every=2)
    return distill(backend, method or PD(substeps=2), sampler, out_dir=str(out), resume=resume,
                   **{**RUN, **kw})


@pytest.fixture(scope="module")
def reference(ring, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    _run(ring, out)
    return str(out)



def _same_end(a, b):
    sa, ma = load_checkpoint(latest_checkpoint(a))
    sb, mb = load_checkpoint(latest_checkpoint(b))
    assert ma["step"] == mb["step"] and ma["history"] == mb["history"]
    for k in sa["modules"]:
        for n, v in sa["modules"][k].items():
            assert torch.equal(v, sb["modules"][k][n]), (k, n)


# ---------------------------------------------------------------------------------------------
# tampered metadata: corrupt -> the earlier checkpoint, with a warning
# ---------------------------------------------------------------------------------------------
def _edit(ck_dir, fn, resign=True):
    """Change meta.json with ``fn(meta)``; ``resign``: recompute its checksum as an attacker
    (or a careless script) could, so the checks behind the checksum are what is tested."""
    p = ck_dir / "meta.json"
    meta = json.loads(p.read_text())
    fn(meta)
    if resign and "meta_sha256" in meta:
        meta["meta_sha256"] = meta_digest(meta)
    p.write_text(json.dumps(meta))


def _drop(key):
    return lambda m: m.pop(key)


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _nan_weight(ck_dir):
    """A NaN in the student's weights, with both checksums made to match."""
    from safetensors.torch import load_file, save_file
    t = load_file(str(ck_dir / "tensors.safetensors"))
    k = next(k for k in t if ".modules.student." in k and t[k].is_floating_point())
    t[k] = t[k].clone()
    t[k].view(-1)[0] = math.nan
    save_file(t, str(ck_dir / "tensors.safetensors"))
    digest = hashlib.sha256((ck_dir / "tensors.safetensors").read_bytes()).hexdigest()
    _edit(ck_dir, _set("tensors_sha256", digest))


def _pickle_payload(ck_dir):
    """A pickle where the tensors belong, its checksum recorded: it must never be unpickled."""
    (ck_dir / "tensors.safetensors").write_bytes(pickle.dumps({"x": [1, 2, 3]}))
    digest = hashlib.sha256((ck_dir / "tensors.safetensors").read_bytes()).hexdigest()
    _edit(ck_dir, _set("tensors_sha256", digest))


TAMPERED = {  # name: (tamper, expected reason in the warning)
    "no tensors_sha256": (lambda d: _edit(d, _drop("tensors_sha256")), "'tensors_sha256' is missing"),
    "no meta_sha256": (lambda d: _edit(d, _drop("meta_sha256"), resign=False), "'meta_sha256' is missing"),
    "no config": (lambda d: _edit(d, _drop("config")), "'config' is missing"),
    "no step": (lambda d: _edit(d, _drop("step")), "'step' is missing"),
    "no history": (lambda d: _edit(d, _drop("history")), "'history' is missing"),
    "no skipped": (lambda d: _edit(d, _drop("skipped")), "'skipped' is missing"),
    "step as text": (lambda d: _edit(d, _set("step", "6")), "step='6' is a str, not a int"),
    "step as bool": (lambda d: _edit(d, _set("step", True)), "step=True is a bool"),
    "step disagrees with folder": (lambda d: _edit(d, _set("step", 5)),
                                   "step=5 disagrees with the folder name step_0000006"),
    "history not a list": (lambda d: _edit(d, _set("history", {"step": 1})), "is a dict, not a list"),
    "history beyond the step": (lambda d: _edit(d, lambda m: m["history"].append({"step": 9})),
                                "history entry {'step': 9} is not a record of a step in [1, 6]"),
    "negative skipped": (lambda d: _edit(d, _set("skipped", -1)), "skipped=-1"),
    "sha not hex": (lambda d: _edit(d, _set("tensors_sha256", "abc")), "is not a SHA-256"),
    "meta edited, checksum not": (lambda d: _edit(d, lambda m: m["config"].__setitem__("lr", 0.5),
                                                  resign=False), "does not match its recorded"),
    "meta is a list": (lambda d: (d / "meta.json").write_text("[1, 2]"), "holds a list"),
    "state skeleton names a missing tensor": (
        lambda d: _edit(d, lambda m: m["state"]["__dict__"][0][1]["__dict__"][0][1]["__dict__"]
                        [0][1].__setitem__("__tensor__", "s.nope")), "s.nope"),
    "NaN weight, checksums matching": (_nan_weight, "holds NaN or inf"),
    "pickle payload, checksum matching": (_pickle_payload, "corrupt or incomplete"),
}


@pytest.mark.parametrize("kind", list(TAMPERED))
def test_tampered_metadata_is_corrupt_and_falls_back_bitwise(ring, reference, tmp_path, kind,
                                                             monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something was unpickled")
    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    out = interrupted_copy(reference, tmp_path / "run")
    tamper, reason = TAMPERED[kind]
    tamper(tmp_path / "run" / "step_0000006")
    with pytest.warns(UserWarning, match="step_0000006 is corrupt or incomplete") as rec:
        res = _run(ring, out, resume=True)
    assert any(reason in str(w.message) for w in rec), [str(w.message) for w in rec]
    assert res.resumed_from.endswith("step_0000003")
    _same_end(out, reference)


# ---------------------------------------------------------------------------------------------
# another run: refused, naming both values
# ---------------------------------------------------------------------------------------------
def _older_version(d):  # a checkpoint whose config predates the backend identity
    _edit(d, lambda m: m["config"].pop("backend"))


MISMATCHED = [  # (name, how this run differs, pattern of the CheckpointError)
    ("batch size", {"batch_size": 16}, r"batch_size=32, this run has batch_size=16"),
    ("seed", {"seed": 2}, r"seed=1, this run has seed=2"),
    ("method setting", {"method": PD(substeps=4)}, r"method_config=.*'substeps': 2.*'substeps': 4"),
    ("sampler prior", {"sampler": StateSampler(beta_frwd=0.75, beta_mixed=0.25, buffer_size=32,
                                               refresh_every=2)}, r"sampler=.*beta_frwd"),
    ("optimizer class", {"optimizer_class": torch.optim.Adam},
     r"optimizer='AdamW', this run has optimizer='Adam'"),
    ("EMA turned off", {"ema_decay": None}, r"written with an EMA .*ema_decay=None"),
    ("MLP teacher instead of the exact one", {"backend": "mlp"}, r"backend=.*teacher_probe"),
    ("another mixture", {"backend": "grid25"}, r"backend=.*teacher_probe"),
    ("student of another width", {"backend": "narrow"},
     r"its student has another architecture: net\.body\.0\.bias is \(128,\) there and \(64,\) "
     r"in this run \(another width"),
    ("older checkpoint version", {"tamper": _older_version},
     r"does not record 'backend' \(written by an older version"),
]


@pytest.fixture(scope="module")
def other_backends():
    return {"mlp": Toy2dBackend("ring8", teacher="mlp", init_steps=100),
            "grid25": Toy2dBackend("grid25", init_steps=100),
            "narrow": Toy2dBackend("ring8", init_steps=100, hidden=64)}


@pytest.mark.parametrize("name,change,pattern", MISMATCHED, ids=[m[0] for m in MISMATCHED])
def test_resume_of_another_run_is_refused_naming_both_values(ring, reference, tmp_path,
                                                             other_backends, name, change, pattern):
    out = interrupted_copy(reference, tmp_path / "run")
    kw = dict(change)
    backend = other_backends[kw.pop("backend")] if "backend" in kw else ring
    if "tamper" in kw:
        kw.pop("tamper")(tmp_path / "run" / "step_0000006")
    before = sorted(os.listdir(out))
    with pytest.raises(CheckpointError, match=pattern):
        _run(backend, out, resume=True, **kw)
    assert sorted(os.listdir(out)) == before  # nothing written, nothing pruned


# ---------------------------------------------------------------------------------------------
# settings changed on purpose: applied, warned about, recorded
# ---------------------------------------------------------------------------------------------
def test_changed_optimizer_settings_are_applied_warned_and_recorded(ring, reference, tmp_path):
    out = interrupted_copy(reference, tmp_path / "run")
    with pytest.warns(UserWarning, match=r"step 6 with changed settings.*lr: 0.001 -> 0.0005.*"
                                         r"weight_decay: 0.0 -> 0.01.*grad_clip: 1.0 -> 0.5"):
        res = _run(ring, out, resume=True, lr=5e-4, weight_decay=0.01, grad_clip=0.5)
    # the lr really is the new one from step 7 on (linear decay over 12 steps after 2 warmup)
    for h in res.history[6:]:
        assert h["lr"] == pytest.approx(5e-4 * (1 - (h["step"] - 2) / 10))
    ref = [h["lr"] for h in load_checkpoint(latest_checkpoint(reference))[1]["history"]]
    assert [h["lr"] for h in res.history[:6]] == ref[:6]
    state, meta = load_checkpoint(latest_checkpoint(out))
    group = state["opt"]["student"]["param_groups"][0]
    assert group["weight_decay"] == 0.01 and group["initial_lr"] == 5e-4
    assert state["sched"]["student"]["base_lrs"] == [5e-4]
    assert meta["config"]["lr"] == 5e-4
    assert meta["resumes"] == res.resumes == [{
        "step": 6, "from": str(tmp_path / "run" / "step_0000006"),
        "changed": {"lr": [1e-3, 5e-4], "weight_decay": [0.0, 0.01], "grad_clip": [1.0, 0.5]}}]
    # resuming the resumed run with its own settings changes (and records) nothing more
    shutil.rmtree(os.path.join(out, "step_0000012"))
    (tmp_path / "run" / "latest").write_text("step_0000009")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _run(ring, out, resume=True, lr=5e-4, weight_decay=0.01, grad_clip=0.5)
    assert again.resumes == res.resumes and again.history == res.history


# ---------------------------------------------------------------------------------------------
# non-finite values: bounded skipping, never a non-finite checkpoint
# ---------------------------------------------------------------------------------------------
def _poison(method, at_steps):
    losses, calls = method.losses, itertools.count(1)

    def poisoned(states):
        step = next(calls)
        for g, loss, logs in losses(states):
            if step in at_steps:
                loss = torch.full_like(loss, math.nan)
            yield g, loss, logs
    method.losses = poisoned
    return method


def test_skipping_is_bounded_in_a_row_and_in_all(ring, tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 9 of pd: updates were skipped for non-finite "
                                             r"values in 6 steps in a row \(max_consecutive_skips=5"
                                             r".*diverging.*step_0000008 is kept \(it may already"):
        distill(ring, _poison(PD(substeps=2), set(range(4, 30))), None, steps=30, batch_size=16,
                on_nonfinite="skip", out_dir=str(tmp_path), ckpt_every=2, progress=False)
    # the checkpoints of steps 4..8 would hold weights that are finite (skipped updates change
    # nothing): they are written; the run stops at the bound
    with pytest.raises(NonFiniteError, match=r"step 6 of pd: .* in 3 steps in all "
                                             r"\(max_consecutive_skips=5, max_skips=2"):
        distill(ring, _poison(PD(substeps=2), {2, 4, 6}), None, steps=10, batch_size=16,
                on_nonfinite="skip", max_skips=2, progress=False)
    res = distill(ring, _poison(PD(substeps=2), {2, 4}), None, steps=6, batch_size=16,
                  on_nonfinite="skip", max_skips=2, progress=False)
    assert (res.skipped, res.skipped_steps) == (2, 2)


def test_a_non_finite_state_is_never_checkpointed(ring, tmp_path):
    m = PD(substeps=2)
    after, calls = m.after_step, itertools.count(1)

    def diverge():  # the weights go NaN at step 3 (as at lr 1e30), the losses are not checked
        after()
        if next(calls) == 3:
            with torch.no_grad():
                m.student.net.out.weight.fill_(math.nan)
    m.after_step = diverge
    with pytest.raises(NonFiniteError, match=r"step 4 of pd: the state to checkpoint holds NaN "
                                             r"or inf \(first: s\.modules\.student\.net\.out\."
                                             r"weight\); not written.*step_0000002"):
        distill(ring, m, None, steps=4, batch_size=16, out_dir=str(tmp_path), ckpt_every=2,
                on_nonfinite="skip", max_consecutive_skips=10, progress=False)
    assert latest_checkpoint(str(tmp_path)).endswith("step_0000002")
    assert not (tmp_path / "step_0000004").exists()


# ---------------------------------------------------------------------------------------------
# a full disk
# ---------------------------------------------------------------------------------------------
def test_full_disk_names_path_and_step_and_cleans_up(ring, tmp_path, monkeypatch):
    save, calls = ck.save_file, itertools.count(1)

    def full_disk(tensors, path, *a, **k):
        if next(calls) < 2:
            return save(tensors, path, *a, **k)
        with open(path, "wb") as f:  # a partial file, then the error safetensors raises
            f.write(b"\0" * 1000)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"could not write the checkpoint of step 4 to "
                                              r".*step_0000004 \(OSError: .*No space left.*"
                                              r"partial folder was removed"):
        distill(ring, PD(substeps=2), None, steps=6, batch_size=16, out_dir=str(tmp_path),
                ckpt_every=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["history.jsonl", "latest", "step_0000002"]
    load_checkpoint(str(tmp_path / "step_0000002"))


def test_old_checkpoints_are_pruned_first_when_that_makes_room(ring, tmp_path, monkeypatch):
    """A disk that holds 2.5 checkpoints: with keep=2 the oldest is pruned before the new one is
    written (it would be pruned after it anyway); the newest is never pruned first."""
    one = {}

    def folder_bytes(p):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(p) for f in fs)

    def usage(root):
        used = sum(folder_bytes(p) for p in ck.checkpoints(root))
        size = one.get("size", 10 ** 12)
        return shutil._ntuple_diskusage(int(2.5 * size), used, max(0, int(2.5 * size) - used))
    monkeypatch.setattr(ck.shutil, "disk_usage", usage)
    seen, save = [], ck.save_file

    def watch(tensors, path, *a, **k):
        seen.append(sorted(d for d in os.listdir(os.path.dirname(os.path.dirname(path)))
                           if d.startswith("step_")))
        save(tensors, path, *a, **k)
        one.setdefault("size", folder_bytes(os.path.dirname(path)))
    monkeypatch.setattr(ck, "save_file", watch)
    distill(ring, PD(substeps=2), None, steps=8, batch_size=16, out_dir=str(tmp_path),
            ckpt_every=2, keep_checkpoints=2, progress=False)
    # while writing step 6, step 2 was already gone; step 4 (the newest) stayed
    assert seen == [[], ["step_0000002"], ["step_0000004"], ["step_0000006"]]
    assert [os.path.basename(p) for p in ck.checkpoints(str(tmp_path))] == \
        ["step_0000008", "step_0000006"]



def test_a_resumed_run_says_from_which_step_and_folder(ring, reference, tmp_path, capfd):
    """Resuming prints one line naming the step and the folder (the checkpoint too); a run
    that finds nothing to resume prints none."""
    out = interrupted_copy(reference, tmp_path / "run")
    res = _run(ring, out, resume=True)
    err = capfd.readouterr().err
    assert f"distill: resumed from step 6 in folder {out} ({res.resumed_from})" in err
    _run(ring, tmp_path / "fresh", resume=True)
    assert "resumed from" not in capfd.readouterr().err
