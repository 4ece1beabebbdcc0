"""Tests that pin behaviours a mutation run showed the rest of the suite does not pin.

Each test is built so that a specific, realistic wrong version gives a clearly different number:
inputs where the wrong and right formulas disagree (rows of tiny variance for LayerNorm, labels
ranked 2nd to 5th for top-5, uneven shards for the cross-rank sum), distributions checked with
bounds of a few standard deviations, and tolerances relative to each value's own scale.
Each docstring names the planted bugs ("Planted:") the test was run against and failed on.
"""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from gendd_fast import DiffLoss, FusedDiffLoss
from gendd_fast.diffusion import create_diffusion
from gendd_fast.distill import DKD, dkd_loss
from gendd_fast.distill.distillers import Distiller
from gendd_fast.evaluate import evaluate
from gendd_fast.head import NUM_TRAIN_TIMESTEPS, draw_row_randomness
from gendd_fast.kernels import adaln_block as blk
from gendd_fast.kernels.diffusion_loss import loss_tables
from gendd_fast.kernels.final_layer import final_layer, final_layer_reference
from gendd_fast.kernels.layernorm import ln_stats
from gendd_fast.kernels.noise_injection import noise_injection

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def rel_close(got, want, tol, name=""):
    """Elementwise |got - want| <= tol * |want| (+ a floor far below any value compared)."""
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err = (got - want).abs() / (want.abs() + 1e-30)
    worst = err.max().item()
    assert worst <= tol, f"{name}: relative error {worst:.2e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------
# Evaluation: top-5 and the cross-rank reduction
# ---------------------------------------------------------------------------------------------
class FixedLogits(Distiller):
    """Serves prepared logits batch by batch; the 'sample_' logits rank the label differently."""

    def __init__(self, logits, sample_logits=None):
        super().__init__(nn.Identity())
        self.batches, self.sample_batches = list(logits), list(sample_logits or [])

    @torch.no_grad()
    def eval_logits(self, images, autocast, sample=False, **_):
        out = {"": self.batches.pop(0)}
        if sample:
            out["sample_"] = self.sample_batches.pop(0)
        return out


def logits_with_label_rank(labels, ranks, K, gen):
    """Logits (n, K) in which ``labels[i]`` is the ``ranks[i]``-th largest (1 = top)."""
    rows = []
    for y, r in zip(labels.tolist(), ranks.tolist()):
        vals = torch.sort(torch.rand(K, generator=gen) * 10 + 1, descending=True).values
        others = [c for c in torch.randperm(K, generator=gen).tolist() if c != y]
        order = others[: r - 1] + [y] + others[r - 1:]
        row = torch.empty(K)
        row[torch.tensor(order)] = vals
        rows.append(row)
    return torch.stack(rows)


def test_top5_counts_labels_ranked_second_to_fifth_and_not_sixth():
    """Planted: top-5 computed as top-1; top-4 / top-6 windows; the sampled logits scored
    with the probe's hits."""
    gen = torch.Generator().manual_seed(3)
    K, n = 10, 40
    labels = torch.randint(0, K, (n,), generator=gen)
    ranks = torch.tensor([1, 2, 3, 4, 5, 6, 7, 10] * 5)
    s_ranks = torch.roll(ranks, 3)  # a different mix of ranks for the sampled logits
    lg = logits_with_label_rank(labels, ranks, K, gen)
    slg = logits_with_label_rank(labels, s_ranks, K, gen)
    for i in range(n):  # the construction itself
        assert int((lg[i] > lg[i, labels[i]]).sum()) + 1 == ranks[i]
    loader = [(torch.zeros(8, 1), labels[i:i + 8]) for i in range(0, n, 8)]
    model = FixedLogits(lg.split(8), slg.split(8))
    res = evaluate(model, loader, torch.device("cpu"), sample=True)
    assert res["n"] == n
    assert res["top1"] == pytest.approx(100.0 * (ranks == 1).sum().item() / n)
    assert res["top5"] == pytest.approx(100.0 * (ranks <= 5).sum().item() / n)
    assert res["sample_top1"] == pytest.approx(100.0 * (s_ranks == 1).sum().item() / n)
    assert res["sample_top5"] == pytest.approx(100.0 * (s_ranks <= 5).sum().item() / n)


