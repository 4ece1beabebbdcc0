"""Each Triton op against its PyTorch reference, through Triton's interpreter on CPU.

Outputs start as NaN (GENDD_FAST_POISON=1, set in conftest), so an element a kernel fails to
write fails the comparison. Shapes are deliberately not multiples of the block sizes.
fp32 tolerances: 1e-4 relative to the largest reference value; fp16: 1e-2 (fp16 operands,
fp32 accumulation, compared with fp32 math). The interpreter computes bf16 wrongly, so bf16 is
covered by the GPU tests (tests_gpu/).
"""
import pytest
import torch
import torch.nn.functional as F

from gendd_fast.diffusion import create_diffusion
from gendd_fast.head import timestep_embedding
from gendd_fast.kernels import adaln_block as blk
from gendd_fast.kernels import matmul as mm
from gendd_fast.kernels.adaln_condition import adaln_condition, adaln_condition_reference
from gendd_fast.kernels.adaln_modulation import adaln_modulation, adaln_modulation_reference
from gendd_fast.kernels.diffusion_loss import (diffusion_loss, diffusion_loss_reference,
                                               loss_tables)
from gendd_fast.kernels.final_layer import final_layer, final_layer_reference
from gendd_fast.kernels.linear import fused_linear
from gendd_fast.kernels.noise_injection import noise_injection, noise_injection_reference
from gendd_fast.kernels.timestep_embedding import timestep_features, timestep_table
from gendd_fast.kernels.layernorm import ln_stats
from helpers import block_by_hand, final_by_hand, rel_close, tiny_variance_rows

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def close(got, want, dtype=torch.float32, name=""):
    got, want = got.float(), want.float()
    assert not torch.isnan(got).any(), f"{name}: unwritten (NaN) elements"
    scale = want.abs().max().clamp_min(1e-6)
    err = ((got - want).abs().max() / scale).item()
    assert err <= TOL[dtype], f"{name}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def grads_of(fn, inputs, seed_grad):
    for x in inputs:
        x.grad = None
    out = fn(*inputs)
    out.backward(seed_grad)
    return out, [x.grad for x in inputs]


