"""The native sampler loop (gendd_fast._C) against the reference Python loop, on CPU."""
import pytest
import torch

from gendd_fast import DiffLoss, guided_sample, sampler_ext
from helpers import perturb_zero_init



@pytest.fixture(autouse=True, scope="module")
def _extension_must_load():
    # CI builds the extension from a clean clone: failing to load it is a failure, not a skip.
    assert sampler_ext.available(), f"gendd_fast._C unavailable: {sampler_ext._state['why']}"


def make_head(steps, depth=2, width=48, d=16, zc=20, chunks=3):
    h = DiffLoss(d, zc, depth, width, str(steps), chunks)
    perturb_zero_init(h, std=0.1)
    return h.eval()


def noises(h, rows, doubled):
    steps, d = h.gen_diffusion.num_timesteps, h.in_channels
    xT, sn = torch.randn(rows, d), torch.randn(steps, rows, d)
    if doubled:
        return xT, sn, torch.cat([xT, xT]), torch.cat([sn, sn], 1)
    return xT, sn, xT, sn


def test_extension_is_the_compiled_module():
    mod = sampler_ext.load_extension()
    assert hasattr(mod, "sample_loop") and mod.with_cuda in (True, False)


@pytest.mark.parametrize("steps", [1, 10, 64, 100])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("cfg", [1.0, 2.0])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_extension_matches_reference(steps, sampler, cfg, temperature):
    h = make_head(steps)
    n = 7  # not a multiple of anything
    z, k = torch.randn(n, 20), torch.randint(0, 3, (n,))
    guided = cfg != 1.0
    xT, sn, xT_ref, sn_ref = noises(h, n, guided)
    zz = torch.cat([z, torch.zeros_like(z)]) if guided else z
    kk = torch.cat([k, k]) if guided else k
    eta = 0.5 if sampler == "ddim" else 0.0
    ref = h.sample(zz, kk, cfg=cfg, temperature=temperature, noise=xT_ref, step_noises=sn_ref,
                   sampler=sampler, eta=eta, backend="torch")[:n]
    out = sampler_ext.sample(h, z, k, xT, sn, cfg=cfg, temperature=temperature,
                             ddim=sampler == "ddim", eta=eta)
    assert torch.isfinite(ref).all()
    # fp32 rounding only: GEMM blocking differs between one row and many
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)


def test_default_backend_dispatches_to_extension_with_same_seeded_result():
    h = make_head(10)
    z, k = torch.randn(5, 20), torch.randint(0, 3, (5,))
    a = guided_sample(h, z, k, cfg=2.0, generator=torch.Generator().manual_seed(9),
                      backend="torch")
    b = guided_sample(h, z, k, cfg=2.0, generator=torch.Generator().manual_seed(9), backend="ext")
    c = guided_sample(h, z, k, cfg=2.0, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(c, b, rtol=0, atol=0)
    a1 = h.sample(z, k, generator=torch.Generator().manual_seed(4), backend="torch")
    b1 = h.sample(z, k, generator=torch.Generator().manual_seed(4), backend="ext")
    torch.testing.assert_close(b1, a1, rtol=2e-4, atol=2e-4)


def test_auto_falls_back_when_uncond_half_is_not_zero():
    h = make_head(4)
    z, k = torch.randn(6, 20), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="all-zero unconditional half"):
        h.sample(z, k, cfg=2.0, backend="ext")
    out = h.sample(z, k, cfg=2.0)  # auto -> reference loop
    assert out.shape == (6, 16)


def call(h, **over):
    args = dict(weights=sampler_ext.head_weights(h.net), depth=2, z=torch.randn(3, 20),
                chunk_idx=torch.tensor([0, 1, 2]), x_T=torch.randn(3, 16),
                step_noises=torch.randn(4, 3, 16), tables=sampler_ext.step_tables(h.gen_diffusion),
                timesteps=torch.tensor(h.gen_diffusion.timestep_map), cfg=2.0, temperature=1.0,
                ddim=False, eta=0.0)
    args.update(over)
    return sampler_ext.load_extension().sample_loop(**args)


@pytest.mark.parametrize("over,msg", [
    ("wrong_weight", "has shape"), ("missing_weight", "weight tensors for depth"),
    ("empty", "empty batch"), ("too_many_steps", "at most 1000 sampling steps"),
    ("chunk", "chunk_idx out of range"), ("noise", "step_noises must be"),
    ("z", "z must be"), ("bad_t", "timesteps must lie")])
def test_bad_input_is_a_python_error_not_a_crash(over, msg):
    h = make_head(4)
    w = sampler_ext.head_weights(h.net)
    cases = {
        "wrong_weight": dict(weights=w[:10] + [torch.zeros(7, 7)] + w[11:]),
        "missing_weight": dict(weights=w[:-1]),
        "empty": dict(z=torch.zeros(0, 20), chunk_idx=torch.zeros(0, dtype=torch.long),
                      x_T=torch.zeros(0, 16), step_noises=torch.zeros(4, 0, 16)),
        "too_many_steps": dict(timesteps=torch.arange(1001), step_noises=torch.zeros(1001, 3, 16),
                               tables=torch.zeros(1001, 8)),
        "chunk": dict(chunk_idx=torch.tensor([0, 1, 3])),
        "noise": dict(step_noises=torch.randn(5, 3, 16)),
        "z": dict(z=torch.randn(3, 21)),
        "bad_t": dict(timesteps=torch.tensor([0, 1, 2, 1000])),
    }
    with pytest.raises(ValueError, match=msg):
        call(h, **cases[over])


