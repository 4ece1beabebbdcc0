"""The reference's augmentations, from timm: RandAugment per image, Mixup / CutMix and label
smoothing per batch (the BEiT -> ResNet-50 recipes, timm "A1"/"A2").

- RandAugment is timm's ``rand_augment_transform`` on each training image (a PIL image, after
  the crop and flip, before anything is normalised), with timm's hyper-parameters as its
  ``create_transform`` sets them: translations of 0.45 x the image size and fill with the
  dataset's mean colour. The policy string picks timm's op set (``inc1``: the "increasing"
  set). The data path then goes one way: uint8 image -> augment -> normalise on the device.
  DALI runs the same op set on the GPU (:func:`gendd_fast.data.dali.rand_augment_gpu`).
- Mixup / CutMix / label smoothing are timm's ``Mixup`` on the normalised batch (linear mixing
  and region pasting commute with the per-channel affine normalisation). The labels become
  ``(B, K)`` distributions, which every distiller accepts (GenDD's contraction takes
  ``y @ W_t``, CE/KD a soft-label cross-entropy).

timm draws from Python's and NumPy's global generators. Every call here seeds them from (run
seed, image or batch key) and restores them afterwards, so the augmentation of an image or a
batch depends on nothing else (a resumed run sees exactly the batches of the uninterrupted one)
and the trainer's own random state is untouched.
"""
from __future__ import annotations

import contextlib
import random
import re
from typing import Optional, Tuple

import numpy as np
import torch

from .transforms import normalization_for


def _timm():
    from ..thirdparty import import_library
    try:
        return import_library("timm")
    except Exception as e:  # noqa: BLE001 - ImportError, or a wheel failing in another way
        raise ImportError(f"--randaug / --mixup / --cutmix / --label-smoothing use timm, which "
                          f"is not importable here ({type(e).__name__}: {e}); install it with "
                          f"pip install --no-deps -r requirements-nodeps.txt") from e


@contextlib.contextmanager
def seeded_globals(seed: int):
    """Python's and NumPy's global generators seeded from ``seed`` inside, restored after."""
    py, npy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


# ---------------------------------------------------------------------------------------------
# RandAugment, per image
# ---------------------------------------------------------------------------------------------
def parse_randaug(policy: Optional[str]) -> Optional[Tuple[int, float, float]]:
    """Check ``rand-m7-n2-mstd0.5`` (timm's notation; ``inc1`` picks timm's "increasing" op set)
    -> (ops per image N, magnitude M in [0, 10], magnitude std), with errors that name the
    problem before timm sees the string. None/''/'none' disable it."""
    if policy is None or policy.strip().lower() in ("", "none", "off", "false"):
        return None
    parts = policy.strip().split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaug policy {policy!r} must start with 'rand-' "
                         f"(e.g. rand-m7-n2-mstd0.5)")
    n, m, mstd = 2, 9.0, 0.0
    for p in parts[1:]:
        k = re.match(r"^(mstd|inc|m|n)(-?[0-9.]+)$", p)
        if not k:
            raise ValueError(f"randaug policy {policy!r}: cannot read {p!r} (known: mM, nN, "
                             f"mstdS, inc1)")
        key, val = k.group(1), float(k.group(2))
        if key == "m":
            m = val
        elif key == "n":
            n = int(val)
        elif key == "mstd":
            mstd = val
    if not 0 <= m <= 10 or n < 1 or mstd < 0:
        raise ValueError(f"randaug policy {policy!r}: need 0 <= m <= 10, n >= 1, mstd >= 0")
    return n, m, mstd


def timm_randaug_hparams(image_size: int, dataset: str):
    """What timm's ``create_transform`` gives RandAugment: translate 0.45 x the size, fill with
    the mean colour (uint8)."""
    mean = normalization_for(dataset)[0]
    return dict(translate_const=int(image_size * 0.45),
                img_mean=tuple(min(255, round(255 * m)) for m in mean))


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, also for 0 bits: timm asks for 0 bits at low Posterize / high
    PosterizeIncreasing levels, which Pillow 13 refuses (ValueError) where older Pillow, and
    so the reference, gave a black image. Same mask as Pillow otherwise."""
    if bits_to_keep >= 8:
        return img
    from PIL import Image
    mask = (0xFF << (8 - max(int(bits_to_keep), 0))) & 0xFF
    return Image.fromarray(np.asarray(img) & np.uint8(mask))


class RandAugmentPerImage:
    """timm's RandAugment for one uint8 CHW training image, seeded per image. Pickles (the
    DataLoader's worker processes get a copy)."""

    def __init__(self, policy: str, image_size: int, dataset: str):
        parse_randaug(policy)  # our error messages for a malformed policy
        self.policy, self.hparams = policy, timm_randaug_hparams(image_size, dataset)
        # a copy: timm writes into the hparams it is given
        self.transform = _timm().data.auto_augment.rand_augment_transform(
            policy, dict(self.hparams))
        for op in self.transform.ops:  # see _posterize
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        from PIL import Image
        img = Image.fromarray(x.permute(1, 2, 0).numpy())
        with seeded_globals(seed * 2 + 1):  # not the crop's stream
            out = self.transform(img)
        return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1) \
            .contiguous()


