"""Datasets and loaders: ``build_loaders(cfg, rank, world, device)`` picks the backend."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .datasets import (ArrayDataset, BadImageError, DatasetError, ImageFileDataset,
                       WebDatasetShards, check_labels, load_cifar_arrays, load_digits_arrays,
                       read_file_list, scan_image_folder, synthetic_arrays)
from ..notice import notice
from .pixels import UnknownRangeError, refuse_unknown_range
from .loader import DeviceNormalizer, EpochSampler, TorchLoader

__all__ = ["build_loaders", "build_datasets", "Loaders", "BadImageError", "DatasetError",
           "EpochSampler", "describe_pipeline"]

ARRAY_DATASETS = ("digits", "cifar10", "cifar100", "synthetic")


def describe_pipeline(cfg) -> str:
    """The resolved image size, crops and normalisation of ``cfg`` (resolved), for the header."""
    from .transforms import NORMALIZATION
    norm = cfg.dataset if cfg.dataset in NORMALIZATION else "imagenet"
    if cfg.dataset in ARRAY_DATASETS:
        pad, flip = (2, "no flip") if cfg.dataset == "digits" else (4, "flip")
        crop = f"{cfg.image_size} px: pad {pad} + random crop, {flip}; eval the full image"
    else:
        lo, hi = cfg.crop_scale
        crop = (f"{cfg.image_size} px: random-resized crop (scale {lo:g}-{hi:g}) + flip; eval "
                f"resize {cfg.val_resize} + centre crop {cfg.image_size}")
    return f"{crop}; normalisation {norm}"


def _warn_if_upsampled(samples, cfg, root):
    """Small images (e.g. 32-px folders) under the ImageNet-size default would be upsampled 7x
    without a word, making the run slow and the teacher's features meaningless: say so."""
    from PIL import Image
    try:
        with Image.open(samples[0][0]) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - the loader reports unreadable files itself
        return
    if min(w, h) * 2 <= cfg.image_size:
        notice(f"images in {root} are {w}x{h} px but training crops are {cfg.image_size} px "
               f"(upsampled {cfg.image_size / min(w, h):.0f}x); pass --image-size {min(w, h)} "
               f"--val-resize {min(w, h)} to train at their own size")


@dataclass
class Loaders:
    train: Any
    val: Any
    num_classes: int
    backend: str


def _join(root: Optional[str], path: Optional[str]) -> Optional[str]:
    if path is None or os.path.isabs(path) or root is None or os.path.exists(path):
        return path
    return os.path.join(root, path)


def build_datasets(cfg):
    """Host-path (train, val, num_classes) for ``cfg.dataset``. Labels are checked here, before
    the first step: a label the model has no output for fails now, naming where it is."""
    train, val, nc = _build_datasets(cfg)
    train, val = carve_and_mask(cfg, train, val)
    from .augment import randaug_for
    train.augment = randaug_for(cfg)  # timm's RandAugment per image, before normalising
    if cfg.num_classes is not None and cfg.num_classes < nc:
        raise DatasetError(f"--num-classes {cfg.num_classes} is smaller than the {nc} classes "
                           f"of the {cfg.dataset} data")
    if nc < 2:  # --num-classes 1 is refused; data with one class must be too (top-1 is 100%)
        raise DatasetError(f"the {cfg.dataset} data at {cfg.data_path!r} has a single class; "
                           f"classification needs at least 2 (top-1 would be 100% whatever "
                           f"the model learns). Check the folder or list")
    if not cfg.skip_bad_images:  # both data paths: a file whose range is unknown, named now
        for ds in (train, val):
            if isinstance(ds, ImageFileDataset):
                try:
                    refuse_unknown_range([s[0] for s in ds.samples])
                except UnknownRangeError as e:
                    raise BadImageError(str(e)) from None
    return train, val, nc


# Methods whose loss needs a label on every image: with --labeled-fraction they train on the
# labelled images only (the unlabelled ones would only cost steps).
LABELS_ONLY_METHODS = ("ce", "gendd-pretrain")


