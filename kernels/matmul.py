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
the partial rows of all of them in one ``sum`` at the end of the step. ``a_copy`` has the same
programs store opA in the dot dtype, for a later weight gradient to read as a plain operand.

The kernel takes its operands, output, epilogue tensors and partial sums as tuples that hold
only what the modes in force read: Triton binds and specialises every argument on the host at
every launch, so a short argument list is a cheap launch. Each distinct problem's tiles,
stages and constexprs are computed once (:func:`_launch`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .limits import compute_capability, shared_memory_limit
from .utils import cdiv, interpreting, tl, triton

PLAIN, SILU, LNMOD, MUL, NOISE = 0, 1, 2, 3, 4
STORE, GATE_RESIDUAL, SILU_GRAD, SCATTER = 0, 1, 2, 3
# The GEMM's compile-time choices travel as ONE constexpr tuple, in this order: Triton binds,
# specialises and hashes every kernel parameter on the host at each launch, and 16 separate
# constexprs cost about 5 us a launch more than one.
CFG_FIELDS = ("A_MODE", "A_T", "A_AFFINE", "B_MODE", "B_AFFINE", "EPI", "HAS_BIAS", "SUMS",
              "A_COPY", "DOT_DTYPE", "IEEE", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M",
              "SPLIT_K")


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
    def _along(v, ROWS: tl.constexpr, TRANS: tl.constexpr):
        """Broadcast a per-row (``ROWS``) or per-column vector of the logical matrix over a
        tile that is stored as is (TRANS False) or transposed (TRANS True)."""
        if ROWS != TRANS:  # constexpr: one branch is compiled, so one return type
            out = v[:, None]
        else:
            out = v[None, :]
        return out

    @triton.jit
    def _load_tile(X, r, c, R, C, MODE: tl.constexpr, AFFINE: tl.constexpr,
                   TRANS: tl.constexpr):
        """Tile X[r, c] (fp32) after the prologue; out-of-range entries are 0. ``X`` is the
        operand tuple (see :func:`operand_args`). ``TRANS``: the (c, r) tile of
        ``prologue(X)^T``, loaded through swapped strides: no transpose in registers, so a plain
        operand goes from the pipelined loads to shared memory and the tensor cores as it is
        (sm_90: the weight-gradient GEMMs' wgmma can overlap the next loads)."""
        rr = _along(r, True, TRANS)
        cc = _along(c, False, TRANS)
        mask = (rr < R) & (cc < C)
        x = tl.load(X[0] + rr * X[1] + cc * X[2], mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            x = x * tl.sigmoid(x)
        elif MODE == 2:  # (x, s0, s1, scale, ss0, ss1, shift, mean, rstd[, ln_w, ln_b])
            mu = tl.load(X[7] + r, mask=r < R, other=0.0)
            rs = tl.load(X[8] + r, mask=r < R, other=0.0)
            x = (x - _along(mu, True, TRANS)) * _along(rs, True, TRANS)
            if AFFINE:
                w = tl.load(X[9] + c, mask=c < C, other=0.0).to(tl.float32)
                b = tl.load(X[10] + c, mask=c < C, other=0.0).to(tl.float32)
                x = x * _along(w, False, TRANS) + _along(b, False, TRANS)
            off = rr * X[4] + cc * X[5]
            sc = tl.load(X[3] + off, mask=mask, other=0.0).to(tl.float32)
            sh = tl.load(X[6] + off, mask=mask, other=0.0).to(tl.float32)
            x = tl.where(mask, x * (1.0 + sc) + sh, 0.0)
        elif MODE == 3:  # (x, s0, s1, y, ys0, ys1)
            y = tl.load(X[3] + rr * X[4] + cc * X[5], mask=mask, other=0.0).to(tl.float32)
            x = x * y
        elif MODE == 4:  # (x0, s0, s1, eps, es0, es1, t, sqrt_abar, sqrt_1m_abar)
            tt = tl.load(X[6] + r, mask=r < R, other=0)
            ca = tl.load(X[7] + tt, mask=r < R, other=0.0)
            cb = tl.load(X[8] + tt, mask=r < R, other=0.0)
            e = tl.load(X[3] + rr * X[4] + cc * X[5], mask=mask, other=0.0).to(tl.float32)
            x = _along(ca, True, TRANS) * x + _along(cb, True, TRANS) * e
        return x

    @triton.jit
    def _matmul_kernel(A, B, C, E, P, dims, CFG: tl.constexpr):
        """``A``, ``B``: operand tuples; ``C``: (c, sc0, sc1[, bias]); ``E``: the epilogue's
        tensors (GATE_RESIDUAL: (r, sr0, gate, sg0, v, sv0); SILU_GRAD: (p, sp0); SCATTER:
        (p, sp0, i0, i1, i2, t0, t1, t2)); ``P``: (part, sp0, oa, oc, oc2, acopy, sac0) for
        the column sums (``SUMS`` bits: 1 A, 2 C, 4 C again) and the copy of opA in the dot
        dtype (``A_COPY``); ``dims``: (M, N, K). ``CFG``: every compile-time choice, in
        :data:`CFG_FIELDS` order. Tuples keep the launch's argument binding short: it runs on
        the host for every launch. ``SPLIT_K`` > 1: the grid's second axis splits the
        reduction and each program adds its partial tile into C atomically."""
        A_MODE: tl.constexpr = CFG[0]
        A_T: tl.constexpr = CFG[1]
        A_AFFINE: tl.constexpr = CFG[2]
        B_MODE: tl.constexpr = CFG[3]
        B_AFFINE: tl.constexpr = CFG[4]
        EPI: tl.constexpr = CFG[5]
        HAS_BIAS: tl.constexpr = CFG[6]
        SUMS: tl.constexpr = CFG[7]
        A_COPY: tl.constexpr = CFG[8]
        DOT_DTYPE: tl.constexpr = CFG[9]
        IEEE: tl.constexpr = CFG[10]
        BLOCK_M: tl.constexpr = CFG[11]
        BLOCK_N: tl.constexpr = CFG[12]
        BLOCK_K: tl.constexpr = CFG[13]
        GROUP_M: tl.constexpr = CFG[14]
        SPLIT_K: tl.constexpr = CFG[15]
        M, N, K = dims[0], dims[1], dims[2]
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
        if SPLIT_K > 1:  # this program's share of the reduction: whole K blocks
            k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
            k_lo = tl.program_id(1) * k_per
            k_hi = tl.minimum(K, k_lo + k_per)
        else:
            k_lo = 0
            k_hi = K
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if A_T:  # A = X^T: X[k, m] loaded as an (m, k) tile through swapped strides
                a = _load_tile(A, offs_k, offs_m, K, M, A_MODE, A_AFFINE, True)
            else:
                a = _load_tile(A, offs_m, offs_k, M, K, A_MODE, A_AFFINE, False)
                if SUMS % 2 == 1 or A_COPY:
                    if pid_n == 0:
                        if SUMS % 2 == 1:  # column sums of A over this tile (a bias gradient)
                            tl.store(P[0] + pid_m * P[1] + P[2] + offs_k, tl.sum(a, axis=0),
                                     mask=offs_k < K)
                        if A_COPY:  # opA as the dot sees it, for a later weight gradient
                            tl.store(P[5] + offs_m[:, None] * P[6] + offs_k[None, :],
                                     a.to(DOT_DTYPE),
                                     mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))
            b = _load_tile(B, offs_k, offs_n, K, N, B_MODE, B_AFFINE, False)
            if IEEE:
                acc += tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision="ieee")
            else:
                acc += tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if HAS_BIAS:
            bias = tl.load(C[3] + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            acc += bias[None, :]
        if EPI == 1:  # V = acc; C = R + G * V
            tl.store(E[4] + offs_m[:, None] * E[5] + offs_n[None, :],
                     acc.to(E[4].dtype.element_ty), mask=mask)
            res = tl.load(E[0] + offs_m[:, None] * E[1] + offs_n[None, :], mask=mask,
                          other=0.0).to(tl.float32)
            gate = tl.load(E[2] + offs_m[:, None] * E[3] + offs_n[None, :], mask=mask,
                           other=0.0).to(tl.float32)
            acc = res + gate * acc
        elif EPI >= 2:  # C = acc * SiLU'(P)
            p = tl.load(E[0] + offs_m[:, None] * E[1] + offs_n[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            sig = tl.sigmoid(p)
            acc = acc * sig * (1.0 + p * (1.0 - sig))
        if SUMS >= 2:  # this tile's column sums of C (a bias gradient), reduced by the caller
            csum = tl.sum(tl.where(mask, acc, 0.0), axis=0)
            tl.store(P[0] + pid_m * P[1] + P[3] + offs_n, csum, mask=offs_n < N)
            if SUMS >= 4:
                tl.store(P[0] + pid_m * P[1] + P[4] + offs_n, csum, mask=offs_n < N)
        if EPI == 3:  # scatter-add the rows into three fp32 (rows, N) tables
            mm = offs_m < M
            i0 = tl.load(E[2] + offs_m, mask=mm, other=0)
            i1 = tl.load(E[3] + offs_m, mask=mm, other=0)
            i2 = tl.load(E[4] + offs_m, mask=mm, other=0)
            tl.atomic_add(E[5] + i0[:, None] * N + offs_n[None, :], acc, mask=mask)
            tl.atomic_add(E[6] + i1[:, None] * N + offs_n[None, :], acc, mask=mask)
            tl.atomic_add(E[7] + i2[:, None] * N + offs_n[None, :], acc, mask=mask)
        elif SPLIT_K > 1:  # partial sums added into the zeroed fp32 C
            tl.atomic_add(C[0] + offs_m[:, None] * C[1] + offs_n[None, :] * C[2], acc,
                          mask=mask)
        else:
            tl.store(C[0] + offs_m[:, None] * C[1] + offs_n[None, :] * C[2],
                     acc.to(C[0].dtype.element_ty), mask=mask)

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
# A grid under one wave whose reduction split-K cannot share out (one K block, or an epilogue
# that must see the whole sum) takes the first of these (BLOCK_M, BLOCK_N) that fills a wave,
# or the last: more, smaller programs. BLOCK_M stays 64 so sm_90 keeps its warpgroup MMA.
_SMALL_GRID_TILES = [(64, 64), (64, 32), (64, 16)]
MIN_BLOCK_M = 32  # the smallest BLOCK_M any launch takes (the interpreter's): partial-sum rows
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
                   heavy: bool = False, a_t: bool = False, arch: int = 90):
    """Tiles and stages for one GEMM that fit ``smem_limit`` bytes of shared memory. The
    interpreter gets small blocks (fast on CPU). On the GPU the tiles follow the problem:
    weight-gradient GEMMs (small M x N, long K) use smaller tiles for occupancy; a LayerNorm or
    SiLU prologue keeps a whole fp32 tile live, so 128-row tiles get 8 warps; ``heavy`` (the
    SiLU' epilogue, which loads a tile and keeps it live beside the accumulator) takes 64-column
    tiles: at 128 x 128, ptxas spills there on sm_80 and sm_90; so does an fp32 A operand
    formed by a two-tensor prologue (the noise injection, ``dout * g``) on sm_80. On sm_100
    ptxas holds an 8-warp heavy tile to 80 registers and spills (12 B at 128 x 64 x 64): there
    heavy tiles take 4 warps (196 registers, no spill).

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
    elif heavy and arch in (100, 103):  # the data-centre Blackwells
        tiles = [(bm, bn, bk, 4) for bm, bn, bk, _ in tiles]
    # a short reduction (K = 128: the final layer's dx) takes a BLOCK_K that leaves it 4 steps
    # where a candidate has one: a one-step loop cannot overlap its loads with the MMA, and the
    # smaller tile also keeps sm_80 from spilling beside the a_copy / a_sum stores
    tiles = [t for t in tiles if cdiv(K, t[2]) >= 4] or tiles
    for bm, bn, bk, warps in tiles:
        # a pipeline as deep as the reduction loop only costs memory (and registers: ptxas
        # spills a two-iteration loop pipelined two deep)
        top = max(1, min(_MAX_STAGES[kind], cdiv(K, bk) - 1))
        for stages in range(top, 1 if top > 1 else 0, -1):
            if smem_estimate(bm, bn, bk, stages, a_bytes, b_bytes, dot_bytes,
                             transformed) <= smem_limit:
                return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
                            num_stages=stages)
    raise RuntimeError(f"no GEMM tile fits {smem_limit} bytes of shared memory "
                       f"({M}x{N}x{K}, operand bytes {a_bytes}/{b_bytes})")


def _narrow(op: Operand, dot_dtype: torch.dtype) -> Operand:
    """A plain operand wider than the dot dtype (fp32 master weights, fp32 ``x_t`` or output
    gradients under autocast) is cast once before the GEMM: the values are those the kernel's
    per-tile cast would give (round to nearest even both ways), and the pipeline then buffers
    half the bytes per stage."""
    if op.mode == PLAIN and op.x.element_size() > _DOT_BYTES[dot_dtype]:
        return Operand(op.x.to(dot_dtype))
    return op


def operand_args(op: Operand) -> tuple:
    """The kernel's tuple for one operand: ``(x, s0, s1)``, then what its prologue reads
    (MUL: the factor and its strides; LNMOD: scale, its strides, shift, mean, rstd[, ln_w,
    ln_b]; NOISE: the noise, its strides, t and the two tables). Only the tensors a mode uses
    are bound, which keeps the host's per-launch binding short."""
    x = op.x
    s = x.stride()
    mode = op.mode
    if mode == PLAIN or mode == SILU:
        return (x, s[0], s[1])
    aux = op.aux
    sa = aux.stride()
    if len(sa) != 2:
        sa = (0, 0)
    if mode == MUL:
        return (x, s[0], s[1], aux, sa[0], sa[1])
    if mode == NOISE:
        return (x, s[0], s[1], aux, sa[0], sa[1], op.mean, op.rstd, op.ln_w)
    if op.shift.stride() != aux.stride():
        raise ValueError("fused_matmul: the LNMOD scale and shift must share strides")
    if op.ln_w is None:
        return (x, s[0], s[1], aux, sa[0], sa[1], op.shift, op.mean, op.rstd)
    return (x, s[0], s[1], aux, sa[0], sa[1], op.shift, op.mean, op.rstd, op.ln_w, op.ln_b)


def fused_matmul(a: Operand, b: Operand, out: Optional[torch.Tensor], a_t: bool = False,
                 bias: Optional[torch.Tensor] = None, epilogue: int = STORE,
                 e1: Optional[torch.Tensor] = None, e2: Optional[torch.Tensor] = None,
                 v_out: Optional[torch.Tensor] = None, dot_dtype: torch.dtype = torch.float32,
                 ieee: bool = True, part: Optional[torch.Tensor] = None, a_sum: int = -1,
                 c_sum: int = -1, c_sum2: int = -1, scatter=None, narrow: bool = True,
                 shape=None, accumulate: bool = False,
                 a_copy: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``out (M, N) <- epilogue(opA @ opB + bias)``; see the module docstring.

    ``part``: the (rows, cols) fp32 partial-sum buffer, with ``a_sum`` / ``c_sum`` / ``c_sum2``
    the column offsets written (-1: none). ``scatter``: ``(idx0, idx1, idx2, t0, t1, t2)`` for
    the SCATTER epilogue, which stores no ``out`` (then ``shape`` = (M, N)). ``narrow=False``
    keeps plain fp32 operands as they are (their tiles are cast in the kernel).
    ``accumulate``: ``out`` is fp32 and zeroed, so a grid under one wave may split the
    reduction (split-K: each part adds its partial tile atomically); plain STORE only.
    ``a_copy``: an (M, K) tensor in the dot dtype (unit column stride) that receives opA as the
    tensor cores saw it (A not transposed): a later weight gradient then reads a plain operand
    in the dot dtype, whose tiles stream through shared memory (pipelined wgmma on sm_90)."""
    M, N = out.shape if out is not None else shape
    ax = a.x
    if a_t:
        K, am = ax.shape
    else:
        am, K = ax.shape
    if am != M or b.x.shape != (K, N):
        raise ValueError(f"fused_matmul: shapes do not chain: A {tuple(ax.shape)} "
                         f"(transposed={a_t}), B {tuple(b.x.shape)}, out {(M, N)}")
    if narrow:
        a, b = _narrow(a, dot_dtype), _narrow(b, dot_dtype)
    amode, bmode = a.mode, b.mode
    if (a_t and amode == PLAIN and bmode != PLAIN and out is not None and bias is None
            and epilogue == STORE and part is None and a_copy is None):
        # a weight gradient whose B has a prologue: as C^T = opB^T @ A the transformed
        # operand is the one fed from registers and the plain one streams through shared
        # memory, so on sm_90 each wgmma overlaps the next K step's (pendings = 1, not 0)
        return fused_matmul(b, Operand(a.x), out.t(), a_t=True, dot_dtype=dot_dtype, ieee=ieee,
                            narrow=False, accumulate=accumulate)
    A, B = operand_args(a), operand_args(b)
    if c_sum2 >= 0 > c_sum:  # the kernel stores the second copy only beside the first
        raise ValueError("fused_matmul: c_sum2 needs c_sum")
    sums = (a_sum >= 0) + 2 * (c_sum >= 0) + 4 * (c_sum2 >= 0)
    if out is None and bias is not None:
        raise ValueError("fused_matmul: the SCATTER epilogue (no out) takes no bias")
    some = out if out is not None else scatter[3]  # where the launch goes
    grid, kw = _launch(M, N, K, amode, _operand_bytes(A, amode), ax.element_size(),
                       amode == LNMOD and a.ln_w is not None, bmode, _operand_bytes(B, bmode),
                       bmode == LNMOD and b.ln_w is not None, a_t, epilogue, bias is not None,
                       sums, a_copy is not None, dot_dtype, ieee,
                       accumulate and out is not None and out.dtype == torch.float32,
                       shared_memory_limit(some), compute_capability(some))
    if out is None:
        c = ()
    else:
        sc = out.stride()
        c = (out, sc[0], sc[1]) if bias is None else (out, sc[0], sc[1], bias)
    if epilogue == STORE:
        e = ()
    elif epilogue == SILU_GRAD:
        if e1.stride(1) != 1:
            raise ValueError("fused_matmul: e1 needs unit column stride")
        e = (e1, e1.stride(0))
    elif epilogue == GATE_RESIDUAL:
        if e1.stride(1) != 1 or e2.stride(1) != 1 or v_out.stride(1) != 1:
            raise ValueError("fused_matmul: e1, e2 and v_out need unit column stride")
        e = (e1, e1.stride(0), e2, e2.stride(0), v_out, v_out.stride(0))
    else:
        if e1.stride(1) != 1:
            raise ValueError("fused_matmul: e1 needs unit column stride")
        e = (e1, e1.stride(0), *scatter)
    if sums or a_copy is not None:
        if a_copy is not None and (a_t or a_copy.shape != (M, K) or a_copy.stride(1) != 1):
            raise ValueError("fused_matmul: a_copy must be an (M, K) tensor with unit column "
                             "stride, and A not transposed")
        pt = part if part is not None else a_copy
        ac = a_copy if a_copy is not None else pt
        p = (pt, pt.stride(0), max(a_sum, 0), max(c_sum, 0), max(c_sum2, 0), ac, ac.stride(0))
    else:
        p = ()
    _matmul_kernel.run(A, B, c, e, p, (M, N, K), grid=grid, warmup=False, **kw)
    return out


def _operand_bytes(t: tuple, mode: int) -> int:
    """Bytes loaded per element of an operand (its tuple, :func:`operand_args`): x, and the
    factor / scale and the shift its prologue reads."""
    if mode == PLAIN or mode == SILU:
        return t[0].element_size()
    if mode == LNMOD:
        return t[0].element_size() + t[3].element_size() + t[6].element_size()
    return t[0].element_size() + t[3].element_size()


# Split-K: an output of fewer tiles than one wave on a 132-SM H100 splits its reduction in up
# to this many parts, each keeping at least SPLIT_MIN_K_STEPS K blocks (a pipeline to fill).
WAVE_SMS = 132
SPLIT_MIN_K_STEPS = 2


def split_k(tiles: int, K: int, block_k: int) -> int:
    """How many parts the reduction of a ``tiles``-program GEMM is split in (1: none)."""
    if tiles >= WAVE_SMS:
        return 1
    return max(1, min(cdiv(WAVE_SMS, tiles), cdiv(K, block_k) // SPLIT_MIN_K_STEPS))


@functools.lru_cache(maxsize=4096)
def _launch(M, N, K, a_mode, a_bytes, a_x_bytes, a_affine, b_mode, b_bytes, b_affine, a_t,
            epilogue, has_bias, sums, a_copy, dot_dtype, ieee, accumulate, smem_limit,
            arch=90):
    """Grid and launch keywords (every constexpr: tiles, stages, modes, dot dtype, split-K) of
    one GEMM, computed once per (problem, operands, epilogue, device limit): a launch then
    costs one cache lookup. ``accumulate``: the output is a zeroed fp32 buffer, so split-K may
    apply to a plain STORE without bias or partial sums."""
    transformed = a_mode != PLAIN or b_mode != PLAIN or a_t
    heavy = epilogue >= SILU_GRAD or (a_mode in (MUL, NOISE) and a_x_bytes == 4)
    cfg = _launch_config(M, N, K, a_bytes, b_bytes, _DOT_BYTES[dot_dtype], transformed,
                         smem_limit, heavy, a_t, arch)
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    splittable = accumulate and epilogue == STORE and not has_bias and not sums
    split = split_k(tiles, K, cfg["BLOCK_K"]) if splittable else 1
    if tiles * split < WAVE_SMS and not interpreting():
        for bm, bn in _SMALL_GRID_TILES:
            if bm > cfg["BLOCK_M"] or bn > cfg["BLOCK_N"]:
                continue
            tiles = cdiv(M, bm) * cdiv(N, bn)
            split = split_k(tiles, K, cfg["BLOCK_K"]) if splittable else 1
            # 64 columns keep the warps chosen (4 warps spill an fp32-operand 64 x 64 tile
            # on sm_100); narrower tiles take 4
            cfg = dict(cfg, BLOCK_M=bm, BLOCK_N=bn,
                       num_warps=cfg["num_warps"] if bn >= 64 else 4)
            if tiles * split >= WAVE_SMS:
                break
    values = dict(A_MODE=a_mode, A_T=a_t, A_AFFINE=a_affine, B_MODE=b_mode, B_AFFINE=b_affine,
                  EPI=epilogue, HAS_BIAS=has_bias, SUMS=sums, A_COPY=a_copy,
                  DOT_DTYPE=_TL_DTYPE[dot_dtype], IEEE=ieee and dot_dtype == torch.float32,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                  GROUP_M=cfg["GROUP_M"], SPLIT_K=split)
    kw = dict(CFG=tuple(values[f] for f in CFG_FIELDS), num_warps=cfg["num_warps"],
              num_stages=cfg["num_stages"])
    return (tiles, split), kw


def cfg_values(cfg: tuple) -> dict:
    """The GEMM kernel's ``CFG`` constexpr by name."""
    return dict(zip(CFG_FIELDS, cfg))


def weight_t(w: torch.Tensor) -> Operand:
    """B operand ``W^T`` of a (out, in) weight, without a copy."""
    return Operand(w.t())
