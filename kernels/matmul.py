"""One GEMM kernel with the prologues and epilogues the AdaLN head needs.

``C[m, n] = sum_k opA[m, k] * opB[k, n]`` with fp32 accumulation, where each operand tile is
loaded from a logical matrix ``X[row, col]`` through a prologue, so the transformed operand is
never written to memory:

- ``PLAIN``: ``X``
- ``SILU``: ``SiLU(X)``                                       (adaLN input, MLP hidden)
- ``LNMOD``: ``LN(X)[row] * (1 + scale[row, col]) + shift[row, col]``, LN from the row's
  precomputed mean / rstd and an optional per-column affine (the block's ``in_ln``)
- ``MUL``: ``X * Y``                                           (``g * gate`` in backward)
- ``NOISE``: ``sqrt(abar[t[row]]) * X + sqrt(1 - abar[t[row]]) * Y``: ``x_t`` from ``x0`` and
  the noise, formed in the tile (``mean`` = t, ``rstd`` / ``ln_w`` = the two fp32 tables), so
  ``x_t`` is never written

Operand A is read as ``X[m, k]``, or as ``X[k, m]`` transposed (``a_t``: the weight-gradient
GEMMs, whose reduction runs over the rows). Operand B is ``X[k, n]`` with arbitrary strides
(``W^T`` of a weight, or an activation in the weight-gradient GEMMs).

Epilogues (on the fp32 accumulator, plus an optional per-column bias):

- ``STORE``: ``C = acc``
- ``GATE_RESIDUAL``: ``V = acc``; ``C = R + G * V`` (stores both V and C)
- ``SILU_GRAD``: ``C = acc * SiLU'(P)`` (backward through a SiLU whose input P was kept)
- ``SCATTER``: ``SILU_GRAD``, then the tile is not stored but added (atomically) into three
  fp32 tables at the rows ``idx0[m]``, ``idx1[m]``, ``idx2[m]`` (the condition backward:
  ``y[r] = temb[t[r]] + cond[ci[r]] + pos[k[r]]`` scatters ``dy`` back)

Column sums for bias gradients ride along where a kernel already holds the tensor: with a
``part`` buffer, ``c_sum`` (column offset) stores each M tile's column sums of C, ``c_sum2`` a
second copy, ``a_sum`` the column sums of the A tile (pid_n == 0 programs); the caller reduces
the partial rows of all of them in one ``sum`` at the end of the step.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .limits import shared_memory_limit
from .utils import interpreting, tl, triton

PLAIN, SILU, LNMOD, MUL, NOISE = 0, 1, 2, 3, 4
STORE, GATE_RESIDUAL, SILU_GRAD, SCATTER = 0, 1, 2, 3


@dataclass
class Operand:
    """A logical matrix and its prologue. ``x`` is 2-D with any strides; ``aux``/``shift`` are
    (rows, cols) tensors (MUL: the factor; LNMOD: 1 + scale is applied to ``aux`` = scale);
    ``mean``/``rstd`` are (rows,) fp32; ``ln_w``/``ln_b`` are (cols,) or None. NOISE: ``aux`` is the
    noise, ``mean`` the (rows,) timesteps, ``rstd`` / ``ln_w`` the sqrt(abar) / sqrt(1 - abar)
    tables."""
    x: torch.Tensor
    mode: int = PLAIN
    aux: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None
    rstd: Optional[torch.Tensor] = None
    ln_w: Optional[torch.Tensor] = None
    ln_b: Optional[torch.Tensor] = None


if triton is not None:

    @triton.jit
    def _load_tile(X, sx0, sx1, r, c, R, C, MODE: tl.constexpr,
                   AUX, sa0, sa1, SH, MEAN, RSTD, LNW, LNB,
                   HAS_AFFINE: tl.constexpr):
        """Tile X[r, c] (fp32) after the prologue; out-of-range entries are 0. SH (the shift)
        shares AUX's (the scale's) strides."""
        mask = (r[:, None] < R) & (c[None, :] < C)
        x = tl.load(X + r[:, None] * sx0 + c[None, :] * sx1, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            x = x * tl.sigmoid(x)
        elif MODE == 2:
            mu = tl.load(MEAN + r, mask=r < R, other=0.0)
            rs = tl.load(RSTD + r, mask=r < R, other=0.0)
            x = (x - mu[:, None]) * rs[:, None]
            if HAS_AFFINE:
                w = tl.load(LNW + c, mask=c < C, other=0.0).to(tl.float32)
                b = tl.load(LNB + c, mask=c < C, other=0.0).to(tl.float32)
                x = x * w[None, :] + b[None, :]
            sc = tl.load(AUX + r[:, None] * sa0 + c[None, :] * sa1, mask=mask,
                         other=0.0).to(tl.float32)
            sh = tl.load(SH + r[:, None] * sa0 + c[None, :] * sa1, mask=mask,
                         other=0.0).to(tl.float32)
            x = tl.where(mask, x * (1.0 + sc) + sh, 0.0)
        elif MODE == 3:
            y = tl.load(AUX + r[:, None] * sa0 + c[None, :] * sa1, mask=mask,
                        other=0.0).to(tl.float32)
            x = x * y
        elif MODE == 4:  # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
            tt = tl.load(MEAN + r, mask=r < R, other=0)
            ca = tl.load(RSTD + tt, mask=r < R, other=0.0)
            cb = tl.load(LNW + tt, mask=r < R, other=0.0)
            e = tl.load(AUX + r[:, None] * sa0 + c[None, :] * sa1, mask=mask,
                        other=0.0).to(tl.float32)
            x = ca[:, None] * x + cb[:, None] * e
        return x

    @triton.jit
    def _load_tile_t(X, sx0, sx1, r, c, R, C, MODE: tl.constexpr,
                     AUX, sa0, sa1, SH, MEAN, RSTD, LNW, LNB,
                     HAS_AFFINE: tl.constexpr):
        """The (c, r) tile of ``prologue(X)^T``, loaded through swapped strides: no transpose in
        registers, so a plain operand goes from the pipelined loads to shared memory and the
        tensor cores as it is (sm_90: the weight-gradient GEMMs' wgmma can overlap the next
        loads). Same prologues as :func:`_load_tile`, their per-row vectors along axis 1."""
        mask = (c[:, None] < C) & (r[None, :] < R)
        x = tl.load(X + c[:, None] * sx1 + r[None, :] * sx0, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            x = x * tl.sigmoid(x)
        elif MODE == 2:
            mu = tl.load(MEAN + r, mask=r < R, other=0.0)
            rs = tl.load(RSTD + r, mask=r < R, other=0.0)
            x = (x - mu[None, :]) * rs[None, :]
            if HAS_AFFINE:
                w = tl.load(LNW + c, mask=c < C, other=0.0).to(tl.float32)
                b = tl.load(LNB + c, mask=c < C, other=0.0).to(tl.float32)
                x = x * w[:, None] + b[:, None]
            sc = tl.load(AUX + c[:, None] * sa1 + r[None, :] * sa0, mask=mask,
                         other=0.0).to(tl.float32)
            sh = tl.load(SH + c[:, None] * sa1 + r[None, :] * sa0, mask=mask,
                         other=0.0).to(tl.float32)
            x = tl.where(mask, x * (1.0 + sc) + sh, 0.0)
        elif MODE == 3:
            y = tl.load(AUX + c[:, None] * sa1 + r[None, :] * sa0, mask=mask,
                        other=0.0).to(tl.float32)
            x = x * y
        elif MODE == 4:
            tt = tl.load(MEAN + r, mask=r < R, other=0)
            ca = tl.load(RSTD + tt, mask=r < R, other=0.0)
            cb = tl.load(LNW + tt, mask=r < R, other=0.0)
            e = tl.load(AUX + c[:, None] * sa1 + r[None, :] * sa0, mask=mask,
                        other=0.0).to(tl.float32)
            x = ca[None, :] * x + cb[None, :] * e
        return x

    @triton.jit
    def _matmul_body(
            A, sa0, sa1, A_MODE: tl.constexpr, A_T: tl.constexpr,
            A_AUX, saa0, saa1, A_SH, A_MEAN, A_RSTD, A_LNW, A_LNB,
            A_AFFINE: tl.constexpr,
            B, sb0, sb1, B_MODE: tl.constexpr,
            B_AUX, sba0, sba1, B_SH, B_MEAN, B_RSTD, B_LNW, B_LNB,
            B_AFFINE: tl.constexpr,
            C, sc0, sc1, BIAS, HAS_BIAS: tl.constexpr, EPI: tl.constexpr,
            E1, se10, E2, se20, V, sv0,
            PART, sp0, A_SUM: tl.constexpr, oa, C_SUM: tl.constexpr, oc, C_SUM2: tl.constexpr,
            oc2, I0, I1, I2, T0, T1, T2,
            M, N, K,
            DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            GROUP_M: tl.constexpr):
        # grouped ordering of the output tiles: neighbouring programs share A rows in cache
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if A_T:  # A = X^T: X[k, m] loaded as an (m, k) tile through swapped strides
                a = _load_tile_t(A, sa0, sa1, offs_k, offs_m, K, M, A_MODE, A_AUX, saa0, saa1,
                                 A_SH, A_MEAN, A_RSTD, A_LNW, A_LNB, A_AFFINE)
            else:
                a = _load_tile(A, sa0, sa1, offs_m, offs_k, M, K, A_MODE, A_AUX, saa0, saa1,
                               A_SH, A_MEAN, A_RSTD, A_LNW, A_LNB, A_AFFINE)
                if A_SUM:  # column sums of A over this tile's rows (a bias gradient)
                    if pid_n == 0:
                        tl.store(PART + pid_m * sp0 + oa + offs_k, tl.sum(a, axis=0),
                                 mask=offs_k < K)
            b = _load_tile(B, sb0, sb1, offs_k, offs_n, K, N, B_MODE, B_AUX, sba0, sba1,
                           B_SH, B_MEAN, B_RSTD, B_LNW, B_LNB, B_AFFINE)
            if IEEE:
                acc += tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision="ieee")
            else:
                acc += tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if HAS_BIAS:
            bias = tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            acc += bias[None, :]
        if EPI == 1:  # V = acc; C = R + G * V
            tl.store(V + offs_m[:, None] * sv0 + offs_n[None, :],
                     acc.to(V.dtype.element_ty), mask=mask)
            res = tl.load(E1 + offs_m[:, None] * se10 + offs_n[None, :], mask=mask,
                          other=0.0).to(tl.float32)
            gate = tl.load(E2 + offs_m[:, None] * se20 + offs_n[None, :], mask=mask,
                           other=0.0).to(tl.float32)
            acc = res + gate * acc
        elif EPI >= 2:  # C = acc * SiLU'(P)
            p = tl.load(E1 + offs_m[:, None] * se10 + offs_n[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            sig = tl.sigmoid(p)
            acc = acc * sig * (1.0 + p * (1.0 - sig))
        if C_SUM:  # this tile's column sums of C (a bias gradient), reduced by the caller
            csum = tl.sum(tl.where(mask, acc, 0.0), axis=0)
            tl.store(PART + pid_m * sp0 + oc + offs_n, csum, mask=offs_n < N)
            if C_SUM2:
                tl.store(PART + pid_m * sp0 + oc2 + offs_n, csum, mask=offs_n < N)
        if EPI == 3:  # scatter-add the rows into three fp32 (rows, N) tables
            mm = offs_m < M
            i0 = tl.load(I0 + offs_m, mask=mm, other=0)
            i1 = tl.load(I1 + offs_m, mask=mm, other=0)
            i2 = tl.load(I2 + offs_m, mask=mm, other=0)
            tl.atomic_add(T0 + i0[:, None] * N + offs_n[None, :], acc, mask=mask)
            tl.atomic_add(T1 + i1[:, None] * N + offs_n[None, :], acc, mask=mask)
            tl.atomic_add(T2 + i2[:, None] * N + offs_n[None, :], acc, mask=mask)
        else:
            tl.store(C + offs_m[:, None] * sc0 + offs_n[None, :] * sc1,
                     acc.to(C.dtype.element_ty), mask=mask)


    @triton.jit
    def _fused_matmul_kernel(
            A, sa0, sa1, A_MODE: tl.constexpr, A_T: tl.constexpr,
            A_AUX, saa0, saa1, A_SH, A_MEAN, A_RSTD, A_LNW, A_LNB, A_AFFINE: tl.constexpr,
            B, sb0, sb1, B_MODE: tl.constexpr,
            B_AUX, sba0, sba1, B_SH, B_MEAN, B_RSTD, B_LNW, B_LNB, B_AFFINE: tl.constexpr,
            C, sc0, sc1, BIAS, HAS_BIAS: tl.constexpr, EPI: tl.constexpr,
            E1, se10, E2, se20, V, sv0,
            PART, sp0, A_SUM: tl.constexpr, oa, C_SUM: tl.constexpr, oc, C_SUM2: tl.constexpr,
            oc2, I0, I1, I2, T0, T1, T2, M, N, K,
            DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            GROUP_M: tl.constexpr):
        """The GEMM with column partial sums and / or the scatter epilogue."""
        _matmul_body(A, sa0, sa1, A_MODE, A_T, A_AUX, saa0, saa1, A_SH, A_MEAN, A_RSTD, A_LNW,
                     A_LNB, A_AFFINE, B, sb0, sb1, B_MODE, B_AUX, sba0, sba1, B_SH, B_MEAN,
                     B_RSTD, B_LNW, B_LNB, B_AFFINE, C, sc0, sc1, BIAS, HAS_BIAS, EPI,
                     E1, se10, E2, se20, V, sv0, PART, sp0, A_SUM, oa, C_SUM, oc, C_SUM2, oc2,
                     I0, I1, I2, T0, T1, T2, M, N, K, DOT_DTYPE, IEEE, BLOCK_M, BLOCK_N,
                     BLOCK_K, GROUP_M)

    @triton.jit
    def _matmul_kernel(
            A, sa0, sa1, A_MODE: tl.constexpr, A_T: tl.constexpr,
            A_AUX, saa0, saa1, A_SH, A_MEAN, A_RSTD, A_LNW, A_LNB, A_AFFINE: tl.constexpr,
            B, sb0, sb1, B_MODE: tl.constexpr,
            B_AUX, sba0, sba1, B_SH, B_MEAN, B_RSTD, B_LNW, B_LNB, B_AFFINE: tl.constexpr,
            C, sc0, sc1, BIAS, HAS_BIAS: tl.constexpr, EPI: tl.constexpr,
            E1, se10, E2, se20, V, sv0, M, N, K,
            DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            GROUP_M: tl.constexpr):
        """The same GEMM without partial sums or scatter: 11 arguments fewer for Triton to
        bind on every launch (most of the step's GEMMs)."""
        _matmul_body(A, sa0, sa1, A_MODE, A_T, A_AUX, saa0, saa1, A_SH, A_MEAN, A_RSTD, A_LNW,
                     A_LNB, A_AFFINE, B, sb0, sb1, B_MODE, B_AUX, sba0, sba1, B_SH, B_MEAN,
                     B_RSTD, B_LNW, B_LNB, B_AFFINE, C, sc0, sc1, BIAS, HAS_BIAS, EPI,
                     E1, se10, E2, se20, V, sv0, C, 0, False, 0, False, 0, False, 0,
                     C, C, C, C, C, C, M, N, K, DOT_DTYPE, IEEE, BLOCK_M, BLOCK_N, BLOCK_K,
                     GROUP_M)

_DOT_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
_TL_DTYPE = {}
if triton is not None:
    _TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# Tile candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps), best first for each problem shape. The
# first one whose shared memory estimate fits the device at the most stages is taken, and
# gendd_fast/launch_check.py compiles what each supported GPU gets, ahead of time, to prove it fits.
_WGRAD_TILES = [(64, 64, 64, 4), (64, 64, 32, 4)]       # small output, long reduction
_NARROW_TILES = [(128, 64, 64, 8), (128, 64, 32, 8), (64, 64, 32, 4)]   # N <= 128 (final layer)
_WIDE_TILES = [(128, 128, 64, 8), (128, 128, 32, 8), (128, 64, 32, 8), (64, 64, 32, 4)]
# fp32 (``--amp off``): the IEEE fp32 dot runs on the CUDA cores with both operand tiles in
# registers, so K steps of 32 and 8 warps keep ptxas from spilling where 64 did (sm_80: up to
# 8 KB of spills per thread at 64 x 64 x 64, 4 warps).
_FP32_TILES = {"wgrad": [(64, 64, 32, 8), (64, 64, 16, 4)],
               "narrow": [(128, 64, 32, 8), (64, 64, 32, 4)],
               "wide": [(128, 128, 32, 8), (128, 64, 32, 8), (64, 64, 32, 4)]}
_MAX_STAGES = {"wgrad": 4, "narrow": 4, "wide": 3}
SMEM_MARGIN = 2048  # barriers and alignment padding the estimate does not itemise


def smem_estimate(bm, bn, bk, stages, a_bytes, b_bytes, dot_bytes, transformed):
    """Upper estimate of the shared memory (bytes) of one block: the software pipeline keeps
    ``stages - 1`` copies of every tile the loads bring in (``a_bytes`` / ``b_bytes``: bytes per
    element summed over the tensors read for that operand, e.g. h + scale + shift for LNMOD); an
    operand changed by a prologue is staged once more, in the dot dtype, for the tensor cores;
    the epilogue may reuse the same memory for the fp32 accumulator's layout change."""
    pipe = max(stages - 1, 1) * (bm * bk * a_bytes + bk * bn * b_bytes)
    staged = (bm * bk + bk * bn) * dot_bytes if transformed else 0
    return max(pipe + staged, bm * bn * 4) + SMEM_MARGIN


@functools.lru_cache(maxsize=4096)
def _launch_config(M: int, N: int, K: int, a_bytes: int = 4, b_bytes: int = 4,
                   dot_bytes: int = 4, transformed: bool = True, smem_limit: int = 232448,
                   heavy: bool = False, a_t: bool = False):
    """Tiles and stages for one GEMM that fit ``smem_limit`` bytes of shared memory. The
    interpreter gets small blocks (fast on CPU). On the GPU the tiles follow the problem:
    weight-gradient GEMMs (small M x N, long K) use smaller tiles for occupancy; a LayerNorm or
    SiLU prologue keeps a whole fp32 tile live, so 128-row tiles get 8 warps; ``heavy`` (the
    SiLU' epilogue, which loads a tile and keeps it live beside the accumulator) takes 64-column
    tiles: at 128 x 128, ptxas spills there on sm_80 and sm_90; so does an fp32 A operand
    formed by a two-tensor prologue (the noise injection, ``dout * g``) on sm_80.

    Cached: the search runs once per (problem, operand bytes, shared-memory limit), not per
    launch."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if M * N <= 2048 * 2048 and K > 4 * max(M, N):
        kind, tiles = "wgrad", _WGRAD_TILES
    elif N <= 128 or heavy:
        kind, tiles = "narrow", _NARROW_TILES
    else:
        kind, tiles = "wide", _WIDE_TILES
    if dot_bytes == 4:  # a transposed fp32 A tile costs registers too: the small tiles
        tiles = _FP32_TILES["wgrad" if a_t else kind]
    for bm, bn, bk, warps in tiles:
        # a pipeline as deep as the reduction loop only costs memory (and registers: ptxas
        # spills a two-iteration loop pipelined two deep)
        top = max(1, min(_MAX_STAGES[kind], triton.cdiv(K, bk) - 1))
        for stages in range(top, 1 if top > 1 else 0, -1):
            if smem_estimate(bm, bn, bk, stages, a_bytes, b_bytes, dot_bytes,
                             transformed) <= smem_limit:
                return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
                            num_stages=stages)
    raise RuntimeError(f"no GEMM tile fits {smem_limit} bytes of shared memory "
                       f"({M}x{N}x{K}, operand bytes {a_bytes}/{b_bytes})")


def _operand_bytes(op: Operand) -> int:
    """Bytes loaded per element of the logical operand (every tensor its prologue reads)."""
    n = op.x.element_size()
    if op.mode in (LNMOD, MUL, NOISE):
        n += op.aux.element_size()
    if op.mode == LNMOD:
        n += op.shift.element_size()
    return n


def _narrow(op: Operand, dot_dtype: torch.dtype) -> Operand:
    """A plain operand wider than the dot dtype (fp32 master weights, fp32 ``x_t`` or output
    gradients under autocast) is cast once before the GEMM: the values are those the kernel's
    per-tile cast would give (round to nearest even both ways), and the pipeline then buffers
    half the bytes per stage."""
    if op.mode == PLAIN and op.x.element_size() > torch.empty((), dtype=dot_dtype).element_size():
        return Operand(op.x.to(dot_dtype))
    return op


def _operand_args(op: Operand, dummy: torch.Tensor):
    aux = op.aux if op.aux is not None else dummy
    sh = op.shift if op.shift is not None else dummy
    sa = aux.stride()
    if len(sa) != 2:
        sa = (0, 0)
    elif op.shift is not None and sh.stride() != sa:
        raise ValueError("fused_matmul: the LNMOD scale and shift must share strides")
    lw = op.ln_w
    return (aux, sa[0], sa[1], sh,
            op.mean if op.mean is not None else dummy, op.rstd if op.rstd is not None else dummy,
            lw if lw is not None else dummy, op.ln_b if op.ln_b is not None else dummy,
            lw is not None)


def fused_matmul(a: Operand, b: Operand, out: Optional[torch.Tensor], a_t: bool = False,
                 bias: Optional[torch.Tensor] = None, epilogue: int = STORE,
                 e1: Optional[torch.Tensor] = None, e2: Optional[torch.Tensor] = None,
                 v_out: Optional[torch.Tensor] = None, dot_dtype: torch.dtype = torch.float32,
                 ieee: bool = True, part: Optional[torch.Tensor] = None, a_sum: int = -1,
                 c_sum: int = -1, c_sum2: int = -1, scatter=None, narrow: bool = True,
                 shape=None) -> Optional[torch.Tensor]:
    """``out (M, N) <- epilogue(opA @ opB + bias)``; see the module docstring.

    ``part``: the (rows, cols) fp32 partial-sum buffer, with ``a_sum`` / ``c_sum`` / ``c_sum2``
    the column offsets written (-1: none). ``scatter``: ``(idx0, idx1, idx2, t0, t1, t2)`` for
    the SCATTER epilogue, which stores no ``out`` (then ``shape`` = (M, N)). ``narrow=False``
    keeps plain fp32 operands as they are (their tiles are cast in the kernel)."""
    M, N = out.shape if out is not None else shape
    ax = a.x
    K = ax.shape[0] if a_t else ax.shape[1]
    if (ax.shape[1] if a_t else ax.shape[0]) != M or b.x.shape != (K, N):
        raise ValueError(f"fused_matmul: shapes do not chain: A {tuple(ax.shape)} "
                         f"(transposed={a_t}), B {tuple(b.x.shape)}, out {(M, N)}")
    if narrow:
        a, b = _narrow(a, dot_dtype), _narrow(b, dot_dtype)
    if (a_t and a.mode == PLAIN and b.mode != PLAIN and out is not None and bias is None
            and epilogue == STORE and part is None):
        # a weight gradient whose B has a prologue: as C^T = opB^T @ A the transformed
        # operand is the one fed from registers and the plain one streams through shared
        # memory, so on sm_90 each wgmma overlaps the next K step's (pendings = 1, not 0)
        return fused_matmul(b, Operand(a.x), out.t(), a_t=True, dot_dtype=dot_dtype, ieee=ieee,
                            narrow=False)
    dummy = out if out is not None else scatter[3]
    e1 = e1 if e1 is not None else dummy
    e2 = e2 if e2 is not None else dummy
    v = v_out if v_out is not None else dummy
    pt = part if part is not None else dummy
    i0, i1, i2, t0, t1, t2 = scatter if scatter is not None else (dummy,) * 6
    cfg, grid = _launch(M, N, K, _operand_bytes(a), _operand_bytes(b), _DOT_BYTES[dot_dtype],
                        a.mode != PLAIN or b.mode != PLAIN or a_t,
                        shared_memory_limit(dummy.device),
                        epilogue in (SILU_GRAD, SCATTER) or (a.mode in (MUL, NOISE) and
                                                             ax.element_size() == 4),
                        a_t, dot_dtype, ieee and dot_dtype == torch.float32)
    c = out if out is not None else dummy
    sa, sb, sc, s1, s2, sv = (a.x.stride(), b.x.stride(), c.stride(), e1.stride(), e2.stride(),
                              v.stride())
    if epilogue != STORE and (s1[1] != 1 or s2[1] != 1 or sv[1] != 1):  # unit columns assumed
        raise ValueError("fused_matmul: e1, e2 and v_out need unit column stride")
    head = (a.x, sa[0], sa[1], a.mode, a_t, *_operand_args(a, dummy),
            b.x, sb[0], sb[1], b.mode, *_operand_args(b, dummy),
            c, sc[0], sc[1], bias if bias is not None else dummy, bias is not None,
            epilogue, e1, s1[0], e2, s2[0], v, sv[0])
    if part is None and scatter is None:
        _matmul_kernel[grid](*head, M, N, K, **cfg)
    else:
        _fused_matmul_kernel[grid](
            *head, pt, pt.stride(0), a_sum >= 0, max(a_sum, 0), c_sum >= 0, max(c_sum, 0),
            c_sum2 >= 0, max(c_sum2, 0), i0, i1, i2, t0, t1, t2, M, N, K, **cfg)
    return out


@functools.lru_cache(maxsize=4096)
def _launch(M, N, K, a_bytes, b_bytes, dot_bytes, transformed, smem_limit, heavy, a_t,
            dot_dtype, ieee):
    """Launch keywords (tiles, stages, dot dtype) and grid of one GEMM problem, computed once
    per (problem, dtypes, device limit): a launch then costs one cache lookup."""
    cfg = dict(_launch_config(M, N, K, a_bytes, b_bytes, dot_bytes, transformed, smem_limit,
                              heavy, a_t), DOT_DTYPE=_TL_DTYPE[dot_dtype], IEEE=ieee)
    return cfg, (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)


def weight_t(w: torch.Tensor) -> Operand:
    """B operand ``W^T`` of a (out, in) weight, without a copy."""
    return Operand(w.t())
