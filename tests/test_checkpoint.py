"""gendd_fast.checkpoint and the safe loading of weight files: no code runs from a crafted file,
a full disk keeps the previous file and names it, the newest good checkpoint is found past bad
ones, stale temporaries go, best.pt is repaired, and the teacher a run was trained with is
recorded."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gendd_fast import checkpoint as ckpt_io
from gendd_fast.models import create_model, load_checkpoint_weights
from helpers import _disk_full, _env, _Payload, save_teacher, tiny_config


# Hostile input and faults (moved from the campaign file test_hardening.py): no code runs from a
# checkpoint or a CIFAR file, signals and full disks are survived with a clear message, and nothing
# on disk is silently lost or left stale.


def _evil_checkpoint(tmp_path, marker):
    """A file that looks like a teacher / training checkpoint and carries the payload."""
    m = create_model("resnet8", 4)
    path = tmp_path / "evil.pt"
    torch.save({"model": m.state_dict(), "note": _Payload(marker)}, path)
    return str(path)


# -- 1. no code execution from a checkpoint or a CIFAR file ---------------------------------------
def test_the_payload_is_live(tmp_path):
    """The crafted file really does run code when fully unpickled (so the tests below mean
    something): a plain torch.load(weights_only=False) creates the marker."""
    marker = tmp_path / "ran"
    path = _evil_checkpoint(tmp_path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("entry", ["teacher", "init", "resume", "read"])
def test_crafted_checkpoint_is_refused_without_running(tmp_path, entry):
    from gendd_fast.train import train
    marker = tmp_path / "ran"
    path = _evil_checkpoint(tmp_path, marker)
    with pytest.raises(ckpt_io.UnsafeCheckpointError) as e:
        if entry == "teacher":
            train(tiny_config(tmp_path, "kd", path, epochs=1))
        elif entry == "init":
            train(tiny_config(tmp_path, "ce", epochs=1, init=path))
        elif entry == "resume":
            train(tiny_config(tmp_path, "ce", epochs=1, resume=path))
        else:
            load_checkpoint_weights(path, create_model("resnet8", 4))
    assert not marker.exists(), "the checkpoint's payload ran"
    msg = str(e.value)
    assert "posix.system" in msg and "not loaded" in msg
    assert f"python -m gendd_fast.checkpoint --trust-and-convert {path}" in msg


def test_evaluate_cli_refuses_a_crafted_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    path = _evil_checkpoint(tmp_path, marker)
    r = subprocess.run([sys.executable, "-m", "gendd_fast.evaluate", "--checkpoint", path,
                        "--device", "cpu"], capture_output=True, text=True, timeout=120,
                       env=_env(), cwd=str(tmp_path))
    assert r.returncode != 0 and not marker.exists()
    assert "--trust-and-convert" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_trusted_file_converts_explicitly(tmp_path):
    """The way out the message names: a trusted file with foreign objects (an argparse.Namespace
    as in many published teachers) becomes tensors-only and then loads with weights_only."""
    import argparse
    path, model = save_teacher(tmp_path)
    state = torch.load(path)
    state["args"] = argparse.Namespace(lr=0.05)
    state["acc"] = np.float64(0.7)  # NumPy scalars are foreign objects too
    torch.save(state, path)
    with pytest.raises(ckpt_io.UnsafeCheckpointError, match="argparse.Namespace"):
        load_checkpoint_weights(path, create_model("resnet8", 4))
    out = str(tmp_path / "converted.pt")
    r = subprocess.run([sys.executable, "-m", "gendd_fast.checkpoint", "--trust-and-convert",
                        path, out], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dropped" in r.stdout and "argparse.Namespace" in r.stdout
    fresh = create_model("resnet8", 4)
    load_checkpoint_weights(out, fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_disk_full_names_the_kept_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    ckpt_io.atomic_save({"a": torch.ones(3)}, str(target))
    _disk_full(monkeypatch, tmp_path)
    with pytest.raises(ckpt_io.DiskFullError) as e:
        ckpt_io.atomic_save({"a": torch.zeros(1000)}, str(target))
    assert "no space left on device" in str(e.value)
    assert f"the previous {target} is kept unchanged" in str(e.value)
    assert isinstance(e.value, OSError) and "inline_container" not in str(e.value)
    assert torch.equal(torch.load(target)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left
    with pytest.raises(ckpt_io.DiskFullError, match="no earlier best.pt existed"):
        ckpt_io.atomic_save({"a": torch.zeros(1000)}, str(tmp_path / "best.pt"))


# -- 5, 6: what is on disk -------------------------------------------------------------------------
def _state(step, epoch, best_epoch, value=1.0):
    return {"model": {"w": torch.full((3,), value)}, "extra": {"b": torch.ones(2)},
            "global_step": step, "epoch": epoch, "step_in_epoch": 0,
            "best": {"top1": 50.0 + best_epoch, "epoch": best_epoch}}


def test_newest_good_checkpoint_skips_bad_ones(tmp_path):
    assert ckpt_io.newest_good_checkpoint(str(tmp_path)) is None
    ckpt_io.atomic_save(_state(8, 2, 2), str(tmp_path / "best.pt"))
    ckpt_io.atomic_save(_state(12, 3, 2, value=float("inf")), str(tmp_path / "last.pt"))
    assert ckpt_io.newest_good_checkpoint(str(tmp_path)) == (str(tmp_path / "best.pt"), 8)
    ckpt_io.atomic_save(_state(12, 3, 2), str(tmp_path / "last.pt"))
    assert ckpt_io.newest_good_checkpoint(str(tmp_path)) == (str(tmp_path / "last.pt"), 12)
    (tmp_path / "last.pt").write_bytes(b"truncated")
    assert "best.pt (step 8)" in ckpt_io.describe_newest_good(str(tmp_path))


def test_nonfinite_names_cover_buffers():
    bn = torch.nn.BatchNorm1d(3)
    bn.running_var.fill_(float("inf"))
    assert ckpt_io.nonfinite_names(bn.state_dict()) == ["running_var"]
    bn.running_var.fill_(1.0)
    assert ckpt_io.nonfinite_names(bn.state_dict()) == []


def test_stale_temps_removed(tmp_path):
    for f in (".last.pt.abc123.tmp", ".best.pt.x.tmp", "keep.tmp", ".other.q.tmp", "last.pt"):
        (tmp_path / f).write_bytes(b"x")
    assert ckpt_io.remove_stale_temps(str(tmp_path)) == [".best.pt.x.tmp", ".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.q.tmp", "keep.tmp", "last.pt"]


def test_repair_best(tmp_path):
    old_best, last = _state(4, 1, 1), _state(8, 2, 2, value=2.0)
    ckpt_io.atomic_save(old_best, str(tmp_path / "best.pt"))
    # last.pt was saved at the end of epoch 2, a new best; best.pt still holds epoch 1
    msg = ckpt_io.repair_best(last, str(tmp_path))
    assert "rewrote it from last.pt" in msg
    assert ckpt_io.read_checkpoint(str(tmp_path / "best.pt"))["global_step"] == 8
    assert ckpt_io.repair_best(last, str(tmp_path)) is None  # now consistent
    (tmp_path / "best.pt").unlink()  # killed before best.pt existed at all
    assert "rewrote" in ckpt_io.repair_best(last, str(tmp_path))
    # the best epoch is older than last.pt: its weights are gone, say so, write nothing
    later = _state(12, 3, 2, value=3.0)
    ckpt_io.atomic_save(old_best, str(tmp_path / "best.pt"))
    assert "no longer on disk" in ckpt_io.repair_best(later, str(tmp_path))
    assert ckpt_io.read_checkpoint(str(tmp_path / "best.pt"))["global_step"] == 4


def test_teacher_identity(tmp_path):
    a, _ = save_teacher(tmp_path / "a", seed=0) if (tmp_path / "a").mkdir() is None else None
    b, _ = save_teacher(tmp_path / "b", seed=1) if (tmp_path / "b").mkdir() is None else None
    ia, ib = ckpt_io.file_identity(a), ckpt_io.file_identity(b)
    assert ia["name"] == ib["name"] and ia["size"] == ib["size"] and ia["sha256"] != ib["sha256"]
    assert ckpt_io.teacher_mismatch(ia, ckpt_io.file_identity(a), "last.pt") is None
    msg = ckpt_io.teacher_mismatch(ia, ib, "last.pt")
    assert "cannot resume from last.pt" in msg and ia["sha256"][:12] in msg


def test_one_weights_reader_unwraps_every_nesting_and_strips_module(tmp_path):
    """checkpoint.read_weights is what --init, --teacher-checkpoint, teacher weight files and the
    public reader use: a state dict bare or under model / state_dict / student / model_ema,
    DDP's module. prefix removed, anything else refused by name. Planted: 'state_dict' dropped
    from STATE_KEYS (a public ImageNet file then holds no state dict): the loop fails."""
    sd = {"a.weight": torch.ones(2), "b": torch.zeros(1)}
    for i, obj in enumerate([sd, {"model": sd}, {"state_dict": {"module." + k: v
                                                                for k, v in sd.items()}},
                             {"student": sd, "epoch": 3}, {"model_ema": sd}]):
        path = str(tmp_path / f"w{i}.pt")
        torch.save(obj, path)
        got = ckpt_io.read_weights(path, "weights")
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd), obj.keys()
    torch.save({"model": {"a": [1, 2]}}, str(tmp_path / "bad.pt"))
    with pytest.raises(ckpt_io.CheckpointError, match="holds no state dict"):
        ckpt_io.read_weights(str(tmp_path / "bad.pt"), "weights")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt_io.read_weights(str(tmp_path / "none.pt"), "weights")
    assert not hasattr(ckpt_io, "load_student_weights")  # one --init loader (public_checkpoint)


# -- output and resume preconditions, --trust-and-convert, teacher weights (issue 20) ----------
# Each test below failed on main before issue 20, as its docstring says.
import argparse  # noqa: E402
import os  # noqa: E402

from gendd_fast.train import train  # noqa: E402
from helpers import read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 1-epoch CE run whose folder the tests copy."""
    tmp = tmp_path_factory.mktemp("done")
    res = train(tiny_config(tmp, "ce", epochs=1))
    return res["output"]


