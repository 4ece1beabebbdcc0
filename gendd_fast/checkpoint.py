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

import dataclasses
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


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A weights or checkpoint file that is not there."""


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
    return (f"{what} {path!r} could not be read as tensors: it holds Python objects other than "
            f"tensors and plain containers"
            f"{held}; unpickling them could run arbitrary code, so it was not loaded. If you "
            f"trust where the file came from, convert it once into a tensors-only copy with "
            f"'python -m gendd_fast.checkpoint --trust-and-convert {path} CONVERTED.pt' "
            f"and use CONVERTED.pt")


def read_checkpoint(path: str, what: str = "checkpoint", allow=()) -> Dict[str, Any]:
    """Load a checkpoint or weights file without executing anything it holds: tensors, plain
    containers and :data:`SAFE_GLOBALS` only (``weights_only=True``), plus the classes in
    ``allow`` (the public GenDD reader lets its scripts' ``argparse.Namespace`` through). The one
    reader of every file the package loads: --resume, --init, --teacher-checkpoint, teacher
    weights, evaluate and the report."""
    if not path or not os.path.isfile(path):
        raise MissingCheckpointError(f"{what} {path!r} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS + list(allow)):
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


# Where a weights file nests the model's state dict, in the order looked for: ours and the public
# CIFAR scripts ('model'), the public ImageNet scripts and most trainers ('state_dict'), a
# distiller's student ('student'), an EMA copy ('model_ema', torchvision's reference scripts).
STATE_KEYS = ("model", "state_dict", "student", "model_ema")


def strip_module(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys without DistributedDataParallel's ``module.`` prefix."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def state_dict_in(obj: Any) -> Optional[Dict[str, torch.Tensor]]:
    """The state dict inside a loaded file (nested under one of :data:`STATE_KEYS`, or bare),
    ``module.`` prefixes removed; None when there is none (not a non-empty dict of tensors)."""
    if isinstance(obj, dict):
        for key in STATE_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return None
    return strip_module(obj)


def read_weights(path: str, what: str = "weights", allow=(), check=None
                 ) -> Dict[str, torch.Tensor]:
    """The state dict of a weights file (:func:`read_checkpoint`, then :func:`state_dict_in`).
    ``check(loaded, path)``: a reason to refuse the whole file (e.g. :func:`unfinished_stage`)."""
    loaded = read_checkpoint(path, what, allow)
    why = check(loaded, path) if check is not None else None
    if why:
        raise CheckpointError(why)
    state = state_dict_in(loaded)
    if state is None:
        raise CheckpointError(f"{what} {path!r} holds no state dict (expected "
                              f"{{'model': state_dict}} or a bare state dict of tensors)")
    return state


def config_from_checkpoint(ckpt: Any, path: str):
    """The :class:`Config` a training checkpoint of ours was written with (fields this version
    does not know are dropped); a clear error for any other file. Used by evaluate and the
    report."""
    from .config import Config
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path!r} is not a gendd_fast training checkpoint (no "
                              f"'config'/'model')")
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in ckpt["config"].items() if k in fields})


def load_matching(state: Dict[str, torch.Tensor], student: torch.nn.Module, path: str,
                  layout: str = "", error=CheckpointError) -> str:
    """``--init``: the tensors of ``state`` that the student has, with the same shapes, loaded
    non-strictly (stage 2 from stage 1; keys the student lacks are ignored). Returns a one-line
    summary; an error when nothing matches."""
    own = student.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    where = f" ({layout})" if layout else ""
    if not usable:
        raise error(f"initial weights {path!r}{where} share no parameter with the "
                              f"student {type(student).__name__} - is it the right architecture?")
    student.load_state_dict(usable, strict=False)
    return f"loaded {len(usable)}/{len(own)} student tensors from {path}{where}"


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


def unfinished_stage(ckpt: Any, path: str) -> Optional[str]:
    """Why ``path``, a ``last.pt``, must not start the next stage (None: its run finished, or it
    is not one of our training checkpoints). The stage-1 to stage-2 handoff: a stage 1 stopped
    by a signal exits 0, so ``stage1 && stage2`` would start stage 2 from half a stage 1."""
    if os.path.basename(path) != "last.pt" or not isinstance(ckpt, dict):
        return None
    cfg, epoch, step = ckpt.get("config"), ckpt.get("epoch"), ckpt.get("step_in_epoch", 0)
    if not isinstance(cfg, dict) or not isinstance(epoch, int) or \
            not isinstance(cfg.get("epochs"), int):
        return None
    if (epoch >= cfg["epochs"] and step == 0) or (
            cfg.get("max_steps") and ckpt.get("global_step", 0) >= cfg["max_steps"]):
        return None
    return (f"initial weights {path!r} are the last.pt of a run that did not finish (epoch "
            f"{epoch + 1 if step else epoch} of {cfg['epochs']}" + (f", step {step}" if step else "")
            + f"; stopped by a signal?): the next stage would start from half the previous one. "
              f"Finish that run with --resume auto in {os.path.dirname(path) or '.'}, or start "
              f"from its best.pt on purpose")


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


# Files the trainer writes into OUTPUT: each must be a regular file that can be written, or be
# absent. A directory named last.pt used to let a run train, then crash at its first save.
OUTPUT_FILES = CHECKPOINT_NAMES + ("metrics.jsonl", "curves.png")


def output_refusal(output: str) -> Optional[str]:
    """Why this run cannot write its outputs into ``output`` (None: it can). Found before step
    1: a read-only folder used to surface only when the first metrics or checkpoint were
    written. The folder is tested by writing a file, which also holds for root and read-only
    mounts, where permission bits say nothing."""
    try:
        fd, probe = tempfile.mkstemp(dir=output, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return (f"output folder {output!r} cannot be written ({e.strerror or e}); choose a "
                f"writable --output")
    for name in OUTPUT_FILES:
        p = os.path.join(output, name)
        if os.path.lexists(p) and not os.path.isfile(p):
            return (f"{p!r} exists but is not a regular file (a directory or a broken link); "
                    f"the run could not write it. Remove or rename it, or choose another "
                    f"--output")
        if os.path.isfile(p) and name == "metrics.jsonl":
            try:
                open(p, "a").close()
            except OSError as e:
                return f"{p!r} cannot be written ({e.strerror or e}); fix it or choose another --output"
    return None


# The keys a resume reads, with their types: a hand-edited or foreign file fails here, naming
# the key, instead of with a bare KeyError or TypeError somewhere in the resume.
RESUME_KEYS = {"model": dict, "optimizer": dict, "scaler": dict, "schedule": dict,
               "epoch": int, "step_in_epoch": int, "global_step": int, "world_size": int,
               "config": dict, "best": dict, "rng": (list, tuple, dict)}


def resume_state_problem(state: Any, path: str, epochs: int, steps_per_epoch: int
                         ) -> Optional[str]:
    """Why ``state`` cannot be resumed by a run of ``epochs`` x ``steps_per_epoch`` (None: it
    can). ``step_in_epoch`` may equal ``steps_per_epoch``: a stop during the epoch-end
    evaluation keeps the position before that evaluation."""
    if not isinstance(state, dict):
        return f"cannot resume from {path}: it holds a {type(state).__name__}, not a checkpoint"
    for key, kind in RESUME_KEYS.items():
        if key not in state:
            return (f"cannot resume from {path}: the checkpoint has no {key!r} entry (is it a "
                    f"training checkpoint of gendd_fast, not a weights-only file?)")
        v = state[key]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            return (f"cannot resume from {path}: its {key!r} entry is a {type(v).__name__}, "
                    f"expected a {want}")
    ranges = {"epoch": (0, epochs), "step_in_epoch": (0, steps_per_epoch),
              "global_step": (0, None), "world_size": (1, None)}
    for key, (lo, hi) in ranges.items():
        v = state[key]
        if v < lo or (hi is not None and v > hi):
            top = "" if hi is None else f"..{hi}"
            return (f"cannot resume from {path}: {key} is {v}, outside {lo}{top}" +
                    (f" (this run has {steps_per_epoch} steps per epoch)"
                     if key == "step_in_epoch" else ""))
    return None


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


def weight_problem(state: Dict[str, Any], own: Dict[str, torch.Tensor], path: str,
                   what: str = "teacher") -> Optional[str]:
    """Why the weights ``state`` read from ``path`` must not be loaded into a model whose own
    state is ``own`` (None: they may). ``load_state_dict`` casts silently, so an int64 or
    complex tensor where the model holds floats became plausible-looking floats; and a NaN
    teacher surfaced only as a NaN loss at step 1, blamed on --lr. Integer buffers such as
    BatchNorm's ``num_batches_tracked`` stay integers and are not flagged."""
    wrong = [f"{k} ({state[k].dtype})" for k, v in own.items()
             if k in state and isinstance(state[k], torch.Tensor) and v.is_floating_point()
             and not state[k].is_floating_point()]
    if wrong:
        return (f"{what} checkpoint {path!r} holds non-float tensors where the model has float "
                f"weights: {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}; loading "
                f"would cast them silently. Is it a weights file of this architecture?")
    floats = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)
              and (v.is_floating_point() or v.is_complex())}
    bad = nonfinite_names({k: (v.abs() if v.is_complex() else v) for k, v in floats.items()})
    if bad:
        return (f"{what} checkpoint {path!r} holds NaN/Inf values in {', '.join(bad)}; the "
                f"file is damaged or was saved from a diverged run. Use another {what} file")
    return None


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


