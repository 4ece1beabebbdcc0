"""Every adaLN modulation of the head from the row conditions, with SiLU in the GEMM prologue:

    mods = [SiLU(y) @ W_0^T + b_0 | SiLU(y) @ W_1^T + b_1 | ... | SiLU(y) @ W_f^T + b_f]

one GEMM per layer writing its column block of one (N, 3W * depth + 2W) buffer (SiLU(y) is never
written). Backward: ``dW_l = dmods_l^T @ SiLU(y)`` (SiLU again in the prologue),
``db_l = sum dmods_l``, and ``dy = (dmods @ [W_0; ...; W_f]) * SiLU'(y)`` with SiLU' in the
epilogue. Weights stay in their own dtype (fp32 masters): tiles are cast for the dot inside the
kernel, and weight gradients come out in fp32.
"""
from __future__ import annotations

import torch

from .utils import empty
from .matmul import PLAIN, SILU, SILU_GRAD, Operand, fused_matmul, weight_t


class AdaLNModulationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, dot_dtype, *params):
        weights, biases = params[0::2], params[1::2]
        widths = [w.shape[0] for w in weights]
        mods = empty((y.shape[0], sum(widths)), y.device, y.dtype)
        col = 0
        for w, b in zip(weights, biases):
            fused_matmul(Operand(y, SILU), weight_t(w), mods[:, col:col + w.shape[0]], bias=b,
                         dot_dtype=dot_dtype)
            col += w.shape[0]
        ctx.save_for_backward(y, *weights)
        ctx.dot_dtype, ctx.bias_dtypes = dot_dtype, [b.dtype for b in biases]
        return mods

    @staticmethod
    def backward(ctx, dmods):
        y, *weights = ctx.saved_tensors
        dmods = dmods.contiguous()
        grads, col = [], 0
        for w, bdt in zip(weights, ctx.bias_dtypes):
            d = dmods[:, col:col + w.shape[0]]
            dw = empty(w.shape, w.device, torch.float32)
            fused_matmul(Operand(d), Operand(y, SILU), dw, a_t=True, dot_dtype=ctx.dot_dtype)
            grads += [dw.to(w.dtype), d.sum(0, dtype=torch.float32).to(bdt)]
            col += w.shape[0]
        dy = None
        if ctx.needs_input_grad[0]:
            stacked = torch.cat([w.to(ctx.dot_dtype) for w in weights], 0)  # (sum widths, W)
            dy = empty(y.shape, y.device, torch.float32)
            fused_matmul(Operand(dmods), Operand(stacked, PLAIN), dy, epilogue=SILU_GRAD, e1=y,
                         dot_dtype=ctx.dot_dtype)
        return (dy, None, *grads)


def adaln_modulation(y, layers, dot_dtype=None):
    """(N, sum of widths) modulations; ``layers`` = [(weight, bias), ...] in column order."""
    params = [t for wb in layers for t in wb]
    return AdaLNModulationFunction.apply(y, dot_dtype or y.dtype, *params)


def adaln_modulation_reference(y, layers):
    s = torch.nn.functional.silu(y)
    return torch.cat([torch.nn.functional.linear(s, w.to(y.dtype), b.to(y.dtype))
                      for w, b in layers], dim=1)
