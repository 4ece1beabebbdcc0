"""Row-wise kernels around the AdaLN GEMMs: LayerNorm statistics, and the backward of
``u = LN(h) * (1 + scale) + shift`` (and of the gated residual) without materialising LN(h).

The forward GEMMs apply LN and the modulation in their prologue from the per-row mean / rstd
computed here, so the normalised activations never reach memory; the backward recomputes them
row by row here.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .utils import cdiv, empty, empty_like, next_pow2, row_block, tl, triton

if triton is not None:

    @triton.jit
    def _ln_stats_kernel(X, sx, MEAN, RSTD, n_rows, W, eps,
                         ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        cols = tl.arange(0, BLOCK_W)
        cmask = cols < W
        for i in range(ROWS):
            r = tl.program_id(0) * ROWS + i
            if r < n_rows:
                x = tl.load(X + r * sx + cols, mask=cmask, other=0.0).to(tl.float32)
                mean = tl.sum(x, axis=0) / W
                d = tl.where(cmask, x - mean, 0.0)
                var = tl.sum(d * d, axis=0) / W
                tl.store(MEAN + r, mean)
                tl.store(RSTD + r, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def _ln_mod_bwd_kernel(X, AFF, G, OUT, PS, GT, n_rows, W, HAS_AFFINE: tl.constexpr,
                           HAS_RESID: tl.constexpr, MOD_SUMS: tl.constexpr,
                           DH_SUM: tl.constexpr, GATE: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK_W: tl.constexpr):
        """Per row: dshift, dscale, dh (+ the residual g). Per program, column partial sums
        into PART[pid, o_* + col]: d ln_w / d ln_b (HAS_AFFINE), d shift / d scale (MOD_SUMS,
        the modulation's bias gradient), dh (DH_SUM). GATE: dh is the output gradient of the
        gated residual ``h = h_prev + gate2 * v2`` below, whose backward is folded in here:
        dgate2 = dh * v2 (written, and summed into o_g) and dv2 = dh * gate2 (written: the plain
        A operand of that layer's two backward GEMMs; summed into o_gb, the bias gradient of
        the layer that produced v2).

        Tuples (short host binding): X = (du, sdu, h, sh, mean, rstd, scale, ssc);
        AFF = (ln_w, ln_b) or (); G = (g, sg) or (); OUT = (dh, sdh, dshift, sds, dscale,
        sdsc); PS = (part, sp, o_lw, o_lb, o_sh, o_sc, o_dh, o_g, o_gb) or ();
        GT = (v2, sv2, gate2, sgt2, dgate2, sdg2, dv2, sdv2) or ()."""
        DU, sdu, H, sh, MEAN, RSTD, SCALE, ssc = X[0], X[1], X[2], X[3], X[4], X[5], X[6], X[7]
        DH, sdh, DSHIFT, sds, DSCALE, sdsc = OUT[0], OUT[1], OUT[2], OUT[3], OUT[4], OUT[5]
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_W)
        cmask = cols < W
        if HAS_AFFINE:
            lw = tl.load(AFF[0] + cols, mask=cmask, other=0.0).to(tl.float32)
            lb = tl.load(AFF[1] + cols, mask=cmask, other=0.0).to(tl.float32)
        acc_w = tl.zeros((BLOCK_W,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_W,), dtype=tl.float32)
        acc_sh = tl.zeros((BLOCK_W,), dtype=tl.float32)
        acc_sc = tl.zeros((BLOCK_W,), dtype=tl.float32)
        acc_dh = tl.zeros((BLOCK_W,), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_W,), dtype=tl.float32)
        acc_gb = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for i in range(ROWS):
            r = pid * ROWS + i
            if r < n_rows:
                du = tl.load(DU + r * sdu + cols, mask=cmask, other=0.0).to(tl.float32)
                h = tl.load(H + r * sh + cols, mask=cmask, other=0.0).to(tl.float32)
                sc1 = 1.0 + tl.load(SCALE + r * ssc + cols, mask=cmask, other=0.0).to(tl.float32)
                mean = tl.load(MEAN + r)
                rstd = tl.load(RSTD + r)
                xhat = tl.where(cmask, (h - mean) * rstd, 0.0)
                if HAS_AFFINE:
                    n = xhat * lw + lb
                else:
                    n = xhat
                # u = n * (1 + scale) + shift
                dsc = du * n
                tl.store(DSHIFT + r * sds + cols, du.to(DSHIFT.dtype.element_ty), mask=cmask)
                tl.store(DSCALE + r * sdsc + cols, dsc.to(DSCALE.dtype.element_ty), mask=cmask)
                if MOD_SUMS:
                    acc_sh += du
                    acc_sc += dsc
                dn = du * sc1
                if HAS_AFFINE:
                    acc_w += dn * xhat
                    acc_b += dn
                    dxhat = dn * lw
                else:
                    dxhat = dn
                dxhat = tl.where(cmask, dxhat, 0.0)
                c1 = tl.sum(dxhat, axis=0) / W
                c2 = tl.sum(dxhat * xhat, axis=0) / W
                dh = rstd * (dxhat - c1 - xhat * c2)
                if HAS_RESID:
                    dh += tl.load(G[0] + r * G[1] + cols, mask=cmask, other=0.0).to(tl.float32)
                dh = dh.to(DH.dtype.element_ty)
                tl.store(DH + r * sdh + cols, dh, mask=cmask)
                dh = dh.to(tl.float32)  # what the layers below read
                if DH_SUM:
                    acc_dh += dh
                if GATE:
                    v2 = tl.load(GT[0] + r * GT[1] + cols, mask=cmask, other=0.0).to(tl.float32)
                    g2 = tl.load(GT[2] + r * GT[3] + cols, mask=cmask, other=0.0).to(tl.float32)
                    dg = dh * v2
                    tl.store(GT[4] + r * GT[5] + cols, dg.to(GT[4].dtype.element_ty),
                             mask=cmask)
                    acc_g += dg
                    dv = dh * g2
                    tl.store(GT[6] + r * GT[7] + cols, dv.to(GT[6].dtype.element_ty), mask=cmask)
                    acc_gb += dv
        if HAS_AFFINE or MOD_SUMS or DH_SUM or GATE:
            base = PS[0] + pid * PS[1] + cols
            if HAS_AFFINE:
                tl.store(base + PS[2], acc_w, mask=cmask)
                tl.store(base + PS[3], acc_b, mask=cmask)
            if MOD_SUMS:
                tl.store(base + PS[4], acc_sh, mask=cmask)
                tl.store(base + PS[5], acc_sc, mask=cmask)
            if DH_SUM:
                tl.store(base + PS[6], acc_dh, mask=cmask)
            if GATE:
                tl.store(base + PS[7], acc_g, mask=cmask)
                tl.store(base + PS[8], acc_gb, mask=cmask)

    @triton.jit
    def _gate_bwd_kernel(G, sg, V, sv, GATE, sgate, DGATE, sdg, PB, n_rows, W,
                         ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        """h' = h + gate * v: dgate = g * v, and column partial sums of dv = g * gate (the bias
        gradient of the layer that produced v)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_W)
        cmask = cols < W
        acc = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for i in range(ROWS):
            r = pid * ROWS + i
            if r < n_rows:
                g = tl.load(G + r * sg + cols, mask=cmask, other=0.0).to(tl.float32)
                v = tl.load(V + r * sv + cols, mask=cmask, other=0.0).to(tl.float32)
                gate = tl.load(GATE + r * sgate + cols, mask=cmask, other=0.0).to(tl.float32)
                tl.store(DGATE + r * sdg + cols, (g * v).to(DGATE.dtype.element_ty), mask=cmask)
                acc += g * gate
        tl.store(PB + pid * W + cols, acc, mask=cmask)


