"""IKL-KD (Cui et al., NeurIPS 2024) against the paper's formula, computed independently in
float64 over every class pair, and the distiller's class-wise prior and warm-up."""
import math

import pytest
import torch
import torch.nn.functional as F

from gendd_fast.distill import IKL, ikl_loss
from gendd_fast.models import create_model
from gendd_fast.train import train
from helpers import read_metrics, save_teacher, tiny_config


def ikl_by_formula(s, t, w, alpha, beta, T):
    """beta/4 sum_{j,k} w_j w_k (dt_jk - ds_jk)^2 + alpha CE(softmax(t/T), softmax(s/T)),
    per sample, with the (K, K) difference matrices built explicitly, then the batch mean."""
    s, t, w = s.double(), t.double(), w.double()
    total = 0.0
    for i in range(s.shape[0]):
        dt = t[i][:, None] - t[i][None, :]
        ds = s[i][:, None] - s[i][None, :]
        wmse = 0.25 * (w[i][:, None] * w[i][None, :] * (dt - ds) ** 2).sum()
        p_t = torch.exp(t[i] / T - torch.logsumexp(t[i] / T, 0))
        log_p_s = s[i] / T - torch.logsumexp(s[i] / T, 0)
        total = total + beta * wmse - alpha * (p_t * log_p_s).sum()
    return total / s.shape[0]


def _rand(b=6, k=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, generator=g) * 3
    t = torch.randn(b, k, generator=g) * 3
    w = torch.softmax(torch.randn(b, k, generator=g) * 2, 1)
    return s, t, w


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.5), (4.0, 1.0), (0.0, 1.0)])
def test_ikl_loss_matches_the_formula(T, alpha, beta):
    s, t, w = _rand(seed=int(T * 10 + alpha))
    got, _, _ = ikl_loss(s, t, w, alpha, beta, T)
    want = ikl_by_formula(s, t, w, alpha, beta, T)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-5)


def test_ikl_loss_with_identical_logit_classes():
    """Classes whose logits coincide (in the student, the teacher, or both) contribute zero
    pairwise differences; the loss must still match the formula and stay finite."""
    s, t, w = _rand(b=5, k=9, seed=3)
    s[:, 1:4] = s[:, :1]          # student: classes 0..3 identical
    t[:, 5:9] = t[:, 5:6]         # teacher: classes 5..8 identical
    s[2] = 0.7                    # one sample with all student logits equal
    t[3] = s[3]                   # one sample where student == teacher
    s.requires_grad_(True)
    got, wmse, _ = ikl_loss(s, t, w, 1.0, 0.5, 1.0)
    torch.testing.assert_close(got.double(), ikl_by_formula(s.detach(), t, w, 1.0, 0.5, 1.0),
                               rtol=2e-5, atol=1e-5)
    got.backward()
    assert torch.isfinite(s.grad).all()
    # student == teacher everywhere: the weighted MSE vanishes exactly
    _, wmse, _ = ikl_loss(t, t, w, 1.0, 0.5, 1.0)
    assert float(wmse) == 0.0


def test_ikl_gradient_matches_the_formula():
    s, t, w = _rand(b=4, k=7, seed=5)
    s1 = s.clone().requires_grad_(True)
    ikl_loss(s1, t, w, 1.0, 0.5, 2.0)[0].backward()
    s2 = s.double().clone().requires_grad_(True)
    ikl_by_formula(s2, t, w, 1.0, 0.5, 2.0).backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)


def _teacher_logits(k=5, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g) * 2, torch.randint(0, k, (b,), generator=g)


def test_ikl_global_information_prior_is_the_previous_epochs_class_mean():
    k = 5
    d = IKL(create_model("resnet8", k), k, alpha=1.0, beta=0.5, T=1.0, T2=2.0, gi=True)
    x = torch.randn(8, 3, 16, 16)
    batches = [_teacher_logits(k, seed=i) for i in range(3)]
    # epoch 0: three steps (progress 1/3, 2/3, 1); the prior is not ready yet
    for step, (t, y) in enumerate(batches, 1):
        w = d.class_weights(t, F.one_hot(y, k).float(), step / 3)
        torch.testing.assert_close(w, torch.softmax(t / 2.0, 1))  # own teacher probabilities
    # first step of epoch 1: the prior is the class mean of softmax(t / T2) over epoch 0
    t_all = torch.cat([b[0] for b in batches]).double()
    y_all = torch.cat([b[1] for b in batches])
    t_new, y_new = _teacher_logits(k, seed=9)
    w = d.class_weights(t_new, F.one_hot(y_new, k).float(), 1 + 1 / 3)
    for i in range(len(y_new)):
        c = int(y_new[i])
        members = torch.softmax(t_all[y_all == c] / 2.0, 1)
        want = members.mean(0) if len(members) else torch.softmax(t_new[i].double() / 2.0, 0)
        torch.testing.assert_close(w[i].double(), want, rtol=1e-5, atol=1e-6)
    # soft labels mix the class rows
    y_soft = torch.zeros(1, k)
    y_soft[0, int(y_all[0])], y_soft[0, int(y_all[1])] = 0.3, 0.7
    w_soft = d.class_weights(t_new[:1], y_soft, 1 + 2 / 3)
    want = 0.3 * d.prior[int(y_all[0])] + 0.7 * d.prior[int(y_all[1])]
    if int(y_all[0]) == int(y_all[1]):
        want = d.prior[int(y_all[0])]
    torch.testing.assert_close(w_soft[0], want)
    _ = x


