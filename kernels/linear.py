"""``y = x @ W^T + b`` through the fused GEMM (the head's ``input_proj``), casting tiles to the
compute dtype inside the kernel so neither ``x`` (fp32 ``x_t``) nor the fp32 master weight is
copied; weight gradients come out in fp32."""
from __future__ import annotations

import torch

from .utils import empty
from .matmul import Operand, fused_matmul, weight_t


class FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, out_dtype, dot_dtype):
        out = empty((x.shape[0], w.shape[0]), x.device, out_dtype)
        fused_matmul(Operand(x), weight_t(w), out, bias=b, dot_dtype=dot_dtype)
        ctx.save_for_backward(x, w)
        ctx.dot_dtype, ctx.bias_dtype = dot_dtype, b.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.contiguous()
        dw = empty(w.shape, w.device, torch.float32)
        fused_matmul(Operand(g), Operand(x), dw, a_t=True, dot_dtype=ctx.dot_dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = empty(x.shape, x.device, torch.float32)
            fused_matmul(Operand(g), Operand(w), dx, dot_dtype=ctx.dot_dtype)
            dx = dx.to(x.dtype)
        return dx, dw.to(w.dtype), g.sum(0, dtype=torch.float32).to(ctx.bias_dtype), None, None


def fused_linear(x, w, b, out_dtype=None, dot_dtype=None):
    return FusedLinearFunction.apply(x, w, b, out_dtype or x.dtype, dot_dtype or x.dtype)
