"""One run per output folder: an exclusive lock file, held for the run's life.

Two runs started into the same ``--output`` used to both run: ``last.pt`` of one seed,
``best.pt`` of the other and an interleaved ``metrics.jsonl``. The lock is ``OUTPUT/.gendd.lock``,
held with ``flock`` on an open descriptor. The kernel drops a flock when its process dies, however
it dies (SIGKILL, OOM): a lock file left by a dead run is therefore *stale* by construction and is
taken over with a notice, never a refusal. The file's text names the holder (PID, host, start
time) so a refused second run can say who holds the folder.

Opening the lock file is also the first write into the folder, so a read-only ``--output`` is
found here, before anything is built.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

LOCK_NAME = ".gendd.lock"


class RunLockError(ValueError):
    """The output folder is held by another live run, or cannot be written."""


class RunLock:
    def __init__(self, output: str):
        self.output = output
        self.path = os.path.join(output, LOCK_NAME)
        self.fd: Optional[int] = None
        self.stale: Optional[dict] = None  # the dead holder whose lock file was taken over

    def acquire(self) -> "RunLock":
        try:
            os.makedirs(self.output, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunLockError(f"output folder {self.output!r} cannot be written "
                               f"({e.strerror or e}); choose a writable --output") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _same_file(fd, self.path):  # its holder removed it while we opened it
                os.close(fd)
                return self.acquire()
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockError(
                    f"output folder {self.output!r} is in use by another run (PID "
                    f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
                    f"{holder.get('started', '?')}); two runs in one folder would mix their "
                    f"checkpoints and metrics. Wait for it, stop it, or choose another "
                    f"--output") from None
            raise RunLockError(f"cannot lock {self.path!r} ({e.strerror or e})") from None
        previous = _read_holder(fd)
        if previous:  # a lock file nobody holds: its run died without releasing it
            self.stale = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self.fd = fd
        return self

    def release(self):
        """Remove the file, then drop the lock (in this order: a run that takes the folder
        after us never has its fresh lock file deleted by us)."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}


def describe(holder: dict) -> str:
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}"
