"""NVIDIA DALI pipelines: JPEG decoding on the GPU (nvJPEG, ``device="mixed"``) and augmentation
there, feeding the trainer the same ``(images, labels)`` batches as the DataLoader path.

- ImageNet-style data (class folders, ``path label`` lists): ``fn.readers.file`` sharded by rank
  -> random-resized-crop fused into the decoder (``decoders.image_random_crop``) -> resize ->
  flip (-> timm's RandAugment, :mod:`gendd_fast.data.dali_randaug`) -> normalise; validation:
  resize of the shorter side + centre crop. The reader is named,
  so the epoch length is known, and validation pads its last batch so every image is scored
  exactly once over the ranks.
- CIFAR / digits arrays: ``fn.external_source`` fed in the order of the trainer's own sharded
  sampler, then pad-and-crop (``fn.slice`` with zero padding) + flip + normalise on the GPU.
- Unlabelled WebDataset shards (CC3M): ``fn.readers.webdataset``; labels are -1.

Batches leave the pipeline as NHWC and are handed over as NCHW *views* of that memory: the
batch is already channels-last, no copy. With ``device=None`` (no GPU) every pipeline runs on the
CPU with CPU decoders, which is how CI tests them.

DALI cannot skip an undecodable file mid-batch: on a decoding failure the loader scans its files
with Pillow and raises :class:`BadImageError` naming them; ``--skip-bad-images`` therefore uses the
DataLoader path. DALI shuffles with its own generator, so a resumed run continues with a new data
order (the DataLoader path resumes bit-exactly).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..notice import notice
from .datasets import ArrayDataset, BadImageError, ImageFileDataset, WebDatasetShards
from .loader import EpochSampler
from .transforms import normalization_for


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - ImportError, or a CUDA-linked import failing
        return False


def _norm(dataset: str):
    mean, std = normalization_for(dataset)
    return [m * 255.0 for m in mean], [s * 255.0 for s in std]


def _decode(jpegs, train: bool, size: int, val_resize: int, crop_scale, on_gpu: bool):
    from nvidia.dali import fn, types
    device = "mixed" if on_gpu else "cpu"
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, device=device, output_type=types.RGB, random_area=list(crop_scale),
            random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR)
        return images, fn.random.coin_flip(probability=0.5)
    images = fn.decoders.image(jpegs, device=device, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=val_resize, interp_type=types.INTERP_LINEAR)
    return images, 0


def _augment_then_normalise(images, mirror, randaug, size, dataset, crop):
    """Flip, timm's RandAugment (uint8, before normalising: the DataLoader path's order), then
    the normalisation; without RandAugment the flip stays fused into the normalisation."""
    from nvidia.dali import fn, types
    mean, std = _norm(dataset)
    if randaug:
        from .dali_randaug import rand_augment
        if crop:
            images = fn.crop(images, crop=(size, size))
        images = fn.flip(images, horizontal=mirror)
        images = rand_augment(images, randaug, size, dataset)
        mirror = 0
    kw = dict(crop=(size, size)) if crop else {}
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC", mean=mean,
                                    std=std, mirror=mirror, **kw)


def file_pipeline(files: Sequence[str], labels: Sequence[int], train: bool, size: int,
                  val_resize: int, crop_scale, dataset: str, batch_size: int, shard_id: int,
                  num_shards: int, device_id: Optional[int], seed: int = 0, num_threads: int = 4,
                  randaug: Optional[str] = None):
    """Class folders and file lists (the sample list comes from the DataLoader path's scan, so
    both paths see the same files and class indices)."""
    from nvidia.dali import fn, pipeline_def
    randaug = randaug if train else None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed + 1000 * shard_id, enable_conditionals=bool(randaug))
    def pipe():
        jpegs, lab = fn.readers.file(files=list(files), labels=list(labels), shard_id=shard_id,
                                     num_shards=num_shards, random_shuffle=train,
                                     initial_fill=4096, pad_last_batch=not train,
                                     stick_to_shard=True, name="Reader")
        images, mirror = _decode(jpegs, train, size, val_resize, crop_scale,
                                 device_id is not None)
        return _augment_then_normalise(images, mirror, randaug, size, dataset, True), lab

    return pipe()


def webdataset_pipeline(shards: Sequence[str], train: bool, size: int, val_resize: int,
                        crop_scale, dataset: str, batch_size: int, shard_id: int,
                        num_shards: int, device_id: Optional[int], seed: int = 0,
                        num_threads: int = 4, randaug: Optional[str] = None):
    """Unlabelled WebDataset tar shards (one image per sample key)."""
    from nvidia.dali import fn, pipeline_def, types
    randaug = randaug if train else None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed + 1000 * shard_id, enable_conditionals=bool(randaug))
    def pipe():
        jpegs = fn.readers.webdataset(paths=list(shards), ext=["jpg;jpeg;png;webp"],
                                      shard_id=shard_id, num_shards=num_shards,
                                      random_shuffle=train, initial_fill=4096,
                                      pad_last_batch=not train, stick_to_shard=True,
                                      name="Reader")
        images, mirror = _decode(jpegs, train, size, val_resize, crop_scale,
                                 device_id is not None)
        images = _augment_then_normalise(images, mirror, randaug, size, dataset, True)
        return images, fn.constant(idata=-1, dtype=types.INT64, shape=[1])

    return pipe()


class _ArrayBatches:
    """external_source feed: this rank's samples in the trainer's sharded order, batch by batch.

    DALI asks for batches ahead of use (prefetching), so the order must not depend on when
    ``set_epoch`` is called: each request carries DALI's own epoch and iteration numbers, and
    the epoch is ``first_epoch + epoch_idx`` (``first_skip`` batches dropped in the first one).
    Raising StopIteration ends an epoch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, sampler: EpochSampler,
                 batch_size: int, drop_last: bool):
        self.images, self.labels = images, labels.astype(np.int64)
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.first_epoch, self.first_skip = 0, 0
        self._cache = (None, None)

    def start(self, epoch: int, skip: int):
        self.first_epoch, self.first_skip = epoch, skip
        self._cache = (None, None)

    def _order(self, epoch_idx: int) -> List[int]:
        if self._cache[0] != epoch_idx:
            epoch = self.first_epoch + epoch_idx
            skip = self.first_skip * self.batch_size if epoch_idx == 0 else 0
            s = EpochSampler(self.sampler.n, self.sampler.rank, self.sampler.world,
                             self.sampler.shuffle, self.sampler.seed)
            s.set_epoch(epoch, skip)
            self._cache = (epoch_idx, [i for i, _ in s])
        return self._cache[1]

    def __call__(self, info):
        order = self._order(info.epoch_idx)
        start = info.iteration * self.batch_size
        if start >= len(order) or (self.drop_last and start + self.batch_size > len(order)):
            raise StopIteration
        idx = order[start:start + self.batch_size]
        return [self.images[i] for i in idx], [self.labels[i:i + 1] for i in idx]


