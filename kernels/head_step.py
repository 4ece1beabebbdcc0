"""The whole GenDD head training loss, forward and backward, as one autograd function.

Per-op autograd functions (the other modules here) each pay autograd's bookkeeping, return
their own gradient tensors and reduce their own bias gradients; across the head that was
~150 launches a step. Here one function runs every kernel of the step in order and owns the
buffers, so (for depth D):

- forward (12 + D * 3 launches + 3): the time MLP once per timestep and ``cond_embed`` once
  per image (fused GEMMs), the row conditions (one gather kernel; a dropped row reads the bias),
  all adaLN modulations in ONE GEMM over the stacked weights, ``input_proj`` with the noise
  injection in its prologue (``x_t`` is never written), LN statistics + two GEMMs per block,
  the final layer, and the loss kernel, which writes d loss / d out (x 1 / rows for a mean);
- backward: one zeroed fp32 buffer holds the partial column sums of every bias / LN-affine
  gradient (written by kernels that already hold those tensors: GEMM epilogues, the LN-modulate
  backward, which also does the gated-residual backward of the block below) and the three
  condition tables, which the modulation ``dy`` GEMM scatters into from its epilogue; every
  modulation gradient lands in one preallocated buffer (no ``cat``), the modulation weight
  gradient is one GEMM, and one ``sum`` at the end reduces all partial columns.

Weights arrive already cast to the compute dtype (:class:`StepWeights`, cast once per optimizer
step by the caller); gradients come out in fp32 for the fp32 masters. Atomic adds make the
condition-table gradients' summation order vary run to run (as ``index_add_`` on CUDA does).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List

import torch

from .adaln_block import LN_EPS
from .adaln_condition import condition_rows
from .diffusion_loss import loss_rows
from .layernorm import ln_mod_backward, ln_stats
from .matmul import (GATE_RESIDUAL, LNMOD, MIN_BLOCK_M, MUL, NOISE, SCATTER, SILU, SILU_GRAD,
                     Operand, fused_matmul)
from .utils import cdiv, empty, row_block

# Order of the master parameters passed to the function (after the fixed inputs).
HEAD_NAMES = ("te0_w", "te0_b", "te2_w", "te2_b", "cond_w", "cond_b", "pos")
BLOCK_NAMES = ("ln_w", "ln_b", "w0", "b0", "w2", "b2")


@dataclass
class StepWeights:
    """The GEMM weights of one step in the compute dtype, views of one buffer: the time MLP,
    ``cond_embed``, the stacked modulation weights (sum of widths, W) and their stacked fp32
    biases, ``input_proj``, each block's two MLP weights and the final layer."""
    dtype: torch.dtype
    te0: torch.Tensor
    te2: torch.Tensor
    cond: torch.Tensor
    mod: torch.Tensor
    mod_b: torch.Tensor
    inp: torch.Tensor
    w0: List[torch.Tensor]
    w2: List[torch.Tensor]
    fin: torch.Tensor


@dataclass
class StepConsts:
    """Per device: the sinusoidal features of every timestep (compute dtype) and the loss
    tables (fp32) with their first two columns."""
    feat: torch.Tensor
    tab: torch.Tensor
    sqrt_ac: torch.Tensor
    sqrt_1mac: torch.Tensor


@functools.lru_cache(maxsize=None)
def master_index(depth: int):
    """Positions of the master parameters in the function's argument list."""
    idx = {k: i for i, k in enumerate(HEAD_NAMES)}
    pos = len(HEAD_NAMES)
    idx["mod_w"] = [pos + 2 * i for i in range(depth + 1)]
    idx["mod_b"] = [pos + 2 * i + 1 for i in range(depth + 1)]
    pos += 2 * (depth + 1)
    idx["in_w"], idx["in_b"] = pos, pos + 1
    pos += 2
    for j, k in enumerate(BLOCK_NAMES):
        idx[k] = [pos + 6 * i + j for i in range(depth)]
    pos += 6 * depth
    idx["fin_w"], idx["fin_b"] = pos, pos + 1
    idx["count"] = pos + 2
    return idx


@functools.lru_cache(maxsize=None)
def _cols(W, depth, d):
    return _Cols(W, depth, d)


