"""A roofline model of the fused head's training step: FLOPs and bytes of every kernel at the
real shapes, and the time each would take at the device's peak rates.

    python benchmarks/perf_model.py                       # H100, the three training shapes
    python benchmarks/perf_model.py --gpu A100 --dtype fp32

Each kernel's predicted time is max(FLOPs / peak FLOP/s, bytes / peak bandwidth): the least it
can take. Bytes count each tensor once (what a kernel must read and write at least: operands,
prologue inputs, epilogue inputs and outputs); FLOPs count 2 per multiply-add of the GEMMs and
ignore the elementwise work, which hides under the memory time. bench_head.py prints this
prediction beside the measured time of each kernel, so a GPU run shows at once which kernel
is far from its limit; without a GPU the prediction says what to expect.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from typing import Dict, List, Optional

# Dense peak rates from the vendors' data sheets (no sparsity): tensor-core bf16/fp16 with fp32
# accumulation, fp32 on the CUDA cores (the fused head's --amp off GEMMs use IEEE fp32, not
# TF32), and memory bandwidth. Matched against the CUDA device name, longest key first.
PEAKS = {
    "H200": dict(bf16=989e12, fp16=989e12, fp32=67e12, bw=4.8e12),
    "H100 PCIe": dict(bf16=756e12, fp16=756e12, fp32=51e12, bw=2.0e12),
    "H100": dict(bf16=989e12, fp16=989e12, fp32=67e12, bw=3.35e12),
    "A100": dict(bf16=312e12, fp16=312e12, fp32=19.5e12, bw=2.0e12),
    "B200": dict(bf16=2250e12, fp16=2250e12, fp32=75e12, bw=8.0e12),
    "L40S": dict(bf16=362e12, fp16=362e12, fp32=91.6e12, bw=0.864e12),
    "L4": dict(bf16=121e12, fp16=121e12, fp32=30.3e12, bw=0.3e12),
    "RTX 4090": dict(bf16=165e12, fp16=165e12, fp32=82.6e12, bw=1.008e12),
}
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def peaks_for(name: str) -> Optional[Dict]:
    for key in sorted(PEAKS, key=len, reverse=True):
        if key.lower() in name.lower():
            return dict(PEAKS[key], name=key)
    return None


def _gemm(op, m, n, k, a_bytes, b_bytes, c_bytes, extra_bytes=0):
    return dict(kernel="_matmul_kernel", op=f"{op} {m}x{n}x{k}", dims=(m, n, k),
                flops=2 * m * n * k,
                bytes=m * k * a_bytes + k * n * b_bytes + m * n * c_bytes + extra_bytes)


def _rows(kernel, op, n_bytes):
    return dict(kernel=kernel, op=op, flops=0, bytes=n_bytes)


def step_kernels(rows: int, width: int = 1024, depth: int = 3, token_dim: int = 64,
                 dtype: str = "bf16", steps: int = 1000, version: str = "current",
                 z: int = 256) -> List[Dict]:
    """Every Triton kernel of one forward + backward of FusedDiffLoss, in launch order.
    ``version="v0"``: the dataflow before the one-function step (per-op autograd functions)."""
    if version == "current":
        return step_kernels_current(rows, width, depth, token_dim, dtype, steps, z)
    return step_kernels_v0(rows, width, depth, token_dim, dtype, steps)


def step_kernels_v0(rows: int, width: int = 1024, depth: int = 3, token_dim: int = 64,
                    dtype: str = "bf16", steps: int = 1000) -> List[Dict]:
    """The per-op dataflow (the torch GEMMs of the time MLP and the condition embedding are
    left out: one per timestep / image, not per row; the torch glue is measured separately)."""
    n, W, d, e = rows, width, token_dim, BYTES[dtype]
    steps = min(steps, rows)  # the time MLP runs once per distinct timestep
    M = 3 * W * depth + 2 * W  # modulation columns
    f4 = 4  # fp32: x_t, the loss inputs, weight gradients, du
    k = [_rows("_noise_injection_kernel", "x_t", n * d * (4 + 4 + f4) + n * 8),
         _rows("_timestep_features_kernel", "features", steps * 256 * 4),
         _rows("_condition_kernel", "y = temb[t] + cond[i] + pos[k]", n * W * e + n * 24)]
    for i in range(depth):
        k.append(_gemm(f"mod{i} fwd", n, 3 * W, W, e, e, e))
    k.append(_gemm("mod final fwd", n, 2 * W, W, e, e, e))
    k.append(_gemm("input_proj fwd", n, W, d, e, e, e))
    for i in range(depth):
        k.append(_rows("_ln_stats_kernel", f"block{i} LN stats", n * W * e + n * 8))
        k.append(_gemm(f"block{i} fc1 fwd (LN-mod)", n, W, W, 3 * e, e, e))
        k.append(_gemm(f"block{i} fc2 fwd (gate+res)", n, W, W, e, e, 2 * e, 2 * n * W * e))
    k.append(_rows("_ln_stats_kernel", "final LN stats", n * W * e + n * 8))
    k.append(_gemm("final fwd (LN-mod)", n, 2 * d, W, 3 * e, e, f4))
    k.append(_rows("_diffusion_loss_kernel", "loss + dout", n * (2 * d * 4 * 2 + 3 * d * 4)))
    # backward, in autograd's order
    k.append(_gemm("final dW", 2 * d, W, n, f4, 3 * e, f4))
    k.append(_gemm("final du", n, W, 2 * d, f4, e, f4))
    k.append(_rows("_ln_mod_bwd_kernel", "final LN-mod bwd", n * W * (f4 + 2 * e + 3 * e)))
    for i in reversed(range(depth)):
        k.append(_rows("_gate_bwd_kernel", f"block{i} dgate", n * W * 4 * e))
        k.append(_gemm(f"block{i} fc2 dW", W, W, n, 2 * e, e, f4))
        k.append(_gemm(f"block{i} fc2 da (SiLU')", n, W, W, 2 * e, e, e, n * W * e))
        k.append(_gemm(f"block{i} fc1 dW", W, W, n, e, 3 * e, f4))
        k.append(_gemm(f"block{i} fc1 du", n, W, W, e, e, f4))
        k.append(_rows("_ln_mod_bwd_kernel", f"block{i} LN-mod bwd",
                       n * W * (f4 + 2 * e + 4 * e)))
    k.append(_gemm("input_proj dW", W, d, n, e, e, f4))
    for i in range(depth):
        k.append(_gemm(f"mod{i} dW", 3 * W, W, n, e, e, f4))
    k.append(_gemm("mod final dW", 2 * W, W, n, e, e, f4))
    k.append(_gemm("mod dy (SiLU')", n, W, M, e, e, f4, n * W * e))
    return k


def step_kernels_current(rows, width=1024, depth=3, token_dim=64, dtype="bf16", steps=1000,
                         z=256, images=64):
    """The one-function step (gendd_fast/kernels/head_step.py), launch order. The zeroing of the
    partial-sum buffer and its final reduction are torch ops: step_accounting.py measures them
    with the rest of the glue."""
    n, W, d, e, T, B = rows, width, token_dim, BYTES[dtype], steps, images
    M = 3 * W * depth + 2 * W
    f4 = 4
    k = [_gemm("time fc0 fwd", T, W, 256, e, e, e),
         _gemm("time fc2 fwd (SiLU)", T, W, W, e, e, e),
         _gemm("cond_embed fwd", B, W, z, f4, e, e),
         _rows("_condition_kernel", "y = temb[t] + cond[i] + pos[k]", n * W * e + n * 24),
         _gemm("modulation fwd (one GEMM)", n, M, W, e, e, e),
         _gemm("input_proj fwd (noise in prologue)", n, W, d, 2 * f4, e, e, n * 8)]
    for i in range(depth):
        k.append(_rows("_ln_stats_kernel", f"block{i} LN stats", n * W * e + n * 8))
        k.append(_gemm(f"block{i} fc1 fwd (LN-mod)", n, W, W, 3 * e, e, e))
        k.append(_gemm(f"block{i} fc2 fwd (gate+res)", n, W, W, e, e, 2 * e, 2 * n * W * e))
    k.append(_rows("_ln_stats_kernel", "final LN stats", n * W * e + n * 8))
    k.append(_gemm("final fwd (LN-mod)", n, 2 * d, W, 3 * e, e, f4))
    k.append(_rows("_diffusion_loss_kernel", "loss + dout", n * (2 * d * 4 * 2 + 2 * d * 4)))
    # du also writes g * dout in the compute dtype, the plain A of the final weight gradient
    k.append(_gemm("final du (+ bias sums, g*dout copy)", n, W, 2 * d, f4, e, f4,
                   n * 2 * d * e))
    k.append(_gemm("final dW", 2 * d, W, n, e, 3 * e, f4))
    fold = 4 * e  # the gated-residual backward of the block below: v, gate read; dgate, dv written
    k.append(_rows("_ln_mod_bwd_kernel", "final LN-mod bwd (+ gate bwd below)",
                   n * W * (f4 + 2 * e + 3 * e + (fold if depth else 0))))
    for i in reversed(range(depth)):
        k.append(_gemm(f"block{i} fc2 dW (as SiLU(a)^T dv)", W, W, n, e, e, f4))
        k.append(_gemm(f"block{i} fc2 da (SiLU', bias sums)", n, W, W, e, e, e, n * W * e))
        k.append(_gemm(f"block{i} fc1 dW", W, W, n, e, 3 * e, f4))
        k.append(_gemm(f"block{i} fc1 du", n, W, W, e, e, f4))
        k.append(_rows("_ln_mod_bwd_kernel", f"block{i} LN-mod bwd" +
                       (" (+ gate bwd below)" if i else ""),
                       n * W * (f4 + 2 * e + 4 * e + (fold if i else 0))))
    k.append(_gemm("input_proj dW (noise in prologue)", W, d, n, e, 2 * f4, f4, n * 8))
    k.append(_gemm("modulation dW (one GEMM)", M, W, n, e, e, f4))
    k.append(_gemm("modulation dy (SiLU', scatter into the tables)", n, W, M, e, e, 0,
                   n * W * e + 3 * n * W * f4))
    k.append(_gemm("time fc2 dh (SiLU', table copy)", T, W, W, f4, e, f4, 2 * T * W * e))
    k.append(_gemm("time fc2 dW", W, W, T, e, e, f4))
    k.append(_gemm("time fc0 dW", W, 256, T, f4, e, f4))
    k.append(_gemm("cond_embed dW", W, z, B, f4, f4, f4))
    k.append(_gemm("cond_embed dz", B, z, W, f4, e, f4))
    return k


def predict(kernels: List[Dict], peaks: Dict, dtype: str) -> List[Dict]:
    """Adds ``pred_ms`` and the bound (compute or memory) to each kernel."""
    out = []
    for k in kernels:
        t_c = k["flops"] / peaks[dtype]
        t_m = k["bytes"] / peaks["bw"]
        out.append(dict(k, pred_ms=max(t_c, t_m) * 1e3,
                        bound="compute" if t_c >= t_m else "memory"))
    return out


def with_grids(rows: List[Dict], grids: List, sms: int = 132) -> Optional[List[Dict]]:
    """``rows`` (from :func:`predict`, launch order) with each kernel's CTAs and ``grid_ms``: a
    grid of fewer CTAs than the GPU has SMs can use only that share of the SMs' tensor cores
    and load bandwidth, so its time is ``pred_ms * sms / ctas``; a grid of a wave or more keeps
    ``pred_ms`` (the tail of a partial last wave is not modelled). ``grids``: (kernel, CTAs[,
    GEMM (M, N, K)]) of every launch in order, as ``gendd_fast.launch_check.record_step``
    records them (the once-per-device timestep features left out). None when the two lists
    do not align: kernel by kernel, and GEMM by GEMM where the dims were recorded (M and N
    in either order: a weight gradient may run as its transpose)."""
    grids = [g for g in grids if g[0] != "_timestep_features_kernel"]

    def kind(name):  # older trees named their GEMM kernels two ways
        return "gemm" if "matmul" in name else name

    def same(r, g):
        if kind(r["kernel"]) != kind(g[0]):
            return False
        if len(g) > 2 and g[2] and "dims" in r:
            (m, n, k), (gm, gn, gk) = r["dims"], g[2]
            return k == gk and sorted((m, n)) == sorted((gm, gn))
        return True
    if len(rows) != len(grids) or not all(same(r, g) for r, g in zip(rows, grids)):
        return None
    return [dict(r, ctas=g[1], grid_ms=r["pred_ms"] * max(1.0, sms / max(g[1], 1)))
            for r, g in zip(rows, grids)]


def by_kernel(rows: List[Dict]) -> "OrderedDict[str, Dict]":
    """Predictions summed per kernel name (what a profiler's per-name totals compare with)."""
    agg: "OrderedDict[str, Dict]" = OrderedDict()
    for r in rows:
        a = agg.setdefault(r["kernel"], dict(kernel=r["kernel"], launches=0, flops=0, bytes=0,
                                             pred_ms=0.0))
        a["launches"] += 1
        a["flops"] += r["flops"]
        a["bytes"] += r["bytes"]
        a["pred_ms"] += r["pred_ms"]
    return agg


def main(argv=None):
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import print_table

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="H100")
    ap.add_argument("--dtype", default="bf16", choices=sorted(BYTES))
    ap.add_argument("--rows", default="7680,5120,20480")
    ap.add_argument("--grids", action="store_true",
                    help="also record each launch's grid as sm_90 would run it (real Triton, "
                         "no GPU: gendd_fast.launch_check) and print CTAs and the grid-aware "
                         "time (a grid under one wave of 132 SMs pays for its idle SMs)")
    args = ap.parse_args(argv)
    peaks = peaks_for(args.gpu)
    if peaks is None:
        raise SystemExit(f"no peak rates for {args.gpu!r}; known: {', '.join(PEAKS)}")
    out = []
    for n in (int(r) for r in args.rows.split(",")):
        rows = predict(step_kernels(n, dtype=args.dtype), peaks, args.dtype)
        cols = ["op", "flops", "bytes", "bound", "pred_ms"]
        if args.grids:
            filled = with_grids(rows, record_grids(n, args.dtype))
            if filled is None:
                raise SystemExit("the recorded launches do not match the model's kernel list")
            rows, cols = filled, cols + ["ctas", "grid_ms"]
        print_table(rows, cols,
                    f"{n} rows, {args.dtype} on {peaks['name']} (predicted minimum per kernel)")
        total = sum(r["pred_ms"] for r in rows)
        print(f"step total: {total:.3f} ms predicted minimum" +
              (f", {sum(r['grid_ms'] for r in rows):.3f} ms grid-aware" if args.grids else ""))
        out.append(dict(rows=n, total_pred_ms=total, kernels=rows))
    return out


def record_grids(rows: int, dtype: str, width: int = 1024, depth: int = 3,
                 token_dim: int = 64, z: int = 256):
    """(kernel, CTAs, GEMM dims) of every launch of one step over ``rows`` rows as sm_90 runs
    it, from the launch recorder of the ``gendd_fast`` on the path (needs the real Triton,
    not ``TRITON_INTERPRET``; an older tree's records carry no dims)."""
    import torch
    from gendd_fast.launch_check import record_step
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    return [[r.kernel, r.ctas, list(getattr(r, "dims", ()))]
            for r in record_step(90, dt, rows, width, depth, token_dim, z=z)]


if __name__ == "__main__":
    main()