class _RecordingPickle:
    """A ``pickle_module`` for torch.load that records every global the file imports (what a
    trusted file was allowed to run), whatever the file's format (zip or legacy)."""

    def __init__(self):
        import pickle as _pickle
        imported = self.imported = []

        class Unpickler(_pickle.Unpickler):
            def find_class(self, module, name):
                imported.append(f"{module}.{name}")
                return super().find_class(module, name)

        self.Unpickler = Unpickler
        self.__name__ = "pickle"

    def load(self, fh, **kw):
        return self.Unpickler(fh, **kw).load()

    def __getattr__(self, name):  # anything else torch asks of the module
        import pickle as _pickle
        return getattr(_pickle, name)


def _tensor_rebuilding(name: str) -> bool:
    """Globals every torch file imports to rebuild tensors: listing them would hide the rest."""
    return (name.startswith(("torch._utils._rebuild", "torch.storage.", "torch._tensor."))
            or (name.startswith("torch.") and name.endswith("Storage"))
            or name == "collections.OrderedDict")


def trust_and_convert(src: str, dst: str):
    """Load ``src`` with full unpickling (runs whatever it holds: only for files you trust) and
    write ``dst`` holding only tensors and plain containers. Returns (dropped entries, the
    globals the file imported beyond torch's own tensor rebuilding)."""
    if not os.path.isfile(src):
        raise CheckpointError(f"--trust-and-convert: input {src!r} does not exist or is not a "
                              f"file")
    if os.path.isdir(dst) or (os.path.dirname(os.path.abspath(dst))
                              and not os.path.isdir(os.path.dirname(os.path.abspath(dst)))):
        raise CheckpointError(f"--trust-and-convert: output {dst!r} must be a file path in an "
                              f"existing folder" + (" (it is a directory)"
                                                    if os.path.isdir(dst) else ""))
    recorder = _RecordingPickle()
    try:
        obj = torch.load(src, map_location="cpu", weights_only=False, pickle_module=recorder)
    except Exception as e:  # noqa: BLE001 - truncated, foreign, or not a torch file
        raise CheckpointError(f"--trust-and-convert: {src!r} could not be read "
                              f"({type(e).__name__}: {e}); it may be truncated or not a torch "
                              f"checkpoint") from None
    dropped: List[str] = []
    try:
        atomic_save(_plain(obj, "file", dropped), dst)
    except OSError as e:
        raise CheckpointError(f"--trust-and-convert: cannot write {dst!r} "
                              f"({e.strerror or e})") from None
    allowed = sorted({g for g in recorder.imported if not _tensor_rebuilding(g)})
    return dropped, allowed


def _main(argv=None):
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m gendd_fast.checkpoint",
                                description="Checkpoint utilities.")
    p.add_argument("--trust-and-convert", nargs=2, metavar=("TRUSTED_IN", "OUT"), required=True,
                   help="fully unpickle TRUSTED_IN (this runs any code it holds: only for files "
                        "you trust) and write OUT with tensors and plain containers only, which "
                        "the trainer loads with weights_only=True")
    a = p.parse_args(argv)
    src, dst = a.trust_and_convert
    try:
        dropped, allowed = trust_and_convert(src, dst)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {dst}" + (f"; dropped non-tensor objects: {', '.join(dropped)}"
                            if dropped else ""))
    print("the trusted file imported " + (", ".join(allowed) if allowed else
                                          "nothing beyond torch's tensor rebuilding")
          + " while it was loaded")


if __name__ == "__main__":
    _main()
