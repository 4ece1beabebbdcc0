"""``--teacher-cache FILE``: the frozen teacher's outputs, computed once per input it can be shown.

A frozen, eval-mode teacher maps the same input bits to the same ``(features, logits)``. Where the
training augmentation draws from a finite set (the in-memory datasets: pad-and-crop offsets, and
flips), every input the teacher can ever see is known in advance: ``N images x V variants``. The
cache runs the teacher on all of them once, stores the outputs in FILE, and each training step
looks its batch up instead of running the teacher.

Lookups are by *content*, not by index: the key of an input is a 128-bit hash of the exact bits of
the normalised tensor the teacher would receive. So a lookup can never hand back another input's
outputs; an input that is not in the table (a miss) makes the teacher run for that batch, and the
run's results count the misses. Nothing about the method changes: the student sees the same
teacher outputs it would have computed, to float rounding (the teacher ran on another batch).

The file is refused when it was made by another teacher (checkpoint content), another precision,
or other training images; it is built (and written atomically) when it does not exist. Refused
where it cannot pay: augmentation from a continuous space (RandAugment, Mixup / CutMix, the
random-resized crops of image folders and DALI), or a table larger than :data:`MAX_BYTES`.
On a GPU each step synchronises once with the host (to know whether the teacher must run), so
the CUDA-graphed step is off with it.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional, Tuple

import torch

FORMAT = "gendd_fast.teacher_cache/1"
MAX_BYTES = 4 << 30           # a larger table than this belongs on disk, not in every rank's RAM
BUILD_BATCH = 256
_HASH_SEED = 0x6E6464         # fixed: a file's keys must be reproducible by every later run
_MIX = -7046029254386353131   # 0x9E3779B97F4A7C15 (the golden-ratio odd constant) as int64


class TeacherCacheError(ValueError):
    """A --teacher-cache that cannot be used as asked (refused setting or mismatched file)."""


# -- the key of an input: a hash of its bits ---------------------------------------------------
_weights: Dict[Tuple[int, str], torch.Tensor] = {}


def _hash_weights(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    if key not in _weights:
        g = torch.Generator().manual_seed(_HASH_SEED)
        w = torch.randint(-(2 ** 62), 2 ** 62, (2, n), generator=g, dtype=torch.int64) | 1
        _weights[key] = w.to(device)
    return _weights[key]


def content_hash(x: torch.Tensor) -> torch.Tensor:
    """(B, 2) int64 keys of the B inputs in ``x`` from their exact bits, in NCHW order whatever the
    memory format. Each element is multiplied by its own odd 64-bit weight, mixed (xor-shift,
    multiply) and summed, twice with independent weights: two inputs that differ anywhere get
    the same 128-bit key with probability about 2^-128 (int64 arithmetic wraps)."""
    v = x.detach().contiguous().reshape(x.shape[0], -1)
    if v.dtype in (torch.float32, torch.int32):
        bits = v.view(torch.int32).to(torch.int64)
    elif v.dtype in (torch.float16, torch.bfloat16, torch.int16):
        bits = v.view(torch.int16).to(torch.int64)
    elif v.dtype in (torch.float64, torch.int64):
        bits = v.view(torch.int64)
    else:
        bits = v.to(torch.int64)
    h = bits.unsqueeze(1) * _hash_weights(bits.shape[1], bits.device)  # (B, 2, n)
    h = h ^ (h >> 29)
    h = h * _MIX
    h = h ^ (h >> 32)
    return h.sum(-1)


# -- when it applies -----------------------------------------------------------------------------
def refusal(cfg, loaders, needs_teacher: bool) -> Optional[str]:
    """Why --teacher-cache cannot serve this run, in one line; None when it can."""
    from .data import ArrayDataset
    if not needs_teacher:
        return f"--method {cfg.method} runs no teacher forward: there is nothing to cache"
    if loaders.backend != "torch":
        return (f"the {loaders.backend} data path augments on the device; the cache needs the "
                f"DataLoader path (--data-backend torch) over an in-memory dataset")
    if cfg.mixup or cfg.cutmix:
        return ("Mixup/CutMix blend random pairs with random weights: no input repeats, so no "
                "lookup would ever hit")
    ds = getattr(loaders.train, "dataset", None)
    if not isinstance(ds, ArrayDataset):
        return (f"the {cfg.dataset} images are random-resized crops from a continuous space: no "
                f"input repeats; the cache applies to the in-memory datasets (digits, CIFAR, "
                f"synthetic) with pad-and-crop augmentation")
    if ds.augmentation_count() is None:
        return (f"--randaug {cfg.randaug!r} draws from a continuous space: no input repeats, so "
                f"no lookup would ever hit")
    return None


def identity(cfg, dataset, teacher_id: Optional[Dict], amp: str) -> Dict:
    """What a cache file must have been made from: the teacher (its checkpoint's content, or its
    name and weights), the precision, the training images and their augmentation set."""
    import hashlib
    images = hashlib.sha256(memoryview(dataset.images.reshape(-1))).hexdigest()
    return {"teacher": cfg.teacher,
            "teacher_checkpoint_sha256": (teacher_id or {}).get("sha256"),
            "teacher_weights": cfg.teacher_weights or (True if cfg.teacher_pretrained else None),
            "amp": amp, "dataset": cfg.dataset, "image_size": cfg.image_size,
            "images": len(dataset), "images_sha256": images, "pad": dataset.pad,
            "flip": dataset.flip, "variants": dataset.augmentation_count()}


# -- building, loading, looking up ----------------------------------------------------------------
@torch.no_grad()
def build(teacher, dataset, normalize, autocast, batch: int = BUILD_BATCH) -> Dict:
    """Run ``teacher`` on every variant of every image of ``dataset`` (normalised by the training
    loader's own ``normalize``, so the bits match what training feeds it): the table."""
    keys, feats, logits = [], [], []
    per = dataset.augmentation_count()
    chunk = max(1, batch // per)
    for start in range(0, len(dataset), chunk):
        raw = torch.cat([dataset.augmentation_variants(i)
                         for i in range(start, min(start + chunk, len(dataset)))])
        x = normalize(raw)
        with autocast:
            f, z = teacher(x)
        keys.append(content_hash(x).cpu())
        feats.append(f.detach().cpu())
        logits.append(z.detach().cpu())
    keys, feats, logits = torch.cat(keys), torch.cat(feats), torch.cat(logits)
    # identical inputs (two crops of a blank border) share a row; sort by the first key half
    keys, first = _unique_rows(keys)
    order = torch.argsort(keys[:, 0])
    keys, rows = keys[order], first[order]
    if bool((keys[1:, 0] == keys[:-1, 0]).any()):  # a 64-bit collision: never seen in practice
        raise TeacherCacheError("teacher cache: two different inputs share a 64-bit key half; "
                                "this table cannot be searched, train without --teacher-cache")
    return {"keys": keys, "features": feats[rows].contiguous(), "logits": logits[rows].contiguous()}


def _unique_rows(keys: torch.Tensor):
    """Distinct (k0, k1) rows and the index of each one's first occurrence."""
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    first = torch.full((len(uniq),), len(keys), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys)), reduce="amin")
    return uniq, first


