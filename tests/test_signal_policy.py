"""The signal policy (gendd_fast/signal_policy.py), the way the probe ran it: a real trainer
process, real SIGTERM/SIGINT. A small driver script imports the trainer first (imports take
seconds on a loaded machine and are no phase of ours), then marks the phase under test on stderr
so the signal lands inside it, not by a guessed delay.

Each test was run against main's code (its gendd_fast on PYTHONPATH) and failed there, as its
docstring says."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gendd_fast import checkpoint as ckpt_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The trainer's CLI with one phase wrapped: MARK is printed when the phase starts (and, for
# set-up, the phase is held open for a few seconds so the signal surely lands in it).
DRIVER = r'''
import sys, time
import gendd_fast.train as T
from gendd_fast.cli import train_cli
phase = sys.argv.pop(1)
def marked(fn, hold=0.0):
    def wrapper(*a, **k):
        print("MARK " + phase, file=sys.stderr, flush=True)
        time.sleep(hold)
        return fn(*a, **k)
    return wrapper
if phase == "set-up":
    T.build_loaders = marked(T.build_loaders, hold=30.0)
elif phase == "evaluation":
    T.evaluate = marked(T.evaluate)
elif phase == "final":
    T.Trainer.final_evaluation = marked(T.Trainer.final_evaluation)
elif phase == "training":
    T.Trainer.train_epoch = marked(T.Trainer.train_epoch)
sys.argv[0] = "gendd_fast.train"
train_cli()
'''


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")


def _gendd_cmd(tmp_path, out, *extra):
    from helpers import save_teacher
    teacher, _ = save_teacher(tmp_path)
    return ["--method", "gendd", "--teacher", "resnet8", "--teacher-checkpoint", teacher,
            "--student", "resnet8", "--dataset", "synthetic", "--synthetic-size", "32",
            "--num-classes", "4", "--image-size", "16", "--batch-size", "16",
            "--token-dim", "32", "--diffloss-w", "48", "--diffloss-d", "2", "--mul", "3",
            "--device", "cpu", "--workers", "0", "--log-interval", "1", "--no-plot",
            "--no-progress", "--output", str(out), *extra]


def _run_and_signal(tmp_path, phase, args, sig=signal.SIGTERM, delay=0.0, timeout=120):
    """Start the driver, send ``sig`` ``delay`` s after MARK; returns (rc, stderr, seconds from
    the signal to the exit)."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), phase, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True)
    err, t_sig = [], None
    try:
        deadline = time.time() + timeout
        for line in proc.stderr:
            err.append(line)
            if line.startswith("MARK"):
                time.sleep(delay)
                t_sig = time.time()
                os.kill(proc.pid, sig)
                break
            if time.time() > deadline:
                break
        out, rest = proc.communicate(timeout=timeout)
        err.append(rest)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert t_sig is not None, "".join(err)[-3000:]
    return proc.returncode, "".join(err), time.time() - t_sig


def test_sigterm_during_set_up_stops_cleanly(tmp_path):
    """A SIGTERM while the run is still being set up (here: while the loaders are built) stops it
    within seconds with exit 0 and one line, no traceback. On main the handler was installed
    only after set-up: the process died of the signal (rc -15) with nothing said."""
    out = tmp_path / "run"
    rc, err, took = _run_and_signal(tmp_path, "set-up", _gendd_cmd(tmp_path, out, "--epochs",
                                                                   "1"))
    assert rc == 0, err[-3000:]
    assert "stopped by SIGTERM during set-up" in err and "--resume auto" in err
    assert "Traceback" not in err
    assert took < 20, took  # the 30 s hold was cut short: the stop is immediate in set-up
    assert not (out / ".gendd.lock").exists()  # the lock went with the run


def test_sigint_is_handled_like_sigterm(tmp_path):
    """Ctrl-C (SIGINT) during training saves a resumable last.pt and exits 0 with a line, as
    SIGTERM does. On main it raised KeyboardInterrupt: a raw traceback, rc 1, nothing saved."""
    out = tmp_path / "run"
    rc, err, took = _run_and_signal(tmp_path, "training",
                                    _gendd_cmd(tmp_path, out, "--epochs", "300"),
                                    sig=signal.SIGINT, delay=0.5)
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    state = ckpt_io.read_checkpoint(str(out / "last.pt"))
    assert state["global_step"] >= 1
    assert took < 30


