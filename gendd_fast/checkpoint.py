"""Checkpoints that survive a crash mid-write and resume a run exactly.

A training checkpoint is one ``torch.save`` dict:

- ``model``: the student's state dict in the public format (``{'model': state_dict}``), so any
  checkpoint of ours loads as a teacher or as the student of a later stage;
- ``extra``: the rest of the method's trainable state (GenDD: ``cls_projector.*``, ``diffloss.*``,
  ``teacher_fc.*``, with the public code's names);
- ``optimizer``, ``scaler``, ``schedule``; ``epoch`` and ``step_in_epoch`` (where to continue),
  ``global_step``; ``rng`` (every rank's Python, NumPy, torch and CUDA generator states);
  ``config`` (the resolved config), ``best`` and ``teacher`` (the teacher file's name, size and
  SHA-256, so a resume with another teacher is refused).

Files are written to a temporary name in the same folder, flushed to disk, then renamed over the
target: a reader sees the old file or the new one, never half of one. Files are read with
``weights_only=True``: tensors and plain containers (the RNG states are stored as tensors, so plain
``torch.load(weights_only=True)`` opens a checkpoint too), plus the NumPy pieces of older
checkpoints' RNG state, nothing that could run code (teacher files are routinely downloaded).
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch

FORMAT = "gendd_fast/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit this run."""


class UnsafeCheckpointError(CheckpointError):
    """A file that holds Python objects which could run code when unpickled: refused."""


class DiskFullError(CheckpointError, OSError):
    """A checkpoint write that ran out of space; the file it would have replaced is kept."""

    def __init__(self, msg: str):
        super().__init__(msg)
        self.errno, self.strerror = errno.ENOSPC, msg


def _numpy_rng_globals():
    """What the NumPy generator state in ``rng`` pickles as (an ndarray of uint32 keys), under
    both the NumPy 1 and NumPy 2 module names. These rebuild plain arrays and run no code."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1
        from numpy.core import multiarray
    out = []
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out.append((multiarray._reconstruct, f"{mod}._reconstruct"))
    out += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    # NumPy 2 may name the dtype's class (numpy.dtypes.UInt32DType) instead of numpy.dtype.
    for name in ("UInt32DType", "Int64DType", "Float64DType"):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        if cls is not None:
            out.append((cls, f"numpy.dtypes.{name}"))
    return out


# What checkpoints written before the RNG states became tensors hold beyond tensors and plain
# containers: the allow-list read_checkpoint gives torch.load(weights_only=True) so they still
# load. Fresh checkpoints and teacher files (``{'model': state_dict}``) need none of it.
SAFE_GLOBALS = _numpy_rng_globals()


def _no_space(e: BaseException) -> bool:
    """Whether a failed write ran out of space (torch wraps the OSError in its own errors)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        if "no space left on device" in str(e).lower():
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


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
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception) and _no_space(e):
            kept = (f"the previous {path} is kept unchanged" if os.path.isfile(path)
                    else f"no earlier {os.path.basename(path)} existed, so none is on disk")
            raise DiskFullError(f"no space left on device while writing {path}; {kept}. Free "
                                f"space in {folder} and resume with --resume auto") from e
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _unsafe_globals(path: str) -> List[str]:
    """The globals a torch zip file would import, found without unpickling anything."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file cannot be scanned without loading
        return []
    allowed = {n for _, n in SAFE_GLOBALS}
    return [n for n in names if n not in allowed]


def _unsafe_message(path: str, what: str, names: List[str]) -> str:
    held = f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else ""
    return (f"{what} {path!r} holds Python objects other than tensors and plain containers"
            f"{held}; unpickling them could run arbitrary code, so it was not loaded. If you "
            f"trust where the file came from, convert it once into a tensors-only copy with "
            f"'python -m gendd_fast.checkpoint --trust-and-convert {path} CONVERTED.pt' "
            f"and use CONVERTED.pt")


def read_checkpoint(path: str, what: str = "checkpoint") -> Dict[str, Any]:
    """Load a checkpoint or teacher file without executing anything it holds: tensors, plain
    containers and :data:`SAFE_GLOBALS` only (``weights_only=True``)."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(path)
        if names or "unsupported global" in str(e).lower():
            raise UnsafeCheckpointError(_unsafe_message(path, what, names)) from None
        raise CheckpointError(f"{what} {path!r} could not be read ({type(e).__name__}: {e}); "
                              f"it may be truncated or not a torch checkpoint") from e
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
    """This process's generator states as tensors and plain numbers only, so plain
    ``torch.load(path, weights_only=True)`` opens a checkpoint with no allow-list (checkpoints
    before this stored NumPy's state as NumPy objects; :func:`set_rng_state` still takes those)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                    "gauss_next": gauss},
         "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                   "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: Dict[str, Any]):
    py, npy = s["python"], s["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"])
    random.setstate(py)
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)  # a tuple with an ndarray: a checkpoint from before the change
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


# -- the output folder: what is on disk, and keeping it consistent ------------------------------
CHECKPOINT_NAMES = ("last.pt", "best.pt")


def existing_checkpoint(output: str) -> Optional[str]:
    """The first of OUTPUT/last.pt, OUTPUT/best.pt that exists, else None."""
    for name in CHECKPOINT_NAMES:
        p = os.path.join(output, name)
        if os.path.isfile(p):
            return p
    return None


def fresh_run_refusal(output: str, overwrite: bool) -> Optional[str]:
    """Why a run that does not resume must not start in ``output`` (None: it may). A finished
    run's checkpoints and metrics would otherwise be replaced without a word."""
    found = existing_checkpoint(output)
    if found is None or overwrite:
        return None
    if os.path.basename(found) == "best.pt":  # no last.pt: nothing that --resume auto would use
        return (f"output folder {output!r} already holds a checkpoint (best.pt, but no last.pt "
                f"to resume from); a fresh run would overwrite it. Choose another --output, or "
                f"pass --overwrite to replace it")
    return (f"output folder {output!r} already holds a checkpoint ({os.path.basename(found)}); "
            f"a fresh run would overwrite it. Continue that run with --resume auto, choose "
            f"another --output, or pass --overwrite to replace it")