class TeacherCache:
    """Called like the teacher (``images -> (features, logits)``), it looks the batch up in the
    table and runs ``teacher`` only when an input is missing from it."""

    def __init__(self, teacher, table: Dict, device: torch.device, path: str = ""):
        self.teacher, self.path = teacher, path
        keys = table["keys"].to(device)
        self.k0, self.k1 = keys[:, 0].contiguous(), keys[:, 1].contiguous()
        self.features, self.logits = table["features"].to(device), table["logits"].to(device)
        self.lookups, self.misses = 0, 0

    def __len__(self):
        return len(self.k0)

    def __call__(self, images):
        h = content_hash(images)
        idx = torch.searchsorted(self.k0, h[:, 0].contiguous()).clamp_(max=len(self.k0) - 1)
        hit = (self.k0[idx] == h[:, 0]) & (self.k1[idx] == h[:, 1])
        self.lookups += len(images)
        n_hit = int(hit.sum())  # the one host sync: whether the teacher must run
        if n_hit == len(images):
            return self.features[idx], self.logits[idx]
        self.misses += len(images) - n_hit
        return self.teacher(images)

    def stats(self) -> Dict:
        return {"teacher_cache_lookups": self.lookups, "teacher_cache_misses": self.misses}


def open_cache(cfg, teacher, loaders, device: torch.device, autocast, amp: str,
               teacher_id: Optional[Dict], is_main: bool = True, world: int = 1,
               replace: bool = False) -> TeacherCache:
    """The cache of ``cfg.teacher_cache``: loaded when the file exists and matches this run,
    built by the main rank (and written atomically) when it does not; a file made for another
    run is refused, or with ``replace`` (one process: the demo's own cache) rebuilt."""
    from . import checkpoint as ckpt_io
    from .distributed import barrier, broadcast_object
    from .notice import notice
    path, ds = cfg.teacher_cache, loaders.train.dataset
    want = identity(cfg, ds, teacher_id, amp)
    entries = len(ds) * want["variants"]
    exists = broadcast_object(os.path.isfile(path) if is_main else None)  # one decision
    table = None
    if not exists:
        nbytes = entries * 4 * (teacher.model.fc.in_features + teacher.model.fc.out_features + 4)
        if nbytes > MAX_BYTES:
            raise TeacherCacheError(
                f"--teacher-cache: {len(ds)} images x {want['variants']} augmentations = "
                f"{entries:,} teacher outputs, about {nbytes / 2**30:.1f} GiB: too large to hold "
                f"in memory (limit {MAX_BYTES / 2**30:.0f} GiB); train without it")
        if is_main:
            t0 = time.time()
            table = {"format": FORMAT, "identity": want,
                     **build(teacher, ds, loaders.train.normalize, autocast)}
            ckpt_io.atomic_save(table, path)
            notice(f"teacher cache: {len(table['keys']):,} distinct inputs ({len(ds)} images x "
                   f"{want['variants']} augmentations) through the teacher in "
                   f"{time.time() - t0:.1f}s, written to {path}")
        if world > 1:
            barrier()
    if table is None:  # the main rank keeps what it built; everyone else reads the file
        table = ckpt_io.read_checkpoint(path, "teacher cache")
        if not isinstance(table, dict) or table.get("format") != FORMAT:
            raise TeacherCacheError(f"--teacher-cache {path!r} is not a teacher cache of this "
                                    f"version ({FORMAT}); remove it to rebuild it")
        have = table.get("identity") or {}
        diff = [k for k in want if have.get(k) != want[k]]
        if diff and replace and world == 1:
            os.remove(path)
            return open_cache(cfg, teacher, loaders, device, autocast, amp, teacher_id)
        if diff:
            shown = "; ".join(f"{k}: file {have.get(k)!r}, this run {want[k]!r}"
                              for k in diff[:3])
            raise TeacherCacheError(f"--teacher-cache {path!r} was made for another run "
                                    f"({shown}); remove it or pass another path, and it is "
                                    f"rebuilt")
    cache = TeacherCache(teacher, table, device, path)
    if is_main:
        notice(f"teacher cache: {len(cache):,} teacher outputs from {path}; the teacher runs "
               f"only for an input missing from it")
    return cache


