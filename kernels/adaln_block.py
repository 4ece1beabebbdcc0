"""One residual AdaLN block, forward and backward, in two fused GEMMs each way:

    a  = (LN(h) * (1 + scale) + shift) @ W0^T + b0     LN + modulate in the GEMM prologue
    v  = SiLU(a) @ W2^T + b2                           SiLU in the prologue
    h' = h + gate * v                                  bias + gate + residual in the epilogue

Only ``a``, ``v`` and ``h'`` are written (``a`` and ``v`` for the backward), plus the LN
statistics. Backward, with g = dL/dh':
    dgate = g * v,  db2 = sum g * gate                 (row kernel)
    dW2 = (g * gate)^T @ SiLU(a)                       (both products formed in prologues)
    da  = ((g * gate) @ W2) * SiLU'(a)                 (SiLU' in the epilogue)
    dW0 = da^T @ (LN(h) * (1 + scale) + shift)         (modulated LN recomputed in the prologue)
    du  = da @ W0, then LN-modulate backward + residual (row kernel): dshift, dscale, dh, d ln
"""
from __future__ import annotations

import torch

from .utils import empty, empty_like
from .layernorm import gate_backward, ln_mod_backward, ln_stats
from .matmul import GATE_RESIDUAL, LNMOD, MUL, SILU, SILU_GRAD, Operand, fused_matmul, weight_t

LN_EPS = 1e-6


class AdaLNBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, shift, scale, gate, ln_w, ln_b, w0, b0, w2, b2, dot_dtype):
        n, W = h.shape
        mean, rstd = ln_stats(h, LN_EPS)
        u = Operand(h, LNMOD, aux=scale, shift=shift, mean=mean, rstd=rstd, ln_w=ln_w, ln_b=ln_b)
        a = empty_like(h)
        fused_matmul(u, weight_t(w0), a, bias=b0, dot_dtype=dot_dtype)
        v = empty_like(h)
        out = empty_like(h)
        fused_matmul(Operand(a, SILU), weight_t(w2), out, bias=b2, epilogue=GATE_RESIDUAL, e1=h,
                     e2=gate, v_out=v, dot_dtype=dot_dtype)
        ctx.save_for_backward(h, shift, scale, gate, ln_w, ln_b, w0, w2, a, v, mean, rstd)
        ctx.dot_dtype = dot_dtype
        ctx.dtypes = (ln_w.dtype, b0.dtype, b2.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        h, shift, scale, gate, ln_w, ln_b, w0, w2, a, v, mean, rstd = ctx.saved_tensors
        dt = ctx.dot_dtype
        g = g.contiguous()
        n, W = h.shape
        dshift, dscale, dgate = (empty((n, W), h.device, shift.dtype)
                                 for _ in range(3))
        db2 = gate_backward(g, v, gate, dgate)
        dv = Operand(g, MUL, aux=gate)
        dw2 = empty((W, W), h.device, torch.float32)
        fused_matmul(dv, Operand(a, SILU), dw2, a_t=True, dot_dtype=dt)
        da = empty((n, W), h.device, h.dtype)
        fused_matmul(dv, Operand(w2), da, epilogue=SILU_GRAD, e1=a, dot_dtype=dt)
        db0 = da.sum(0, dtype=torch.float32)
        u = Operand(h, LNMOD, aux=scale, shift=shift, mean=mean, rstd=rstd, ln_w=ln_w, ln_b=ln_b)
        dw0 = empty((W, W), h.device, torch.float32)
        fused_matmul(Operand(da), u, dw0, a_t=True, dot_dtype=dt)
        du = empty((n, W), h.device, torch.float32)
        fused_matmul(Operand(da), Operand(w0), du, dot_dtype=dt)
        dh, dlnw, dlnb = ln_mod_backward(du, h, mean, rstd, scale, dshift, dscale, ln_w, ln_b, g=g)
        lnw_dt, b0_dt, b2_dt = ctx.dtypes
        return (dh, dshift, dscale, dgate, dlnw.to(lnw_dt), dlnb.to(lnw_dt), dw0.to(w0.dtype),
                db0.to(b0_dt), dw2.to(w2.dtype), db2.to(b2_dt), None)


def adaln_block(h, shift, scale, gate, ln_w, ln_b, w0, b0, w2, b2, dot_dtype=None):
    """``h + gate * MLP(LN(h) * (1 + scale) + shift)`` for (N, W) activations and modulations."""
    return AdaLNBlockFunction.apply(h, shift, scale, gate, ln_w, ln_b, w0, b0, w2, b2,
                                    dot_dtype or h.dtype)


def adaln_block_reference(h, shift, scale, gate, ln_w, ln_b, w0, b0, w2, b2):
    F = torch.nn.functional
    dt = h.dtype
    u = F.layer_norm(h, (h.shape[1],), ln_w.to(dt), ln_b.to(dt), LN_EPS) * (1 + scale) + shift
    v = F.linear(F.silu(F.linear(u, w0.to(dt), b0.to(dt))), w2.to(dt), b2.to(dt))
    return h + gate * v
