"""Data loading behind one interface, whatever the backend.

A loader is iterable over ``(images, labels)`` already on the training device: images float,
normalised, in channels-last memory when asked; labels int64 (-1 where unlabelled). It has
``set_epoch(epoch, skip_batches=0)`` (a resumed run starts mid-epoch), ``len()`` in batches, and
``bad_images`` (how many undecodable files were skipped this epoch, with ``--skip-bad-images``).

This module is the host path: a ``DataLoader`` over :mod:`gendd_fast.data.datasets` with the
sharded, resumable :class:`EpochSampler`; :mod:`gendd_fast.data.dali` is the GPU path.
"""
from __future__ import annotations

import math
import os
import signal
import threading
from typing import Iterator

import torch

from .datasets import BadImageError
from .transforms import normalization_for


def ignore_sigterm(_worker_id: int = 0):
    """DataLoader ``worker_init_fn``: a worker outlives a SIGTERM sent to the whole process group
    and dies only by its parent's. A pre-emption (``scancel``, a Kubernetes eviction) signals
    every process of the job; workers that died first made the main process crash with "worker
    killed by signal" instead of saving. But the parent itself also stops its workers with
    SIGTERM (``Process.terminate`` at exit), so plain ``SIG_IGN`` would hang every exit that did
    not shut the loader down first. The sender tells them apart: SIGTERM is blocked and taken by
    a thread with ``sigwaitinfo``, which ends the worker only when the parent sent it."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no sender information; keep the default
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait():
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


def _worker_error_text(e: BaseException) -> str:
    """The original message of an error re-raised from a DataLoader worker, whose text is
    'Caught X in DataLoader worker process N. Original Traceback ...: X: message'."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    return last.split(f"{type(e).__name__}: ", 1)[-1]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample augmentation seed that depends only on the run seed, the epoch and the index."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2 ** 63)


class EpochSampler(torch.utils.data.Sampler):
    """Shards a dataset over ranks; yields ``(index, sample_seed)``.

    Training (``shuffle=True``): a permutation drawn from (seed, epoch) alone, padded by wrapping
    so every rank gets the same count, like ``DistributedSampler``. Evaluation (``shuffle=False``):
    rank r takes indices r, r + world, ...: every sample exactly once over all ranks, no padding.
    ``set_epoch(epoch, skip)`` drops this rank's first ``skip`` samples (resuming mid-epoch).
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0):
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world, shuffle, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def _indices(self):
        if not self.shuffle:
            return list(range(self.rank, self.n, self.world))
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        total = math.ceil(self.n / self.world) * self.world
        order += order[: total - self.n]
        return order[self.rank:total:self.world]

    def __iter__(self) -> Iterator:
        for i in self._indices()[self.skip:]:
            yield i, sample_seed(self.seed, self.epoch, i)

    def __len__(self):
        return max(0, len(self._indices()) - self.skip)


class _Collate:
    """Stacks uint8 images; drops the ``None`` of skipped bad files and counts them."""

    def __call__(self, items):
        good = [it for it in items if it is not None]
        bad = len(items) - len(good)
        if not good:
            return None, None, bad
        return (torch.stack([g[0] for g in good]),
                torch.tensor([g[1] for g in good], dtype=torch.int64), bad)


class DeviceNormalizer:
    """uint8 NCHW on the host -> float, normalised, on the device (channels-last if asked)."""

    def __init__(self, dataset: str, device: torch.device, channels_last: bool):
        mean, std = normalization_for(dataset)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0)
        self.device, self.channels_last = device, channels_last

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = x_uint8.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x.float() - self.mean) * self.inv_std


class TorchLoader:
    """The DataLoader path (Pillow decode in worker processes, augmentation on the host)."""

    backend = "torch"

    def __init__(self, dataset, batch_size: int, train: bool, rank: int, world: int, seed: int,
                 workers: int, device: torch.device, normalizer: DeviceNormalizer):
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.sampler = EpochSampler(len(dataset), rank, world, shuffle=train, seed=seed)
        self.normalize = normalizer
        self.bad_images = 0
        # A private generator: creating an iterator must not consume the global RNG, or a
        # resumed run's training randomness would drift from the uninterrupted run's.
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=_Collate(), pin_memory=device.type == "cuda", drop_last=train,
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=ignore_sigterm if workers > 0 else None)

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self.sampler.set_epoch(epoch, skip_batches * self.batch_size)

    def image_indices(self):
        """Dataset index of each image this rank yields, in order (evaluation noise keys)."""
        return self.sampler._indices()[self.sampler.skip:]

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __iter__(self):
        self.bad_images = 0
        it = iter(self._loader)
        while True:
            try:
                x, y, bad = next(it)
            except StopIteration:
                return
            except BadImageError as e:  # one line naming the file, not a worker's traceback
                # Stop the workers now: left to the interpreter's exit, they are terminated and
                # torch's SIGCHLD handler prints a spurious "worker exited unexpectedly"
                # traceback after the one-line error.
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                    self._loader._iterator = None  # a later pass starts fresh workers
                raise BadImageError(f"{_worker_error_text(e)}. Remove or replace the file, or "
                                    f"train with --skip-bad-images") from None
            self.bad_images += bad
            if x is None:
                continue
            yield self.normalize(x), y.to(self.normalize.device, non_blocking=True)
