"""The reference's augmentations: timm's RandAugment per image (mean fill, the policy's op set)
and timm's Mixup/CutMix/label smoothing per batch, exact replay for resume, and soft labels
reaching the distillers. DALI's GPU RandAugment against timm: test_dali.py and tests_gpu/."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

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


def _timm():
    import importlib
    from gendd_fast.models.external import import_source
    import_source("timm", "test")
    return importlib.import_module("timm")


def test_randaugment_is_timms_per_image_with_mean_fill_and_its_hparams():
    """Each training image goes through timm's own rand_augment_transform with the hparams
    timm's create_transform sets (translate 0.45 x size, mean-colour fill), Python/NumPy
    seeded from the image's key. Planted bugs checked: a grey fill (128, timm's default)
    instead of the mean failed the hparams assertion; crossing the seeds (the crop's stream)
    failed the pixel comparison."""
    timm = _timm()
    ra = A.RandAugmentPerImage("rand-m9-n3-mstd0.5", 24, "imagenet")
    assert ra.hparams == dict(translate_const=10, img_mean=(124, 116, 104))
    want_t = timm.data.auto_augment.rand_augment_transform("rand-m9-n3-mstd0.5", dict(ra.hparams))
    names = sorted(op.name for op in ra.transform.ops)
    assert names == sorted(op.name for op in want_t.ops)  # timm's op set for the policy
    assert "Invert" in names and "SolarizeAdd" in names  # the default, not 'increasing', set
    inc = A.RandAugmentPerImage("rand-m9-n3-mstd0.5-inc1", 24, "imagenet")
    assert "PosterizeIncreasing" in {op.name for op in inc.transform.ops}
    differed = 0
    for seed, arr in enumerate(_images(n=6, h=24, w=24)):
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        got = ra(x, seed)
        with A.seeded_globals(seed * 2 + 1):
            want = np.asarray(want_t(_pil(arr)))
        assert torch.equal(got, torch.from_numpy(want.copy()).permute(2, 0, 1))
        assert torch.equal(ra(x, seed), got)  # a function of the key alone
        differed += not torch.equal(got, x)
    assert differed >= 4
    state = (random.getstate(), np.random.get_state()[1].copy())
    ra(x, 5)
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()


def test_mixup_cutmix_are_timms_and_replay_from_the_batch_key():
    timm = _timm()
    x, lab = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 1, 0])
    mix = A.BatchMixer(4, mixup=0.8, cutmix=1.0, switch_prob=0.5, smoothing=0.1)
    ref = timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode="batch",
                          label_smoothing=0.1, num_classes=4)
    for seed in range(4):
        got_x, got_y = mix(x, lab, seed)
        with A.seeded_globals(seed):
            want_x, want_y = ref(x.clone(), lab)
        assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
        assert not torch.equal(got_x, x)
    torch.testing.assert_close(got_y.sum(1), torch.ones(6))
    un_x, un_y = mix(x, torch.full((6,), -1), 0)  # unlabelled: mixed, labels kept
    assert torch.equal(un_y, torch.full((6,), -1)) and not torch.equal(un_x, x)
    with pytest.raises(ValueError, match="must be even"):
        mix(x[:5], lab[:5], 0)
    smooth = A.BatchMixer(5, smoothing=0.1)(x, torch.tensor([2, 0, 1, 1, 1, 1]), 0)[1]
    assert smooth[0, 2] == pytest.approx(0.92) and smooth[0, 0] == pytest.approx(0.02)


def test_augmentation_comes_before_normalising_one_way():
    """RandAugment alone: no batch wrapper, and each batch is the normalised augmented uint8
    images (no normalise -> un-normalise -> normalise round trip)."""
    from gendd_fast.data.loader import DeviceNormalizer
    cfg = _aug_cfg(mixup=0.0, cutmix=0.0, label_smoothing=0.0, batch_size=8)
    loaders = build_loaders(cfg, 0, 1, torch.device("cpu"))
    assert not isinstance(loaders.train, A.BatchAugmentLoader)
    ds, sampler = loaders.train.dataset, loaders.train.sampler
    assert isinstance(ds.augment, A.RandAugmentPerImage)
    assert getattr(loaders.val.dataset, "augment", None) is None  # evaluation: never
    loaders.train.set_epoch(0)
    x, _ = next(iter(loaders.train))
    keys = list(iter(sampler))[:8]
    raw = torch.stack([ds[k][0] for k in keys])
    torch.testing.assert_close(x, DeviceNormalizer(cfg.dataset, torch.device("cpu"), False)(raw))


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
    """Mixup/CutMix mix the normalised batch, and what the trainer gets is still normalised:
    un-normalised, every value lies in [0, 1], and the many black pixels of the input (0 ->
    -mean/std, about -1.9 for CIFAR-100) are still there as negatives.
    Planted: the augmented batch returned un-normalised -> fails (no value below -1.5)."""
    g = torch.Generator().manual_seed(0)
    x01 = (torch.rand(64, 3, 12, 12, generator=g) * 1.6 - 0.3).clamp(0, 1)  # 19% exact zeros
    out, back = _augmented(x01, mixup=0.8, cutmix=1.0)
    assert back.min() >= -1e-4 and back.max() <= 1 + 1e-4
    assert float((out < -1.5).float().mean()) > 0.05
    assert not torch.allclose(back, x01, atol=1e-3)   # it did augment


def test_rand_augment_draws_both_signs_of_a_signed_op():
    """Signed ops (the "increasing" set's brightness, rotation, shear...) take a random sign: on
    mid-grey images BrightnessIncreasing at m9 scales the level by 1 +- 0.81, so over per-image
    seeds some images come out far darker (about 24) and some far brighter (about 232).
    Planted: the sign always +1 (timm's _randomly_negate returning its input) -> fails (no
    image gets darker)."""
    ra = A.RandAugmentPerImage("rand-m9-n2-mstd0-inc1", 4, "synthetic")
    grey = torch.full((3, 4, 4), 128, dtype=torch.uint8)
    level = torch.stack([ra(grey, seed).float().mean() for seed in range(400)])
    assert int((level < 64).sum()) >= 3
    assert int((level > 192).sum()) >= 3


def test_zero_bit_posterize_gives_black_as_the_reference_did():
    """timm's PosterizeIncreasing at level 10 keeps 0 bits, which Pillow 13 refuses; the
    reference's Pillow gave a black image. Planted bug checked: without the replacement
    _posterize this raised ValueError('bits must be between ... 1 and 8')."""
    ra = A.RandAugmentPerImage("rand-m10-n1-inc1", 16, "imagenet")
    op = next(o for o in ra.transform.ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude_std = 1.0, 0.0
    out = np.asarray(op(_pil(_images(n=1, h=16, w=16)[0])))
    assert out.max() == 0
    from PIL import ImageOps
    img = _pil(_images(n=1, h=16, w=16)[0])
    assert np.array_equal(np.asarray(A._posterize(img, 3)),
                          np.asarray(ImageOps.posterize(img, 3)))