def test_top5_with_fewer_than_five_classes_is_every_image():
    """With K < 5 classes every label is within the top K: top-5 is 100, top-1 is not."""
    y = torch.tensor([0, 1, 2, 2])
    lg = torch.tensor([[3.0, 2, 1], [3.0, 2, 1], [3.0, 2, 1], [1.0, 2, 3]])
    res = evaluate(FixedLogits([lg]), [(torch.zeros(4, 1), y)], torch.device("cpu"))
    assert res["top1"] == pytest.approx(50.0) and res["top5"] == pytest.approx(100.0)


_WORKER = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_mutation_guards import eval_fixture
from gendd_fast.distributed import init_distributed, shutdown
from gendd_fast.evaluate import evaluate
env = init_distributed("cpu")
model, shards = eval_fixture({ckpt!r})
res = evaluate(model, shards[env.rank], env.device, sample=True)
json.dump(res, open({out!r} + str(env.rank), "w"))
shutdown()
"""


class LinearStudent(Distiller):
    """A tiny real model: linear-probe logits and a second, different 'sampled' head."""

    def __init__(self):
        super().__init__(nn.Linear(6, 7))
        self.other = nn.Linear(6, 7)

    @torch.no_grad()
    def eval_logits(self, images, autocast, sample=False, **_):
        out = {"": self.student(images)}
        if sample:
            out["sample_"] = self.other(images)
        return out


def eval_fixture(checkpoint=None):
    """The model (from ``checkpoint`` when given) and the same images in every process; rank 0
    gets 13 images, rank 1 gets 7."""
    torch.manual_seed(11)
    model = LinearStudent()
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
    torch.manual_seed(12)
    x, y = torch.randn(20, 6), torch.randint(0, 7, (20,))
    shard = lambda a, b: [(x[i:min(i + 4, b)], y[i:min(i + 4, b)]) for i in range(a, b, 4)]
    return model, [shard(0, 13), shard(13, 20)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_evaluation_equals_single_process(tmp_path):
    """The same checkpoint scored by two gloo processes and by one.
    Planted: hit counts not all-reduced (n still is); neither reduced; top-5 not reduced."""
    model, shards = eval_fixture()
    with torch.no_grad():
        for p in model.parameters():  # not the seeded init the workers would get anyway
            p.add_(torch.randn(p.shape))
    ckpt = str(tmp_path / "model.pt")
    torch.save(model.state_dict(), ckpt)
    whole = evaluate(model, shards[0] + shards[1], torch.device("cpu"), sample=True)
    alone = evaluate(model, shards[0], torch.device("cpu"), sample=True)
    # the fixture is informative: rank 0's own shard scores differently from the whole set
    for k in ("top1", "top5", "sample_top1", "sample_top5"):
        assert alone[k] != pytest.approx(whole[k]), k
    script = tmp_path / "worker.py"
    out = str(tmp_path / "res")
    script.write_text(_WORKER.format(tests=HERE, out=out, ckpt=ckpt))
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, e in zip(procs, errs):
        assert p.returncode == 0, e[-2000:]
    for r in range(2):
        got = json.load(open(out + str(r)))
        assert got["n"] == 20
        for k in ("top1", "top5", "sample_top1", "sample_top5"):
            assert got[k] == pytest.approx(whole[k], rel=1e-12), (r, k)


# ---------------------------------------------------------------------------------------------
# LayerNorm inside the kernels: eps and the rsqrt form, on rows of tiny variance
# ---------------------------------------------------------------------------------------------
def tiny_variance_rows(n, W, gen):
    """Row variances from 0 to 1e-4 (eps is 1e-6): where 1/(sqrt(var)+eps), another eps or a
    biased mean all give different numbers from rsqrt(var + eps)."""
    spread = torch.tensor([0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    spread = spread[torch.arange(n) % len(spread)]
    off = torch.randn(n, 1, generator=gen) * 0.5
    return off + spread[:, None] * torch.randn(n, W, generator=gen)


def test_ln_stats_rsqrt_of_var_plus_eps_on_tiny_variance_rows():
    """Planted: eps 1e-5 / 1e-6 dropped; 1/(sqrt(var)+eps); unbiased variance."""
    gen = torch.Generator().manual_seed(5)
    h = tiny_variance_rows(30, 80, gen)
    mean, rstd = ln_stats(h, 1e-6)
    hd = h.double()
    var = hd.var(1, unbiased=False)
    rel_close(mean, hd.mean(1), 1e-5, "mean")  # |mean| ~ 0.5: fp32 summation error is far less
    rel_close(rstd, torch.rsqrt(var + 1e-6), 1e-3, "rstd")


def blk_inputs(n, W):
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g)
    mods = [r(n, W) * 0.5 for _ in range(3)]
    w0, w2 = (r(W, W) / W ** 0.5 for _ in range(2))
    return [r(n, W), *mods, 1 + 0.1 * r(W), 0.1 * r(W), w0, 0.1 * r(W), w2, 0.1 * r(W)]


HEAD_LN_EPS = 1e-6  # the method's in_ln / norm_final eps, written out: not read from the code


def block_by_hand(h, shift, scale, gate, ln_w, ln_b, w0, b0, w2, b2):
    F = torch.nn.functional
    u = F.layer_norm(h, (h.shape[1],), ln_w, ln_b, HEAD_LN_EPS) * (1 + scale) + shift
    return h + gate * F.linear(F.silu(F.linear(u, w0, b0)), w2, b2)


def final_by_hand(h, shift, scale, w, b):
    F = torch.nn.functional
    return F.linear(F.layer_norm(h, (h.shape[1],), None, None, HEAD_LN_EPS) * (1 + scale)
                    + shift, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adaln_block_and_final_layer_on_tiny_variance_rows(dtype):
    """The LN of both fused layers, forward and backward, where eps matters, against an
    independent formula with eps 1e-6. Planted: LN_EPS 1e-5 (kernel and its reference agree,
    so only this catches it); ln_stats called with another eps; the rsqrt form."""
    gen = torch.Generator().manual_seed(6)
    n, W = 18, 64
    inputs = blk_inputs(n, W)
    inputs[0] = tiny_variance_rows(n, W, gen).to(dtype)
    inputs[1:4] = [m.to(dtype) for m in inputs[1:4]]
    inputs = [x.requires_grad_(True) for x in inputs]
    g = torch.randn(n, W, generator=gen).to(dtype)
    tol = 1e-3 if dtype == torch.float32 else 3e-2

    def rows_close(got, want, name):  # each row against its own scale
        got, want = got.float(), want.float()
        scale = want.abs().amax(1, keepdim=True).clamp_min(1e-6)
        err = ((got - want).abs() / scale).max().item()
        assert err <= tol, f"{name}: row-relative error {err:.2e} > {tol:.0e}"

    out = blk.adaln_block(*inputs)
    (dh,) = torch.autograd.grad(out, inputs[0], g)
    ref = block_by_hand(*[x.float() for x in inputs])
    (rdh,) = torch.autograd.grad(ref, inputs[0], g.float())
    # h' = h + gate * v: compare the update, not h (which would hide v)
    rows_close(out.float() - inputs[0].float(), ref - inputs[0].float(), "block update")
    rows_close(dh.float() - g.float(), rdh - g.float(), "block dh through LN")

    h, sh, sc = inputs[0], inputs[1], inputs[2]
    w, b = torch.randn(24, W, generator=gen), torch.randn(24, generator=gen)
    fo = final_layer(h, sh, sc, w, b)
    gf = torch.randn(n, 24, generator=gen)
    (fdh,) = torch.autograd.grad(fo, h, gf)
    fr = final_by_hand(h.float(), sh.float(), sc.float(), w, b)
    (frdh,) = torch.autograd.grad(fr, h, gf)
    rows_close(fo, fr, "final out")
    rows_close(fdh, frdh, "final dh")


def test_head_layernorms_use_the_method_eps_on_tiny_variance_rows():
    """The reference head's LayerNorms (in_ln, norm_final) on rows where eps 1e-5 and 1e-6
    differ. Planted: nn.LayerNorm(eps=1e-5) in the head."""
    head = DiffLoss(8, 6, 2, 32, "4", 2)
    gen = torch.Generator().manual_seed(8)
    x = tiny_variance_rows(12, 32, gen)
    y = torch.randn(12, 32, generator=gen)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        blk0, fl = head.net.res_blocks[0], head.net.final_layer
        sh, sc, ga = blk0.adaLN_modulation(y).chunk(3, dim=-1)
        want = block_by_hand(x, sh, sc, ga, blk0.in_ln.weight, blk0.in_ln.bias,
                             blk0.mlp[0].weight, blk0.mlp[0].bias, blk0.mlp[2].weight,
                             blk0.mlp[2].bias)
        rel = ((blk0(x, y) - want).abs().amax(1) / (want - x).abs().amax(1)).max().item()
        assert rel < 1e-4, rel
        fsh, fsc = fl.adaLN_modulation(y).chunk(2, dim=-1)
        want = final_by_hand(x, fsh, fsc, fl.linear.weight, fl.linear.bias)
        rel = ((fl(x, y) - want).abs().amax(1) / want.abs().amax(1)).max().item()
        assert rel < 1e-4, rel


# ---------------------------------------------------------------------------------------------
# Noise injection: the gradient with respect to eps
# ---------------------------------------------------------------------------------------------
def test_noise_injection_gradients_for_x0_and_eps():
    """Planted: d eps = g * sqrt(abar); d eps = g; d x0 and d eps swapped."""
    diff = create_diffusion("")
    tab = loss_tables(diff, "cpu")
    sa, s1a = tab[:, 0].contiguous(), tab[:, 1].contiguous()
    n, d = 21, 16
    x0 = torch.randn(n, d, requires_grad=True)
    eps = torch.randn(n, d, requires_grad=True)
    t = torch.tensor([0, 1, 2, 999, 998, 500] + list(range(100, 1000, 60)))
    assert t.shape == (n,)
    g = torch.randn(n, d)
    dx0, deps = torch.autograd.grad(noise_injection(x0, eps, t, sa, s1a), [x0, eps], g)
    ac = torch.from_numpy(diff.np["alphas_cumprod"])[t][:, None]
    rel_close(dx0, g.double() * ac.sqrt(), 1e-5, "dx0")
    rel_close(deps, g.double() * (1 - ac).sqrt(), 1e-5, "deps")
    # eps alone requiring grad (x0 a constant) still gets its gradient
    (deps2,) = torch.autograd.grad(noise_injection(x0.detach(), eps, t, sa, s1a), [eps], g)
    rel_close(deps2, g.double() * (1 - ac).sqrt(), 1e-5, "deps (eps only)")


# ---------------------------------------------------------------------------------------------
# Drawn timesteps and condition keep rates
# ---------------------------------------------------------------------------------------------
def _check_uniform_steps(t):
    n = t.numel()
    assert t.dtype == torch.int64
    assert int(t.min()) == 0 and int(t.max()) == NUM_TRAIN_TIMESTEPS - 1
    counts = torch.bincount(t, minlength=NUM_TRAIN_TIMESTEPS).double()
    assert counts.numel() == NUM_TRAIN_TIMESTEPS
    expected = n / NUM_TRAIN_TIMESTEPS
    # t = 0 (the decoder-NLL term) is drawn as often as any other step
    sd = math.sqrt(expected)
    assert abs(counts[0] - expected) < 5 * sd, f"t=0 drawn {counts[0]:.0f}x, expected {expected}"
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    # chi-square with 999 dof: mean 999, sd ~ 44.7
    assert chi2 < 999 + 6 * 44.7, chi2
    assert abs(t.double().mean().item() - 499.5) < 5 * 288.7 / math.sqrt(n)


def test_row_randomness_timesteps_cover_zero_uniformly_and_keep_rate():
    """Planted: randint(1, 1000); randint(0, 999); keep = rand < p (rate 1 - p)."""
    n = 200_000
    for p in (0.2, 0.35):
        keep, t, noise = draw_row_randomness(n, 4, p, "cpu", torch.Generator().manual_seed(1))
        _check_uniform_steps(t)
        rate, sd = keep.double().mean().item(), math.sqrt(p * (1 - p) / n)
        assert abs(rate - (1 - p)) < 5 * sd, (p, rate)
        assert noise.shape == (n, 4)
        assert abs(noise.mean().item()) < 5 / math.sqrt(4 * n)
        assert abs(noise.std().item() - 1) < 0.01
    keep, _, _ = draw_row_randomness(1000, 4, 0.0, "cpu")
    assert keep.all()


def test_head_draws_training_timesteps_from_zero_to_999():
    """DiffLoss.training_timesteps (the per-row forward without explicit t)."""
    _check_uniform_steps(DiffLoss.training_timesteps(200_000, "cpu",
                                                     generator=torch.Generator().manual_seed(2)))
    t = torch.tensor([0, 999])
    assert torch.equal(DiffLoss.training_timesteps(2, "cpu", t), t)
    for bad in (torch.tensor([0, 1000]), torch.tensor([-1, 3])):
        with pytest.raises(ValueError, match="timesteps"):
            DiffLoss.training_timesteps(2, "cpu", bad)


@pytest.mark.parametrize("head_cls", [DiffLoss, FusedDiffLoss])
def test_distill_loss_drops_conditions_at_the_asked_rate(head_cls, monkeypatch):
    """What reaches the loss: the fraction of rows whose condition is dropped, the timesteps.
    Planted: keep-rate 1 - p in either head; kept rows gathering another image's condition."""
    d, zc, L, B, mul, p = 4, 6, 2, 50, 40, 0.3    # 4000 rows
    head = head_cls(d, zc, 1, 16, "4", L)
    seen = {}

    if head_cls is DiffLoss:
        def spy(target, z, chunk_idx, t=None, noise=None, **_):
            seen.update(dropped=(z == 0).all(1), t=t)
            return target.sum() * 0
        monkeypatch.setattr(head, "forward", spy)
    else:
        def spy(x0, t, noise, k, z_img, ci):
            seen.update(dropped=ci == z_img.shape[0], t=t, image=ci)
            return x0.sum(1) * 0
        monkeypatch.setattr(head, "row_losses", spy)
    z = torch.randn(B, zc) + 3  # no row of z is zero by chance
    head.distill_loss(torch.randn(B, L * d), z, mul, p, torch.Generator().manual_seed(4))
    n = B * L * mul
    rate, sd = seen["dropped"].double().mean().item(), math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) < 5 * sd, rate
    assert int(seen["t"].min()) >= 0 and int(seen["t"].max()) < NUM_TRAIN_TIMESTEPS
    if head_cls is FusedDiffLoss:  # kept rows gather their own image's condition
        r = torch.arange(n) % (B * L)
        kept = ~seen["dropped"]
        assert torch.equal(seen["image"][kept], (r // L)[kept])


# ---------------------------------------------------------------------------------------------
# DKD warm-up
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("progress,ramp", [(0.0, 0.0), (1.0, 0.05), (5.0, 0.25), (10.0, 0.5),
                                           (19.5, 0.975), (20.0, 1.0), (35.0, 1.0)])
def test_dkd_warmup_weight_at_given_epochs(progress, ramp):
    """loss = ce_weight * CE + min(epoch / warmup, 1) * DKD, at warmup 20.
    Planted: no clamp at 1; ramp by (epoch + 1); warm-up ignored."""
    torch.manual_seed(0)
    student = nn.Linear(5, 6)
    m = DKD(nn.Sequential(student), alpha=1.0, beta=8.0, T=4.0, warmup=20, ce_weight=0.7)
    x, y, t = torch.randn(8, 5), torch.randint(0, 6, (8,)), torch.randn(8, 6) * 3
    loss, parts = m(x, y, (None, t), progress)
    s = student(x)
    ce = nn.functional.cross_entropy(s, y)
    kd = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    assert kd.item() > 0.1  # the warm-up weight is visible in the loss
    want = 0.7 * ce + ramp * kd
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    m0 = DKD(nn.Sequential(student), warmup=0)
    loss0, _ = m0(x, y, (None, t), progress)
    assert loss0.item() == pytest.approx((ce + kd).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The ancestral sampler, with tolerances relative to each term's own scale
# ---------------------------------------------------------------------------------------------
def _by_hand(diff, model, xT, z, temperature):
    """The improved-DDPM ancestral loop in float64; returns the states after every step."""
    b = diff.np["betas"]
    ac = np.cumprod(1 - b)
    ac_prev = np.append(1.0, ac[:-1])
    pv = b * (1 - ac_prev) / (1 - ac)
    plog = np.log(np.append(pv[1], pv[1:]))
    x, states, d = xT.double(), [], xT.shape[1]
    for step, i in enumerate(reversed(range(diff.num_timesteps))):
        o = model(x.float(), torch.full((x.shape[0],), diff.timestep_map[i])).double()
        e, v = o[:, :d], o[:, d:]
        x0 = math.sqrt(1 / ac[i]) * x - math.sqrt(1 / ac[i] - 1) * e
        mean = (b[i] * math.sqrt(ac_prev[i]) / (1 - ac[i]) * x0
                + (1 - ac_prev[i]) * math.sqrt(1 - b[i]) / (1 - ac[i]) * x)
        logvar = (v + 1) / 2 * math.log(b[i]) + (1 - (v + 1) / 2) * plog[i]
        x = mean + (torch.exp(0.5 * logvar) * z[step].double() * temperature if i > 0 else 0)
        states.append(x)
    return states


def _linear_head(d, seed):
    w = torch.randn(2 * d, d, generator=torch.Generator().manual_seed(seed))

    def model(x, t, **_):  # depends on the original timestep index, as the head does
        return torch.tanh(x @ w.T * 0.5 + t[:, None].float() / 1000)
    return model


def test_ancestral_sampler_by_hand_at_moderate_scale():
    """Steps {0, 500} ("1,1" respacing) keep every value O(1), so each element is compared to
    its own size. Planted: noise std exp(logvar); temperature ignored; noise on the last step;
    variance fraction (v + 1) / 2 flipped; model called with respaced instead of original t."""
    diff = create_diffusion("1,1")
    assert diff.timestep_map == [0, 500]
    d = 3
    model = _linear_head(d, 0)
    xT, z = torch.randn(6, d), torch.randn(2, 6, d)
    got = diff.p_sample_loop(model, (6, d), noise=xT, step_noises=z, temperature=0.7)
    want = _by_hand(diff, model, xT, z, 0.7)[-1]
    assert want.abs().max() < 20
    rel_close(got, want, 1e-4, "x_0")


def test_ancestral_sampler_noise_term_at_large_scale():
    """With steps {0, 999} the state after the first step is ~1e4, so an absolute-or-relative
    check on it hides an error of order 1 in the noise. Check the noise term on its own: two
    runs that differ only in the first step's noise differ by exactly
    temperature * exp(0.5 * logvar) * (z - z'). The last step's noise must not matter at all."""
    diff = create_diffusion("2")
    d = 3
    model = _linear_head(d, 1)
    xT = torch.randn(6, d)
    seen = []

    def recording(x, t, **kw):
        seen.append(x.clone())
        return model(x, t, **kw)

    z1, z2 = torch.randn(2, 6, d), torch.randn(2, 6, d)
    z2[1] = z1[1]
    a = diff.p_sample_loop(recording, (6, d), noise=xT, step_noises=z1, temperature=0.7)
    b = diff.p_sample_loop(recording, (6, d), noise=xT, step_noises=z2, temperature=0.7)
    x1a, x1b = seen[1].double(), seen[3].double()   # inputs to the second (last) step
    assert x1a.abs().max() > 1e3  # the scale that hid errors before
    states = _by_hand(diff, model, xT, z1, 0.7)
    rel_close(x1a, states[0], 1e-5, "x after the first step")
    # the noise term alone, relative to its own size
    b_, ac = diff.np["betas"][1], np.cumprod(1 - diff.np["betas"])
    pv = diff.np["posterior_variance"]
    out = model(xT, torch.full((6,), 999)).double()
    f = (out[:, d:] + 1) / 2
    logvar = f * math.log(b_) + (1 - f) * math.log(pv[1])
    want = 0.7 * torch.exp(0.5 * logvar) * (z1[0] - z2[0]).double()
    assert want.abs().min() > 1e-3
    got_diff = x1a - x1b
    # fp32 rounding of values ~1e4 is ~1e-3 absolute: compare each row to its own noise scale
    err = ((got_diff - want).abs() / want.abs().amax(1, keepdim=True)).max().item()
    assert err < 0.01, f"noise term relative error {err:.2e}"
    # no noise on the last step: changing only z[last] changes nothing
    z3 = z1.clone()
    z3[1] = torch.randn(6, d) * 5
    c = diff.p_sample_loop(model, (6, d), noise=xT, step_noises=z3, temperature=0.7)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)
    assert ac[1] < 1e-3


# ---------------------------------------------------------------------------------------------
# Beyond the list: survivors of the hand-planted mutants
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [True, False])
def test_evaluate_restores_the_training_mode(mode):
    """Planted: distiller.train(False) after evaluating (the next epoch would train with
    frozen BatchNorm statistics)."""
    model = LinearStudent().train(mode)
    evaluate(model, [(torch.randn(3, 6), torch.tensor([0, 1, 2]))], torch.device("cpu"))
    assert model.training is mode and model.student.training is mode


def _small_gendd(**kw):
    from gendd_fast.distill import GenDD
    from gendd_fast.models import create_model
    from helpers import perturb_zero_init
    torch.manual_seed(0)
    args = dict(token_dim=16, width=32, depth=1, sampling_steps="3", mul=2, cond_drop=0.3,
                beta=1.0, smooth=0.7)
    args.update(kw)
    g = GenDD(create_model("resnet8", 5), nn.Linear(64, 5), DiffLoss, **args)
    perturb_zero_init(g.diffloss, std=0.2)
    return g


def test_sampled_logits_average_the_draws_before_classifying():
    """teacher_fc(mean of num_sampling generated features), the draws taken in order from the
    generator. Planted: the sum instead of the mean (the bias is then outweighed)."""
    import contextlib
    g = _small_gendd().eval()
    with torch.no_grad():
        g.teacher_fc.bias.copy_(torch.randn(5) * 5)
    x = torch.randn(3, 3, 32, 32)
    out = g.eval_logits(x, contextlib.nullcontext(), sample=True, cfg=2.0, num_sampling=3,
                        generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        z = g.cls_projector(g.student.forward_features(x))
        feats = [g.diffloss.generate(z, cfg=2.0, generator=gen) for _ in range(3)]
        want = g.teacher_fc(sum(feats) / 3)
    scale = want.abs().amax(1, keepdim=True)
    assert ((out["sample_"] - want).abs() / scale).max() < 1e-4


def test_gendd_step_hands_the_head_the_condition_target_and_drop_rate(monkeypatch):
    """What the GenDD step passes to the head, with mixing off: z = LayerNorm(f_s), the
    contracted target, mul and cond_drop. Planted: cond_drop not passed (0.0); z = f_s;
    contraction weights swapped."""
    g = _small_gendd(beta=0.0)
    seen = {}

    def spy(target, z, mul, cond_drop_prob, generator=None):
        seen.update(target=target, z=z, mul=mul, p=cond_drop_prob)
        return (z.sum() + target.sum()) * 0
    monkeypatch.setattr(g.diffloss, "distill_loss", spy)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 4, 2, 2])
    f_t = torch.randn(4, 64)
    g(x, y, (f_t, None))
    f_s = g.student.forward_features(x)
    z = nn.functional.layer_norm(f_s, (f_s.shape[1],), g.cls_projector[0].weight,
                                 g.cls_projector[0].bias)
    torch.testing.assert_close(seen["z"], z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["target"], 0.3 * f_t + 0.7 * g.teacher_fc.weight[y])
    assert seen["mul"] == 2 and seen["p"] == 0.3


