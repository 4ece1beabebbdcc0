"""DiffLoss: reference-compatible names, initialisation, CFG semantics, gradients, errors."""
import io

import pytest
import torch

from gendd_fast import DiffLoss, guided_sample
from gendd_fast.head import timestep_embedding
from helpers import perturb_zero_init
from gendd_fast import FusedDiffLoss
from gendd_fast.head import NUM_TRAIN_TIMESTEPS, draw_row_randomness
import math
from helpers import block_by_hand, final_by_hand, tiny_variance_rows


def expected_keys(depth):
    """The parameter names of the public GenDD head (under ``net.``), written out by hand."""
    keys = ["time_embed.mlp.0.weight", "time_embed.mlp.0.bias", "time_embed.mlp.2.weight",
            "time_embed.mlp.2.bias", "cond_embed.weight", "cond_embed.bias", "pos_embed.weight",
            "input_proj.weight", "input_proj.bias"]
    for i in range(depth):
        keys += [f"res_blocks.{i}.{n}" for n in
                 ("in_ln.weight", "in_ln.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                  "mlp.2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias")]
    keys += ["final_layer.linear.weight", "final_layer.linear.bias",
             "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]
    return {"net." + k for k in keys}


def small_head(**kw):
    args = dict(target_channels=8, z_channels=12, depth=2, width=32, num_sampling_steps="10",
                num_chunks=3)
    args.update(kw)
    return DiffLoss(**args)


def test_state_dict_names_shapes_and_init():
    h = DiffLoss(64, 256, 3, 1024, "100", 4)
    sd = h.state_dict()
    assert set(sd) == expected_keys(3)
    assert sd["net.pos_embed.weight"].shape == (4, 1024)
    assert sd["net.time_embed.mlp.0.weight"].shape == (1024, 256)
    assert sd["net.res_blocks.0.adaLN_modulation.1.weight"].shape == (3072, 1024)
    assert sd["net.final_layer.adaLN_modulation.1.weight"].shape == (2048, 1024)
    assert sd["net.final_layer.linear.weight"].shape == (128, 1024)
    for k in ("net.final_layer.linear.weight", "net.final_layer.linear.bias",
              "net.res_blocks.2.adaLN_modulation.1.weight",
              "net.final_layer.adaLN_modulation.1.bias"):
        assert torch.all(sd[k] == 0), k
    assert 0.015 < sd["net.time_embed.mlp.0.weight"].std() < 0.025
    assert torch.all(sd["net.cond_embed.bias"] == 0)
    # xavier-uniform bound for a square W x W layer is sqrt(6 / 2W)
    assert sd["net.res_blocks.0.mlp.0.weight"].abs().max() <= (6 / 2048) ** 0.5 + 1e-6


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t)
    i = torch.arange(128, dtype=torch.float64)
    f = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * i / 128)
    want = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], 1)
    torch.testing.assert_close(emb.double(), want, atol=2e-4, rtol=0)


def test_state_dict_round_trip_through_bytes():
    a = perturb_zero_init(small_head())
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = small_head()
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x, z, k = torch.randn(5, 8), torch.randn(5, 12), torch.tensor([0, 1, 2, 0, 1])
    t = torch.randint(0, 1000, (5,))
    torch.testing.assert_close(a.net(x, t, z, k), b.net(x, t, z, k), rtol=0, atol=0)


def test_forward_reproducible_with_explicit_t_noise_and_generator():
    h = perturb_zero_init(small_head())
    x, z, k = torch.randn(7, 8), torch.randn(7, 12), torch.randint(0, 3, (7,))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert h(x, z, k, generator=g1).item() == h(x, z, k, generator=g2).item()
    t, n = torch.randint(0, 1000, (7,)), torch.randn(7, 8)
    per_row = h(x, z, k, t=t, noise=n, reduction="none")
    assert per_row.shape == (7,)
    assert h(x, z, k, t=t, noise=n).item() == pytest.approx(per_row.mean().item(), rel=1e-6)


def test_gradients_reach_every_parameter_once_zero_init_perturbed():
    h = perturb_zero_init(small_head())
    x, k = torch.randn(9, 8), torch.randint(0, 3, (9,))
    z = torch.randn(9, 12, requires_grad=True)
    h(x, z, k).backward()
    for name, p in h.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert z.grad.abs().sum() > 0


def test_forward_with_cfg_mixes_eps_only():
    h = perturb_zero_init(small_head())
    n = 4
    x = torch.randn(n, 8)
    z = torch.randn(n, 12)
    k = torch.randint(0, 3, (n,))
    t = torch.randint(0, 1000, (n,))
    zz, kk, tt = torch.cat([z, torch.zeros_like(z)]), torch.cat([k, k]), torch.cat([t, t])
    xx = torch.cat([x, torch.randn(n, 8)])  # second half of x is ignored by design
    out = h.net.forward_with_cfg(xx, tt, zz, kk, cfg_scale=2.0)
    c = h.net(x, t, z, k)
    u = h.net(x, t, torch.zeros_like(z), k)
    torch.testing.assert_close(out[:n, :8], u[:, :8] + 2.0 * (c[:, :8] - u[:, :8]))
    torch.testing.assert_close(out[:n, 8:], c[:, 8:])  # conditional variance kept
    torch.testing.assert_close(out[n:, 8:], u[:, 8:])


