"""Augmentations on the host, in PIL and numpy (no torchvision: it does not import on CPU here).

Every random choice takes an explicit ``random.Random``, seeded per sample from (seed, epoch,
index) by the sampler: augmentation is then the same whatever the worker count, and a resumed run
sees exactly the batches the uninterrupted run would have seen. Outputs are uint8 CHW tensors;
conversion to float and normalisation happen on the device (see :mod:`gendd_fast.data.loader`).
"""
from __future__ import annotations

import math
import random
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image

# Per-dataset normalisation (mean, std) on [0, 1] pixels.
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),  # the public code's
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "digits": ((0.3053,) * 3, (0.3760,) * 3),
    "synthetic": ((0.5,) * 3, (0.25,) * 3),
}


def normalization_for(dataset: str):
    return NORMALIZATION.get(dataset, NORMALIZATION["imagenet"])


def random_resized_crop_box(width: int, height: int, scale: Sequence[float], rng: random.Random,
                            ratio: Tuple[float, float] = (3 / 4, 4 / 3)):
    """(left, top, w, h) of a crop covering a random area fraction and aspect ratio (Inception
    style): ten tries, then the largest centred crop within the ratio bounds."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_chw_uint8(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def train_transform_pil(img: Image.Image, size: int, scale, rng: random.Random) -> torch.Tensor:
    """Random-resized-crop to ``size`` and horizontal flip (ImageNet-style training)."""
    img = img.convert("RGB")
    left, top, w, h = random_resized_crop_box(img.width, img.height, scale, rng)
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_chw_uint8(img)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def center_crop_box(width: int, height: int, resize: int, size: int):
    """Resize the shorter side to ``resize``, then take the centred ``size`` square: the
    resized image's dimensions and the crop's offsets, in resized pixels. Lengths and offsets
    round half up, as DALI's resize and crop do, so both data paths cut the same pixels."""
    if width <= height:
        new_w, new_h = resize, _round_half_up(resize * height / width)
    else:
        new_w, new_h = _round_half_up(resize * width / height), resize
    return new_w, new_h, _round_half_up((new_w - size) / 2.0), _round_half_up((new_h - size) / 2.0)


def val_transform_pil(img: Image.Image, resize: int, size: int) -> torch.Tensor:
    """Shorter side to ``resize`` then a centred ``size`` crop (the usual evaluation transform)."""
    img = img.convert("RGB")
    new_w, new_h, left, top = center_crop_box(img.width, img.height, resize, size)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    return to_chw_uint8(img.crop((left, top, left + size, top + size)))


def pad_crop_flip(hwc: np.ndarray, pad: int, flip: bool, rng: random.Random) -> torch.Tensor:
    """CIFAR-style: zero-pad, random crop back to the original size, optional random flip."""
    h, w = hwc.shape[:2]
    if pad:
        padded = np.zeros((h + 2 * pad, w + 2 * pad, hwc.shape[2]), dtype=hwc.dtype)
        padded[pad:pad + h, pad:pad + w] = hwc
        y, x = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
        hwc = padded[y:y + h, x:x + w]
    if flip and rng.random() < 0.5:
        hwc = hwc[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1).contiguous()
