"""--labeled-fraction and --val-from-train (in-memory data), and how the distillers treat the
unlabelled rows they make: CE only on labelled rows, KD/DKD from the teacher's logits on every
row, GenDD's contraction only where a label exists.

Planted-bug checks (each was run, seen to fail, then removed): averaging CE over the whole batch
instead of the labelled rows fails ``test_labelled_ce_averages_over_labelled_rows_only``;
contracting unlabelled rows towards class 0 (``w[labels.clamp_min(0)]`` without the mask) fails
``test_gendd_contracts_only_labelled_rows``; drawing the labelled subset with a fixed seed instead
of ``--seed`` fails ``test_labelled_fraction_marks_or_drops_the_unlabelled_images``.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gendd_fast.config import make_config
from gendd_fast.data import build_datasets, stratified_pick
from gendd_fast.distill.distillers import DKD, KD, GenDD, labelled_ce, labelled_rows
from gendd_fast.distill.losses import dkd_loss, kd_loss
from gendd_fast.head import DiffLoss


def _cfg(**kw):
    return make_config(**{"dataset": "digits", "image_size": 8, "teacher": "resnet8",
                          "teacher_checkpoint": "x.pt", **kw})


def test_labelled_subset_is_stratified_and_drawn_by_seed():
    labels = np.repeat(np.arange(10), 30)
    a, b, c = (stratified_pick(labels, 0.1, s) for s in (0, 0, 1))
    assert (a == b).all() and not (a == c).all()  # deterministic by seed, different per seed
    assert [int(a[labels == k].sum()) for k in range(10)] == [3] * 10
    assert int(stratified_pick(labels, 0.001, 0).sum()) == 10  # at least one image per class


def test_labelled_fraction_marks_or_drops_the_unlabelled_images():
    full, _, _ = build_datasets(_cfg(method="kd"))
    kd, _, _ = build_datasets(_cfg(method="kd", labeled_fraction=0.1))
    ce, _, _ = build_datasets(_cfg(method="ce", labeled_fraction=0.1))
    n_lab = int((kd.labels >= 0).sum())
    assert len(kd) == len(full) and abs(n_lab - 0.1 * len(full)) <= 10
    assert (kd.labels[kd.labels >= 0] == full.labels[kd.labels >= 0]).all()
    # CE cannot use an unlabelled image: it trains on exactly the labelled ones
    assert len(ce) == n_lab and (ce.labels >= 0).all()
    assert (ce.images == full.images[kd.labels >= 0]).all()
    other, _, _ = build_datasets(_cfg(method="kd", labeled_fraction=0.1, seed=1))
    assert ((other.labels >= 0) != (kd.labels >= 0)).any()  # each seed draws its own subset


def test_val_from_train_is_carved_from_training_images_only():
    full, test, _ = build_datasets(_cfg(method="ce"))
    tr, val, _ = build_datasets(_cfg(method="ce", val_from_train=0.2))
    tr2, val2, _ = build_datasets(_cfg(method="ce", val_from_train=0.2, seed=5))
    assert len(tr) + len(val) == len(full) and abs(len(val) - 0.2 * len(full)) <= 10
    assert (val.images == val2.images).all()  # the same split whatever the student's seed
    key = {im.tobytes() for im in test.images}
    assert not any(im.tobytes() in key for im in val.images)  # the test split is untouched
    assert not val.train and tr.train


@pytest.mark.parametrize("bad,msg", [(dict(labeled_fraction=0.0), "labeled-fraction"),
                                     (dict(labeled_fraction=1.5), "labeled-fraction"),
                                     (dict(val_from_train=1.0), "val-from-train"),
                                     (dict(labeled_fraction=0.5, mixup=0.2), "Mixup")])
def test_bad_fractions_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        _cfg(method="kd", **bad)


def test_labelled_ce_averages_over_labelled_rows_only():
    logits, y = torch.randn(6, 5), torch.tensor([1, -1, 3, -1, -1, 0])
    m = labelled_rows(y)
    assert m.tolist() == [True, False, True, False, False, True]
    torch.testing.assert_close(labelled_ce(logits, y), F.cross_entropy(logits[m], y[m]))
    assert labelled_rows(torch.tensor([1, 2])) is None
    assert float(labelled_ce(logits, torch.full((6,), -1))) == 0.0


class _Student(nn.Module):
    num_features = 8

    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(4, 8), nn.Linear(8, 5)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.fc(self.forward_features(x))


def test_kd_and_dkd_learn_from_unlabelled_rows_through_the_teacher():
    torch.manual_seed(0)
    x, t = torch.randn(6, 4), torch.randn(6, 5) * 3
    y = torch.tensor([1, -1, 3, -1, -1, 0])
    kd = KD(_Student(), T=4.0, alpha=0.1)
    loss, _ = kd(x, y, (None, t))
    s = kd.student(x)
    m = y >= 0
    want = 0.1 * F.cross_entropy(s[m], y[m]) + 0.9 * kd_loss(s, t, 4.0)
    torch.testing.assert_close(loss, want)
    dkd = DKD(_Student(), warmup=0)
    loss, _ = dkd(x, y, (None, t), progress=1.0)
    s = dkd.student(x)
    target = torch.where(m, y, t.argmax(1))  # the teacher's class where no label exists
    want = F.cross_entropy(s[m], y[m]) + dkd_loss(s, t, target, 1.0, 8.0, 4.0)
    torch.testing.assert_close(loss, want)


def test_gendd_contracts_only_labelled_rows():
    teacher_fc = nn.Linear(64, 5)
    g = GenDD(_Student(), teacher_fc, DiffLoss, token_dim=64, width=16, depth=1,
              sampling_steps="4", mul=1, smooth=0.9)
    f_t, y = torch.randn(4, 64), torch.tensor([2, -1, 0, -1])
    got = g.contract(f_t, y)
    w = teacher_fc.weight
    torch.testing.assert_close(got[0], 0.1 * f_t[0] + 0.9 * w[2])
    torch.testing.assert_close(got[2], 0.1 * f_t[2] + 0.9 * w[0])
    torch.testing.assert_close(got[[1, 3]], f_t[[1, 3]])  # unlabelled: the teacher's feature
    torch.testing.assert_close(g.contract(f_t, torch.full((4,), -1)), f_t)
    # CE of the linear probe on the labelled row only
    x, y = torch.randn(4, 4), torch.tensor([-1, -1, -1, 3])
    _, parts = g(x, y, (f_t, None))
    logits = g.student.fc(g.student.forward_features(x))
    torch.testing.assert_close(parts["ce"], F.cross_entropy(logits[3:], y[3:]))
