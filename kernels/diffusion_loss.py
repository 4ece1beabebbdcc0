"""The GenDD diffusion loss per row in one pass: MSE on eps plus the improved-DDPM variational
term of the learned-range variance, in bits, with eps detached in the VB term:

    mse = mean_d (eps - eps_hat)^2
    log var_p = f * log(beta_t) + (1 - f) * log(post_var_clipped_t),   f = (v + 1) / 2
    vb  = mean_d KL(q(x_{t-1} | x_t, x0) || p) / ln 2          (t > 0)
        = -mean_d log p_decoder(x0) / ln 2                      (t = 0: discretised Gaussian,
                                                                 bins of 2/255 on [-1, 1])

The loss is elementwise in each row, so the kernel also writes its gradient with respect to the
head output ``[eps_hat, v]`` in the same pass; backward only scales it by the incoming gradient.
``tables`` is (1000, 8) fp32: sqrt(abar), sqrt(1 - abar), sqrt(1 / abar), sqrt(1 / abar - 1),
the posterior mean coefficients on x0 and x_t, log(beta) and the clipped posterior log-variance.
"""
from __future__ import annotations

import torch

from .utils import cdiv, empty, next_pow2, row_block, tl, triton

TABLE_COLUMNS = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_mean_coef1", "posterior_mean_coef2", "log_betas",
                 "posterior_log_variance_clipped")


def loss_tables(diffusion, device) -> torch.Tensor:
    """The (T, 8) fp32 table of a :class:`gendd_fast.diffusion.GaussianDiffusion` (float64
    values cast to fp32, as the reference casts after indexing)."""
    cols = [torch.from_numpy(diffusion.np[c]) for c in TABLE_COLUMNS]
    return torch.stack(cols, dim=1).float().to(device).contiguous()


if triton is not None:

    @triton.jit
    def _diffusion_loss_kernel(OUT, so, X0, sx0, XT, sxt, EPS, se, T, TAB, LOSS, DOUT, sdo,
                               n_rows, D, grad_scale, NEED_GRAD: tl.constexpr,
                               XT_FROM_NOISE: tl.constexpr, ROWS: tl.constexpr,
                               BLOCK_D: tl.constexpr):
        """XT_FROM_NOISE: x_t is re-formed from x0 and the noise (table columns 0 and 1, as
        the noise injection does) instead of read. DOUT is scaled by ``grad_scale`` (1 / rows
        when the caller takes the mean)."""
        INV_LN2: tl.constexpr = 1.4426950408889634
        GELU_C: tl.constexpr = 1.5957691216057308  # 2 * sqrt(2 / pi)
        cols = tl.arange(0, BLOCK_D)
        cm = cols < D
        for i in range(ROWS):
            r = tl.program_id(0) * ROWS + i
            if r < n_rows:
                t = tl.load(T + r)
                sra = tl.load(TAB + t * 8 + 2)
                srm1 = tl.load(TAB + t * 8 + 3)
                c1 = tl.load(TAB + t * 8 + 4)
                c2 = tl.load(TAB + t * 8 + 5)
                lb = tl.load(TAB + t * 8 + 6)
                lpc = tl.load(TAB + t * 8 + 7)
                e_hat = tl.load(OUT + r * so + cols, mask=cm, other=0.0).to(tl.float32)
                vv = tl.load(OUT + r * so + D + cols, mask=cm, other=0.0).to(tl.float32)
                x0 = tl.load(X0 + r * sx0 + cols, mask=cm, other=0.0).to(tl.float32)
                eps = tl.load(EPS + r * se + cols, mask=cm, other=0.0).to(tl.float32)
                if XT_FROM_NOISE:
                    xt = tl.load(TAB + t * 8) * x0 + tl.load(TAB + t * 8 + 1) * eps
                else:
                    xt = tl.load(XT + r * sxt + cols, mask=cm, other=0.0).to(tl.float32)
                diff = tl.where(cm, eps - e_hat, 0.0)
                mse = tl.sum(diff * diff, axis=0) / D
                # the model's reverse step from the detached eps_hat
                mu_p = c1 * (sra * xt - srm1 * e_hat) + c2 * xt
                frac = (vv + 1.0) * 0.5
                lp = frac * lb + (1.0 - frac) * lpc
                if t == 0:
                    # discretised Gaussian decoder, cdf(u) = sigmoid(2c(u + 0.044715 u^3)) (the
                    # tanh form of the reference), log scale = lp / 2, du/d(log scale) = -u
                    inv = tl.exp(-0.5 * lp)
                    cen = x0 - mu_p
                    up = inv * (cen + 1.0 / 255.0)
                    um = inv * (cen - 1.0 / 255.0)
                    sp = tl.sigmoid(GELU_C * (up + 0.044715 * up * up * up))
                    sm = tl.sigmoid(GELU_C * (um + 0.044715 * um * um * um))
                    dcp = -sp * (1.0 - sp) * GELU_C * (1.0 + 3.0 * 0.044715 * up * up) * up
                    dcm = -sm * (1.0 - sm) * GELU_C * (1.0 + 3.0 * 0.044715 * um * um) * um
                    delta = sp - sm
                    one_m = 1.0 - sm
                    lo = x0 < -0.999
                    hi = x0 > 0.999
                    # clamp(min=1e-12) as the reference: no gradient where it clamps
                    p_sel = tl.where(lo, sp, tl.where(hi, one_m, delta))
                    dp_sel = tl.where(lo, dcp, tl.where(hi, -dcm, dcp - dcm))
                    ok = p_sel > 1e-12
                    term = -tl.log(tl.maximum(p_sel, 1e-12))
                    dterm = -0.5 * tl.where(ok, dp_sel / tl.where(ok, p_sel, 1.0), 0.0)
                else:
                    # KL(q || p), var_q = exp(lpc)
                    dm = (c1 * x0 + c2 * xt) - mu_p
                    e_qp = tl.exp(lpc - lp)
                    e_p = tl.exp(-lp)
                    term = 0.5 * (-1.0 + lp - lpc + e_qp + dm * dm * e_p)
                    dterm = 0.5 * (1.0 - e_qp - dm * dm * e_p)
                vb = tl.sum(tl.where(cm, term, 0.0), axis=0) / D * INV_LN2
                tl.store(LOSS + r, mse + vb)
                if NEED_GRAD:
                    tl.store(DOUT + r * sdo + cols, -2.0 * diff / D * grad_scale, mask=cm)
                    dv = dterm * INV_LN2 / D * 0.5 * (lb - lpc) * grad_scale
                    tl.store(DOUT + r * sdo + D + cols, dv, mask=cm)


class DiffusionLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, x0, x_t, eps, t, tables):
        n, d2 = out.shape
        d = d2 // 2
        if x0.shape != (n, d) or x_t.shape != (n, d) or eps.shape != (n, d) or t.shape != (n,):
            raise ValueError(f"diffusion loss: head output {tuple(out.shape)} needs x0, x_t, eps "
                             f"of ({n}, {d}) and t of ({n},)")
        need = out.requires_grad
        loss = empty(n, out.device, torch.float32)
        dout = empty((n, d2), out.device, torch.float32) if need else loss
        rows = row_block(n)
        _diffusion_loss_kernel[(cdiv(n, rows),)](
            out, out.stride(0), x0, x0.stride(0), x_t, x_t.stride(0), eps, eps.stride(0),
            t.contiguous(), tables, loss, dout, dout.stride(0) if need else 0, n, d, 1.0,
            NEED_GRAD=need, XT_FROM_NOISE=False, ROWS=rows, BLOCK_D=next_pow2(d))
        if need:
            ctx.save_for_backward(dout)
        ctx.out_dtype = out.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        (dout,) = ctx.saved_tensors
        return (dout * g[:, None]).to(ctx.out_dtype), None, None, None, None, None


def diffusion_loss(out, x0, x_t, eps, t, tables):
    """Per-row ``mse + vb`` (N,) for head output ``out`` (N, 2d); gradients reach ``out`` only."""
    return DiffusionLossFunction.apply(out, x0, x_t, eps, t, tables)


def loss_rows(out, x0, eps, t, tables, grad_scale: float):
    """Forward only, x_t re-formed from ``x0`` and ``eps``: per-row losses (N,) and their
    gradient with respect to ``out`` times ``grad_scale`` (the one-function head step)."""
    n, d2 = out.shape
    loss = empty(n, out.device, torch.float32)
    dout = empty((n, d2), out.device, torch.float32)
    rows = row_block(n)
    _diffusion_loss_kernel[(cdiv(n, rows),)](
        out, out.stride(0), x0, x0.stride(0), x0, x0.stride(0), eps, eps.stride(0), t, tables,
        loss, dout, dout.stride(0), n, d2 // 2, grad_scale, NEED_GRAD=True, XT_FROM_NOISE=True,
        ROWS=rows, BLOCK_D=next_pow2(d2 // 2))
    return loss, dout


def diffusion_loss_reference(diffusion, out, x0, x_t, eps, t):
    return diffusion.losses_from_output(out, x0, x_t, t, eps)["loss"]