def stratified_pick(labels, fraction: float, seed: int):
    """Boolean mask choosing round(fraction * n_c) images of each class c (at least one), drawn
    with ``numpy.random.RandomState(seed)``: the same images for the same seed on any machine."""
    import numpy as np
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        mask[idx[: max(1, int(round(len(idx) * fraction)))]] = True
    return mask


def carve_and_mask(cfg, train, val):
    """``--val-from-train``: evaluate on a stratified part of the training images (fixed seed,
    so teacher and students share it) and train on the rest. ``--labeled-fraction``: keep the
    labels of a stratified fraction drawn by ``--seed``, mark the rest -1 (unlabelled), and drop
    them for the methods that cannot learn without labels. In-memory datasets only."""
    if cfg.val_from_train <= 0 and cfg.labeled_fraction >= 1:
        return train, val
    if not isinstance(train, ArrayDataset):
        raise DatasetError(f"--val-from-train and --labeled-fraction apply to the in-memory "
                           f"datasets (digits, CIFAR, synthetic), not {cfg.dataset!r}")
    images, labels = train.images, train.labels
    if cfg.val_from_train > 0:
        held = stratified_pick(labels, cfg.val_from_train, seed=1234)
        val = ArrayDataset(images[held], labels[held], False)
        images, labels = images[~held], labels[~held]
    if cfg.labeled_fraction < 1:
        keep = stratified_pick(labels, cfg.labeled_fraction, seed=cfg.seed)
        if cfg.method in LABELS_ONLY_METHODS:
            images, labels = images[keep], labels[keep]
        else:
            labels = labels.copy()
            labels[~keep] = -1
    return ArrayDataset(images, labels, True, pad=train.pad, flip=train.flip), val


def _contiguous_classes(samples, list_path: str) -> int:
    """The class count a 'path label' list implies; every class below it must have an image."""
    present = {s[1] for s in samples}
    nc = 1 + max(present)
    missing = [c for c in range(nc) if c not in present]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise DatasetError(f"{list_path}: labels run up to {nc - 1} but class(es) {shown} have "
                           f"no image, which would build a {nc}-class model with outputs never "
                           f"trained. Fix the labels, or pass --num-classes {nc} if the gaps "
                           f"are intended")
    return nc


