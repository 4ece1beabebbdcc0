"""timm's RandAugment in a DALI pipeline (the GPU data path), built on ``nvidia.dali.auto_aug``.

The op set and the magnitudes are timm's (``timm.data.auto_augment``), not DALI's own RandAugment
suite (which differs: an identity op, no Invert / SolarizeAdd, enhance factors 1 +- m). For each
of the policy's N layers every image picks one of the policy's ops uniformly, applies it with
probability 0.5 at level ~ N(M, mstd) clipped to [0, 10], with a random sign where timm negates,
and geometric ops fill with the dataset's mean colour. Each op's parameter for a level is
computed with timm's own formula (its ``int()`` truncations included) into a table of
``NUM_BINS`` levels, so the level is quantised to 0.1.

Where the two differ by construction (documented, not hidden): timm draws bilinear or bicubic at
random for geometric ops, DALI uses bilinear; Sharpness' 1-pixel border follows DALI's filter
border, not Pillow's copied border; the enhance ops round in float, Pillow in 8-bit steps (within
1 level); Equalize is DALI's (an OpenCV-style CDF lut, up to ~120 levels from Pillow's
``(step // 2 + cdf) // step`` on some images; Pillow's needs a per-channel histogram DALI does
not offer on the GPU). The other deterministic ops are checked against timm on fixed images in
``tests/test_dali.py`` (CPU) and ``tests_gpu/test_dali_randaug_gpu.py`` (GPU).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from .augment import parse_randaug, timm_randaug_hparams  # noqa: F401 (tests use the latter)

NUM_BINS = 101                    # levels 0.0, 0.1, ..., 10.0
LEVELS = np.linspace(0.0, 10.0, NUM_BINS)
_LEVEL_DENOM = 10.0               # timm's


# -- timm's level -> argument formulas (timm.data.auto_augment *_level_to_arg) ------------------
def _enhance(level):
    return level / _LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing(level):   # 1 +- this; the sign is drawn per image
    return level / _LEVEL_DENOM * 0.9


def _posterize_bits(level):
    return int(level / _LEVEL_DENOM * 4)


def _solarize_thresh(level):
    return min(256, int(level / _LEVEL_DENOM * 256))


def _solarize_add(level):
    return min(128, int(level / _LEVEL_DENOM * 110))


def _mask(bits: int) -> np.uint8:
    """Pillow's posterize mask: keep the top ``bits`` bits (8 or more: all)."""
    return np.uint8(255 if bits >= 8 else (0xFF << (8 - bits)) & 0xFF)


# timm's op names (default and 'increasing' sets) -> (table of the parameter per level, negated)
def _tables(image_size: int) -> Dict[str, Tuple[np.ndarray, bool]]:
    tr = 0.45 * image_size  # timm: translate_pct 0.45 of the image size, in pixels
    t = {
        "AutoContrast": (None, False), "Equalize": (None, False), "Invert": (None, False),
        "Rotate": (LEVELS / _LEVEL_DENOM * 30.0, True),
        "Posterize": (np.array([_mask(_posterize_bits(v)) for v in LEVELS]), False),
        "PosterizeIncreasing": (np.array([_mask(4 - _posterize_bits(v)) for v in LEVELS]),
                                False),
        "Solarize": (np.array([_solarize_thresh(v) for v in LEVELS], np.int32), False),
        "SolarizeIncreasing": (np.array([256 - _solarize_thresh(v) for v in LEVELS], np.int32),
                               False),
        "SolarizeAdd": (np.array([_solarize_add(v) for v in LEVELS], np.int32), False),
        "ShearX": (LEVELS / _LEVEL_DENOM * 0.3, True),
        "ShearY": (LEVELS / _LEVEL_DENOM * 0.3, True),
        "TranslateXRel": (LEVELS / _LEVEL_DENOM * tr, True),
        "TranslateYRel": (LEVELS / _LEVEL_DENOM * tr, True),
    }
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        t[name] = (np.array([_enhance(v) for v in LEVELS], np.float32), False)
        t[name + "Increasing"] = (np.array([_enhance_increasing(v) for v in LEVELS],
                                           np.float32), True)
    return t