class _Cols:
    """Column offsets of the partial-sum buffer: every bias / LN-affine gradient of the step."""

    def __init__(self, W, depth, d):
        self.MW = MW = 3 * W * depth + 2 * W          # modulation biases, in mods order
        self.lw = [MW + 2 * W * i for i in range(depth)]
        self.lb = [MW + 2 * W * i + W for i in range(depth)]
        o = MW + 2 * W * depth
        self.b0 = [o + 2 * W * i for i in range(depth)]
        self.b2 = [o + 2 * W * i + W for i in range(depth)]
        o += 2 * W * depth
        self.bin, self.bf = o, o + W
        self.tb2 = o + W + 2 * d
        self.tb0, self.cb = self.tb2 + W, self.tb2 + 2 * W
        self.total = self.cb + W


class HeadStepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, noise, t, ti, k, ci, z_img, mean, consts, wts, *m):
        """``t``: each row's timestep; ``ti``: its row in ``consts.feat`` (``t`` itself when
        the features cover every timestep)."""
        dt, D = wts.dtype, len(wts.w0)
        ix = master_index(D)
        n, d = x0.shape
        W, T, B = m[0].shape[0], consts.feat.shape[0], z_img.shape[0]
        dev = x0.device
        kw = dict(dot_dtype=dt, narrow=False)
        MW = wts.mod.shape[0]
        # every activation the forward writes in the compute dtype: one allocation
        shapes = [(T, W), (T, W), (B, W), (n, MW), (n, W)] + [(n, W)] * (3 * D)
        buf = empty(sum(a * b for a, b in shapes), dev, dt)
        acts = [x.view(sh) for x, sh in zip(buf.split([a * b for a, b in shapes]), shapes)]
        h1, temb, cond, mods, h = acts[:5]
        # the condition tables: once per timestep / image
        fused_matmul(Operand(consts.feat), Operand(wts.te0.t()), h1, bias=m[1], **kw)
        fused_matmul(Operand(h1, SILU), Operand(wts.te2.t()), temb, bias=m[3], **kw)
        fused_matmul(Operand(z_img), Operand(wts.cond.t()), cond, bias=m[5], **kw)
        y = condition_rows(temb, ti, cond, ci, m[5], m[6], k, dt)
        fused_matmul(Operand(y, SILU), Operand(wts.mod.t()), mods, bias=wts.mod_b, **kw)
        xt = Operand(x0, NOISE, aux=noise, mean=t, rstd=consts.sqrt_ac, ln_w=consts.sqrt_1mac)
        fused_matmul(xt, Operand(wts.inp.t()), h, bias=m[ix["in_b"]], **kw)
        blocks = []
        for i in range(D):
            mu, rs = ln_stats(h, LN_EPS)
            c = 3 * W * i
            shift, scale, gate = mods[:, c:c + W], mods[:, c + W:c + 2 * W], \
                mods[:, c + 2 * W:c + 3 * W]
            u = Operand(h, LNMOD, aux=scale, shift=shift, mean=mu, rstd=rs,
                        ln_w=m[ix["ln_w"][i]], ln_b=m[ix["ln_b"][i]])
            a, v, out = acts[5 + 3 * i:8 + 3 * i]
            fused_matmul(u, Operand(wts.w0[i].t()), a, bias=m[ix["b0"][i]], **kw)
            fused_matmul(Operand(a, SILU), Operand(wts.w2[i].t()), out, bias=m[ix["b2"][i]],
                         epilogue=GATE_RESIDUAL, e1=h, e2=gate, v_out=v, **kw)
            blocks.append((h, mu, rs, a, v, shift, scale, gate))
            h = out
        mu, rs = ln_stats(h, LN_EPS)
        c = 3 * W * D
        fshift, fscale = mods[:, c:c + W], mods[:, c + W:c + 2 * W]
        out = empty((n, 2 * d), dev, torch.float32)
        fused_matmul(Operand(h, LNMOD, aux=fscale, shift=fshift, mean=mu, rstd=rs),
                     Operand(wts.fin.t()), out, bias=m[ix["fin_b"]], **kw)
        rows, dout = loss_rows(out, x0, noise, t, consts.tab, 1.0 / n if mean else 1.0)
        ctx.state = (x0, noise, t, ti, k, ci, z_img, consts, wts, h1, y, mods, xt, blocks,
                     (h, mu, rs, fshift, fscale), dout, [p.shape for p in m], ix,
                     [m[j] for j in ix["ln_w"]], [m[j] for j in ix["ln_b"]])
        return rows.mean() if mean else rows

    @staticmethod
    def backward(ctx, g):
        (x0, noise, t, ti, k, ci, z_img, consts, wts, h1, y, mods, xt, blocks, final, dout,
         shapes, ix, ln_w, ln_b) = ctx.state
        ctx.state = None
        dt, D = wts.dtype, len(wts.w0)
        n, d = x0.shape
        W, T, B, zc = h1.shape[1], h1.shape[0], z_img.shape[0], z_img.shape[1]
        L = shapes[ix["pos"]][0]
        dev = x0.device
        kw = dict(dot_dtype=dt, narrow=False)
        cols = _cols(W, D, d)
        MW = cols.MW
        # fp32 weight gradients + the reduced sums, in one buffer (the masters' .grad)
        wshapes = [(MW, W)] + [(W, W)] * (2 * D)
        sizes = [a * b for a, b in wshapes] + [cols.total]
        G = empty(sum(sizes), dev, torch.float32)
        views = G.split(sizes)
        dmodw = views[0].view(MW, W)
        dw0 = [views[1 + 2 * i].view(W, W) for i in range(D)]
        dw2 = [views[2 + 2 * i].view(W, W) for i in range(D)]
        S = views[1 + 2 * D]
        # zeroed, in one launch: the partial sums (every producer writes only its own rows),
        # the three tables the condition backward scatters into, and the weight gradients
        # whose grids are under one wave (time MLP, cond_embed, input_proj, final layer) and
        # the condition's gradient dz (64 rows): split-K GEMMs add their partial tiles there
        # rows: one per row-kernel program (over the n rows) or GEMM M tile (n or T rows)
        prow = max(cdiv(n, row_block(n)), cdiv(max(n, T), MIN_BLOCK_M))
        need_dz = ctx.needs_input_grad[6]
        zshapes = [(prow, cols.total), (T, W), (B + 1, W), (L, W), (W, consts.feat.shape[1]),
                   (W, zc), (W, d), (2 * d, W), (W, W)] + ([(B, zc)] if need_dz else [])
        zsizes = [a * b for a, b in zshapes]
        Z = torch.zeros(sum(zsizes), device=dev, dtype=torch.float32)
        P, dtemb, dcond, dpos, dte0, dcw, dinw, dfin, dte2, *dz = (
            x.view(sh) for x, sh in zip(Z.split(zsizes), zshapes))
        dz = dz[0] if need_dz else None

        gx = (g.reshape(1, 1) if g.dim() == 0 else g.reshape(n, 1)).expand(n, 2 * d)
        dop = Operand(dout, MUL, aux=gx)
        h, mu, rs, fshift, fscale = final
        # one du and one da serve every layer in turn (each is consumed before the next)
        du = empty((n, W), dev, torch.float32)
        da = empty((n, W), dev, dt)
        dv = empty((n, W), dev, dt)  # g * gate of the block below, from its LN backward
        # du also writes g * dout in the compute dtype: the final layer's weight gradient
        # then reads a plain operand, which streams through shared memory (pipelined wgmma)
        dsc = empty((n, 2 * d), dev, dt)
        fused_matmul(dop, Operand(wts.fin), du, part=P, a_sum=cols.bf, a_copy=dsc, **kw)
        fused_matmul(Operand(dsc), Operand(h, LNMOD, aux=fscale, shift=fshift, mean=mu,
                                          rstd=rs), dfin, a_t=True, accumulate=True, **kw)
        dmods = empty((n, MW), dev, dt)
        c = 3 * W * D

        def below(i, offs):
            """Fold the gated-residual backward of block i (if any) into this LN backward."""
            if i < 0:
                offs["dh"] = cols.bin
                return None
            offs.update(g=3 * W * i + 2 * W, gb=cols.b2[i])
            return (blocks[i][4], blocks[i][7], dmods[:, 3 * W * i + 2 * W:3 * W * (i + 1)], dv)

        offs = dict(sh=c, sc=c + W)
        gate_below = below(D - 1, offs)
        gcur = ln_mod_backward(du, h, mu, rs, fscale, dmods[:, c:c + W],
                               dmods[:, c + W:c + 2 * W], part=P, offsets=offs,
                               gate_below=gate_below, dh_dtype=dt)
        for i in reversed(range(D)):
            h, mu, rs, a, v, shift, scale, gate = blocks[i]
            # dv (plain): this weight gradient runs as dW^T = SiLU(a)^T dv, wgmma-pipelined
            fused_matmul(Operand(dv), Operand(a, SILU), dw2[i], a_t=True, **kw)
            fused_matmul(Operand(dv), Operand(wts.w2[i]), da, epilogue=SILU_GRAD, e1=a, part=P,
                         c_sum=cols.b0[i], **kw)
            u = Operand(h, LNMOD, aux=scale, shift=shift, mean=mu, rstd=rs, ln_w=ln_w[i],
                        ln_b=ln_b[i])
            fused_matmul(Operand(da), u, dw0[i], a_t=True, **kw)
            fused_matmul(Operand(da), Operand(wts.w0[i]), du, **kw)
            c = 3 * W * i
            offs = dict(lw=cols.lw[i], lb=cols.lb[i], sh=c, sc=c + W)
            gate_below = below(i - 1, offs)
            gcur = ln_mod_backward(du, h, mu, rs, scale, dmods[:, c:c + W],
                                   dmods[:, c + W:c + 2 * W], ln_w[i], ln_b[i],
                                   g=gcur, part=P, offsets=offs, gate_below=gate_below,
                                   dh_dtype=dt)
        fused_matmul(Operand(gcur), xt, dinw, a_t=True, accumulate=True, **kw)
        fused_matmul(Operand(dmods), Operand(y, SILU), dmodw, a_t=True, **kw)
        fused_matmul(Operand(dmods), Operand(wts.mod), None, epilogue=SCATTER, e1=y, part=P,
                     c_sum=cols.tb2, c_sum2=cols.cb, scatter=(ti, ci, k, dtemb, dcond, dpos),
                     shape=(n, W), **kw)
        dh1 = empty((T, W), dev, torch.float32)
        dtemb_c = empty((T, W), dev, dt)  # the fp32 table in the compute dtype, as for dsc
        fused_matmul(Operand(dtemb), Operand(wts.te2), dh1, epilogue=SILU_GRAD, e1=h1, part=P,
                     c_sum=cols.tb0, a_copy=dtemb_c, **kw)
        fused_matmul(Operand(dtemb_c), Operand(h1, SILU), dte2, a_t=True, accumulate=True,
                     **kw)
        fused_matmul(Operand(dh1), Operand(consts.feat), dte0, a_t=True, accumulate=True, **kw)
        dimg = dcond[:B]
        fused_matmul(Operand(dimg), Operand(z_img), dcw, a_t=True, accumulate=True, **kw)
        if need_dz:
            fused_matmul(Operand(dimg), Operand(wts.cond), dz, accumulate=True, **kw)
        torch.sum(P, 0, out=S)
        # S in column order: modulation biases per layer, (ln_w, ln_b) per block, (b0, b2)
        # per block, input_proj, final layer, time fc2, time fc0, cond_embed
        mod_rows = [shapes[wi][0] for wi in ix["mod_w"]]
        seg = S.split(mod_rows + [W] * (4 * D) + [W, 2 * d, W, W, W])
        nm = len(mod_rows)
        grads = [None] * ix["count"]
        grads[0], grads[1], grads[2], grads[3] = dte0, seg[-2], dte2, seg[-3]
        grads[4], grads[5], grads[6] = dcw, seg[-1], dpos
        r = 0
        for j, (wi, bi) in enumerate(zip(ix["mod_w"], ix["mod_b"])):
            grads[wi], grads[bi] = dmodw[r:r + mod_rows[j]], seg[j]
            r += mod_rows[j]
        grads[ix["in_w"]], grads[ix["in_b"]] = dinw, seg[-5]
        for i in range(D):
            grads[ix["ln_w"][i]], grads[ix["ln_b"][i]] = seg[nm + 2 * i], seg[nm + 2 * i + 1]
            grads[ix["w0"][i]], grads[ix["b0"][i]] = dw0[i], seg[nm + 2 * D + 2 * i]
            grads[ix["w2"][i]], grads[ix["b2"][i]] = dw2[i], seg[nm + 2 * D + 2 * i + 1]
        grads[ix["fin_w"]], grads[ix["fin_b"]] = dfin, seg[-4]
        return (None, None, None, None, None, None, dz, None, None, None, *grads)
