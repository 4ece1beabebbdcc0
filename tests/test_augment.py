"""Batch augmentation: RandAugment ops against Pillow, Mixup/CutMix/label smoothing against
direct computations, exact replay for resume, and soft labels reaching the distillers."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from gendd_fast.config import make_config
from gendd_fast.data import build_loaders
from gendd_fast.data import augment as A
from gendd_fast.distill import GenDD, KD, cross_entropy, kd_loss
from gendd_fast.head import DiffLoss
from gendd_fast.models import create_model
from gendd_fast.train import train
from helpers import read_metrics, save_teacher, tiny_config


def _images(n=3, h=20, w=24, seed=0):
    g = np.random.RandomState(seed)
    # smooth-ish content plus noise, so histograms and edges are not degenerate
    base = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 40, h)[:, None, None]
    return [np.clip(base + g.randint(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
            for _ in range(n)]


def _batch(arrs):
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrs])


def _pil(arr):
    return Image.fromarray(arr)


def _back(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def test_parse_randaug():
    assert A.parse_randaug("rand-m7-n2-mstd0.5") == (2, 7.0, 0.5)
    assert A.parse_randaug("rand-m9-mstd0.5-inc1") == (2, 9.0, 0.5)
    assert A.parse_randaug("none") is None and A.parse_randaug(None) is None
    for bad in ("augmix-m5", "rand-m11", "rand-q3", "rand-n0"):
        with pytest.raises(ValueError, match="randaug"):
            A.parse_randaug(bad)
    with pytest.raises(ValueError, match="randaug"):
        make_config(method="ce", randaug="rand-x")


# each op at magnitude 1 (fraction of 10) and sign +1 against Pillow's own operation
def _pil_refs():
    return {
        "AutoContrast": lambda im, m: ImageOps.autocontrast(im),
        "Equalize": lambda im, m: ImageOps.equalize(im),
        "Invert": lambda im, m: ImageOps.invert(im),
        "Posterize": lambda im, m: ImageOps.posterize(im, 4 - int(m * 4)),
        "Solarize": lambda im, m: ImageOps.solarize(im, 256 - int(m * 256)),
        "Color": lambda im, m: ImageEnhance.Color(im).enhance(1 + m * 0.9),
        "Contrast": lambda im, m: ImageEnhance.Contrast(im).enhance(1 + m * 0.9),
        "Brightness": lambda im, m: ImageEnhance.Brightness(im).enhance(1 + m * 0.9),
        "Sharpness": lambda im, m: ImageEnhance.Sharpness(im).enhance(1 + m * 0.9),
    }


@pytest.mark.parametrize("name", list(_pil_refs()))
@pytest.mark.parametrize("mag", [0.3, 0.7])
def test_rand_augment_ops_match_pillow(name, mag):
    arrs = _images()
    x = _batch(arrs)
    got = A.RAND_OPS[name](x, torch.full((3,), mag), torch.ones(3))
    want = torch.stack([_back(_pil_refs()[name](_pil(a), mag)) for a in arrs])
    # Pillow rounds to uint8 at every step (and Contrast rounds its mean): within 2 levels
    err = (got - want).abs()
    assert float(err.max()) <= 2.5 / 255, (name, float(err.max()))


def test_rand_augment_translation_is_an_exact_shift():
    x = _batch(_images(n=2, h=20, w=20))
    mag = torch.full((2,), 4 / (20 * 0.45))  # four pixels
    # like PIL's affine (timm's TranslateX): output pixel (i, j) reads input (i, j + 4)
    out = A.op_translate_x(x, mag, torch.ones(2))
    torch.testing.assert_close(out[..., :, :-4], x[..., :, 4:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., :, -4:], torch.full_like(out[..., :, -4:], 0.5),
                               atol=1e-5, rtol=0)  # grey fill
    out = A.op_translate_y(x, mag, -torch.ones(2))
    torch.testing.assert_close(out[..., 4:, :], x[..., :-4, :], atol=1e-5, rtol=0)


def test_rand_augment_is_a_function_of_the_generator():
    x = _batch(_images(n=8))
    a = A.rand_augment(x, 2, 9, 0.5, torch.Generator().manual_seed(3))
    b = A.rand_augment(x, 2, 9, 0.5, torch.Generator().manual_seed(3))
    c = A.rand_augment(x, 2, 9, 0.5, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c) and a.shape == x.shape
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_label_smoothing_matches_timm_convention():
    y = A.smooth_one_hot(torch.tensor([2, 0]), 5, 0.1)
    want = torch.full((2, 5), 0.02)
    want[0, 2], want[1, 0] = 0.92, 0.92
    torch.testing.assert_close(y, want)


def test_mixup_mixes_images_and_labels_with_the_reversed_batch():
    g = torch.Generator().manual_seed(0)
    x, lab = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 1, 0])
    out, y, lam, kind = A.mix_batch(x, lab, 4, g, mixup=0.8)
    assert kind == "mixup" and 0 < lam < 1
    torch.testing.assert_close(out, lam * x + (1 - lam) * x[[5, 4, 3, 2, 1, 0]])
    one = F.one_hot(lab, 4).float()
    torch.testing.assert_close(y, lam * one + (1 - lam) * one[[5, 4, 3, 2, 1, 0]])


def test_cutmix_label_weight_is_the_pasted_area():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 16, 12).clone()
        lab = torch.arange(6) % 4
        out, y, lam, kind = A.mix_batch(x, lab, 4, g, cutmix=1.0)
        assert kind == "cutmix"
        pasted = (out[0, 0] == 5.0).float().mean()  # image 0's partner is image 5
        assert float(pasted) == pytest.approx(1 - lam)
        assert bool((out[0, 0] == 0.0).float().mean() == lam)
        one = F.one_hot(lab, 4).float()
        torch.testing.assert_close(y, lam * one + (1 - lam) * one.flip(0))


def test_unlabelled_batches_keep_their_labels():
    x, lab = torch.randn(4, 3, 8, 8), torch.full((4,), -1)
    out, y, lam, _ = A.mix_batch(x, lab, 4, torch.Generator().manual_seed(0), mixup=1.0)
    assert torch.equal(y, lab) and not torch.equal(out, x)


def _aug_cfg(**kw):
    base = dict(method="ce", dataset="digits", batch_size=32, workers=0, device="cpu",
                randaug="rand-m7-n2-mstd0.5", mixup=0.1, cutmix=1.0, label_smoothing=0.1)
    base.update(kw)
    return make_config(**base).resolved()


def test_loader_wrapper_gives_soft_labels_and_replays_exactly_for_resume():
    cfg = _aug_cfg()
    loaders = build_loaders(cfg, 0, 1, torch.device("cpu"))
    assert isinstance(loaders.train, A.BatchAugmentLoader)
    assert not isinstance(loaders.val, A.BatchAugmentLoader)
    loaders.train.set_epoch(1)
    batches = [b for _, b in zip(range(3), loaders.train)]
    x, y = batches[0]
    assert y.dtype == torch.float32 and y.shape == (32, 10)
    torch.testing.assert_close(y.sum(1), torch.ones(32))
    # resuming at (epoch 1, batch 2) reproduces the third batch exactly
    again = build_loaders(cfg, 0, 1, torch.device("cpu"))
    again.train.set_epoch(1, 2)
    x2, y2 = next(iter(again.train))
    assert torch.equal(x2, batches[2][0]) and torch.equal(y2, batches[2][1])
    # and the plain loader is what was augmented: no augmentation, no wrapper
    plain = build_loaders(_aug_cfg(randaug=None, mixup=0.0, cutmix=0.0, label_smoothing=0.0),
                          0, 1, torch.device("cpu"))
    assert not isinstance(plain.train, A.BatchAugmentLoader)


def test_soft_labels_flow_into_contraction_ce_and_kd():
    torch.manual_seed(0)
    k = 5
    y = torch.softmax(torch.randn(4, k), 1)
    teacher_fc = torch.nn.Linear(64, k)
    g = GenDD(create_model("resnet8", k), teacher_fc, DiffLoss, token_dim=32, width=32,
              depth=1, sampling_steps="4", mul=1, smooth=0.7)
    f_t = torch.randn(4, 64)
    want = 0.3 * f_t + 0.7 * (y.double() @ teacher_fc.weight.double()).float()
    torch.testing.assert_close(g.contract(f_t, y), want, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # y @ W_t stays fp32 under autocast
        torch.testing.assert_close(g.contract(f_t, y), want, rtol=1e-5, atol=1e-5)
    logits = torch.randn(4, k)
    torch.testing.assert_close(cross_entropy(logits, y),
                               -(y * torch.log_softmax(logits, 1)).sum(1).mean())
    kd = KD(create_model("resnet8", k), T=4.0, alpha=0.5)
    x, t = torch.randn(4, 3, 16, 16), torch.randn(4, k)
    loss, parts = kd(x, y, (None, t))
    s = kd.student(x)
    torch.testing.assert_close(loss, 0.5 * cross_entropy(s, y) + 0.5 * kd_loss(s, t, 4.0))


@pytest.mark.parametrize("method", ["gendd", "kd", "dkd", "ikl"])
def test_mixed_batches_train_every_method(tmp_path, method):
    path, _ = save_teacher(tmp_path)
    cfg = tiny_config(tmp_path, method, path, epochs=1, sample_eval="never",
                      randaug="rand-m7-n2-mstd0.5", mixup=0.2, cutmix=1.0, label_smoothing=0.1,
                      beta=0.0)
    train(cfg)
    assert all(np.isfinite(r["loss"]) for r in read_metrics(cfg.output))


# -- the wrapper's contract, through wrap_train_loader (whatever implements the ops) ------------
class _FixedLoader:
    """A training loader of one normalised batch, as both backends hand them over."""
    backend = "torch"
    bad_images = 0

    def __init__(self, x):
        self.x = x

    def set_epoch(self, epoch, skip_batches=0):
        pass

    def __len__(self):
        return 1

    def __iter__(self):
        yield self.x, torch.zeros(len(self.x), dtype=torch.long)


def _augmented(pixels01, dataset="cifar100", **cfg_kw):
    """pixels in [0, 1] -> normalise -> the configured batch augmentation -> back in [0, 1]."""
    from types import SimpleNamespace

    from gendd_fast.data.augment import wrap_train_loader
    from gendd_fast.data.transforms import normalization_for
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization_for(dataset))
    cfg = make_config(method="ce", dataset=dataset, num_classes=10, seed=3, **cfg_kw)
    loaders = SimpleNamespace(train=_FixedLoader((pixels01 - mean) / std), val=None,
                              num_classes=10, backend="torch")
    wrapped = wrap_train_loader(loaders, cfg, 0).train
    wrapped.set_epoch(0)
    out, _ = next(iter(wrapped))
    return out, out * std + mean


def test_batch_augmentation_hands_back_normalised_images():
    """RandAugment works on [0, 1] pixels, but the batch the trainer gets is normalised again:
    un-normalised, every value lies in [0, 1], and the many black pixels of the input (0 ->
    -mean/std, about -1.9 for CIFAR-100) are still there as negatives.
    Planted: the augmented batch returned un-normalised -> fails."""
    g = torch.Generator().manual_seed(0)
    x01 = (torch.rand(64, 3, 12, 12, generator=g) * 1.6 - 0.3).clamp(0, 1)  # 19% exact zeros
    out, back = _augmented(x01, randaug="rand-m9-n2-mstd0.5")
    assert back.min() >= -1e-4 and back.max() <= 1 + 1e-4
    assert float((out < -1.5).float().mean()) > 0.05
    assert not torch.allclose(back, x01, atol=1e-3)   # it did augment


def test_rand_augment_draws_both_signs_of_a_signed_op():
    """Signed ops (brightness, rotation, shear...) take a random sign: on mid-grey images the
    only ops that move the level by more than one grey level are Brightness up and Brightness
    down, so for a fixed seed some images come out clearly darker and some clearly brighter.
    Planted: the sign always +1 -> fails (no image gets darker)."""
    x01 = torch.full((400, 3, 4, 4), 128 / 255)
    _, back = _augmented(x01, dataset="synthetic", randaug="rand-m9-n2-mstd0")
    level = back.mean(dim=(1, 2, 3))
    assert int((level < 128 / 255 - 0.05).sum()) >= 3
    assert int((level > 128 / 255 + 0.05).sum()) >= 3
