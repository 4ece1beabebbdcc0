"""Datasets of the trainer's host (DataLoader) path. Each item is ``(uint8 CHW image, label)``.

Items are fetched with ``dataset[(index, sample_seed)]``: the seed drives the augmentation (see
:mod:`gendd_fast.data.transforms`). Unlabelled data gives label -1. A file that cannot be decoded
raises :class:`BadImageError` naming it, or, with ``skip_bad=True``, gives ``None`` (dropped by the
collate function and counted).
"""
from __future__ import annotations

import os
import pickle
import random
import tarfile
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from . import folder_scan
from .pixels import UnknownRangeError, to_rgb
from .transforms import pad_crop_flip, train_transform_pil, val_transform_pil

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset path or list that cannot be used as asked."""


class BadImageError(DatasetError):
    """An image file that cannot be read or decoded (a bad input: the CLI reports it in one
    line, like every other data error)."""


def _split_key(key):
    """Accept ``dataset[i]`` (no augmentation randomness needed) and ``dataset[(i, seed)]``."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), int(key)


# -- in-memory arrays: digits, CIFAR, synthetic ------------------------------------------------
class ArrayDataset(torch.utils.data.Dataset):
    """uint8 NHWC images in memory with pad-and-crop (+ flip) augmentation when training."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool, pad: int = 4,
                 flip: bool = True):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DatasetError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} "
                               f"{images.shape}")
        if len(images) != len(labels):
            raise DatasetError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.train, self.pad, self.flip = train, pad, flip
        self.augment = None  # per-image RandAugment (training), set by build_datasets

    def __len__(self):
        return len(self.images)

    def augmentation_count(self) -> Optional[int]:
        """How many distinct inputs one training image can become (every crop offset, times two
        with flips); None where the augmentation is not a finite set (RandAugment)."""
        if not self.train or self.augment is not None:
            return None
        return (2 * self.pad + 1) ** 2 * (2 if self.flip else 1)

    def augmentation_variants(self, i: int) -> torch.Tensor:
        """Every uint8 CHW input ``self[(i, seed)]`` can return, for any seed: (V, C, H, W),
        V = :meth:`augmentation_count` (the same arithmetic as :func:`pad_crop_flip`)."""
        if self.augmentation_count() is None:
            raise DatasetError("the training augmentation of this dataset is not a finite set "
                               "(RandAugment): its variants cannot be listed")
        img = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        c, h, w = img.shape
        p = self.pad
        padded = torch.zeros((c, h + 2 * p, w + 2 * p), dtype=img.dtype)
        padded[:, p:p + h, p:p + w] = img
        crops = [padded[:, y:y + h, x:x + w] for y in range(2 * p + 1) for x in range(2 * p + 1)]
        if self.flip:
            crops += [cr.flip(-1) for cr in crops]
        return torch.stack(crops).contiguous()

    def __getitem__(self, key):
        i, seed = _split_key(key)
        img = self.images[i]
        if self.train:
            x = pad_crop_flip(img, self.pad, self.flip, random.Random(seed))
            if self.augment is not None:
                x = self.augment(x, seed)
        else:
            x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()
        return x, int(self.labels[i])


def load_digits_arrays(seed: int = 0, size: int = 32, val_fraction: float = 0.2):
    """scikit-learn's handwritten digits (shipped inside the package: no download), resized to
    ``size`` and split into a stratified train / held-out pair with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetError("the digits dataset needs scikit-learn (pip install scikit-learn)") \
            from e
    d = load_digits()
    imgs = []
    for a in d.images:  # 8x8 floats in [0, 16]
        im = Image.fromarray((a / 16.0 * 255.0).round().astype(np.uint8), mode="L")
        im = im.resize((size, size), Image.BILINEAR)
        imgs.append(np.repeat(np.asarray(im)[:, :, None], 3, axis=2))
    images, labels = np.stack(imgs), d.target.astype(np.int64)
    rng = np.random.RandomState(seed)
    val_idx = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        val_idx += idx[: int(round(len(idx) * val_fraction))].tolist()
    val_mask = np.zeros(len(labels), dtype=bool)
    val_mask[val_idx] = True
    return (images[~val_mask], labels[~val_mask]), (images[val_mask], labels[val_mask])


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays, lists, dicts and plain values only: a CIFAR batch file is a dict of
    those, and any other global (``os.system`` in a crafted file) is refused before it runs."""

    def find_class(self, module, name):
        fn = _CIFAR_GLOBALS.get(f"{module}.{name}")
        if fn is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR file holds "
                                         f"only NumPy arrays, lists and plain values")
        return fn


def _cifar_globals():
    import codecs
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # NumPy 1
        from numpy.core import multiarray, numeric
    allowed = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
               # protocol-2 pickles of bytes go through codecs.encode (a pure string function)
               "_codecs.encode": codecs.encode}
    for mod in ("numpy.core", "numpy._core"):  # NumPy 1 and 2 write different module names
        allowed[f"{mod}.multiarray._reconstruct"] = multiarray._reconstruct
        allowed[f"{mod}.numeric._frombuffer"] = numeric._frombuffer
        allowed[f"{mod}.multiarray.scalar"] = multiarray.scalar  # NumPy scalars (labels)
    return allowed


_CIFAR_GLOBALS = _cifar_globals()


def _load_cifar_pickle(path: str):
    try:
        with open(path, "rb") as fh:
            entry = _ArraysOnlyUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DatasetError(f"CIFAR file {path!r} was not loaded: {e}") from None
    except Exception as e:  # noqa: BLE001 - truncated or not a pickle at all
        raise DatasetError(f"CIFAR file {path!r} could not be read ({type(e).__name__}: {e}); "
                           f"it may be truncated or not a CIFAR python pickle") from None
    for v in (entry.values() if isinstance(entry, dict) else ()):
        if isinstance(v, np.ndarray) and v.dtype == object:
            raise DatasetError(f"CIFAR file {path!r} holds an object array, not image data")
    return entry


def load_cifar_arrays(root: str, num_classes: int):
    """CIFAR-10/100 from the python pickle folder (``cifar-10-batches-py`` / ``cifar-100-python``
    or their parent)."""
    if not root or not os.path.isdir(root):
        raise DatasetError(f"CIFAR data path {root!r} does not exist")
    sub = "cifar-100-python" if num_classes == 100 else "cifar-10-batches-py"
    if os.path.isdir(os.path.join(root, sub)):
        root = os.path.join(root, sub)
    if num_classes == 100:
        train_files, test_files, key = ["train"], ["test"], b"fine_labels"
    else:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = ["test_batch"], b"labels"

    def read(files):
        xs, ys = [], []
        for f in files:
            path = os.path.join(root, f)
            if not os.path.isfile(path):
                raise DatasetError(f"CIFAR-{num_classes} file {path!r} is missing (expected the "
                                   f"python version's pickles in {root!r})")
            entry = _load_cifar_pickle(path)
            if not isinstance(entry, dict) or b"data" not in entry or key not in entry:
                raise DatasetError(f"CIFAR-{num_classes} file {path!r} holds no {key!r} / "
                                   f"b'data' entries; is it the right CIFAR version?")
            data = np.asarray(entry[b"data"])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DatasetError(f"CIFAR file {path!r}: expected uint8 data of shape (N, 3072), "
                                   f"got {data.dtype} {data.shape}")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys += list(entry[key])
        return np.concatenate(xs).transpose(0, 2, 3, 1).copy(), np.asarray(ys, dtype=np.int64)

    return read(train_files), read(test_files)


def synthetic_arrays(n: int, num_classes: int, size: int, seed: int):
    """Small class-dependent random images for tests and benchmarks (learnable, not trivial)."""
    g = np.random.RandomState(seed)
    protos = g.randint(0, 256, size=(num_classes, size, size, 3)).astype(np.float32)
    labels = g.randint(0, num_classes, size=n).astype(np.int64)
    noise = g.normal(0, 60, size=(n, size, size, 3))
    images = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


# -- image files: class folders and 'path label' lists -----------------------------------------
def scan_image_folder(root: str, allow_empty_classes: bool = False
                      ) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(path, class index) for every image under ROOT/CLASS/..., classes in sorted order. A class
    folder without images is an error unless allowed (training would build an output for a
    class it never sees)."""
    if not root or not os.path.isdir(root):
        raise DatasetError(f"image folder {root!r} does not exist")
    try:  # one scanner (folder_scan): each real directory once, ambiguous classes refused
        classes = folder_scan.class_folders(root)
        if not classes:
            raise DatasetError(f"image folder {root!r} has no class sub-folders")
        samples, empty = folder_scan.scan(root, classes, IMAGE_EXTENSIONS)
    except folder_scan.FolderScanError as e:
        raise DatasetError(str(e)) from None
    if not samples:
        raise DatasetError(f"image folder {root!r} has no images (looked for "
                           f"{', '.join(IMAGE_EXTENSIONS)})")
    if empty and not allow_empty_classes:
        raise DatasetError(f"image folder {root!r}: class folder(s) "
                           f"{', '.join(repr(c) for c in empty[:5])}"
                           f"{' ...' if len(empty) > 5 else ''} hold no images; the model would "
                           f"have an output for a class it never sees. Remove the empty folders "
                           f"or add their images")
    return samples, classes


