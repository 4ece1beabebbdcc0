"""The AdaLN condition of every row, assembled from three small tables:

    y[r] = temb[ti[r]] + cond[ci[r]] + pos[k[r]]

``temb`` holds the time MLP output of each distinct timestep, ``cond`` the condition embedding
of each *image* plus one last row holding ``cond_embed``'s bias alone (a dropped row points
there: ``cond_embed(0)`` is its bias), ``pos`` the token-position table. The embeddings are
computed once per timestep / image / token instead of once per row; the backward scatters the
row gradients back into the three tables (``index_add``).
"""
from __future__ import annotations

import torch

from .utils import cdiv, empty, next_pow2, row_block, tl, triton

if triton is not None:

    @triton.jit
    def _condition_kernel(TEMB, st, TI, COND, sc, CI, CB, NB, POS, sp, K, Y, sy, n_rows, W,
                          ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        """Row r: temb[ti] + cond[ci] + pos[k], where a row with ci >= NB (a dropped
        condition) reads CB (cond_embed's bias) instead of a cond row."""
        cols = tl.arange(0, BLOCK_W)
        cmask = cols < W
        for i in range(ROWS):
            r = tl.program_id(0) * ROWS + i
            if r < n_rows:
                ti = tl.load(TI + r)
                ci = tl.load(CI + r)
                k = tl.load(K + r)
                y = tl.load(TEMB + ti * st + cols, mask=cmask, other=0.0).to(tl.float32)
                if ci < NB:
                    y += tl.load(COND + ci * sc + cols, mask=cmask, other=0.0).to(tl.float32)
                else:
                    y += tl.load(CB + cols, mask=cmask, other=0.0).to(tl.float32)
                y += tl.load(POS + k * sp + cols, mask=cmask, other=0.0).to(tl.float32)
                tl.store(Y + r * sy + cols, y.to(Y.dtype.element_ty), mask=cmask)


class AdaLNConditionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, temb, ti, cond, ci, pos, k, out_dtype):
        n, W = ti.shape[0], temb.shape[1]
        if cond.shape[1] != W or pos.shape[1] != W:
            raise ValueError(f"condition tables must share width {W}: cond {tuple(cond.shape)}, "
                             f"pos {tuple(pos.shape)}")
        y = empty((n, W), temb.device, out_dtype)
        rows = row_block(n)
        _condition_kernel[(cdiv(n, rows),)](
            temb, temb.stride(0), ti, cond, cond.stride(0), ci, cond, cond.shape[0], pos,
            pos.stride(0), k, y,
            y.stride(0), n, W, ROWS=rows, BLOCK_W=next_pow2(W))
        ctx.save_for_backward(ti, ci, k)
        ctx.shapes = (temb.shape[0], cond.shape[0], pos.shape[0])
        ctx.dtypes = (temb.dtype, cond.dtype, pos.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        ti, ci, k = ctx.saved_tensors
        dy = dy.float()
        grads = []
        for idx, rows, dt, need in zip((ti, ci, k), ctx.shapes, ctx.dtypes,
                                       (ctx.needs_input_grad[0], ctx.needs_input_grad[2],
                                        ctx.needs_input_grad[4])):
            if need:
                g = torch.zeros((rows, dy.shape[1]), device=dy.device, dtype=torch.float32)
                grads.append(g.index_add_(0, idx, dy).to(dt))
            else:
                grads.append(None)
        return grads[0], None, grads[1], None, grads[2], None, None


def adaln_condition(temb, ti, cond, ci, pos, k, out_dtype=None):
    """(N, W) conditions ``temb[ti] + cond[ci] + pos[k]`` (see the module docstring)."""
    return AdaLNConditionFunction.apply(temb, ti.contiguous(), cond, ci.contiguous(), pos,
                                        k.contiguous(), out_dtype or temb.dtype)


def condition_rows(temb, ti, cond, ci, cond_bias, pos, k, out_dtype):
    """Forward only (the one-function head step does its own backward): (N, W) rows
    ``temb[ti] + cond[ci] + pos[k]``, with ``ci == len(cond)`` reading ``cond_bias``."""
    n, W = ti.shape[0], temb.shape[1]
    y = empty((n, W), temb.device, out_dtype)
    rows = row_block(n)
    _condition_kernel[(cdiv(n, rows),)](
        temb, temb.stride(0), ti, cond, cond.stride(0), ci, cond_bias, cond.shape[0], pos,
        pos.stride(0), k, y, y.stride(0), n, W, ROWS=rows, BLOCK_W=next_pow2(W))
    return y


def adaln_condition_reference(temb, ti, cond, ci, pos, k):
    return temb[ti] + cond[ci] + pos[k]