def array_pipeline(source: _ArrayBatches, train: bool, pad: int, flip: bool, dataset: str,
                   batch_size: int, device_id: Optional[int], seed: int = 0,
                   num_threads: int = 2, randaug: Optional[str] = None):
    from nvidia.dali import fn, pipeline_def, types
    h, w = source.images.shape[1:3]
    randaug = randaug if train else None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  enable_conditionals=bool(randaug))
    def pipe():
        images, lab = fn.external_source(source=source, num_outputs=2, batch=True,
                                         batch_info=True, layout=["HWC", ""],
                                         dtype=[types.UINT8, types.INT64])
        if device_id is not None:
            images = images.gpu()
        mirror = 0
        if train:
            anchor = fn.random.uniform(range=(-pad, pad + 1), shape=(2,), dtype=types.INT32)
            images = fn.slice(images, start=anchor, shape=(h, w), axis_names="HW",
                              out_of_bounds_policy="pad", fill_values=0)
            if flip:
                mirror = fn.random.coin_flip(probability=0.5)
        return _augment_then_normalise(images, mirror, randaug, h, dataset, False), lab

    return pipe()


def find_undecodable(paths: Sequence[str], limit: int = 20) -> List[str]:
    """Files Pillow cannot decode (used to name the culprit after a DALI decoding failure)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def bad(p):
        try:
            with Image.open(p) as im:
                im.load()
            return None
        except Exception:  # noqa: BLE001
            return p

    with ThreadPoolExecutor(8) as ex:
        found = [p for p in ex.map(bad, paths) if p is not None]
    return found[:limit]


_DECODE_WORDS = ("decod", "codec", "nvjpeg", "jpeg", "image")


class DaliLoader:
    """A DALI pipeline behind the trainer's loader interface.

    ``make_pipe`` builds the pipeline; it is built when first iterated (after ``set_epoch``, so an
    array feed knows where the run resumes) and rebuilt only if epochs stop following on.
    """

    backend = "dali"

    def __init__(self, make_pipe, batch_size: int, train: bool, device: torch.device,
                 shard_size: int, reader_name: Optional[str], files: Optional[Sequence[str]],
                 feed: Optional[_ArrayBatches] = None, indices=None):
        self.make_pipe, self.reader_name = make_pipe, reader_name
        self.batch_size, self.train, self.device = batch_size, train, device
        self.shard_size, self.files, self.feed = shard_size, files, feed
        self._indices = indices
        self.bad_images = 0
        self._it = None
        self._epoch, self._skip, self._next_epoch = 0, 0, None

    def _build(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        if self.feed is not None:
            self.feed.start(self._epoch, self._skip)
        pipe = self.make_pipe()
        pipe.build()
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        kw = dict(reader_name=self.reader_name) if self.reader_name else dict(size=-1)
        self._it = DALIGenericIterator([pipe], ["images", "labels"], last_batch_policy=policy,
                                       auto_reset=True, **kw)

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self._epoch, self._skip = epoch, skip_batches
        if self.feed is not None and (self._it is None or skip_batches
                                      or epoch != self._next_epoch):
            if self._it is None and (epoch or skip_batches):
                # The feed keeps the sample order, but the rebuilt pipeline's crop and flip
                # draws restart from the seed: not the uninterrupted run's augmentations.
                notice(f"DALI: resuming at epoch {epoch + 1}, batch {skip_batches}; the data "
                       f"order is kept but DALI's augmentation draws restart, so the run will "
                       f"not match an uninterrupted one (the DataLoader path resumes exactly)")
            self._it = None  # the array feed restarts exactly at (epoch, skip)
        elif skip_batches:
            notice(f"DALI: resuming mid-epoch, skipping {skip_batches} batches of a new "
                   f"shuffle (the DataLoader path resumes the exact order)")

    def image_indices(self):
        """Dataset index of each image this rank yields, in order (evaluation noise keys), as
        the DataLoader path's ``image_indices``; None when the pipeline cannot say."""
        return None if self._indices is None else self._indices()

    def __len__(self):
        n = max(0, self.shard_size - self._skip * self.batch_size)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _batches(self):
        if self._it is None:
            self._build()  # decodes its first batches: a bad file can fail here already
        skip = 0 if self.feed is not None else self._skip
        self._skip = 0
        for b, data in enumerate(self._it):
            if b < skip:
                continue
            x, y = data[0]["images"], data[0]["labels"]
            if x.shape[0] == 0:  # a padded shard's empty tail
                continue
            x = x.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW: channels-last, no copy
            if x.device != self.device:
                x = x.to(self.device, non_blocking=True)
            yield x, y.view(-1).to(self.device, torch.int64, non_blocking=True)

    def __iter__(self):
        try:
            yield from self._batches()
        except RuntimeError as e:
            # DALI's decoder errors ("nvImageCodec failure", nvJPEG, ...) name no file: look for
            # the culprit with Pillow (a full scan, so only for errors about decoding images).
            text = str(e).lower()
            if self.files is None or not any(w in text for w in _DECODE_WORDS):
                raise
            self._it = None
            found = find_undecodable(self.files)
            if not found:
                raise
            named = ", ".join(repr(p) for p in found)
            raise BadImageError(f"DALI could not decode an image; undecodable files: {named}. "
                                f"Remove them, or train with --skip-bad-images (DataLoader "
                                f"path)") from e
        self._next_epoch = self._epoch = self._epoch + 1


