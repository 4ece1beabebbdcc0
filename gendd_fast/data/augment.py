"""Batch augmentations on the training device: RandAugment, Mixup / CutMix and label smoothing.

They run on whole batches after loading (on the GPU when training there), so the DataLoader and
the DALI paths get the same augmentation without a per-image host transform. The BEiT ->
ResNet-50 recipes (timm "A1"/"A2") use them; with Mixup, CutMix or label smoothing the labels
become ``(B, K)`` distributions, which every distiller accepts (GenDD's contraction takes
``y @ W_t``, CE/KD a soft-label cross-entropy).

Every random draw comes from a CPU generator seeded by (run seed, rank, epoch, batch index): the
augmentation of a batch does not depend on anything else, so a resumed run sees exactly the
batches of the uninterrupted one.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .transforms import normalization_for


# ---------------------------------------------------------------------------------------------
# RandAugment on a float batch in [0, 1]
# ---------------------------------------------------------------------------------------------
def parse_randaug(policy: Optional[str]) -> Optional[Tuple[int, float, float]]:
    """``rand-m7-n2-mstd0.5`` (timm's notation; ``inc1`` accepted: every op here increases with
    the magnitude) -> (ops per image N, magnitude M in [0, 10], magnitude std). None/''/'none'
    disable it."""
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


def _gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a, b, factor):
    """PIL ImageEnhance: b + factor * (a - b), clamped."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def _affine(x, theta):
    """Warp with per-sample 2x3 matrices (normalised coordinates), grey fill like timm (128)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + 0.5


def _eye(n, x):
    return torch.eye(2, 3, device=x.device, dtype=x.dtype).expand(n, 2, 3).clone()


def op_rotate(x, mag, sign):
    a = (mag * 30.0 * sign) * math.pi / 180.0
    th = _eye(len(x), x)
    th[:, 0, 0], th[:, 0, 1] = torch.cos(a), -torch.sin(a)
    th[:, 1, 0], th[:, 1, 1] = torch.sin(a), torch.cos(a)
    return _affine(x, th)


def op_shear_x(x, mag, sign):
    th = _eye(len(x), x)
    th[:, 0, 1] = mag * 0.3 * sign
    return _affine(x, th)


def op_shear_y(x, mag, sign):
    th = _eye(len(x), x)
    th[:, 1, 0] = mag * 0.3 * sign
    return _affine(x, th)


def op_translate_x(x, mag, sign):
    th = _eye(len(x), x)
    th[:, 0, 2] = 2 * mag * 0.45 * sign  # fraction of the width; the grid spans 2
    return _affine(x, th)


def op_translate_y(x, mag, sign):
    th = _eye(len(x), x)
    th[:, 1, 2] = 2 * mag * 0.45 * sign
    return _affine(x, th)


def op_auto_contrast(x, mag, sign):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-12), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x)


def op_equalize(x, mag, sign):
    """Histogram equalisation per image and channel on 256 levels (PIL's ImageOps.equalize)."""
    b, c, h, w = x.shape
    v = (x * 255).round().clamp(0, 255).long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device, dtype=x.dtype).scatter_add_(
        1, v, torch.ones_like(v, dtype=x.dtype))
    last = hist.gather(1, (255 - (hist.flip(1) > 0).float().argmax(1, keepdim=True)))
    step = torch.div(h * w - last, 255, rounding_mode="floor")
    cdf = torch.cumsum(hist, 1) - hist  # pixels strictly below each level
    lut = torch.div(cdf + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1),
                    rounding_mode="floor").clamp(0, 255)
    out = lut.gather(1, v) / 255.0
    out = torch.where(step > 0, out, v.to(x.dtype) / 255.0)  # one level only: unchanged
    return out.view(b, c, h, w)


def op_invert(x, mag, sign):
    return 1.0 - x


def op_posterize(x, mag, sign):
    bits = (4 - (mag * 4).floor()).clamp(0, 8).view(-1, 1, 1, 1)  # increasing: fewer bits
    q = 2.0 ** (8 - bits)
    return torch.floor((x * 255).round() / q) * q / 255.0


def op_solarize(x, mag, sign):
    thresh = (256 - (mag * 256).floor()).view(-1, 1, 1, 1)  # increasing: a lower threshold
    return torch.where((x * 255).round() >= thresh, 1.0 - x, x)