def read_file_list(list_path: str, root: Optional[str], num_classes: Optional[int] = None,
                   check_files: bool = True) -> List[Tuple[str, int]]:
    """``relative/path.jpg label`` per line (ImageNet-LT style); blank lines ignored.

    Every problem is found here, before training, and named by ``list:line``: a label that is
    negative or not below ``num_classes``, and (``check_files``) an image that does not exist."""
    if not list_path or not os.path.isfile(list_path):
        raise DatasetError(f"file list {list_path!r} does not exist")
    samples, lines = [], []
    with open(list_path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DatasetError(f"{list_path}:{n}: expected 'path label', got {line!r}")
            label = int(parts[1])
            if label < 0:
                raise DatasetError(f"{list_path}:{n}: label {label} is negative; labels are "
                                   f"class indices 0, 1, ... ({line!r})")
            if num_classes is not None and label >= num_classes:
                raise DatasetError(f"{list_path}:{n}: label {label} is out of range for "
                                   f"{num_classes} classes (valid 0..{num_classes - 1}): "
                                   f"{line!r}")
            samples.append((os.path.join(root or "", parts[0]), label))
            lines.append(n)
    if not samples:
        raise DatasetError(f"file list {list_path!r} is empty")
    if check_files:
        missing = [(n, p) for n, (p, _) in zip(lines, samples) if not os.path.isfile(p)]
        if missing:
            named = "; ".join(f"{list_path}:{n}: {p!r}" for n, p in missing[:3])
            raise DatasetError(f"{len(missing)} image(s) named in {list_path} do not exist, "
                               f"e.g. {named}" + (f" (paths are relative to {root!r})"
                                                  if root else ""))
    return samples


def check_labels(labels, num_classes: int, source: str, allow_unlabelled: bool = False):
    """Every label must be a class index below ``num_classes`` (-1 allowed for unlabelled data):
    a bad one would otherwise surface as an IndexError somewhere mid-training."""
    y = np.asarray(labels, dtype=np.int64)
    lo = -1 if allow_unlabelled else 0
    bad = np.flatnonzero((y < lo) | (y >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DatasetError(f"{source}: label {int(y[i])} (item {i}, {len(bad)} bad in all) is out "
                           f"of range for {num_classes} classes (valid 0..{num_classes - 1})")


class ImageFileDataset(torch.utils.data.Dataset):
    """Decodes with Pillow; random-resized-crop + flip for training, resize + centre crop else."""

    def __init__(self, samples: Sequence[Tuple[str, int]], train: bool, image_size: int,
                 val_resize: int, crop_scale=(0.08, 1.0), skip_bad: bool = False):
        self.samples = list(samples)
        self.train, self.size, self.resize = train, image_size, val_resize
        self.scale, self.skip_bad = tuple(crop_scale), skip_bad
        self.augment = None  # per-image RandAugment (training), set by build_datasets

    def __len__(self):
        return len(self.samples)

    def _open(self, i):
        path = self.samples[i][0]
        try:
            img = Image.open(path)
            img.load()
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a broken file
            raise BadImageError(f"cannot decode image {path!r}: {type(e).__name__}: {e}") from e
        try:  # 16-bit and float images keep their true range (pixels.py; DALI does the same)
            return to_rgb(img, path)
        except UnknownRangeError as e:
            raise BadImageError(f"cannot use image {path!r}: {e}") from None

    def __getitem__(self, key):
        i, seed = _split_key(key)
        try:
            img = self._open(i)
        except BadImageError:
            if self.skip_bad:
                return None
            raise
        if self.train:
            x = train_transform_pil(img, self.size, self.scale, random.Random(seed))
            if self.augment is not None:
                x = self.augment(x, seed)
        else:
            x = val_transform_pil(img, self.resize, self.size)
        return x, self.samples[i][1]


# -- unlabelled WebDataset tar shards -------------------------------------------------------------
def list_shards(path: str) -> List[str]:
    if path and os.path.isdir(path):
        shards = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar"))
    elif path and os.path.isfile(path):
        shards = [path]
    else:
        raise DatasetError(f"webdataset path {path!r} does not exist")
    if not shards:
        raise DatasetError(f"no .tar shards in {path!r}")
    return shards


class WebDatasetShards(torch.utils.data.Dataset):
    """Map-style view of WebDataset tar shards: one sample per key holding an image member.

    A ``.cls`` member, when present, is the label; otherwise -1 (unlabelled, e.g. CC3M).
    """

    def __init__(self, path: str, train: bool, image_size: int, val_resize: int,
                 crop_scale=(0.08, 1.0), skip_bad: bool = False):
        self.items = []  # (shard, image member name, label)
        for shard in list_shards(path):
            groups = {}
            with tarfile.open(shard) as tf:
                for m in tf.getmembers():
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    groups.setdefault(key, {})[ext.lower()] = m
                for key in sorted(groups):
                    g = groups[key]
                    img = next((g[e] for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
                    if img is None:
                        continue
                    label = -1
                    if "cls" in g:
                        label = int(tf.extractfile(g["cls"]).read().decode().strip())
                    self.items.append((shard, img.name, label))
        if not self.items:
            raise DatasetError(f"no images in the webdataset shards at {path!r}")
        self.train, self.size, self.resize = train, image_size, val_resize
        self.scale, self.skip_bad = tuple(crop_scale), skip_bad
        self.augment = None  # per-image RandAugment (training), set by build_datasets
        self._handles = {}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        i, seed = _split_key(key)
        shard, name, label = self.items[i]
        tf = self._handles.get(shard)
        if tf is None:
            tf = self._handles[shard] = tarfile.open(shard)
        try:
            img = Image.open(tf.extractfile(name))
            img.load()
            img = to_rgb(img, f"{name} in {shard}")
        except Exception as e:  # noqa: BLE001
            if self.skip_bad:
                return None
            raise BadImageError(f"cannot decode image {name!r} in {shard!r}: "
                                f"{type(e).__name__}: {e}") from e
        if self.train:
            x = train_transform_pil(img, self.size, self.scale, random.Random(seed))
            if self.augment is not None:
                x = self.augment(x, seed)
        else:
            x = val_transform_pil(img, self.resize, self.size)
        return x, label

    def __getstate__(self):  # open tar handles do not cross into worker processes
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


# -- which dataset kind a folder holds (for --data-path given without --dataset) ----------------
def infer_dataset(path: str) -> Tuple[Optional[str], str]:
    """(dataset kind, why) from a folder's layout, or (None, what was found). Only layouts that
    cannot be mistaken are recognised: CIFAR's python pickles, ``train/`` and ``val/`` class
    folders, ``.tar`` shards. Anything else is left to the user (a wrong guess trains the wrong
    thing silently)."""
    if not path or not os.path.exists(path):
        return None, f"{path!r} does not exist"
    if os.path.isfile(path):
        return ("webdataset", "a .tar shard") if path.endswith(".tar") else \
            (None, "a single file that is not a .tar shard")
    for sub, kind, marker in (("cifar-100-python", "cifar100", "train"),
                              ("cifar-10-batches-py", "cifar10", "data_batch_1"),
                              ("", "cifar100", "train"), ("", "cifar10", "data_batch_1")):
        root = os.path.join(path, sub) if sub else path
        if os.path.isfile(os.path.join(root, marker)) and \
                os.path.isfile(os.path.join(root, "test" if kind == "cifar100" else "test_batch")):
            return kind, f"CIFAR python pickles ({os.path.join(sub, marker) if sub else marker})"
    if all(os.path.isdir(os.path.join(path, s)) for s in ("train", "val")):
        return "imagefolder", "train/ and val/ class folders"
    if any(f.endswith(".tar") for f in os.listdir(path)):
        return "webdataset", ".tar shards"
    return None, "no train/ and val/ folders, CIFAR pickles or .tar shards"