def _copy_run(src, dst):
    os.makedirs(dst)
    for f in ("last.pt", "best.pt", "metrics.jsonl"):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return str(dst)


def _make_read_only(folder):
    """Root ignores permission bits, so as root the folder is made immutable instead (which
    stops root too, as a read-only mount does); as another user, chmod is enough."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", folder], check=True)
        return lambda: subprocess.run(["chattr", "-i", folder], check=True)
    os.chmod(folder, 0o555)
    return lambda: os.chmod(folder, 0o755)


def test_read_only_output_is_refused_before_step_1(tmp_path, finished_run):
    """A resumed run into a read-only folder: on main it trained, and the folder's state was
    found only at the first write after the steps (the probe: after 15 steps). Now it is refused
    before anything is built, naming the folder, and no step is logged."""
    out = _copy_run(finished_run, tmp_path / "run")
    before = len(read_metrics(out))
    undo = _make_read_only(out)
    try:
        with pytest.raises(ValueError, match="cannot be written"):
            train(tiny_config(tmp_path, "ce", epochs=2, resume="auto", output=out))
    finally:
        undo()
    assert len(read_metrics(out)) == before


def test_last_pt_that_is_a_directory_is_refused_before_training(tmp_path):
    """A directory named last.pt: on main --resume auto saw no checkpoint, trained, then crashed
    at the first save. Now it is refused at once, named."""
    out = tmp_path / "run"
    (out / "last.pt").mkdir(parents=True)
    with pytest.raises(ckpt_io.CheckpointError, match="last.pt' exists but is not a regular"):
        train(tiny_config(tmp_path, "ce", epochs=1, resume="auto", output=str(out)))
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("optimizer"), "no 'optimizer' entry"),
    (lambda s: s.pop("rng"), "no 'rng' entry"),
    (lambda s: s.__setitem__("config", [1, 2]), "'config' entry is a list, expected a dict"),
    (lambda s: s.__setitem__("step_in_epoch", -5), "step_in_epoch is -5, outside 0..4"),
    (lambda s: s.__setitem__("epoch", "1"), "'epoch' entry is a str, expected a int"),
])
def test_hand_edited_checkpoints_are_named(tmp_path, finished_run, edit, message):
    """Hand-edited checkpoints: on main a missing optimizer or rng gave a raw KeyError, a list
    as config a TypeError, and step_in_epoch -5 was accepted. Now each is named, before
    step 1. (64 images / 16 per batch: 4 steps per epoch.)"""
    out = _copy_run(finished_run, tmp_path / "run")
    state = ckpt_io.read_checkpoint(os.path.join(out, "last.pt"))
    edit(state)
    torch.save(state, os.path.join(out, "last.pt"))
    with pytest.raises(ckpt_io.CheckpointError, match=message):
        train(tiny_config(tmp_path, "ce", epochs=2, resume="auto", output=out))


def test_trust_and_convert_errors_are_one_line(tmp_path, capsys):
    """A missing input, a directory as output and a truncated input gave raw tracebacks on main
    (FileNotFoundError, IsADirectoryError, a zip error). Now: exit 2, one line naming the file."""
    path, _ = save_teacher(tmp_path)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(open(path, "rb").read()[:300])
    cases = [([str(tmp_path / "nope.pt"), str(tmp_path / "o.pt")], "does not exist"),
             ([path, str(tmp_path)], "is a directory"),
             ([str(truncated), str(tmp_path / "o.pt")], "could not be read")]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            ckpt_io._main(["--trust-and-convert", *args])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --trust-and-convert") and message in err, err
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()


def test_trust_and_convert_lists_the_globals_it_allowed(tmp_path, capsys):
    """Full unpickling lets a trusted file import what it likes; on main nothing said what it
    imported. Now the globals beyond torch's tensor rebuilding are listed."""
    path, _ = save_teacher(tmp_path)
    state = torch.load(path)
    state["args"] = argparse.Namespace(lr=0.05)
    torch.save(state, path)
    ckpt_io._main(["--trust-and-convert", path, str(tmp_path / "o.pt")])
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("the trusted file imported")][0]
    assert "argparse.Namespace" in line and "_rebuild" not in line