def test_jit_fallback_notice_when_disabled(monkeypatch, capsys):
    monkeypatch.setattr(sampler_ext, "_state", {"module": None, "tried": False, "why": None})
    monkeypatch.setenv("GENDD_FAST_NO_EXT", "1")
    assert not sampler_ext.available()
    h = make_head(3)
    out = h.sample(torch.randn(2, 20), torch.tensor([0, 1]))  # auto -> PyTorch loop
    assert out.shape == (2, 16)


def test_stacked_modulation_cache_follows_weight_updates():
    h = make_head(6)
    z, k = torch.randn(4, 20), torch.randint(0, 3, (4,))
    xT, sn = torch.randn(4, 16), torch.randn(6, 4, 16)
    first = sampler_ext.sample(h, z, k, xT, sn, cfg=2.0)
    w1, _ = sampler_ext.stacked_modulation(h.net)
    assert sampler_ext.stacked_modulation(h.net)[0] is w1  # cached
    with torch.no_grad():  # an optimizer step updates in place
        h.net.res_blocks[1].adaLN_modulation[1].weight.mul_(1.5)
    assert sampler_ext.stacked_modulation(h.net)[0] is not w1
    second = sampler_ext.sample(h, z, k, xT, sn, cfg=2.0)
    zz, kk = torch.cat([z, torch.zeros_like(z)]), torch.cat([k, k])
    ref = h.sample(zz, kk, cfg=2.0, noise=torch.cat([xT, xT]), step_noises=torch.cat([sn, sn], 1),
                   backend="torch")[:4]
    # fp32 rounding, amplified by 1/sqrt(abar) at the noisy steps: judged relative to the scale
    scale = ref.abs().max()
    assert (second - ref).abs().max() / scale < 1e-3
    assert (first - ref).abs().max() / scale > 1e-2  # a stale cache would have been caught


def test_stacked_modulation_shape_is_checked():
    h = make_head(4)
    w, b = sampler_ext.stacked_modulation(h.net)
    with pytest.raises(ValueError, match="stacked modulation must be"):
        call(h, stacked_w=w[:, :-1], stacked_b=b)


def test_bf16_weights_on_cpu_stay_close_to_fp32_reference():
    h = make_head(10)
    z, k = torch.randn(6, 20), torch.randint(0, 3, (6,))
    xT, sn = torch.randn(6, 16), torch.randn(10, 6, 16)
    ref = h.sample(z, k, noise=xT, step_noises=sn, backend="torch")
    import copy
    out = sampler_ext.sample(copy.deepcopy(h).to(torch.bfloat16), z, k, xT, sn)
    assert out.dtype == torch.float32
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 3e-2, rel  # bf16 GEMMs, fp32 state and update


def test_head_layout_names_every_tensor_once_in_the_extension_order():
    """head_layout.head_tensor_names covers the head's parameters exactly once, and head_weights
    hands the extension those tensors in that order. Planted: two block names swapped in
    HEAD_BLOCK ("in_ln.weight" and "mlp.0.weight": the C++ unpack would then read a LayerNorm
    weight as a GEMM): the shape check
    below fails."""
    from gendd_fast.head_layout import head_tensor_names, modulation_layers
    from gendd_fast.sampler_ext import head_weights
    head = DiffLoss(16, 8, 2, 32, "4", 3)
    names = head_tensor_names(2)
    params = dict(head.net.named_parameters())
    assert sorted(names) == sorted(params) and len(set(names)) == len(names)
    got = head_weights(head.net)
    net = head.net  # the order csrc/sampler.cpp's unpack reads, spelt out by module
    want = [net.time_embed.mlp[0].weight, net.time_embed.mlp[0].bias,
            net.time_embed.mlp[2].weight, net.time_embed.mlp[2].bias, net.cond_embed.weight,
            net.cond_embed.bias, net.pos_embed.weight, net.input_proj.weight, net.input_proj.bias]
    for b in net.res_blocks:
        want += [b.in_ln.weight, b.in_ln.bias, b.mlp[0].weight, b.mlp[0].bias, b.mlp[2].weight,
                 b.mlp[2].bias, b.adaLN_modulation[1].weight, b.adaLN_modulation[1].bias]
    f = net.final_layer
    want += [f.adaLN_modulation[1].weight, f.adaLN_modulation[1].bias, f.linear.weight,
             f.linear.bias]
    assert [t.data_ptr() for t in got] == [t.data_ptr() for t in want]
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want]
    assert [tuple(m.weight.shape) for m in modulation_layers(head.net)] == [(96, 32)] * 2 + [(64, 32)]
