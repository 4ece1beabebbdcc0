"""Noise injection ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps`` in one pass.

The two coefficients are gathered per row from fp32 tables inside the kernel (no per-row
coefficient tensors). Backward: ``dx0 = sqrt(abar_t) * g`` and ``deps = sqrt(1 - abar_t) * g``.
"""
from __future__ import annotations

import torch

from .utils import cdiv, empty, next_pow2, row_block, tl, triton

if triton is not None:

    @triton.jit
    def _noise_injection_kernel(X0, sx0, EPS, se, T, SQRT_AC, SQRT_1MAC, OUT, so, n_rows, D,
                                ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        for i in range(ROWS):
            r = tl.program_id(0) * ROWS + i
            if r < n_rows:
                t = tl.load(T + r)
                a = tl.load(SQRT_AC + t)
                b = tl.load(SQRT_1MAC + t)
                x0 = tl.load(X0 + r * sx0 + cols, mask=cmask, other=0.0).to(tl.float32)
                e = tl.load(EPS + r * se + cols, mask=cmask, other=0.0).to(tl.float32)
                tl.store(OUT + r * so + cols, (a * x0 + b * e).to(OUT.dtype.element_ty),
                         mask=cmask)


def _launch(x0, eps, t, sqrt_ac, sqrt_1mac, out):
    n, d = x0.shape
    rows = row_block(n)
    _noise_injection_kernel[(cdiv(n, rows),)](
        x0, x0.stride(0), eps, eps.stride(0), t, sqrt_ac, sqrt_1mac, out, out.stride(0), n, d,
        ROWS=rows, BLOCK_D=next_pow2(d))
    return out


class NoiseInjectionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, eps, t, sqrt_ac, sqrt_1mac):
        if x0.shape != eps.shape or x0.ndim != 2 or t.shape != (x0.shape[0],):
            raise ValueError(f"noise injection: x0 {tuple(x0.shape)}, eps {tuple(eps.shape)} and "
                             f"t {tuple(t.shape)} must be (N, d), (N, d) and (N,)")
        out = empty(x0.shape, x0.device, torch.float32)
        _launch(x0, eps, t.contiguous(), sqrt_ac, sqrt_1mac, out)
        ctx.save_for_backward(t, sqrt_ac, sqrt_1mac)
        return out

    @staticmethod
    def backward(ctx, g):
        t, sqrt_ac, sqrt_1mac = ctx.saved_tensors
        dx0 = g * sqrt_ac[t][:, None] if ctx.needs_input_grad[0] else None
        deps = g * sqrt_1mac[t][:, None] if ctx.needs_input_grad[1] else None
        return dx0, deps, None, None, None


def noise_injection(x0, eps, t, sqrt_ac, sqrt_1mac):
    """fp32 ``x_t`` (N, d) from ``x0``, ``eps`` (N, d), integer ``t`` (N,) and fp32 tables."""
    return NoiseInjectionFunction.apply(x0, eps, t, sqrt_ac, sqrt_1mac)


def noise_injection_reference(x0, eps, t, sqrt_ac, sqrt_1mac):
    return sqrt_ac[t][:, None] * x0.float() + sqrt_1mac[t][:, None] * eps.float()
