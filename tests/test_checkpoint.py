"""gendd_fast.checkpoint and the safe loading of weight files: no code runs from a crafted file,
a full disk keeps the previous file and names it, the newest good checkpoint is found past bad
ones, stale temporaries go, best.pt is repaired, and the teacher a run was trained with is
recorded."""
from gendd_fast import checkpoint as ckpt_io
from gendd_fast.models import create_model, load_checkpoint_weights
import numpy as np
import pytest
from helpers import save_teacher, tiny_config
import subprocess
import sys
import torch
from helpers import _Payload, _disk_full, _env


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