def test_generate_pairs_each_image_with_every_token_position():
    """generate(z) = the guided sampler on rows (image b, token k) in order b * L + k, reshaped
    to (B, L * d). Planted: token indices repeat_interleave'd (rows get the wrong position)."""
    from gendd_fast.sampling import guided_sample
    torch.manual_seed(0)
    head = DiffLoss(4, 5, 1, 16, "3", 3)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    z = torch.randn(2, 5)
    got = head.generate(z, cfg=2.0, generator=torch.Generator().manual_seed(1))
    rows = torch.stack([z[b] for b in range(2) for _ in range(3)])
    k = torch.tensor([k for _ in range(2) for k in range(3)])
    want = guided_sample(head, rows, k, cfg=2.0, generator=torch.Generator().manual_seed(1))
    assert got.shape == (2, 12)
    torch.testing.assert_close(got, want.reshape(2, 12), rtol=1e-5, atol=1e-6)
    # and the position table matters: another order of k gives other tokens
    other = guided_sample(head, rows, k.flip(0), cfg=2.0,
                          generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other.reshape(2, 12), got, atol=1e-3)


def test_gendd_step_probe_ce_reaches_fc_but_not_the_backbone(monkeypatch):
    """In the full GenDD step the linear probe's CE trains fc on *detached* features: with the
    diffusion term contributing no gradient, the backbone gets none. Planted:
    logits = fc(f_s) without detach (CE then trains the student's backbone)."""
    g = _small_gendd(beta=0.0)
    monkeypatch.setattr(g.diffloss, "distill_loss",
                        lambda target, z, *a, **k: (z.sum() + target.sum()) * 0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 4, 2, 2])
    loss, parts = g(x, y, (torch.randn(4, 64), None))
    assert "ce" in parts
    loss.backward()
    assert g.student.fc.weight.grad.abs().sum() > 0
    for name, p in g.student.named_parameters():
        if not name.startswith("fc."):
            assert p.grad is None or not p.grad.any(), name
