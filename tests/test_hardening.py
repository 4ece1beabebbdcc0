"""Hostile input and faults: no code runs from a checkpoint or a CIFAR file, signals and full
disks are survived with a clear message, and nothing on disk is silently lost or left stale."""
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from gendd_fast import checkpoint as ckpt_io
from gendd_fast.config import make_config
from gendd_fast.data import BadImageError, DatasetError, build_datasets, dali
from gendd_fast.data.datasets import load_cifar_arrays
from gendd_fast.models import create_model, load_checkpoint_weights
from helpers import save_teacher, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: proof of code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(tmp_path, marker):
    """A file that looks like a teacher / training checkpoint and carries the payload."""
    m = create_model("resnet8", 4)
    path = tmp_path / "evil.pt"
    torch.save({"model": m.state_dict(), "note": _Payload(marker)}, path)
    return str(path)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


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


def _write_cifar10(root, n=20, protocol=pickle.DEFAULT_PROTOCOL, payload=None, labels=None):
    """A tiny CIFAR-10 python folder: the real files' layout (dict of bytes keys, a uint8
    (N, 3072) array and a list of labels)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"batch_label": b"fake", b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
                 b"labels": list(labels if labels is not None else rng.randint(0, 10, n).tolist()),
                 b"filenames": [b"x.png"] * n}
        if payload is not None and name == "data_batch_1":
            entry[b"extra"] = payload
        with open(d / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=protocol)
    return str(root)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5])
def test_cifar_reader_loads_real_layout(tmp_path, protocol):
    root = _write_cifar10(tmp_path, protocol=protocol)
    (xtr, ytr), (xva, yva) = load_cifar_arrays(root, 10)
    assert xtr.shape == (100, 32, 32, 3) and xtr.dtype == np.uint8 and len(ytr) == 100
    assert xva.shape == (20, 32, 32, 3)
    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "rb") as fh:
        raw = pickle.load(fh)
    assert np.array_equal(xva, raw[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_cifar_reader_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    root = _write_cifar10(tmp_path / "c", payload=_Payload(marker))
    with pytest.raises(DatasetError, match=r"data_batch_1.*refused to load posix.system"):
        load_cifar_arrays(root, 10)
    assert not marker.exists(), "the CIFAR file's payload ran"


def test_cifar_labels_out_of_range_are_named(tmp_path):
    root = _write_cifar10(tmp_path, labels=[0, 1, 2, 10] * 5)
    cfg = make_config(method="ce", dataset="cifar10", data_path=root).resolved()
    with pytest.raises(DatasetError, match=r"label 10 .* out of range for 10 classes"):
        build_datasets(cfg)


# -- 4. SIGTERM to the whole process group with DataLoader workers ------------------------------
def _image_folder(root, n=8, classes=("a", "b"), size=20):
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.random.RandomState(i).randint(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return str(root)


def _folder_cmd(data, out, *extra):
    return [sys.executable, "-m", "gendd_fast.train", "--method", "ce", "--dataset",
            "imagefolder", "--data-path", data, "--image-size", "16", "--batch-size", "4",
            "--student", "resnet8", "--device", "cpu", "--log-interval", "1", "--no-plot",
            "--no-progress", "--output", out, *extra]


def test_sigterm_to_process_group_with_workers_saves_and_exits_0(tmp_path):
    """scancel / an eviction signals every process of the job: DataLoader workers must survive
    it so the main process can save at the next step and exit 0."""
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "run"
    cmd = _folder_cmd(data, str(out), "--epochs", "500", "--workers", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=_env())
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and (not metrics.exists()
                                          or len(metrics.read_text().splitlines()) < 6):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "killed by signal" not in err and "exited unexpectedly" not in err
    state = ckpt_io.read_checkpoint(str(out / "last.pt"))
    assert state["global_step"] >= 5


# -- 8. disk full ---------------------------------------------------------------------------------
def _disk_full(monkeypatch, folder):
    """Point atomic_save's temporary file at /dev/full: every write fails with ENOSPC from the
    kernel, as on a full disk."""
    real = ckpt_io.tempfile.mkstemp

    def mkstemp(dir=None, prefix=None, suffix=None):
        fd, tmp = real(dir=dir, prefix=prefix, suffix=suffix)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), tmp

    monkeypatch.setattr(ckpt_io.tempfile, "mkstemp", mkstemp)


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


def test_disk_full_during_training(tmp_path, monkeypatch):
    from gendd_fast.train import train
    cfg = tiny_config(tmp_path, "ce", epochs=1, max_steps=2)
    train(cfg)
    before = ckpt_io.read_checkpoint(os.path.join(cfg.output, "last.pt"))["global_step"]
    _disk_full(monkeypatch, cfg.output)
    import dataclasses
    with pytest.raises(ckpt_io.DiskFullError, match=r"no space left on device while writing "
                                                    r".*last.pt; the previous .*last.pt is kept"):
        train(dataclasses.replace(cfg, max_steps=0, resume="auto"))
    monkeypatch.undo()
    assert ckpt_io.read_checkpoint(os.path.join(cfg.output, "last.pt"))["global_step"] == before


# -- 8. corrupt images: named, on every path ------------------------------------------------------
def test_corrupt_jpeg_in_the_main_process_is_named(tmp_path):
    from gendd_fast.data import build_loaders
    data = _image_folder(tmp_path / "data")
    with open(os.path.join(data, "train", "a", "zz_broken.jpg"), "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    cfg = make_config(method="ce", dataset="imagefolder", data_path=data, image_size=16,
                      batch_size=4, workers=0, device="cpu").resolved()
    loaders = build_loaders(cfg, 0, 1, torch.device("cpu"))
    loaders.train.set_epoch(0)
    with pytest.raises(BadImageError, match=r"cannot decode image .*zz_broken.jpg.*"
                                            r"--skip-bad-images"):
        list(loaders.train)


def test_corrupt_jpeg_in_a_worker_is_one_line(tmp_path):
    """Through a DataLoader worker the error used to arrive wrapped in the worker's traceback,
    and the CLI printed a raw traceback."""
    data = _image_folder(tmp_path / "data")
    with open(os.path.join(data, "train", "a", "zz_broken.jpg"), "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    cmd = _folder_cmd(data, str(tmp_path / "run"), "--epochs", "1", "--workers", "1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env())
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: cannot decode image") and "zz_broken.jpg" in err
    assert "--skip-bad-images" in err
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


class _FailingDali(dali.DaliLoader):
    """A DALI loader whose pipeline fails as nvImageCodec does on a bad JPEG: while building
    (the first batches are decoded by ``pipe.build()``/the iterator's prefetch), naming no file."""

    def _build(self):
        raise RuntimeError("[/opt/dali/dali/operators/imgcodec/image_decoder.h:695] "
                           "nvImageCodec failure: '#4'")


def test_dali_decode_failure_while_building_names_the_file(tmp_path):
    data = _image_folder(tmp_path / "data")
    bad = os.path.join(data, "train", "a", "zz_broken.jpg")
    with open(bad, "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(data, "train"))
                   for f in fs)
    loader = _FailingDali(None, 4, True, torch.device("cpu"), len(files), "Reader", files)
    loader.set_epoch(0)
    with pytest.raises(BadImageError, match="zz_broken.jpg"):
        next(iter(loader))
    # a failure that is not about a file (nothing undecodable found) is not disguised as one
    os.remove(bad)
    loader = _FailingDali(None, 4, True, torch.device("cpu"), len(files) - 1, "Reader",
                          [f for f in files if f != bad])
    with pytest.raises(RuntimeError, match="nvImageCodec failure"):
        next(iter(loader))


# -- 7. DALI resume over arrays says the augmentations differ ------------------------------------
def test_dali_array_resume_gives_the_notice(capsys):
    from gendd_fast.data.loader import EpochSampler
    images = np.zeros((32, 8, 8, 3), np.uint8)
    feed = dali._ArrayBatches(images, np.zeros(32, np.int64), EpochSampler(32), 4, True)
    fresh = dali.DaliLoader(None, 4, True, torch.device("cpu"), 32, None, None, feed)
    fresh.set_epoch(0, 0)
    assert "DALI" not in capsys.readouterr().err
    resumed = dali.DaliLoader(None, 4, True, torch.device("cpu"), 32, None, None, feed)
    resumed.set_epoch(3, 5)
    err = capsys.readouterr().err
    assert "DALI: resuming at epoch 4, batch 5" in err and "will not match" in err
    resumed = dali.DaliLoader(None, 4, True, torch.device("cpu"), 32, None, None, feed)
    resumed.set_epoch(2, 0)  # at an epoch boundary the draws restart too
    assert "DALI: resuming at epoch 3" in capsys.readouterr().err


# -- 2. helpers: one stop decision for all ranks ------------------------------------------------
def _any_rank_worker(rank, port, results):
    import torch.distributed as dist

    from gendd_fast.distributed import any_rank
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        got = [any_rank(rank == 1), any_rank(False), any_rank(rank == 0)]
        results.put((rank, got))
    finally:
        dist.destroy_process_group()


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_any_rank_is_one_decision():
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_any_rank_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(q.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert got == {0: [True, False, True], 1: [True, False, True]}


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


# -- 2. multi-process: a signal to any rank stops all; SIGTERM to torchrun saves -------------------
def _torchrun_cmd(out, launcher="torch.distributed.run"):
    return [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node", "2",
            "-m", "gendd_fast.train", "--method", "ce", "--dataset", "synthetic",
            "--synthetic-size", "64", "--num-classes", "4", "--image-size", "16",
            "--batch-size", "8", "--epochs", "500", "--student", "resnet8", "--workers", "0",
            "--device", "cpu", "--log-interval", "1", "--no-plot", "--no-progress",
            "--output", str(out)]


def _rank_pids(launcher_pid):
    """{rank: pid} of the launcher's children (Linux /proc)."""
    pids = {}
    for task in os.listdir(f"/proc/{launcher_pid}/task"):
        with open(f"/proc/{launcher_pid}/task/{task}/children") as fh:
            for pid in map(int, fh.read().split()):
                try:
                    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                except OSError:
                    continue
                for kv in env:
                    if kv.startswith(b"RANK="):
                        pids[int(kv[5:])] = pid
    return pids


def _signal_when_training(cmd, out, target, tmp_path):
    """Start ``cmd``; once it has logged a few steps, SIGTERM ``target(proc)``; return
    (returncode, stderr). A hang fails the test at the timeout instead of hanging CI."""
    log = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=_env(),
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and (not metrics.exists()
                                          or len(metrics.read_text().splitlines()) < 4):
            assert proc.poll() is None, open(tmp_path / "stderr.txt").read()[-3000:]
            time.sleep(0.2)
        os.kill(target(proc), signal.SIGTERM)
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        rc = "hung"
    finally:
        if proc.poll() is None:  # the launcher and its ranks: everything of this session
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in _rank_pids(proc.pid).values() if os.path.exists(f"/proc/{proc.pid}") \
                    else ():
                os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=30)
    log.seek(0)
    return rc, log.read()


def test_sigterm_to_one_rank_stops_every_rank(tmp_path):
    """One node pre-empted: only rank 1 gets SIGTERM. All ranks must stop at the same step,
    rank 0 saves, and the job exits 0 (it hung in a collective)."""
    out = tmp_path / "run"
    rc, err = _signal_when_training(_torchrun_cmd(out), out, lambda p: _rank_pids(p.pid)[1],
                                    tmp_path)
    assert rc == 0, err[-3000:]
    state = ckpt_io.read_checkpoint(str(out / "last.pt"))
    assert state["global_step"] >= 4 and state["world_size"] == 2


def test_sigterm_to_torchrun_saves_a_resumable_checkpoint(tmp_path):
    """Pre-emption that signals torchrun itself: torchrun forwards SIGTERM to every rank, the
    ranks agree to stop, save and exit 0. torchrun then reports the signal with its own non-zero
    exit status (its convention; we use torchrun as it is, with no launcher of our own)."""
    out = tmp_path / "run"
    rc, err = _signal_when_training(_torchrun_cmd(out), out, lambda p: p.pid, tmp_path)
    assert rc != "hung", err[-3000:]
    state = ckpt_io.read_checkpoint(str(out / "last.pt"))
    assert 4 <= state["global_step"] < 2000  # saved where it stopped, long before the end
    assert state["world_size"] == 2


# -- 3. a fresh run never overwrites a folder's checkpoint silently ------------------------------
def test_fresh_run_into_a_checkpoint_folder_is_refused(tmp_path):
    import dataclasses

    from gendd_fast.train import train
    cfg = tiny_config(tmp_path, "ce", epochs=1)
    train(cfg)
    last = os.path.join(cfg.output, "last.pt")
    before = ckpt_io.read_checkpoint(last)["global_step"]
    metrics = open(os.path.join(cfg.output, "metrics.jsonl")).read()
    again = dataclasses.replace(cfg, max_steps=1)
    with pytest.raises(ckpt_io.CheckpointError, match=r"already holds a checkpoint \(last.pt\).*"
                                                      r"--resume auto.*--output.*--overwrite"):
        train(again)
    assert ckpt_io.read_checkpoint(last)["global_step"] == before
    assert open(os.path.join(cfg.output, "metrics.jsonl")).read() == metrics
    train(dataclasses.replace(again, overwrite=True))
    assert ckpt_io.read_checkpoint(last)["global_step"] == 1
    assert not os.path.exists(os.path.join(cfg.output, "best.pt"))  # the old run's is gone


def test_fresh_run_refusal_on_the_cli(tmp_path):
    out = tmp_path / "run"
    ckpt_io.atomic_save({"model": {}}, str(out / "best.pt"))
    r = subprocess.run([sys.executable, "-m", "gendd_fast.train", "--method", "ce", "--dataset",
                        "synthetic", "--output", str(out), "--device", "cpu", "--epochs", "1",
                        "--max-steps", "1", "--synthetic-size", "16", "--batch-size", "8",
                        "--image-size", "16", "--no-plot", "--no-progress"],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"error: output folder {str(out)!r} already holds a checkpoint (best.pt, but no " \
           f"last.pt to resume from)" in r.stderr


# -- 5. non-finite weights or buffers are never saved; the message names what is on disk -------
def test_infinite_batchnorm_statistics_are_not_saved(tmp_path, monkeypatch):
    """A huge lr makes BatchNorm running variances Inf while the training loss (which uses batch
    statistics) stays finite: the guard must look at buffers too, and save nothing bad."""
    from gendd_fast.distill import CE
    from gendd_fast.train import NonFiniteLoss, train
    calls = {"n": 0}
    real = CE.forward

    def poisoned(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2 of 4-step epochs
            bn = next(m for m in self.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return real(self, *a, **kw)

    monkeypatch.setattr(CE, "forward", poisoned)
    cfg = tiny_config(tmp_path, "ce", epochs=3)
    with pytest.raises(NonFiniteLoss, match=r"running_var.*it was not saved and the newest good "
                                            r"checkpoint on disk, .*last.pt \(step 4\)"):
        train(cfg)
    state = ckpt_io.read_checkpoint(os.path.join(cfg.output, "last.pt"))
    assert state["global_step"] == 4
    assert not ckpt_io.nonfinite_names({**state["model"], **state["extra"]})


def test_nan_message_names_a_checkpoint_an_earlier_process_wrote(tmp_path, monkeypatch):
    import dataclasses

    from gendd_fast.distill import CE
    from gendd_fast.train import NonFiniteLoss, train
    cfg = tiny_config(tmp_path, "ce", epochs=2, max_steps=4)
    train(cfg)  # an earlier process: last.pt at step 4
    real = CE.forward
    monkeypatch.setattr(CE, "forward",
                        lambda self, *a, **kw: (lambda lp: (lp[0] * float("nan"), lp[1]))(
                            real(self, *a, **kw)))
    with pytest.raises(NonFiniteLoss) as e:
        train(dataclasses.replace(cfg, max_steps=0, resume="auto"))
    assert "no checkpoint had been written" not in str(e.value)
    assert "last.pt (step 4), is untouched" in str(e.value)


# -- 6. best.pt is repaired on resume; temporary files of killed writes go ------------------------
def test_stale_best_is_rewritten_on_resume_and_temps_removed(tmp_path, monkeypatch):
    import dataclasses

    from gendd_fast.train import train
    cfg = tiny_config(tmp_path, "ce", epochs=3, lr=1e-2)
    real = ckpt_io.atomic_save
    writes = {"best": 0}

    class Killed(BaseException):
        pass

    def killed_during_second_best(obj, path):
        if path.endswith("best.pt"):
            writes["best"] += 1
            if writes["best"] == 2:  # the process dies while writing best.pt a second time
                open(os.path.join(os.path.dirname(path), ".best.pt.dead.tmp"), "wb").close()
                raise Killed()
        return real(obj, path)

    monkeypatch.setattr(ckpt_io, "atomic_save", killed_during_second_best)
    # make every evaluation a new best, so epoch 2 writes best.pt again
    from gendd_fast import train as train_mod
    top = iter(range(10, 100, 10))
    monkeypatch.setattr(train_mod, "evaluate",
                        lambda *a, **kw: {"top1": float(next(top)), "top5": 100.0, "n": 1})
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(ckpt_io, "atomic_save", real)
    out = cfg.output
    last = ckpt_io.read_checkpoint(os.path.join(out, "last.pt"))
    assert last["best"]["epoch"] == 2
    assert ckpt_io.read_checkpoint(os.path.join(out, "best.pt"))["best"]["epoch"] == 1  # stale
    assert os.path.exists(os.path.join(out, ".best.pt.dead.tmp"))
    train(dataclasses.replace(cfg, resume="auto", max_steps=last["global_step"]))
    best = ckpt_io.read_checkpoint(os.path.join(out, "best.pt"))
    assert best["best"]["epoch"] == 2 and best["global_step"] == last["global_step"]
    for k, v in last["model"].items():
        assert torch.equal(best["model"][k], v)
    assert not os.path.exists(os.path.join(out, ".best.pt.dead.tmp"))


# -- 8. resuming with another teacher file is refused ---------------------------------------------
def test_resume_with_a_different_teacher_is_refused(tmp_path):
    import dataclasses

    from gendd_fast.train import train
    (tmp_path / "t1").mkdir()
    (tmp_path / "t2").mkdir()
    t1, _ = save_teacher(tmp_path / "t1", seed=0)
    t2, _ = save_teacher(tmp_path / "t2", seed=1)
    cfg = tiny_config(tmp_path, "kd", t1, epochs=2, max_steps=2)
    train(cfg)
    with pytest.raises(ckpt_io.CheckpointError, match=r"trained with the teacher checkpoint "
                                                      r"'teacher_resnet8.pt'.*sha256"):
        train(dataclasses.replace(cfg, teacher_checkpoint=t2, resume="auto", max_steps=3))
    # the same teacher under another path (a moved run) is fine
    moved = tmp_path / "moved.pt"
    moved.write_bytes(open(t1, "rb").read())
    res = train(dataclasses.replace(cfg, teacher_checkpoint=str(moved), resume="auto",
                                    max_steps=3))
    assert res["global_step"] == 3
