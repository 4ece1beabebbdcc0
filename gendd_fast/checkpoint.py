"""Checkpoints that survive a crash mid-write and resume a run exactly.

A training checkpoint is one ``torch.save`` dict:

- ``model``: the student's state dict in the public format (``{'model': state_dict}``), so any
  checkpoint of ours loads as a teacher or as the student of a later stage;
- ``extra``: the rest of the method's trainable state (GenDD: ``cls_projector.*``, ``diffloss.*``,
  ``teacher_fc.*``, with the public code's names);
- ``optimizer``, ``scaler``, ``schedule``; ``epoch`` and ``step_in_epoch`` (where to continue),
  ``global_step``; ``rng`` (every rank's Python, NumPy, torch and CUDA generator states);
  ``config`` (the resolved config) and ``best``.

Files are written to a temporary name in the same folder, flushed to disk, then renamed over the
target: a reader sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

FORMAT = "gendd_fast/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit this run."""


def atomic_save(obj: Any, path: str):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def read_checkpoint(path: str, what: str = "checkpoint") -> Dict[str, Any]:
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated, foreign, or not a torch file
        raise CheckpointError(f"{what} {path!r} could not be read ({type(e).__name__}: {e}); "
                              f"it may be truncated or not a torch checkpoint") from e


def split_state(state: Dict[str, torch.Tensor]):
    """Method state dict -> (student state dict, everything else)."""
    model = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    extra = {k: v for k, v in state.items() if not k.startswith("student.")}
    return model, extra


def join_state(ckpt: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    state = {"student." + k: v for k, v in ckpt["model"].items()}
    state.update(ckpt.get("extra", {}))
    return state


def rng_state() -> Dict[str, Any]:
    s = {"python": random.getstate(), "numpy": np.random.get_state(),
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: Dict[str, Any]):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_student_weights(path: str, student: torch.nn.Module, strict: bool = False) -> str:
    """Initialise a student from a checkpoint's ``model`` (stage 2 from stage 1). Non-strict:
    keys the student lacks are ignored. Returns a one-line summary."""
    ckpt = read_checkpoint(path, "initial weights")
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"initial weights {path!r} hold no state dict")
    own = student.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not usable:
        raise CheckpointError(f"initial weights {path!r} share no parameter with the student "
                              f"{type(student).__name__} - is it the right architecture?")
    if strict and len(usable) != len(own):
        raise CheckpointError(f"initial weights {path!r} miss {len(own) - len(usable)} keys")
    student.load_state_dict(usable, strict=False)
    return f"loaded {len(usable)}/{len(own)} student tensors from {path}"


def resume_path(resume: Optional[str], output: str) -> Optional[str]:
    """'auto' -> OUTPUT/last.pt when it exists (else a fresh start); a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        p = os.path.join(output, "last.pt")
        return p if os.path.isfile(p) else None
    if not os.path.isfile(resume):
        raise CheckpointError(f"--resume {resume!r}: no such checkpoint")
    return resume