def ln_stats(x: torch.Tensor, eps: float):
    """Per-row mean and 1/sqrt(var + eps) of a (rows, W) tensor, fp32."""
    n, W = x.shape
    mean = empty(n, x.device, torch.float32)
    rstd = empty_like(mean)
    rows = row_block(n)
    _ln_stats_kernel[(cdiv(n, rows),)](x, x.stride(0), mean, rstd, n, W, eps, ROWS=rows,
                                              BLOCK_W=next_pow2(W))
    return mean, rstd


def ln_mod_backward(du, h, mean, rstd, scale, dshift_out, dscale_out,
                    ln_w: Optional[torch.Tensor] = None, ln_b: Optional[torch.Tensor] = None,
                    g: Optional[torch.Tensor] = None, part: Optional[torch.Tensor] = None,
                    offsets: Optional[Dict[str, int]] = None, gate_below=None,
                    dh_dtype=None):
    """Backward of ``u = (LN(h) [* ln_w + ln_b]) * (1 + scale) + shift`` given ``du``.

    Writes d shift and d scale into the given (possibly strided) outputs. Without ``part``
    returns ``(dh [+ g], d ln_w, d ln_b)`` (the last two None without affine). With ``part``
    (the step's partial-sum buffer) the column sums go there at ``offsets`` (keys ``lw``,
    ``lb``, ``sh``, ``sc``, ``dh``, ``g``, ``gb``; a missing key is not computed) and only dh is
    returned; ``gate_below = (v2, gate2, dgate2_out, dv2_out)`` folds in the gated-residual
    backward of the block below (see the kernel)."""
    n, W = h.shape
    rows = row_block(n)
    progs = cdiv(n, rows)
    dh = empty((n, W), h.device, dh_dtype or h.dtype)
    affine = ln_w is not None
    own = part is None
    if own:
        part = empty((progs, 2 * W), h.device, torch.float32) if affine else dh
        offsets = dict(lw=0, lb=W) if affine else {}
    o = offsets or {}
    sums = bool(o)
    ps = (part, part.stride(0), o.get("lw", 0), o.get("lb", 0), o.get("sh", 0), o.get("sc", 0),
          o.get("dh", 0), o.get("g", 0), o.get("gb", 0)) if sums else ()
    if gate_below is not None:
        v2, g2, dg2, dv2 = gate_below
        gt = (v2, v2.stride(0), g2, g2.stride(0), dg2, dg2.stride(0), dv2, dv2.stride(0))
    else:
        gt = ()
    _ln_mod_bwd_kernel[(progs,)](
        (du, du.stride(0), h, h.stride(0), mean, rstd, scale, scale.stride(0)),
        (ln_w, ln_b) if affine else (), (g, g.stride(0)) if g is not None else (),
        (dh, dh.stride(0), dshift_out, dshift_out.stride(0), dscale_out, dscale_out.stride(0)),
        ps, gt, n, W, HAS_AFFINE=affine, HAS_RESID=g is not None, MOD_SUMS="sh" in o,
        DH_SUM="dh" in o, GATE=gate_below is not None, ROWS=rows, BLOCK_W=next_pow2(W))
    if not own:
        return dh
    if affine:
        return dh, part[:, :W].sum(0), part[:, W:].sum(0)
    return dh, None, None


def gate_backward(g, v, gate, dgate_out):
    """dgate = g * v into ``dgate_out``; returns the column sums of g * gate (fp32)."""
    n, W = g.shape
    rows = row_block(n)
    progs = cdiv(n, rows)
    pb = empty((progs, W), g.device, torch.float32)
    _gate_bwd_kernel[(progs,)](g, g.stride(0), v, v.stride(0), gate, gate.stride(0), dgate_out,
                               dgate_out.stride(0), pb, n, W, ROWS=rows, BLOCK_W=next_pow2(W))
    return pb.sum(0)
