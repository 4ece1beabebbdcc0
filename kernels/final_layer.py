"""The head's final layer: ``out = (LN(h) * (1 + scale) + shift) @ Wf^T + bf`` (LN without
affine), with LN + modulate in the GEMM prologue; the output ``[eps_hat, v]`` is written in fp32
for the loss. Backward: ``dWf = dout^T @ u`` (u recomputed in the prologue), ``du = dout @ Wf``,
then the LN-modulate backward row kernel gives dshift, dscale and dh.
"""
from __future__ import annotations

import torch

from .utils import empty
from .adaln_block import LN_EPS
from .layernorm import ln_mod_backward, ln_stats
from .matmul import LNMOD, Operand, fused_matmul, weight_t


class FinalLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, shift, scale, w, b, dot_dtype):
        mean, rstd = ln_stats(h, LN_EPS)
        out = empty((h.shape[0], w.shape[0]), h.device, torch.float32)
        u = Operand(h, LNMOD, aux=scale, shift=shift, mean=mean, rstd=rstd)
        fused_matmul(u, weight_t(w), out, bias=b, dot_dtype=dot_dtype)
        ctx.save_for_backward(h, shift, scale, w, mean, rstd)
        ctx.dot_dtype, ctx.bias_dtype = dot_dtype, b.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        h, shift, scale, w, mean, rstd = ctx.saved_tensors
        dt = ctx.dot_dtype
        g = g.contiguous()
        n, W = h.shape
        u = Operand(h, LNMOD, aux=scale, shift=shift, mean=mean, rstd=rstd)
        dw = empty(w.shape, h.device, torch.float32)
        fused_matmul(Operand(g), u, dw, a_t=True, dot_dtype=dt)
        du = empty((n, W), h.device, torch.float32)
        fused_matmul(Operand(g), Operand(w), du, dot_dtype=dt)
        dshift, dscale = (empty((n, W), h.device, shift.dtype)
                          for _ in range(2))
        dh, _, _ = ln_mod_backward(du, h, mean, rstd, scale, dshift, dscale)
        db = g.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dh, dshift, dscale, dw.to(w.dtype), db, None


def final_layer(h, shift, scale, w, b, dot_dtype=None):
    return FinalLayerFunction.apply(h, shift, scale, w, b, dot_dtype or h.dtype)


def final_layer_reference(h, shift, scale, w, b):
    F = torch.nn.functional
    dt = h.dtype
    u = F.layer_norm(h, (h.shape[1],), None, None, LN_EPS) * (1 + scale) + shift
    return F.linear(u, w.to(dt), b.to(dt)).float()