def _shard_size(n: int, shard_id: int, num_shards: int) -> int:
    """Samples DALI's readers give a shard: the contiguous range [n*i/S, n*(i+1)/S)."""
    return n * (shard_id + 1) // num_shards - n * shard_id // num_shards


def build_loaders(cfg, rank: int, world: int, device: torch.device):
    from . import Loaders, build_datasets
    device_id = device.index if device.type == "cuda" else None
    if device.type == "cuda" and device_id is None:
        device_id = torch.cuda.current_device()
    train_ds, val_ds, nc = build_datasets(cfg)
    threads = max(2, min(cfg.workers, 8))

    def make(ds, train: bool, batch: int):
        if ds is None:
            return None
        if isinstance(ds, ArrayDataset):
            sampler = EpochSampler(len(ds), rank, world, shuffle=train, seed=cfg.seed)
            feed = _ArrayBatches(ds.images, ds.labels, sampler, batch, drop_last=train)
            loader = DaliLoader(lambda: array_pipeline(feed, train, ds.pad, ds.flip,
                                                       cfg.dataset, batch, device_id,
                                                       seed=cfg.seed + rank,
                                                       num_threads=threads,
                                                       randaug=cfg.randaug),
                                batch, train, device, len(sampler), None, None, feed,
                                indices=sampler._indices)
            return loader
        common = dict(train=train, size=cfg.image_size, val_resize=cfg.val_resize,
                      crop_scale=cfg.crop_scale, dataset=cfg.dataset, batch_size=batch,
                      shard_id=rank, num_shards=world, device_id=device_id, seed=cfg.seed,
                      num_threads=threads, randaug=cfg.randaug)
        if isinstance(ds, ImageFileDataset):
            files = [s[0] for s in ds.samples]
            labels = [s[1] for s in ds.samples]
            pipe = lambda: file_pipeline(files, labels, **common)  # noqa: E731
            n, shard_files = len(files), files
        elif isinstance(ds, WebDatasetShards):
            shards = sorted({it[0] for it in ds.items})
            pipe = lambda: webdataset_pipeline(shards, **common)  # noqa: E731
            n, shard_files = len(ds), None
        else:
            raise TypeError(f"no DALI pipeline for {type(ds).__name__}")
        # Training drops partial batches, and DALI's iterator then stops every rank at the
        # smallest shard (n // world samples), so that all ranks take the same steps; len()
        # must count those, not the rank's own shard, or ranks disagree on the epoch's length.
        size = n // world if train else _shard_size(n, rank, world)
        first = n * rank // world  # the readers' shards are contiguous ranges
        return DaliLoader(pipe, batch, train, device, size, "Reader", shard_files,
                          indices=lambda: range(first, first + _shard_size(n, rank, world)))

    return Loaders(make(train_ds, True, cfg.batch_size), make(val_ds, False, cfg.eval_batch_size),
                   nc, "dali")