def op_solarize_add(x, mag, sign):
    add = (mag * 110.0 / 255.0).view(-1, 1, 1, 1)
    return torch.where(x < 128.0 / 255.0, (x + add).clamp(0, 1), x)


def op_color(x, mag, sign):
    return _blend(x, _gray(x).expand_as(x), 1.0 + mag * 0.9 * sign)


def op_contrast(x, mag, sign):
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    return _blend(x, mean, 1.0 + mag * 0.9 * sign)


def op_brightness(x, mag, sign):
    return _blend(x, torch.zeros_like(x), 1.0 + mag * 0.9 * sign)


def op_sharpness(x, mag, sign):
    k = torch.tensor([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]], device=x.device,
                     dtype=x.dtype) / 13.0
    smooth = F.conv2d(x.reshape(-1, 1, *x.shape[2:]), k.view(1, 1, 3, 3), padding=1)
    smooth = smooth.view_as(x).clone()
    smooth[..., 0, :], smooth[..., -1, :] = x[..., 0, :], x[..., -1, :]  # PIL keeps the border
    smooth[..., :, 0], smooth[..., :, -1] = x[..., :, 0], x[..., :, -1]
    return _blend(x, smooth, 1.0 + mag * 0.9 * sign)


# timm's "increasing" RandAugment op set
RAND_OPS = {
    "AutoContrast": op_auto_contrast, "Equalize": op_equalize, "Invert": op_invert,
    "Rotate": op_rotate, "Posterize": op_posterize, "Solarize": op_solarize,
    "SolarizeAdd": op_solarize_add, "Color": op_color, "Contrast": op_contrast,
    "Brightness": op_brightness, "Sharpness": op_sharpness, "ShearX": op_shear_x,
    "ShearY": op_shear_y, "TranslateX": op_translate_x, "TranslateY": op_translate_y,
}


