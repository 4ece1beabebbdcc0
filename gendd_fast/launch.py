"""``torchrun`` that passes a SIGTERM on to the ranks and exits 0 when they saved.

    python -m gendd_fast.launch --nproc_per_node 8 -m gendd_fast.train --config ...

Same flags as ``torchrun``. torchrun turns a SIGTERM into an exception: it forwards the signal,
then exits 1 with a traceback even when every rank saved its checkpoint and exited 0. Here the
first SIGTERM is only forwarded to the ranks; they agree to stop, save at their next step and exit
0, and the launcher, seeing them succeed, exits 0 (or 1 if a rank failed). A second SIGTERM ends
everything as torchrun would. Other signals keep torchrun's handling.
"""
from __future__ import annotations

import os
import signal
import threading

from torch.distributed.elastic.multiprocessing import api as _api

_state = {"context": None, "forwarded": False}
_start = _api.PContext.start


def _forward(signum, frame):
    ctx = _state["context"]
    if _state["forwarded"] or ctx is None:
        return _api._terminate_process_handler(signum, frame)  # torchrun's: stop everything
    _state["forwarded"] = True
    for pid in ctx.pids().values():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _start_and_forward(self):
    """PContext.start installs torchrun's handlers; replace the SIGTERM one with ours."""
    _start(self)
    _state["context"] = self
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _forward)


def main(argv=None):
    from torch.distributed.run import main as torchrun_main
    _api.PContext.start = _start_and_forward
    torchrun_main(argv)


if __name__ == "__main__":
    main()