def test_cfg_scale_one_equals_unguided_sampler():
    h = perturb_zero_init(small_head())
    z, k = torch.randn(6, 12), torch.randint(0, 3, (6,))
    steps = h.gen_diffusion.num_timesteps
    xT, sn = torch.randn(6, 8), torch.randn(steps, 6, 8)
    plain = h.sample(z, k, noise=xT, step_noises=sn, backend="torch")
    zz, kk = torch.cat([z, torch.zeros_like(z)]), torch.cat([k, k])
    doubled = h.sample(zz, kk, cfg=1.0 + 1e-12, noise=torch.cat([xT, xT]),
                       step_noises=torch.cat([sn, sn], 1), backend="torch")
    torch.testing.assert_close(doubled[:6], plain, rtol=1e-4, atol=1e-5)
    guided = h.sample(zz, kk, cfg=2.0, noise=torch.cat([xT, xT]),
                      step_noises=torch.cat([sn, sn], 1), backend="torch")
    assert not torch.allclose(guided[:6], plain, atol=1e-3)


def test_guided_sample_seeded_and_shaped():
    h = perturb_zero_init(small_head())
    z, k = torch.randn(5, 12), torch.randint(0, 3, (5,))
    a = guided_sample(h, z, k, cfg=2.0, generator=torch.Generator().manual_seed(3),
                      backend="torch")
    b = guided_sample(h, z, k, cfg=2.0, generator=torch.Generator().manual_seed(3),
                      backend="torch")
    assert a.shape == (5, 8) and torch.equal(a, b) and torch.isfinite(a).all()


def test_temperature_zero_removes_step_noise():
    h = perturb_zero_init(small_head())
    z, k = torch.randn(3, 12), torch.randint(0, 3, (3,))
    xT = torch.randn(3, 8)
    steps = h.gen_diffusion.num_timesteps
    a = h.sample(z, k, noise=xT, step_noises=torch.randn(steps, 3, 8), temperature=0.0,
                 backend="torch")
    b = h.sample(z, k, noise=xT, step_noises=torch.randn(steps, 3, 8), temperature=0.0,
                 backend="torch")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case,err,msg", [
    ("wide_target", ValueError, "split a 24-wide feature into 3 tokens"),
    ("chunk_high", ValueError, "chunk_idx out of range"),
    ("chunk_neg", ValueError, "chunk_idx out of range"),
    ("batch", ValueError, "batch sizes differ"),
    ("z_width", ValueError, r"z must be \(N, 12\)"),
    ("chunk_float", TypeError, "integer tensor"),
    ("bad_t", ValueError, "timesteps in"),
])
def test_bad_inputs_raise_clear_errors(case, err, msg):
    h = small_head()
    x, z, k = torch.randn(4, 8), torch.randn(4, 12), torch.tensor([0, 1, 2, 0])
    with pytest.raises(err, match=msg):
        if case == "wide_target":
            h(torch.randn(4, 24), z, k)
        elif case == "chunk_high":
            h(x, z, torch.tensor([0, 1, 3, 0]))
        elif case == "chunk_neg":
            h(x, z, torch.tensor([0, -1, 2, 0]))
        elif case == "batch":
            h(torch.randn(3, 8), z[:3].repeat(2, 1)[:4], k)
        elif case == "z_width":
            h(x, torch.randn(4, 10), k)
        elif case == "chunk_float":
            h(x, z, k.float())
        elif case == "bad_t":
            h(x, z, k, t=torch.tensor([0, 1, 1000, 2]))


def test_sampler_errors():
    h = small_head()
    z, k = torch.randn(3, 12), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="doubled batch"):
        h.sample(z, k, cfg=2.0, backend="torch")
    with pytest.raises(ValueError, match="empty batch"):
        h.sample(z[:0], k[:0])
    with pytest.raises(ValueError, match="unknown sampler backend"):
        h.sample(z, k, backend="cuda-magic")
    with pytest.raises(ValueError, match="unknown respacing"):
        small_head(num_sampling_steps="fast")
    with pytest.raises(ValueError, match="positive integer"):
        small_head(num_chunks=0)


# Guards from the mutation run (moved from test_mutation_guards.py): each pins a behaviour the rest
# of the suite did not, with inputs where the wrong and right formulas disagree; each docstring
# names the planted bugs it was run against and failed on.


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
        def spy(x0, t, noise, k, z_img, ci, reduction="none"):
            seen.update(dropped=ci == z_img.shape[0], t=t, image=ci)
            rows = x0.sum(1) * 0
            return rows.mean() if reduction == "mean" else rows
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


def _readme_snippet(marker):
    import os
    import re
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    text = open(path).read()
    m = re.search(rf"<!-- snippet: {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README snippet {marker!r} not found"
    return m.group(1)


def test_readme_drop_in_snippet_trains_and_samples():
    """The README's drop-in example runs as printed, its first gradient is zero (asserted in
    the snippet), later ones are not, and the shapes are the ones it states. Planted bug
    checked: the snippet with perturb_zero_init(head) after the constructor (no zero start)
    failed its assert."""
    code = _readme_snippet("drop-in")
    assert len(code.strip().splitlines()) <= 16
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own README
    assert ns["feats"].shape == (8, 128) and torch.isfinite(ns["feats"]).all()
    assert ns["z"].grad.abs().max() > 0  # after the first step the student gets gradient