def test_sigterm_during_an_evaluation_pass_saves_the_position_before_it(tmp_path):
    """A SIGTERM during the end-of-epoch evaluation (a slow sampling pass) gives it up at the
    next batch, saves last.pt at the position before the evaluation (the epoch's last step) and
    says so; --resume auto then evaluates again and finishes. On main the whole pass ran on
    and last.pt recorded the next epoch (step_in_epoch 0), so its evaluation was lost."""
    out = tmp_path / "run"
    args = _gendd_cmd(tmp_path, out, "--epochs", "2", "--sample-eval", "every",
                      "--sampling-steps", "1000", "--eval-batch-size", "1")
    rc, err, took = _run_and_signal(tmp_path, "evaluation", args, delay=0.05)
    assert rc == 0, err[-3000:]
    assert "during the evaluation of epoch 1" in err, err[-3000:]
    state = ckpt_io.read_checkpoint(str(out / "last.pt"))
    assert state["epoch"] == 0 and state["step_in_epoch"] == 2  # 32 images / 16: 2 steps
    assert took < 20, took
    r = subprocess.run([sys.executable, "-m", "gendd_fast.train",
                        *_gendd_cmd(tmp_path, out, "--epochs", "2", "--sample-eval", "every",
                                    "--sampling-steps", "1000", "--eval-batch-size", "8",
                                    "--resume", "auto")],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    vals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [v["epoch"] for v in vals if v["type"] == "val"][:2] == [1, 2]


def test_sigterm_during_the_final_evaluation_marks_missing_results(tmp_path):
    """A SIGTERM during the final sampling evaluation stops it within seconds; what was not
    scored is marked missing in metrics.jsonl and named in a line. On main the signal was
    ignored there: the evaluation ran to its end (minutes on real data) and exited 0, so a
    pre-emption grace period would have killed it with nothing written."""
    out = tmp_path / "run"
    args = _gendd_cmd(tmp_path, out, "--epochs", "1", "--sample-eval", "end",
                      "--sampling-steps", "1000", "--num-sampling", "4", "--eval-batch-size", "1")
    rc, err, took = _run_and_signal(tmp_path, "final", args, delay=0.05)
    assert rc == 0, err[-3000:]
    assert "final evaluation stopped by SIGTERM" in err and "not scored" in err
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    missing = [r for r in recs if r["type"] == "final_missing"]
    assert missing and "last" in missing[0]["missing"], recs[-3:]
    assert took < 20, took
    assert ckpt_io.read_checkpoint(str(out / "last.pt"))["epoch"] == 1  # complete: resumable


def test_unfinished_stage1_is_refused_as_stage2_init(tmp_path):
    """The stage-1 to stage-2 handoff: a stage 1 stopped by a signal exits 0, so a script's
    `stage1 && stage2` went on to train stage 2 from half a stage 1 without a word (main).
    Its last.pt is now refused as --init, naming the unfinished epoch."""
    from helpers import tiny_config
    from gendd_fast.train import train
    res = train(tiny_config(tmp_path / "s1", "ce", epochs=1))
    state = ckpt_io.read_checkpoint(os.path.join(res["output"], "last.pt"))
    state["config"]["epochs"] = 3  # as if stopped after epoch 1 of 3
    cut = tmp_path / "cut"
    cut.mkdir()
    torch.save(state, cut / "last.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="did not finish"):
        train(tiny_config(tmp_path / "s2", "ce", epochs=1, init=str(cut / "last.pt")))


def test_workers_ignore_a_signal_meant_for_their_parent(tmp_path):
    """A forked DataLoader worker inherits the policy's handler; the handler acts only in the
    process that installed it (a worker must not stop or raise on the job's signal). Checked
    with a real fork and a real signal."""
    from gendd_fast import signal_policy
    stop = {"signal": None, "phase": "set-up"}
    with signal_policy.installed(stop):
        pid = os.fork()
        if pid == 0:  # the 'worker': a signal must neither raise nor kill it
            code = 0
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
            except BaseException:  # noqa: BLE001
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert stop["signal"] is None  # the parent's record is untouched