@pytest.mark.parametrize("poison, message", [
    (lambda v: v.to(torch.int64), "non-float tensors"),
    (lambda v: v.to(torch.complex64), "non-float tensors"),
    (lambda v: v.clone().fill_(float("nan")), "NaN/Inf"),
])
def test_bad_teacher_weights_are_named_at_load(tmp_path, poison, message):
    """int64 or complex tensors in a teacher file were cast to float silently on main, and a
    NaN teacher only surfaced as a NaN loss at step 1 with advice to lower --lr. Now the teacher
    file and the tensor are named when it is loaded."""
    path, _ = save_teacher(tmp_path)
    state = torch.load(path)
    state["model"]["conv1.weight"] = poison(state["model"]["conv1.weight"])
    torch.save(state, path)
    with pytest.raises(ValueError, match=message) as e:
        load_checkpoint_weights(path, create_model("resnet8", 4))
    assert path in str(e.value) and "conv1.weight" in str(e.value)


def test_nan_teacher_stops_the_run_naming_the_file_not_the_lr(tmp_path):
    """The whole run, as the probe did it: the error names the teacher file, not --lr."""
    path, _ = save_teacher(tmp_path)
    state = torch.load(path)
    state["model"]["fc.weight"][0, 0] = float("nan")
    torch.save(state, path)
    with pytest.raises(ValueError) as e:
        train(tiny_config(tmp_path, "kd", path, epochs=1))
    assert path in str(e.value) and "--lr" not in str(e.value)