def timm_op_names(policy: str) -> List[str]:
    """The op names timm's rand_augment_transform uses for ``policy`` (its default set, or the
    'increasing' one with ``inc1``), in timm's order."""
    inc = any(p.startswith("inc") and p[3:] not in ("", "0") for p in policy.split("-")[1:])
    base = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
            "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
            "TranslateXRel", "TranslateYRel"]
    if inc:
        renamed = {"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"}
        base = [n + "Increasing" if n in renamed else n for n in base]
    return base


# -- the ops on uint8 HWC DALI data --------------------------------------------------------------
def _ops(image_size: int, dataset: str):
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
    from nvidia.dali.auto_aug.core import augmentation

    mean = np.array(timm_randaug_hparams(image_size, dataset)["img_mean"], np.float32)
    rgb_l = np.array([19595, 38470, 7471], np.float32)  # Pillow's RGB -> L, in 1/65536

    def u8(x):
        return fn.cast(dmath.clamp(x, 0.0, 255.0), dtype=types.UINT8)

    def f32(x):
        return fn.cast(x, dtype=types.FLOAT)

    def gray(xf):  # Pillow's convert('L'): (R*19595 + G*38470 + B*7471 + 2^15) >> 16
        s = fn.reductions.sum(xf * types.Constant(rgb_l), axis_names="C", keep_dims=True)
        return dmath.floor((s + 32768.0) / 65536.0)

    def blend(deg, xf, factor):  # Pillow's Image.blend(degenerate, image, factor)
        return u8(dmath.floor(deg + (xf - deg) * factor + 0.5))

    def warp(x, matrix):
        # the mean-colour fill: warp (x - mean) with zero fill, then add the mean back
        c = types.Constant(mean)
        out = fn.warp_affine(f32(x) - c, matrix=matrix, fill_value=0.0,
                             interp_type=types.INTERP_LINEAR)
        return u8(dmath.floor(out + c + 0.5))

    T = _tables(image_size)
    made = {}

    def op(name, device="cpu", to_param=None):
        table, negate = T[name]
        kw = dict(name=name)
        if table is not None:
            kw.update(mag_range=table, randomly_negate=negate, param_device=device)
            if to_param is not None:
                kw.update(mag_to_param=to_param)

        def wrap(fun):
            made[name] = augmentation(fun, **kw)
            return fun
        return wrap

    @op("AutoContrast")
    def _auto_contrast(data, _):
        xf = f32(data)
        lo = fn.reductions.min(xf, axis_names="HW", keep_dims=True)
        hi = fn.reductions.max(xf, axis_names="HW", keep_dims=True)
        d = hi - lo
        valid = f32(d > 0.0)
        # Pillow's lut: int(i * 255 / (hi - lo) - lo * 255 / (hi - lo)), identity when flat
        stretched = dmath.floor((xf - lo) * (255.0 / dmath.max(d, 1.0)))
        return u8(valid * stretched + (1.0 - valid) * xf)

    @op("Equalize")
    def _equalize(data, _):
        return fn.equalize(data)  # OpenCV-style lut, not Pillow's: see the module note

    @op("Invert")
    def _invert(data, _):
        return u8(255.0 - f32(data))

    @op("Rotate")
    def _rotate(data, angle):
        c = types.Constant(mean)
        out = fn.rotate(f32(data) - c, angle=angle, fill_value=0.0, keep_size=True,
                        interp_type=types.INTERP_LINEAR)
        return u8(dmath.floor(out + c + 0.5))

    def posterize(data, mask):
        return data & mask
    for n in ("Posterize", "PosterizeIncreasing"):
        op(n, "auto")(posterize)

    def solarize(data, thresh):
        xi = fn.cast(data, dtype=types.INT32)
        over = fn.cast(xi >= thresh, dtype=types.INT32)
        return fn.cast(xi + over * (255 - 2 * xi), dtype=types.UINT8)
    for n in ("Solarize", "SolarizeIncreasing"):
        op(n, "auto")(solarize)

    @op("SolarizeAdd", "auto")
    def _solarize_add(data, add):
        xi = fn.cast(data, dtype=types.INT32)
        low = fn.cast(xi < 128, dtype=types.INT32)
        return fn.cast(low * dmath.min(xi + add, 255) + (1 - low) * xi, dtype=types.UINT8)

    def enhance(kind, increasing):
        def run(data, factor):
            if increasing:
                factor = 1.0 + factor
            xf = f32(data)
            if kind == "Brightness":
                return blend(xf * 0.0, xf, factor)
            if kind == "Color":
                return blend(gray(xf), xf, factor)
            if kind == "Contrast":  # Pillow: the rounded mean of the grey image
                m = dmath.floor(fn.reductions.mean(gray(xf), axis_names="HWC",
                                                   keep_dims=True) + 0.5)
                return blend(m, xf, factor)
            blur = fn.filter(
                xf, types.Constant(np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13))
            return blend(dmath.floor(blur + 0.5), xf, factor)
        return run
    for kind in ("Color", "Contrast", "Brightness", "Sharpness"):
        op(kind, "auto")(enhance(kind, False))
        op(kind + "Increasing", "auto")(enhance(kind, True))

    # Pillow's AFFINE data (a, b, c, d, e, f) maps output (x, y) to input (a x + b y + c, ...),
    # as DALI's warp_affine matrix does by default (inverse map).
    def affine(a_b_c_d_e_f):
        return lambda v: np.array(a_b_c_d_e_f(float(v)), np.float32).reshape(2, 3)

    def warp_op(data, matrix):
        return warp(data, matrix)
    op("ShearX", to_param=affine(lambda v: [1, v, 0, 0, 1, 0]))(warp_op)
    op("ShearY", to_param=affine(lambda v: [1, 0, 0, v, 1, 0]))(warp_op)
    op("TranslateXRel", to_param=affine(lambda v: [1, 0, v, 0, 1, 0]))(warp_op)
    op("TranslateYRel", to_param=affine(lambda v: [1, 0, 0, 0, 1, v]))(warp_op)
    return made


