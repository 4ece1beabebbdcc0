"""One signal policy for every phase of a run: SIGTERM and SIGINT mean "stop cleanly, now".

The trainer installs :func:`installed` around its whole life, set-up included, with one stop
record (a dict). What a signal does depends on the phase the record names:

- ``"set-up"`` (process group, data scan, models, teacher, reading the resume checkpoint):
  nothing is trained yet, so nothing needs saving; the handler raises :class:`StopRequested`
  at once (a data scan or a DALI build can take minutes, too long to wait for a boundary).
- every later phase (training steps, evaluation passes, the final evaluation): the handler only
  records the signal. The loop checks it at each step and each evaluation batch, saves a
  resumable ``last.pt`` and returns; the final evaluation writes what it has and marks the rest
  missing.
- a *second* signal while a stop is pending raises :class:`StopRequested` at once: a user who
  presses Ctrl-C twice wants out (the checkpoint on disk is still whole: writes are atomic).

SIGINT is handled exactly as SIGTERM (a Ctrl-C gave a raw KeyboardInterrupt traceback). Forked
DataLoader workers inherit the handler; it ignores signals in any process but its installer's,
so a worker never dies of a signal meant for the job (the parent stops its workers itself).
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Dict

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """A signal that stops the run where no state can or need be saved (set-up, a second
    signal). Not a ValueError: the CLI reports it as a clean stop, not as bad input."""

    def __init__(self, signum: int, phase: str):
        self.signum, self.phase = signum, phase
        super().__init__(f"stopped by {name(signum)} during {phase}")


def name(signum) -> str:
    try:
        return signal.Signals(signum).name
    except (ValueError, TypeError):
        return str(signum)


def _handler(stop: Dict, owner: int):
    def on_signal(signum, _frame):
        if os.getpid() != owner:  # a forked worker: its parent decides
            return
        pending = stop.get("signal") is not None
        stop["signal"] = stop.get("signal") or signum
        if stop.get("phase", "set-up") == "set-up" or pending:
            raise StopRequested(signum, stop.get("phase", "set-up") if not pending
                                else f"{stop.get('phase')} (second signal)")
    return on_signal


@contextlib.contextmanager
def installed(stop: Dict):
    """SIGTERM and SIGINT handled by the policy inside the block; the caller's own handlers
    come back afterwards. Outside the main thread (a notebook worker) nothing is installed."""
    previous = {}
    handler = _handler(stop, os.getpid())
    for s in SIGNALS:
        try:
            previous[s] = signal.signal(s, handler)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        yield stop
    finally:
        for s, h in previous.items():
            try:
                signal.signal(s, h)
            except (ValueError, TypeError, OSError):
                pass


def set_phase(stop: Dict, phase: str):
    """Enter ``phase`` (the trainer: "training" once set-up is done; the handler reads it)."""
    stop["phase"] = phase


class EvaluationStopped(Exception):
    """An evaluation pass given up after ``batches`` batches because a stop was agreed."""

    def __init__(self, batches: int):
        self.batches = batches
        super().__init__(f"evaluation stopped after {batches} batch(es)")