def test_ikl_forward_warmup_and_parts():
    k = 4
    torch.manual_seed(0)
    d = IKL(create_model("resnet8", k), k, alpha=1.0, beta=0.5, T=1.0, T2=1.0, gi=False,
            warmup=2.0, ce_weight=1.0)
    x = torch.randn(6, 3, 16, 16)
    y = torch.randint(0, k, (6,))
    t = torch.randn(6, k)
    loss, parts = d(x, y, (None, t), progress=0.5)
    logits = d.student(x)
    want = 0.25 * ikl_by_formula(logits.detach(), t, torch.softmax(t, 1), 1.0, 0.5, 1.0) \
        + F.cross_entropy(logits.detach().double(), y)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"ikl", "wmse", "sce", "ce"}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    path, _ = save_teacher(tmp_path_factory.mktemp("teacher"))
    return path


def test_ikl_trains_end_to_end_and_resumes_its_prior(tmp_path, teacher_ckpt):
    cfg = tiny_config(tmp_path, "ikl", teacher_ckpt, epochs=3, sample_eval="never")
    train(cfg)
    losses = [r["loss"] for r in read_metrics(cfg.output)]
    assert all(math.isfinite(v) for v in losses) and len(losses) == 12
    state = torch.load(f"{cfg.output}/last.pt", weights_only=False)
    # epochs 0 and 1 have rolled into the prior: every class seen, rows are distributions
    assert bool(state["extra"]["prior_seen"].all())
    torch.testing.assert_close(state["extra"]["prior"].sum(1), torch.ones(4))
    assert int(state["extra"]["prior_epoch"]) == 2


def test_kd_without_labels_is_the_kl_baseline(tmp_path, teacher_ckpt):
    """--method kd --labels false: teacher soft targets only, no CE, labels never read."""
    from gendd_fast.distill import KD, kd_loss
    torch.manual_seed(0)
    d = KD(create_model("resnet8", 4), T=4.0, alpha=0.1, labels=False)
    x, t = torch.randn(5, 3, 16, 16), torch.randn(5, 4)
    unlabelled = torch.full((5,), -1)
    loss, parts = d(x, unlabelled, (None, t))
    torch.testing.assert_close(loss, kd_loss(d.student(x), t, 4.0))
    assert set(parts) == {"kd"}
    for method in ("dkd", "gendd-pretrain"):
        with pytest.raises(ValueError, match="needs labels"):
            tiny_config(tmp_path, method, teacher_ckpt, labels=False)
    cfg = tiny_config(tmp_path, "kd", teacher_ckpt, labels=False, epochs=1)
    train(cfg)
    assert "ce" not in read_metrics(cfg.output)[-1]


@pytest.mark.parametrize("method,aug", [("ikl", {}),
                                        ("gendd", dict(randaug="rand-m7-n2-mstd0.5",
                                                       mixup=0.2, cutmix=1.0,
                                                       label_smoothing=0.1, beta=0.0))])
def test_resume_is_exact_with_the_prior_and_batch_augmentation(tmp_path, teacher_ckpt, method,
                                                              aug):
    """Stopping mid-epoch 2 and resuming gives the uninterrupted run's weights and IKL prior
    bit for bit (the class-mean accumulators and the batch augmentation draws included)."""
    import dataclasses
    from gendd_fast import checkpoint as ckpt_io
    straight = tiny_config(tmp_path / "a", method, teacher_ckpt, epochs=3, sample_eval="never",
                           **aug)
    train(straight)
    first = tiny_config(tmp_path / "b", method, teacher_ckpt, epochs=3, max_steps=6,
                        sample_eval="never", **aug)
    train(first)
    train(dataclasses.replace(first, max_steps=0, resume="auto"))
    a = ckpt_io.join_state(torch.load(f"{straight.output}/last.pt", weights_only=False))
    b = ckpt_io.join_state(torch.load(f"{first.output}/last.pt", weights_only=False))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


_PRIOR_WORKER = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_ikl import ikl_prior_after_one_epoch
from gendd_fast.distributed import init_distributed, shutdown
env = init_distributed("cpu")
torch.save(ikl_prior_after_one_epoch(env.rank, env.world), {out!r} + str(env.rank))
shutdown()
"""


def ikl_prior_after_one_epoch(rank=0, world=1, k=5, steps=4):
    """The IKL prior at the first step of epoch 1, after this rank's share of epoch 0: step j's
    batch of 8 is split over ``world`` ranks as a sampler would (rank r: rows r, r + world...)."""
    d = IKL(torch.nn.Linear(2, k), k, T2=2.0, gi=True)
    for j in range(steps):
        t, y = _teacher_logits(k, seed=100 + j)
        d.class_weights(t[rank::world], F.one_hot(y[rank::world], k).float(), (j + 1) / steps)
    t, y = _teacher_logits(k, seed=999)
    d.class_weights(t, F.one_hot(y, k).float(), 1 + 1 / steps)   # rolls the epoch
    return {"prior": d.prior.clone(), "seen": d.prior_seen.clone()}


def test_two_process_ikl_prior_equals_one_process(tmp_path):
    """The class-wise prior is a mean over the whole epoch's images, all ranks together: two
    gloo processes, each with half of every batch, end epoch 0 with the one-process prior.
    Planted: the class accumulators not all-reduced across ranks -> fails."""
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    one = ikl_prior_after_one_epoch()
    half = ikl_prior_after_one_epoch(0, 2)
    assert not torch.allclose(half["prior"], one["prior"])   # a rank alone sees another mean
    script, out = tmp_path / "worker.py", str(tmp_path / "prior")
    script.write_text(_PRIOR_WORKER.format(tests=here, out=out))
    from helpers import run_two_gloo_ranks
    run_two_gloo_ranks(script)
    for r in range(2):
        got = torch.load(out + str(r), weights_only=True)
        assert torch.equal(got["seen"], one["seen"]), r
        torch.testing.assert_close(got["prior"], one["prior"], rtol=1e-6, atol=1e-7)