def build_file(cfg, replace: bool = False) -> Dict:
    """Build ``cfg.teacher_cache`` ahead of the runs that will read it (one process, the train
    flags of such a run): the same loaders, teacher and precision the trainer would use. A file
    that already matches is kept; one made for another run is refused (``replace``: rebuilt)."""
    from .build import build_method
    from .checkpoint import file_identity
    from .data import build_loaders
    from .distributed import init_distributed
    from .precision import autocast_for, resolve_amp
    if not cfg.teacher_cache:
        raise TeacherCacheError("--teacher-cache FILE: say where the cache is written")
    cfg = cfg.resolved()
    t0, c0 = time.time(), time.process_time()
    device = init_distributed(cfg.device).device
    loaders = build_loaders(cfg, 0, 1, device)
    _, teacher = build_method(cfg, cfg.num_classes or loaders.num_classes, device)
    why = refusal(cfg, loaders, teacher is not None)
    if why:
        raise TeacherCacheError(f"--teacher-cache: {why}")
    amp = resolve_amp(cfg.amp, device)
    tid = file_identity(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else None
    cache = open_cache(cfg, teacher, loaders, device, autocast_for(device, amp), amp, tid,
                       replace=replace)
    return {"path": cfg.teacher_cache, "entries": len(cache),
            "seconds": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}


def main(argv=None):
    """``python -m gendd_fast.teacher_cache --teacher-cache FILE [train flags]``."""
    import sys
    from .config import config_from_args
    try:
        cfg, _ = config_from_args(sys.argv[1:] if argv is None else list(argv))
        info = build_file(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{info['path']}: {info['entries']:,} teacher outputs ({info['seconds']:.1f}s)")
    return info


if __name__ == "__main__":
    main()
