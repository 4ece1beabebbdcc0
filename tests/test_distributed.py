"""Two processes on gloo through torchrun, as users launch multi-GPU runs (NCCL there)."""
import json
import os
import subprocess
import sys

import torch

from helpers import save_teacher
from gendd_fast import checkpoint as ckpt_io
import signal
import time
from helpers import _env


def test_torchrun_two_process_gendd(tmp_path):
    teacher, _ = save_teacher(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gendd_fast.train", "--method", "gendd", "--dataset", "synthetic",
           "--synthetic-size", "64", "--num-classes", "4", "--image-size", "16",
           "--batch-size", "8", "--epochs", "2", "--student", "resnet8", "--teacher", "resnet8",
           "--teacher-checkpoint", teacher, "--token-dim", "32", "--diffloss-w", "32",
           "--diffloss-d", "1", "--mul", "2", "--sampling-steps", "3", "--workers", "0",
           "--device", "cpu", "--log-interval", "1", "--no-plot", "--no-progress",
           "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr
    state = torch.load(out / "last.pt", weights_only=False)
    # 64 images over 2 ranks of 8: 4 steps per epoch, every rank's RNG state kept for resume
    assert state["global_step"] == 8 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [r for r in recs if r["type"] == "val"]
    assert val and "sample_top1" in val[-1]
    # rank 0 alone writes: one train record per step
    assert [r["step"] for r in recs if r["type"] == "train"] == list(range(1, 9))


# Hostile input and faults (moved from the campaign file test_hardening.py): no code runs from a
# checkpoint or a CIFAR file, signals and full disks are survived with a clear message, and nothing
# on disk is silently lost or left stale.


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
