"""Decoded images to 8-bit RGB with their true range: one rule for both data paths.

Pillow's ``convert("RGB")`` clips instead of rescaling: a 16-bit grayscale PNG (mode ``I;16`` or
``I``) came out 99.8% saturated at 255, and a float TIFF in [0, 1] (mode ``F``) came out black.
Here 16-bit values are scaled by 255/65535 and float values in [0, 1] by 255 (rounded to the
nearest level), which is what the file's range says. A float image outside [0, 1], or a 32-bit
integer image beyond 16 bits, has no range we could know: it is refused by name
(:class:`UnknownRangeError`), never guessed.

The DALI path uses :func:`range_problem` to find such files before it builds (its decoders
read high-bit-depth files with their own conversion rule), so both paths accept the same files
and give the same pixels.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

# Modes whose samples are not 8-bit: (how to read them). Everything else converts as before.
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
HIGH_DEPTH = SIXTEEN_BIT + ("I", "F")


class UnknownRangeError(ValueError):
    """An image whose pixel range cannot be known (float outside [0, 1], int beyond 16 bits)."""


def _scaled(img: Image.Image, path: str) -> np.ndarray:
    """uint8 HxW levels of a single-channel high-depth image, or UnknownRangeError."""
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float32)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not np.isfinite(a).all() or lo < 0.0 or hi > 1.0:
            raise UnknownRangeError(
                f"image {path!r} holds floating-point pixels in [{lo:g}, {hi:g}], not [0, 1]; "
                f"its intensity range is unknown, so it is refused rather than guessed. Save it "
                f"as 8- or 16-bit, or as float scaled to [0, 1]")
        # in float32, rounded half up: DALI's decoder computes the same, level for level
        return np.floor(a * np.float32(255) + np.float32(0.5)).astype(np.uint8)
    a = a.astype(np.int64)
    if img.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
        raise UnknownRangeError(
            f"image {path!r} holds 32-bit integer pixels in [{int(a.min())}, {int(a.max())}], "
            f"beyond 16 bits; its intensity range is unknown, so it is refused. Save it as 8- "
            f"or 16-bit")
    return ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)


def to_rgb(img: Image.Image, path: str) -> Image.Image:
    """``img`` as 8-bit RGB with its true range (see the module docstring)."""
    if img.mode in HIGH_DEPTH:
        return Image.fromarray(_scaled(img, path), mode="L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def range_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be decoded with a known range (None: it can, or it is not an image
    Pillow reads; undecodable files are named by the caller's own check)."""
    try:
        with Image.open(path) as im:
            if im.mode not in HIGH_DEPTH:
                return None
            im.load()
            to_rgb(im, path)
    except UnknownRangeError as e:
        return str(e)
    except Exception:  # noqa: BLE001 - not decodable at all: another check names it
        return None
    return None


def is_high_depth(path: str) -> bool:
    """Whether Pillow reads ``path`` with more than 8 bits per sample (header only)."""
    try:
        with Image.open(path) as im:
            return im.mode in HIGH_DEPTH
    except Exception:  # noqa: BLE001
        return False


# Only TIFF holds pixels whose range can be unknown (float, 32-bit integer); PNG and PPM stop at
# 16 bits, JPEG/WebP/BMP at 8. Checking only these keeps the scan free for ImageNet-style data.
UNKNOWN_RANGE_EXTENSIONS = (".tif", ".tiff")


def refuse_unknown_range(paths, limit: int = 3):
    """Raise :class:`UnknownRangeError` naming the files whose range is unknown, before a run
    starts; called for both data paths, which then decode every accepted file alike."""
    from concurrent.futures import ThreadPoolExecutor
    todo = [p for p in paths if p.lower().endswith(UNKNOWN_RANGE_EXTENSIONS)]
    if not todo:
        return
    with ThreadPoolExecutor(8) as ex:
        bad = [why for why in ex.map(range_problem, todo) if why]
    if bad:
        raise UnknownRangeError(f"{len(bad)} image(s) cannot be read with a known pixel range: "
                                + "; ".join(bad[:limit]) + (" ..." if len(bad) > limit else ""))