def _build_datasets(cfg):
    kind = cfg.dataset
    if kind == "digits":
        (xtr, ytr), (xva, yva) = load_digits_arrays(seed=0, size=cfg.image_size)
        # Digits must not be mirrored; a small shift is their augmentation.
        return (ArrayDataset(xtr, ytr, True, pad=2, flip=False),
                ArrayDataset(xva, yva, False), 10)
    if kind in ("cifar10", "cifar100"):
        nc = 100 if kind == "cifar100" else 10
        (xtr, ytr), (xva, yva) = load_cifar_arrays(cfg.data_path, nc)
        check_labels(ytr, nc, f"CIFAR-{nc} training labels")
        check_labels(yva, nc, f"CIFAR-{nc} test labels")
        return ArrayDataset(xtr, ytr, True), ArrayDataset(xva, yva, False), nc
    if kind == "synthetic":
        nc = cfg.num_classes or 10
        x, y = synthetic_arrays(cfg.synthetic_size, nc, cfg.image_size, seed=1234)
        xv, yv = synthetic_arrays(max(cfg.synthetic_size // 4, 8), nc, cfg.image_size, seed=4321)
        return ArrayDataset(x, y, True), ArrayDataset(xv, yv, False), nc
    file_kw = dict(image_size=cfg.image_size, val_resize=cfg.val_resize,
                   crop_scale=cfg.crop_scale, skip_bad=cfg.skip_bad_images)
    if kind == "imagefolder":
        root = cfg.data_path
        if root and os.path.isdir(os.path.join(root, "train")):
            train_root, val_root = os.path.join(root, "train"), os.path.join(root, "val")
        else:
            train_root, val_root = root, cfg.val_path
        train_s, classes = scan_image_folder(train_root)
        _warn_if_upsampled(train_s, cfg, train_root)
        val_root = cfg.val_path or val_root
        if not val_root:
            raise DatasetError(f"no validation images: {root!r} has no train/ and val/ folders "
                               f"and --val-path was not given")
        # an empty class folder in the held-out split only means nothing of it is scored
        val_s, val_classes = scan_image_folder(val_root, allow_empty_classes=True)
        if val_classes != classes:
            raise DatasetError(f"train and val class folders differ ({len(classes)} vs "
                               f"{len(val_classes)} classes)")
        return (ImageFileDataset(train_s, True, **file_kw),
                ImageFileDataset(val_s, False, **file_kw), len(classes))
    if kind == "filelist":
        if not cfg.train_list or not cfg.val_list:
            raise DatasetError("dataset 'filelist' needs --train-list and --val-list")
        train_list = _join(cfg.data_path, cfg.train_list)
        train_s = read_file_list(train_list, cfg.data_path, cfg.num_classes)
        nc = cfg.num_classes or _contiguous_classes(train_s, train_list)
        val_s = read_file_list(_join(cfg.data_path, cfg.val_list), cfg.val_path or cfg.data_path,
                               nc)
        return (ImageFileDataset(train_s, True, **file_kw),
                ImageFileDataset(val_s, False, **file_kw), nc)
    if kind == "webdataset":
        train = WebDatasetShards(cfg.data_path, True, **file_kw)
        if cfg.val_path:  # e.g. CC3M training evaluated on ImageNet val folders
            val_s, classes = scan_image_folder(cfg.val_path, allow_empty_classes=True)
            val = ImageFileDataset(val_s, False, **file_kw)
            nc = cfg.num_classes or len(classes)
        else:
            val, nc = None, cfg.num_classes or 1000
        check_labels([it[2] for it in train.items], nc, f"webdataset {cfg.data_path!r} .cls "
                     f"labels", allow_unlabelled=True)
        return train, val, nc
    raise DatasetError(f"unknown dataset {kind!r}")


def _choose_backend(cfg, device: torch.device) -> str:
    from . import dali
    if cfg.data_backend == "dali":
        if not dali.available():
            raise ImportError("--data-backend dali: NVIDIA DALI is not importable "
                              "(pip install nvidia-dali-cuda130)")
        if cfg.skip_bad_images:
            notice("--skip-bad-images: DALI cannot skip an undecodable file mid-batch; using the "
                   "DataLoader path")
            return "torch"
        return "dali"
    if cfg.data_backend == "torch" or cfg.skip_bad_images:
        return "torch"
    # auto: DALI for decoded-on-the-fly data on a GPU; in-memory arrays gain little from it
    if device.type != "cuda" or cfg.dataset in ("digits", "synthetic"):
        return "torch"
    return "dali" if dali.available() else "torch"


def build_loaders(cfg, rank: int, world: int, device: torch.device) -> Loaders:
    from .augment import wrap_train_loader  # batch RandAugment / Mixup / CutMix when asked
    return wrap_train_loader(_build_loaders(cfg, rank, world, device), cfg, rank)


def _build_loaders(cfg, rank: int, world: int, device: torch.device) -> Loaders:
    backend = _choose_backend(cfg, device)
    if backend == "dali":
        from . import dali
        return dali.build_loaders(cfg, rank, world, device)
    train_ds, val_ds, nc = build_datasets(cfg)
    norm = DeviceNormalizer(cfg.dataset, device, cfg.channels_last)
    workers = cfg.workers
    if cfg.dataset in ("digits", "synthetic", "cifar10", "cifar100") and device.type == "cpu":
        # In-memory arrays: worker processes only add start-up and IPC cost on a small CPU.
        workers = min(workers, 0)
    train = TorchLoader(train_ds, cfg.batch_size, True, rank, world, cfg.seed, workers, device,
                        norm)
    val = None
    if val_ds is not None:
        val = TorchLoader(val_ds, cfg.eval_batch_size, False, rank, world, cfg.seed, workers,
                          device, norm)
    if len(train) == 0:
        raise DatasetError(f"the training set ({len(train_ds)} images over {world} process(es)) "
                           f"is smaller than one batch of {cfg.batch_size}")
    return Loaders(train, val, nc, "torch")
