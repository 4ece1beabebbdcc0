"""The run lock (gendd_fast/run_lock.py): one run per --output, the way the probe ran it, with two
real trainer processes. Each test failed on main (no lock existed: both runs trained into one
folder), as its docstring says."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

LOCK_NAME = ".gendd.lock"  # gendd_fast.run_lock.LOCK_NAME (imported inside the tests that need it)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def _cmd(out, *extra):
    return [sys.executable, "-m", "gendd_fast.train", "--method", "ce", "--dataset", "synthetic",
            "--synthetic-size", "32", "--num-classes", "4", "--image-size", "16",
            "--batch-size", "16", "--student", "resnet8", "--device", "cpu", "--workers", "0",
            "--log-interval", "1", "--no-plot", "--no-progress", "--output", str(out), *extra]


def _start_and_wait_training(out):
    """A long first run, returned once it has logged training steps (it holds the lock)."""
    proc = subprocess.Popen(_cmd(out, "--epochs", "1000"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    return proc


def test_second_run_into_the_same_output_is_refused(tmp_path):
    """Two runs started into one --output: the second is refused before it touches anything,
    naming the holder's PID and host; the first trains on and stops cleanly. On main both ran
    (last.pt from one seed, best.pt from the other, metrics.jsonl interleaved)."""
    out = tmp_path / "run"
    first = _start_and_wait_training(out)
    try:
        second = subprocess.run(_cmd(out, "--epochs", "1", "--resume", "auto", "--seed", "1"),
                                cwd=REPO, capture_output=True, text=True, timeout=180,
                                env=_env())
        assert second.returncode == 2, second.stderr[-3000:]
        err = second.stderr.strip().splitlines()[-1]
        assert err.startswith("error: output folder") and "in use by another run" in err
        assert f"PID {first.pid}" in err and socket.gethostname() in err
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run was not disturbed
        os.kill(first.pid, signal.SIGTERM)
        _, ferr = first.communicate(timeout=120)
        assert first.returncode == 0, ferr[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert not (out / LOCK_NAME).exists()  # released on the way out


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    """SIGKILL leaves the lock file behind; the kernel dropped the flock with the process, so
    the next run recognises the lock as stale, takes it over with a notice naming the dead
    holder, and resumes. (On main there was no lock to recognise: the test fails on the import
    of gendd_fast.run_lock and on the missing lock file.)"""
    out = tmp_path / "run"
    first = _start_and_wait_training(out)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert (out / LOCK_NAME).exists()
    from gendd_fast.run_lock import RunLock
    lock = RunLock(str(out)).acquire()
    try:
        assert lock.stale and lock.stale["pid"] == first.pid
    finally:
        lock.release()
    assert not (out / LOCK_NAME).exists()


def test_lock_is_held_against_another_holder_and_released_on_an_exception(tmp_path):
    """In one process: a second RunLock on the folder is refused (flock is per open file), and
    train() frees the folder even when the run fails (here: NaN loss at step 1)."""
    from gendd_fast.run_lock import RunLock, RunLockError
    held = RunLock(str(tmp_path)).acquire()
    try:
        with pytest.raises(RunLockError, match=f"PID {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()
    finally:
        held.release()
    from helpers import tiny_config
    from gendd_fast.train import NonFiniteLoss, train
    cfg = tiny_config(tmp_path, "ce", lr=1e30, epochs=1)
    with pytest.raises(NonFiniteLoss):
        train(cfg)
    assert not os.path.exists(os.path.join(cfg.output, LOCK_NAME))
    RunLock(cfg.output).acquire().release()  # free for the next run