def randaug_for(cfg) -> Optional[RandAugmentPerImage]:
    """The per-image RandAugment a config asks for (training data only), or None."""
    if not parse_randaug(cfg.randaug):
        return None
    return RandAugmentPerImage(cfg.randaug, cfg.image_size, cfg.dataset)


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix / label smoothing, per batch
# ---------------------------------------------------------------------------------------------
def batch_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    return (((seed * 1_000_003 + rank) * 1_000_003 + epoch) * 1_000_003 + batch) % (2 ** 63)


class BatchMixer:
    """timm's ``Mixup`` (batch mode: each image mixed with its mirror in the batch) or, with no
    Mixup/CutMix, timm's smoothed one-hot labels. Unlabelled batches (labels < 0) are mixed and
    keep their labels."""

    def __init__(self, num_classes: int, mixup=0.0, cutmix=0.0, prob=1.0, switch_prob=0.5,
                 smoothing=0.0):
        timm = _timm()
        self.num_classes, self.smoothing = num_classes, smoothing
        self.mixup_target = timm.data.mixup.mixup_target
        self.mixer = timm.data.Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob,
                                     switch_prob=switch_prob, mode="batch",
                                     label_smoothing=smoothing, num_classes=num_classes) \
            if (mixup > 0 or cutmix > 0) else None

    def __call__(self, x, labels, seed: int):
        labelled = bool((labels >= 0).all())
        if self.mixer is None:
            if not labelled:
                return x, labels
            return x, self.mixup_target(labels, self.num_classes, 1.0, self.smoothing)
        if x.shape[0] % 2:
            raise ValueError(f"Mixup/CutMix pair each image with its mirror in the batch: the "
                             f"batch of {x.shape[0]} must be even (--batch-size)")
        with seeded_globals(seed):
            x, y = self.mixer(x.clone(), labels.clamp(min=0))
        return x, (y if labelled else labels)


# ---------------------------------------------------------------------------------------------
# The loader wrapper
# ---------------------------------------------------------------------------------------------
class BatchAugmentLoader:
    """Wraps a training loader (either backend): Mixup/CutMix and label smoothing on each
    normalised batch. Everything else is the wrapped loader's."""

    def __init__(self, loader, num_classes: int, seed: int, rank: int, mixup=0.0, cutmix=0.0,
                 prob=1.0, switch_prob=0.5, smoothing=0.0):
        self.loader, self.num_classes = loader, num_classes
        self.seed, self.rank = seed, rank
        self.mix = BatchMixer(num_classes, mixup, cutmix, prob, switch_prob, smoothing)
        self._epoch, self._skip = 0, 0

    def __getattr__(self, name):  # backend, bad_images, sampler, ...
        return getattr(self.__dict__["loader"], name)

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self._epoch, self._skip = epoch, skip_batches
        self.loader.set_epoch(epoch, skip_batches)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        b = self._skip
        for x, labels in self.loader:
            yield self.mix(x, labels, batch_seed(self.seed, self.rank, self._epoch, b))
            b += 1
        self._epoch, self._skip = self._epoch + 1, 0


def wants_batch_augment(cfg) -> bool:
    return bool(cfg.mixup > 0 or cfg.cutmix > 0 or cfg.label_smoothing > 0)


def wrap_train_loader(loaders, cfg, rank: int):
    """``loaders`` with its training loader wrapped when the config asks for Mixup, CutMix or
    label smoothing (evaluation data is never augmented; RandAugment runs per image in the
    datasets, see :func:`randaug_for`)."""
    if not wants_batch_augment(cfg):
        return loaders
    nc = cfg.num_classes or loaders.num_classes
    loaders.train = BatchAugmentLoader(
        loaders.train, nc, cfg.seed, rank, cfg.mixup, cfg.cutmix, cfg.mixup_prob,
        cfg.mixup_switch_prob, cfg.label_smoothing)
    return loaders
