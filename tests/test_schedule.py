"""The learning-rate schedules, the beta2 ramp and the weight-decay groups, against values worked
out by hand from the public code's formulas, on inputs where the plausible wrong versions differ."""
import math
import os

import pytest
import torch

from gendd_fast.config import make_config
from gendd_fast.optim import LRSchedule, build_optimizer, decays, param_groups
from gendd_fast.train import train
from helpers import save_teacher, tiny_config


def sched(**kw):
    base = dict(method="ce", epochs=10, lr=1.0, min_lr=0.0, warmup_epochs=0, sched="cos")
    base.update(kw)
    return LRSchedule(make_config(**base), steps_per_epoch=4)


def test_warmup_starts_above_zero_and_reaches_the_peak():
    s = sched(warmup_epochs=2, sched="step", decay_epochs=[8])  # 8 warm-up steps
    assert s(0) == pytest.approx(1 / 8)        # not 0: the first step already trains
    assert s(7) == pytest.approx(1.0)          # the last warm-up step is at the peak
    assert s(8) == pytest.approx(1.0)          # and the peak holds after it (paper's intent)
    assert s(3) == pytest.approx(4 / 8)


def test_cosine_ends_at_a_positive_min_lr():
    s = sched(min_lr=0.1, warmup_epochs=1)     # 40 steps, 4 of warm-up
    assert s(4) == pytest.approx(1.0)
    mid = 4 + 18
    assert s(mid) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(40) == pytest.approx(0.1)         # min_lr, not 0
    assert s(39) > 0.1


def test_per_epoch_cosine_is_the_reference_formula():
    """lr(e) = lr (e+1)/W for e < W, then min + (lr - min)(1 + cos(pi (e - W + 1)/(E - W)))/2."""
    s = sched(sched="cos-epoch", warmup_epochs=2, min_lr=1e-6)   # E = 10, W = 2, 4 steps/epoch
    want = {0: 0.5, 1: 1.0}
    for e in range(2, 10):
        want[e] = 1e-6 + (1 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (e - 1) / 8))
    for e, v in want.items():
        for i in range(4):                      # constant within the epoch
            assert s(4 * e + i) == pytest.approx(v, abs=1e-12), (e, i)
    assert s(4 * 9) == pytest.approx(1e-6)      # the last epoch runs at min_lr
    assert s(4 * 2) < 1.0                       # the first cosine epoch is already below the peak


def test_step_decay_boundaries_are_the_reference_epochs():
    """Reference: lr x0.1 once epoch (1-based) > 150, i.e. from the 151st epoch (0-based 150)."""
    s = sched(sched="step", epochs=8, decay_epochs=[3, 5], decay_rate=0.1)
    assert s(4 * 3 - 1) == pytest.approx(1.0)   # last step of the 3rd epoch
    assert s(4 * 3) == pytest.approx(0.1)       # first step of the 4th epoch
    assert s(4 * 5 - 1) == pytest.approx(0.1)
    assert s(4 * 5) == pytest.approx(0.01)


def test_beta2_cosine_ramp_start_quarter_middle_end():
    s = sched(epochs=5, betas=[0.9, 0.95], beta2_end=0.999)   # 20 steps: last is 19
    assert s.beta2(0) == pytest.approx(0.95)
    q = 0.999 - 0.5 * 0.049 * (1 + math.cos(math.pi * 0.25))  # cosine, not linear, ramp
    assert s.beta2(19 * 0.25) == pytest.approx(q)
    assert s.beta2(9.5) == pytest.approx((0.95 + 0.999) / 2)
    assert s.beta2(19) == pytest.approx(0.999)  # reached on the last step, not after it
    assert sched(epochs=5, betas=[0.9, 0.95]).beta2(19) == 0.95   # no ramp: constant


def test_apply_sets_every_group_and_the_state_restores():
    cfg = make_config(method="ce", epochs=3, lr=0.5, betas=[0.9, 0.96], beta2_end=0.999,
                      warmup_epochs=1, sched="cos-epoch", min_lr=1e-3)
    s = LRSchedule(cfg, 5)
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))]},
                             {"params": [torch.nn.Parameter(torch.zeros(2))]}], betas=(0.9, 0.5))
    lr, b2 = s.apply(opt, 7)
    assert all(g["lr"] == lr and g["betas"] == (0.9, b2) for g in opt.param_groups)
    # a schedule built from other settings continues the saved one once its state is loaded
    other = LRSchedule(make_config(method="ce", epochs=9, lr=0.1, betas=[0.9, 0.9],
                                   beta2_end=0.99, sched="step"), 2)
    other.load_state_dict(s.state_dict())
    for step in (0, 3, 7, 14):
        assert (other(step), other.beta2(step)) == (s(step), s.beta2(step))


def test_trainer_applies_the_ramp_and_saves_it(tmp_path):
    """8 steps: the optimizer's beta2 at the saved (last) step is the ramp's end value."""
    cfg = tiny_config(tmp_path, "ce", epochs=2, betas=[0.9, 0.95], beta2_end=0.999,
                      sched="cos-epoch", min_lr=1e-4, warmup_epochs=1)
    train(cfg)
    state = torch.load(os.path.join(cfg.output, "last.pt"), weights_only=False)
    assert [g["betas"][1] for g in state["optimizer"]["param_groups"]] == \
        pytest.approx([0.999, 0.999])
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([1e-4, 1e-4])
    assert state["schedule"]["beta2_end"] == 0.999


def test_weight_decay_groups_by_name_as_the_reference(tmp_path):
    """Undecayed: names containing 'diffloss' or 'ln' only; BN, biases, the condition
    LayerNorm (cls_projector.0) and the student's fc are decayed."""
    from gendd_fast.build import build_method
    teacher, _ = save_teacher(tmp_path)
    cfg = tiny_config(tmp_path, "gendd", teacher).resolved()
    distiller, _ = build_method(cfg, 4, torch.device("cpu"))
    decayed, plain = param_groups(distiller, 0.05)
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in distiller.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert plain_names == {n for n, p in distiller.named_parameters()
                           if n.startswith("diffloss.") and p.requires_grad}
    assert {"cls_projector.0.weight", "cls_projector.0.bias", "student.bn1.weight",
            "student.bn1.bias", "student.fc.bias"} <= decayed_names
    assert not any(n.startswith("teacher_fc.") for n in decayed_names | plain_names)  # frozen
    assert not decays("diffloss.net.final_layer.linear.bias") and not decays("x.in_ln.weight")
    opt = build_optimizer(cfg, distiller, torch.device("cpu"))
    assert [len(g["params"]) for g in opt.param_groups] == [len(decayed["params"]),
                                                             len(plain["params"])]