def test_integer_buffers_stay_allowed(tmp_path):
    """BatchNorm's num_batches_tracked is int64 in every checkpoint: not flagged (a guard for
    the check itself; it passes on main too)."""
    path, model = save_teacher(tmp_path)
    fresh = create_model("resnet8", 4)
    load_checkpoint_weights(path, fresh)
    assert torch.equal(fresh.state_dict()["conv1.weight"], model.state_dict()["conv1.weight"])


# -- issue 22: which last.pt may repair best.pt; what --init loads ------------------------------

def _mid_epoch_state(epoch, step_in_epoch, best_epoch, value):
    return {"model": {"w": torch.full((3,), value)}, "extra": {}, "global_step": 4 * epoch
            + step_in_epoch, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "best": {"top1": 60.0, "epoch": best_epoch}}


def test_mid_epoch_last_checkpoint_never_repairs_best(tmp_path):
    """last.pt can stand in for a stale best.pt only when it was written at the very end of the
    best epoch (epoch == best epoch and step_in_epoch == 0). A mid-epoch last.pt with the same
    epoch counter holds weights trained past the best: best.pt stays as it is.
    Planted: repair_best ignoring step_in_epoch -> fails."""
    out = str(tmp_path)
    old = _mid_epoch_state(1, 0, 1, value=1.0)
    ckpt_io.atomic_save(old, os.path.join(out, "best.pt"))
    mid = _mid_epoch_state(2, 3, 2, value=2.0)   # best: epoch 2; then 3 steps of epoch 3
    msg = ckpt_io.repair_best(mid, out)
    assert msg is not None and "no longer on disk" in msg
    kept = ckpt_io.read_checkpoint(os.path.join(out, "best.pt"))
    assert kept["epoch"] == 1 and torch.equal(kept["model"]["w"], old["model"]["w"])
    end = _mid_epoch_state(2, 0, 2, value=3.0)   # the end of the best epoch: it is the best
    assert "rewrote" in ckpt_io.repair_best(end, out)
    assert ckpt_io.read_checkpoint(os.path.join(out, "best.pt"))["epoch"] == 2


def test_init_skips_tensors_of_another_shape_and_reports_k_of_n(tmp_path):
    """--init from a checkpoint whose classifier has another class count: every tensor of the
    same name and shape loads, the two classifier tensors are skipped, and the summary says
    how many of the student's tensors were loaded.
    Planted: the shape filter dropped (load_student_weights, now checkpoint.load_matching) ->
    fails."""
    torch.manual_seed(0)
    src = create_model("resnet8", 10)
    path = str(tmp_path / "stage1.pt")
    torch.save({"model": src.state_dict()}, path)
    torch.manual_seed(1)
    dst = create_model("resnet8", 4)
    fc_before = dst.fc.weight.detach().clone()
    from gendd_fast.public_checkpoint import load_student_weights   # the one --init loader
    msg = load_student_weights(path, dst)
    n = len(dst.state_dict())
    assert f"loaded {n - 2}/{n} student tensors" in msg
    assert torch.equal(dst.fc.weight, fc_before)
    for k, v in dst.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, src.state_dict()[k]), k