def remove_stale_temps(output: str) -> List[str]:
    """Delete the temporary files of checkpoint writes that were killed mid-way (atomic_save
    names them '.NAME.XXXX.tmp'). Call before this run writes anything. Returns what went."""
    gone = []
    if not os.path.isdir(output):
        return gone
    for f in sorted(os.listdir(output)):
        if f.startswith(".") and f.endswith(".tmp") and any(
                f.startswith("." + n + ".") for n in CHECKPOINT_NAMES):
            try:
                os.remove(os.path.join(output, f))
                gone.append(f)
            except OSError:
                pass
    return gone


def nonfinite_names(state: Dict[str, torch.Tensor], limit: int = 5) -> List[str]:
    """Names of the floating-point tensors in ``state`` that hold a NaN or Inf (parameters and
    buffers alike: BatchNorm running variances go Inf before the loss does). One device sync."""
    items = [(k, v) for k, v in state.items()
             if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    if not items:
        return []
    flags = torch.stack([torch.isfinite(v).all() for _, v in items]).cpu()
    return [items[i][0] for i in torch.nonzero(~flags).flatten().tolist()[:limit]]


def _is_good(path: str) -> Optional[int]:
    """global_step of a readable checkpoint of ours whose weights are all finite, else None."""
    try:
        s = read_checkpoint(path)
    except CheckpointError:
        return None
    if not isinstance(s, dict) or not isinstance(s.get("model"), dict):
        return None
    if nonfinite_names({**s["model"], **s.get("extra", {})}, limit=1):
        return None
    step = s.get("global_step")
    return int(step) if isinstance(step, int) else -1


def newest_good_checkpoint(output: str):
    """(path, global_step) of the newest checkpoint in ``output`` that loads and holds finite
    weights, whichever process wrote it; None when there is none."""
    best = None
    for name in CHECKPOINT_NAMES:
        p = os.path.join(output, name)
        if os.path.isfile(p):
            step = _is_good(p)
            if step is not None and (best is None or step > best[1]):
                best = (p, step)
    return best


def describe_newest_good(output: str) -> str:
    """A phrase for error messages: where the newest good checkpoint is, if any."""
    found = newest_good_checkpoint(output)
    if found is None:
        return f"no good checkpoint is on disk in {output}"
    return (f"the newest good checkpoint on disk, {found[0]} (step {found[1]}), is untouched; "
            f"resume from it with --resume {found[0]}")


def repair_best(last_state: Dict[str, Any], output: str) -> Optional[str]:
    """Rewrite OUTPUT/best.pt from ``last_state`` when last.pt says best.pt is stale.

    The trainer writes last.pt, then best.pt, with the same state when an epoch sets a new best;
    a kill between the two leaves last.pt recording a best (``best['epoch']``) that best.pt does
    not hold. Then last.pt *is* that best state (saved at the end of epoch ``best['epoch']``),
    and it is copied. Returns a notice to print, or None when best.pt was consistent."""
    best = last_state.get("best") or {}
    if best.get("epoch", -1) < 0:
        return None
    path = os.path.join(output, "best.pt")
    on_disk = None
    if os.path.isfile(path):
        try:
            on_disk = read_checkpoint(path).get("best")
        except (CheckpointError, AttributeError):
            on_disk = None
    if on_disk == best:
        return None
    if last_state.get("epoch") == best["epoch"] and last_state.get("step_in_epoch", 0) == 0:
        atomic_save(last_state, path)
        return (f"best.pt was stale (a write was interrupted); rewrote it from last.pt "
                f"(epoch {best['epoch']}, top-1 {best.get('top1', float('nan')):.2f})")
    return (f"best.pt does not hold the best epoch ({best['epoch']}) that last.pt records, and "
            f"those weights are no longer on disk; best.pt is rewritten at the next new best")


# -- the teacher's identity: a resume must distil from the same teacher ------------------------
def file_identity(path: str) -> Dict[str, Any]:
    """Name, size and SHA-256 of a file (the teacher checkpoint). The content hash, not the path,
    is the identity: a run moved to another machine keeps its teacher under another path."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"name": os.path.basename(path), "size": os.path.getsize(path),
            "sha256": h.hexdigest()}


def teacher_mismatch(saved: Optional[Dict[str, Any]], current: Optional[Dict[str, Any]],
                     ckpt_path: str) -> Optional[str]:
    """Why resuming ``ckpt_path`` with the teacher ``current`` is wrong (None: same teacher, or
    the checkpoint predates the record)."""
    if not saved or not current or saved.get("sha256") == current.get("sha256"):
        return None
    return (f"cannot resume from {ckpt_path}: it was trained with the teacher checkpoint "
            f"{saved.get('name')!r} ({saved.get('size')} bytes, sha256 "
            f"{str(saved.get('sha256'))[:12]}...), but this run's --teacher-checkpoint is "
            f"{current.get('name')!r} ({current.get('size')} bytes, sha256 "
            f"{str(current.get('sha256'))[:12]}...). Resume with the original teacher file, or "
            f"start a new run in another --output")


# -- converting a trusted file that holds arbitrary objects ------------------------------------
def _plain(obj: Any, where: str, dropped: List[str]):
    """``obj`` with only tensors, NumPy arrays (as tensors) and plain containers kept."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):  # NumPy scalars (np.float64 is also a float) -> Python
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, dict):  # OrderedDict state dicts come back as plain dicts
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                dropped.append(f"{where}[{k!r}]")
                continue
            out[k] = _plain(v, f"{where}[{k!r}]", dropped)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]", dropped) for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    dropped.append(f"{where} ({type(obj).__module__}.{type(obj).__qualname__})")
    return None


def trust_and_convert(src: str, dst: str) -> List[str]:
    """Load ``src`` with full unpickling (runs whatever it holds: only for files you trust) and
    write ``dst`` holding only tensors and plain containers. Returns the dropped entries."""
    obj = torch.load(src, map_location="cpu", weights_only=False)
    dropped: List[str] = []
    atomic_save(_plain(obj, "file", dropped), dst)
    return dropped


def _main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m gendd_fast.checkpoint",
                                description="Checkpoint utilities.")
    p.add_argument("--trust-and-convert", nargs=2, metavar=("TRUSTED_IN", "OUT"), required=True,
                   help="fully unpickle TRUSTED_IN (this runs any code it holds: only for files "
                        "you trust) and write OUT with tensors and plain containers only, which "
                        "the trainer loads with weights_only=True")
    a = p.parse_args(argv)
    src, dst = a.trust_and_convert
    dropped = trust_and_convert(src, dst)
    print(f"wrote {dst}" + (f"; dropped non-tensor objects: {', '.join(dropped)}"
                            if dropped else ""))


if __name__ == "__main__":
    _main()