def rand_augment(x, n: int, m: float, mstd: float, g: torch.Generator, prob: float = 0.5):
    """RandAugment on a float batch in [0, 1]: ``n`` times, every image picks one op uniformly,
    applies it with probability ``prob`` at magnitude ~ N(m, mstd) clipped to [0, 10], with a
    random sign where the op has one. Images that picked the same op are processed together."""
    ops = list(RAND_OPS.values())
    b = x.shape[0]
    x = x.clone()
    for _ in range(n):
        pick = torch.randint(0, len(ops), (b,), generator=g)
        apply = torch.rand(b, generator=g) < prob
        mag = (m + mstd * torch.randn(b, generator=g)).clamp(0, 10) / 10.0
        sign = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
        for k, op in enumerate(ops):
            idx = torch.nonzero((pick == k) & apply).flatten()
            if idx.numel() == 0:
                continue
            dev = idx.to(x.device)
            x[dev] = op(x[dev], mag[idx].to(x.device, x.dtype), sign[idx].to(x.device, x.dtype))
    return x


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix / label smoothing
# ---------------------------------------------------------------------------------------------
def smooth_one_hot(labels, num_classes: int, smoothing: float):
    """timm's convention: the target gets 1 - s + s/K, every other class s/K."""
    off = smoothing / num_classes
    y = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return y.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(h: int, w: int, lam: float, g: torch.Generator):
    """A box of area about (1 - lam) of the image at a uniform centre, clipped to the image;
    returns (y0, y1, x0, x1) and lam corrected to the clipped area."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, (1,), generator=g))
    cx = int(torch.randint(0, w, (1,), generator=g))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)


def _beta(a: float, g: torch.Generator) -> float:
    # Beta(a, a) from two Gamma draws through the generator (torch's Beta takes none)
    u = torch._standard_gamma(torch.full((2,), float(a)), generator=g)
    return float(u[0] / (u[0] + u[1]))


def mix_batch(x, labels, num_classes: int, g: torch.Generator, mixup: float = 0.0,
              cutmix: float = 0.0, prob: float = 1.0, switch_prob: float = 0.5,
              smoothing: float = 0.0):
    """Mixup or CutMix of the batch with its reverse (timm's pairing), soft labels mixed alike.

    Returns (images, labels, lam, kind) with kind in {'mixup', 'cutmix', 'none'}. Unlabelled
    batches (labels < 0) are mixed but keep their labels."""
    labelled = bool((labels >= 0).all())
    y = smooth_one_hot(labels, num_classes, smoothing) if labelled else labels
    use = (mixup > 0 or cutmix > 0) and float(torch.rand(1, generator=g)) < prob
    if not use or x.shape[0] < 2:
        return x, y, 1.0, "none"
    if mixup > 0 and cutmix > 0:
        kind = "cutmix" if float(torch.rand(1, generator=g)) < switch_prob else "mixup"
    else:
        kind = "cutmix" if cutmix > 0 else "mixup"
    lam = _beta(cutmix if kind == "cutmix" else mixup, g)
    flipped = x.flip(0)
    if kind == "mixup":
        x = lam * x + (1 - lam) * flipped
    else:
        (y0, y1, x0, x1), lam = cutmix_box(x.shape[2], x.shape[3], lam, g)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
    if labelled:
        y = lam * y + (1 - lam) * y.flip(0)
    return x, y, lam, kind


# ---------------------------------------------------------------------------------------------
# The loader wrapper
# ---------------------------------------------------------------------------------------------
def batch_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    return (((seed * 1_000_003 + rank) * 1_000_003 + epoch) * 1_000_003 + batch) % (2 ** 63)


class BatchAugmentLoader:
    """Wraps a training loader (either backend): RandAugment, then Mixup/CutMix and label
    smoothing, on each normalised batch. Everything else is the wrapped loader's."""

    def __init__(self, loader, num_classes: int, dataset: str, seed: int, rank: int,
                 randaug=None, mixup=0.0, cutmix=0.0, prob=1.0, switch_prob=0.5,
                 smoothing=0.0):
        self.loader, self.num_classes = loader, num_classes
        self.seed, self.rank = seed, rank
        self.randaug = parse_randaug(randaug) if isinstance(randaug, str) or randaug is None \
            else randaug
        self.mix = dict(mixup=mixup, cutmix=cutmix, prob=prob, switch_prob=switch_prob,
                        smoothing=smoothing)
        mean, std = normalization_for(dataset)
        self._mean, self._std = torch.tensor(mean).view(1, -1, 1, 1), \
            torch.tensor(std).view(1, -1, 1, 1)
        self._epoch, self._skip = 0, 0

    def __getattr__(self, name):  # backend, bad_images, sampler, ...
        return getattr(self.__dict__["loader"], name)

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self._epoch, self._skip = epoch, skip_batches
        self.loader.set_epoch(epoch, skip_batches)

    def __len__(self):
        return len(self.loader)

    def augment(self, x, labels, g: torch.Generator):
        if self.randaug is not None:
            mean, std = self._mean.to(x.device, x.dtype), self._std.to(x.device, x.dtype)
            x01 = (x * std + mean).clamp(0, 1)
            x01 = rand_augment(x01, *self.randaug, g)
            x = (x01 - mean) / std  # elementwise: keeps channels-last memory
        x, y, _, _ = mix_batch(x, labels, self.num_classes, g, **self.mix)
        return x, y

    def __iter__(self):
        b = self._skip
        for x, labels in self.loader:
            g = torch.Generator().manual_seed(batch_seed(self.seed, self.rank, self._epoch, b))
            b += 1
            yield self.augment(x, labels, g)
        self._epoch, self._skip = self._epoch + 1, 0


def wants_batch_augment(cfg) -> bool:
    return bool(parse_randaug(cfg.randaug) or cfg.mixup > 0 or cfg.cutmix > 0
                or cfg.label_smoothing > 0)


def wrap_train_loader(loaders, cfg, rank: int):
    """``loaders`` with its training loader wrapped when the config asks for batch
    augmentation (evaluation data is never augmented)."""
    if not wants_batch_augment(cfg):
        return loaders
    nc = cfg.num_classes or loaders.num_classes
    loaders.train = BatchAugmentLoader(
        loaders.train, nc, cfg.dataset, cfg.seed, rank, cfg.randaug, cfg.mixup, cfg.cutmix,
        cfg.mixup_prob, cfg.mixup_switch_prob, cfg.label_smoothing)
    return loaders