def timm_ops(image_size: int, dataset: str, names: List[str]):
    """The DALI augmentations for timm's op ``names`` (see :func:`timm_op_names`)."""
    made = _ops(image_size, dataset)
    return [made[n] for n in names]


def level_bin(m: float, mstd: float):
    """Per-image magnitude bin: level ~ N(m, mstd) clipped to [0, 10] (timm), in 0.1 steps."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
    if mstd > 0:
        level = dmath.clamp(fn.random.normal(mean=float(m), stddev=float(mstd)), 0.0, 10.0)
        return fn.cast(dmath.floor(level * 10.0 + 0.5), dtype=types.INT32)
    return int(round(m * 10))


def rand_augment(images, policy: str, image_size: int, dataset: str):
    """timm's RandAugment of ``policy`` on a batch of uint8 HWC images in a DALI pipeline built
    with ``enable_conditionals=True``. Each layer: index 0 (probability 0.5) leaves the image,
    else one of the ops, uniformly (timm: a uniform op, applied with probability 0.5)."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import augmentations
    from nvidia.dali.auto_aug.core import select, signed_bin
    n, m, mstd = parse_randaug(policy)
    ops = [augmentations.identity] + timm_ops(image_size, dataset, timm_op_names(policy))
    for _ in range(n):
        pick = fn.random.uniform(values=list(range(1, len(ops))), dtype=types.INT32)
        apply = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
        mag = signed_bin(level_bin(m, mstd))
        images = select(ops, pick * apply, images, magnitude_bin=mag,
                        num_magnitude_bins=NUM_BINS)
    return images