@pytest.mark.parametrize("mode", ["plain", "silu", "lnmod", "mul"])
@pytest.mark.parametrize("a_t", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_matmul_prologues(mode, a_t, dtype):
    M, K, N = 37, 70, 45
    x = torch.randn((K, M) if a_t else (M, K)).to(dtype)
    rows, cols = x.shape
    kw = {}
    ref = x.float()
    if mode == "silu":
        ref = F.silu(ref)
    elif mode == "lnmod":
        mean, var = ref.mean(1), ref.var(1, unbiased=False)
        lw, lb, sc, sh = torch.randn(cols), torch.randn(cols), torch.randn(rows, cols), \
            torch.randn(rows, cols)
        kw = dict(aux=sc.to(dtype), shift=sh.to(dtype), mean=mean, rstd=torch.rsqrt(var + 1e-6),
                  ln_w=lw, ln_b=lb)
        ref = F.layer_norm(ref, (cols,), lw, lb, 1e-6) * (1 + sc.to(dtype).float()) \
            + sh.to(dtype).float()
    elif mode == "mul":
        y = torch.randn(rows, cols).to(dtype)
        kw = dict(aux=y)
        ref = ref * y.float()
    op = mm.Operand(x, {"plain": mm.PLAIN, "silu": mm.SILU, "lnmod": mm.LNMOD,
                        "mul": mm.MUL}[mode], **kw)
    w = torch.randn(N, K).to(dtype)
    b = torch.randn(N)
    out = torch.full((M, N), float("nan"))
    mm.fused_matmul(op, mm.weight_t(w), out, a_t=a_t, bias=b, dot_dtype=dtype)
    want = (ref.t() if a_t else ref) @ w.float().t() + b
    close(out, want, dtype, f"{mode} a_t={a_t}")


def test_fused_matmul_epilogues_and_strided_output():
    M, K, N = 33, 40, 50
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    r, g = torch.randn(M, N), torch.randn(M, N)
    big = torch.full((M, 3 * N), float("nan"))
    out, v = big[:, N:2 * N], torch.full((M, N), float("nan"))  # strided output view
    mm.fused_matmul(mm.Operand(x), mm.weight_t(w), out, bias=b, epilogue=mm.GATE_RESIDUAL,
                    e1=r, e2=g, v_out=v)
    close(v, x @ w.t() + b, name="V")
    close(out, r + g * (x @ w.t() + b), name="gate residual")
    assert torch.isnan(big[:, :N]).all() and torch.isnan(big[:, 2 * N:]).all()  # no overwrite
    p = torch.randn(M, N)
    o2 = torch.full((M, N), float("nan"))
    mm.fused_matmul(mm.Operand(x), mm.weight_t(w), o2, epilogue=mm.SILU_GRAD, e1=p)
    sig = torch.sigmoid(p)
    close(o2, (x @ w.t()) * sig * (1 + p * (1 - sig)), name="silu grad")
    with pytest.raises(ValueError, match="shapes do not chain"):
        mm.fused_matmul(mm.Operand(x), mm.weight_t(torch.randn(N, K + 1)), o2)


def test_noise_injection_forward_backward():
    diff = create_diffusion("")
    tab = loss_tables(diff, "cpu")
    sa, s1a = tab[:, 0].contiguous(), tab[:, 1].contiguous()
    x0 = torch.randn(29, 64, requires_grad=True)
    eps = torch.randn(29, 64)
    t = torch.randint(0, 1000, (29,))
    t[0], t[1] = 0, 999
    out = noise_injection(x0, eps, t, sa, s1a)
    close(out, diff.q_sample(x0.detach(), t, eps), name="x_t vs q_sample")
    close(out, noise_injection_reference(x0.detach(), eps, t, sa, s1a), name="x_t")
    g = torch.randn_like(out)
    out.backward(g)
    close(x0.grad, g * sa[t][:, None], name="dx0")


def test_timestep_features_and_table():
    t = torch.tensor([0, 1, 17, 500, 999, 17])
    close(timestep_features(t), timestep_embedding(t), name="sinusoids")
    steps, inv = timestep_table(t)
    assert steps.tolist() == [0, 1, 17, 500, 999] and torch.equal(steps[inv], t)
    big = torch.randint(0, 1000, (2500,))
    steps, inv = timestep_table(big)  # enough rows: every step, no sort
    assert len(steps) == 1000 and torch.equal(steps[inv], big)


def test_adaln_condition_gather_and_scatter():
    T, B, L, W, n = 7, 5, 3, 48, 41
    temb, cond, pos = (torch.randn(s, W, requires_grad=True) for s in (T, B + 1, L))
    ti, ci, k = torch.randint(0, T, (n,)), torch.randint(0, B + 1, (n,)), torch.randint(0, L, (n,))
    g = torch.randn(n, W)
    out, grads = grads_of(lambda a, b, c: adaln_condition(a, ti, b, ci, c, k), [temb, cond, pos], g)
    ref, rgrads = grads_of(lambda a, b, c: adaln_condition_reference(a, ti, b, ci, c, k),
                           [temb, cond, pos], g)
    close(out, ref, name="y")
    for a, b_, name in zip(grads, rgrads, ("dtemb", "dcond", "dpos")):
        close(a, b_, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adaln_modulation(dtype):
    n, W = 45, 64
    y = torch.randn(n, W).to(dtype).requires_grad_(True)
    layers = [(torch.randn(3 * W, W, requires_grad=True), torch.randn(3 * W, requires_grad=True)),
              (torch.randn(2 * W, W, requires_grad=True), torch.randn(2 * W, requires_grad=True))]
    params = [y] + [p for wb in layers for p in wb]
    g = torch.randn(n, 5 * W).to(dtype)

    def fused(y, *p):
        return adaln_modulation(y, [(p[0], p[1]), (p[2], p[3])])

    def ref(y, *p):
        return adaln_modulation_reference(y.float(), [(p[0], p[1]), (p[2], p[3])])

    out, grads = grads_of(fused, params, g)
    want, rgrads = grads_of(ref, params, g.float())
    close(out, want, dtype, "mods")
    for a, b, name in zip(grads, rgrads, ("dy", "dw0", "db0", "dw1", "db1")):
        close(a, b, dtype, name)


def _block_inputs(n, W, dtype):
    torch.manual_seed(1)
    h = torch.randn(n, W).to(dtype).requires_grad_(True)
    mods = [(torch.randn(n, W) * 0.5).to(dtype).requires_grad_(True) for _ in range(3)]
    ln_w = (1 + 0.1 * torch.randn(W)).requires_grad_(True)
    ln_b = (0.1 * torch.randn(W)).requires_grad_(True)
    w0, w2 = ((torch.randn(W, W) / W ** 0.5).requires_grad_(True) for _ in range(2))
    b0, b2 = ((0.1 * torch.randn(W)).requires_grad_(True) for _ in range(2))
    return [h, *mods, ln_w, ln_b, w0, b0, w2, b2]


@pytest.mark.parametrize("n,W", [(37, 64), (50, 96), (19, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adaln_block(n, W, dtype):
    inputs = _block_inputs(n, W, dtype)
    g = torch.randn(n, W).to(dtype)
    out, grads = grads_of(lambda *a: blk.adaln_block(*a), inputs, g)

    def ref(h, sh, sc, ga, *rest):
        return blk.adaln_block_reference(h.float(), sh.float(), sc.float(), ga.float(), *rest)

    want, rgrads = grads_of(ref, inputs, g.float())
    close(out, want, dtype, "h'")
    names = ("dh", "dshift", "dscale", "dgate", "dln_w", "dln_b", "dw0", "db0", "dw2", "db2")
    for a, b, name in zip(grads, rgrads, names):
        close(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_final_layer(dtype):
    n, W, d2 = 43, 80, 32
    h, sh, sc = (torch.randn(n, W).to(dtype).requires_grad_(True) for _ in range(3))
    w, b = torch.randn(d2, W, requires_grad=True), torch.randn(d2, requires_grad=True)
    g = torch.randn(n, d2)
    out, grads = grads_of(lambda *a: final_layer(*a), [h, sh, sc, w, b], g)
    want, rgrads = grads_of(lambda h, s, c, w, b: final_layer_reference(h.float(), s.float(),
                                                                         c.float(), w, b),
                            [h, sh, sc, w, b], g)
    assert out.dtype == torch.float32
    close(out, want, dtype, "out")
    for a, r, name in zip(grads, rgrads, ("dh", "dshift", "dscale", "dw", "db")):
        close(a, r, dtype, name)


def test_fused_linear_with_input_grad():
    x = torch.randn(31, 20, requires_grad=True)
    w, b = torch.randn(40, 20, requires_grad=True), torch.randn(40, requires_grad=True)
    g = torch.randn(31, 40)
    out, grads = grads_of(lambda *a: fused_linear(*a), [x, w, b], g)
    want, rgrads = grads_of(F.linear, [x, w, b], g)
    close(out, want, name="y")
    for a, r, name in zip(grads, rgrads, ("dx", "dw", "db")):
        close(a, r, name=name)


def test_diffusion_loss_matches_reference_and_its_gradient():
    diff = create_diffusion("")
    tab = loss_tables(diff, "cpu")
    n, d = 60, 64
    x0 = torch.randn(n, d) * 0.5
    x0[:4, :3] = torch.tensor([-1.0, 1.0, 0.9995])  # the decoder's edge bins
    eps = torch.randn(n, d)
    t = torch.randint(0, 1000, (n,))
    t[:6] = 0  # decoder NLL rows
    t[6], t[7] = 1, 999
    x_t = diff.q_sample(x0, t, eps)
    out = (torch.randn(n, 2 * d) * 0.5).clamp(-0.99, 0.99).requires_grad_(True)
    got = diffusion_loss(out, x0, x_t, eps, t, tab)
    want = diffusion_loss_reference(diff, out, x0, x_t, eps, t)
    close(got, want, name="per-row loss")
    g = torch.rand(n)
    (dg,) = torch.autograd.grad(got, out, g)
    (dw,) = torch.autograd.grad(want, out, g)
    close(dg, dw, name="d out")
    # eps is detached in the VB term: the eps half of the gradient is the MSE's alone
    close(dg[:, :d], (-2 * (eps - out[:, :d]) / d * g[:, None]).detach(), name="mse grad")


# Guards from the mutation run (moved from test_mutation_guards.py): each pins a behaviour the rest
# of the suite did not, with inputs where the wrong and right formulas disagree; each docstring
# names the planted bugs it was run against and failed on.


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


def _poisoned(rows, W, block, value, gen, scale=1.0, offset=0.0):
    """A (rows, W) view into a (rows, block) buffer whose lanes past W hold ``value``: a kernel
    that reads or writes lanes it does not own is caught."""
    buf = torch.full((rows, block), value)
    buf[:, :W] = offset + scale * torch.randn(rows, W, generator=gen)
    return buf, buf[:, :W]


def test_layernorm_kernels_mask_the_lanes_past_the_width():
    """LayerNorm statistics and the LN-modulation backward on a width that is not a power of two
    (40, block 64), every input a row-strided view whose padding lanes hold 1e4 (1-D weights
    too), outputs written into padded buffers: the results equal the float64 reference and
    the padding of the outputs keeps its sentinel.
    Planted: the LayerNorm statistics kernel's load not masked past the width -> fails; its
    centred difference not masked -> fails; the backward's d-shift store not masked -> fails.
    (Unmasked loads of h or ln_w in the backward change nothing: the masked xhat and du zero
    those lanes, so those plants pass, rightly.)"""
    from gendd_fast.kernels.layernorm import ln_mod_backward, ln_stats
    n, W, B, eps = 7, 40, 64, 1e-6
    gen = torch.Generator().manual_seed(3)
    _, h = _poisoned(n, W, B, 1e4, gen, offset=3.0)
    _, du = _poisoned(n, W, B, 1e4, gen)
    _, scale = _poisoned(n, W, B, 1e4, gen, scale=0.3)
    _, g = _poisoned(n, W, B, 1e4, gen)
    _, lw = _poisoned(1, W, B, 1e4, gen, scale=0.2, offset=1.0)
    _, lb = _poisoned(1, W, B, 1e4, gen, scale=0.2)
    lw, lb = lw[0], lb[0]
    mean, rstd = ln_stats(h, eps)
    hd = h.double()
    torch.testing.assert_close(mean.double(), hd.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(hd.var(1, unbiased=False) + eps),
                               rtol=1e-4, atol=1e-6)
    ds_buf, dshift = _poisoned(n, W, B, 7.0, gen)
    dc_buf, dscale = _poisoned(n, W, B, 7.0, gen)
    dh, dw, db = ln_mod_backward(du, h, mean, rstd, scale, dshift, dscale, lw, lb, g)
    # reference by autograd in float64
    hh, ww, bb, sc = (t.double().clone().requires_grad_(True) for t in (h, lw, lb, scale))
    shift = torch.zeros_like(hh, requires_grad=True)
    normed = F.layer_norm(hh, (W,), ww, bb, eps)
    u = normed * (1 + sc) + shift
    u.backward(du.double())
    for got, want, name in ((dh, hh.grad + g.double(), "dh"), (dw, ww.grad, "dln_w"),
                            (db, bb.grad, "dln_b"), (dshift, shift.grad, "dshift"),
                            (dscale, sc.grad, "dscale")):
        close(got, want, name=name)
    assert bool((ds_buf[:, W:] == 7.0).all()) and bool((dc_buf[:, W:] == 7.0).all())
