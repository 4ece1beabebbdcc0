"""Diffusion head forward + backward: the reference formulation against the fused Triton head.

    python benchmarks/bench_head.py                 # on a GPU: all shapes, all variants
    python benchmarks/bench_head.py --scale 0.02    # a quick look (fewer rows)

Variants, in one process on the same inputs: the reference DiffLoss in fp32 (the paper's
setting; TF32 off), the reference under bf16 autocast, ``torch.compile`` of the reference under
bf16, and FusedDiffLoss under bf16 autocast. Shapes (head width 1024, depth 3, 64-dim tokens):
CIFAR resnet32x4 teacher (64 images x 4 tokens x 30 copies = 7,680 rows, z 256), ImageNet
ResNet-34 teacher (64 x 8 x 10 = 5,120 rows, z 512) and ResNet-50 teacher (64 x 32 x 10 =
20,480 rows, z 2048). ``executed_gflop`` is what each variant runs (the reference formulation:
time MLP and condition per row; the fused head: per timestep and per image, see
:func:`fused_flops`), and ``tflops`` its rate; ``useful_tflops`` credits every variant with the
reference's count, a rate of useful work. The dense bf16 matmul rate of the
device (8192^3) is measured too, as the yardstick.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RESULTS, device_info, peak_memory_mib, pick_device, print_table,  # noqa: E402
                    reset_peak, sync, time_fn, write_result)

from perf_model import by_kernel, peaks_for, predict, step_kernels  # noqa: E402

from gendd_fast import DiffLoss, FusedDiffLoss  # noqa: E402
from gendd_fast.fused_head import fused_unavailable_reason  # noqa: E402
from gendd_fast.head import draw_row_randomness  # noqa: E402

SHAPES = {"cifar": dict(images=64, tokens=4, mul=30, z=256),
          "r34": dict(images=64, tokens=8, mul=10, z=512),
          "r50": dict(images=64, tokens=32, mul=10, z=2048)}


def reference_flops_per_row(W, depth, d, zc):
    fwd = 2 * (256 * W + W * W + zc * W + d * W + (3 * depth + 2) * W * W + 2 * depth * W * W
               + W * 2 * d)
    return 3 * fwd  # forward + backward (two GEMMs per forward GEMM)


def fused_flops(rows, W, depth, d, zc, images, steps=1000):
    """FLOPs the fused head executes per forward + backward (2 per multiply-add):
    per row 2(M W + d W + 2 D W^2 + 2 d W) with M = (3 D + 2) W modulation columns, per
    timestep 2(256 W + W^2), per image 2 zc W; every GEMM three times (forward, dX, dW) except
    input_proj and the time MLP's first layer, whose inputs need no gradient (twice)."""
    M = (3 * depth + 2) * W
    per_row = 2 * (M * W + d * W + 2 * depth * W * W + 2 * d * W)
    tables = 2 * steps * (256 * W + W * W) + 2 * images * zc * W
    return 3 * (rows * per_row + tables) - 2 * rows * d * W - 2 * steps * 256 * W


def dense_bf16_tflops(device, n=8192):
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, device, repeats=10, warmup=3)
    return 2 * n ** 3 / (t["ms"] / 1e3) / 1e12


def kernel_times_ms(fn, device):
    """Per Triton kernel name: CUDA time (ms) summed over its launches in one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0)
        if ev.key.startswith("_") and ev.key.split("(")[0].endswith("_kernel"):
            name = ev.key.split("(")[0]
            out[name] = out.get(name, 0.0) + t / 1e3
    return out


def model_table(shape, n, W, depth, d, peaks, measured):
    """The roofline prediction of each fused kernel beside its measured time (if any)."""
    pred = predict(step_kernels(n, W, depth, d, "bf16"), peaks, "bf16")
    rows = []
    for k in by_kernel(pred).values():
        r = dict(shape=shape, kernel=k["kernel"], launches=k["launches"],
                 gflop=k["flops"] / 1e9, mbytes=k["bytes"] / 1e6, pred_ms=k["pred_ms"])
        if k["kernel"] in measured:
            r["measured_ms"] = measured[k["kernel"]]
            r["fraction_of_peak"] = k["pred_ms"] / measured[k["kernel"]]
        rows.append(r)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shapes", default="cifar,r34,r50")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the images per shape")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--mul", type=int, default=None, help="override the copies per token")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--model-gpu", default="H100",
                    help="peak rates for the performance model when this device has none known")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's (PyTorch's default)
    info = device_info(device)
    peak = dense_bf16_tflops(device)
    info["dense_bf16_matmul_tflops"] = peak
    fused_reason = fused_unavailable_reason(device)
    W, depth, d = args.width, args.depth, 64
    rows_out, model_rows = [], []
    peaks = (peaks_for(info["gpu"]) if device.type == "cuda" else None) or \
        peaks_for(args.model_gpu)
    for shape in args.shapes.split(","):
        s = SHAPES[shape]
        B = max(2, int(round(s["images"] * args.scale)))
        L, M, zc = s["tokens"], args.mul or s["mul"], s["z"]
        torch.manual_seed(0)
        ref = DiffLoss(d, zc, depth, W, "64", L)
        with torch.no_grad():  # a trained-looking head: no zero layers
            for p in ref.parameters():
                if bool((p == 0).all()):
                    p.normal_(0, 0.02)
        ref = ref.to(device)
        fused = FusedDiffLoss(d, zc, depth, W, "64", L).to(device)
        fused.load_state_dict(ref.state_dict())
        target = torch.randn(B, L * d, device=device)
        z = torch.randn(B, zc, device=device, requires_grad=True)
        n = B * L * M
        keep, t, noise = draw_row_randomness(n, d, 0.2, device)
        x0 = target.reshape(B * L, d).repeat(M, 1)
        r = torch.arange(n, device=device) % (B * L)
        k = r % L
        ci = torch.where(keep, r // L, torch.full_like(r, B))
        flops = reference_flops_per_row(W, depth, d, zc) * n
        # the time MLP runs over all 1,000 timesteps, except on CPU with few rows (the distinct
        # ones: FusedDiffLoss.row_losses)
        steps = 1000 if device.type == "cuda" or n >= 2000 else int(torch.unique(t).numel())
        executed = {"fused bf16": fused_flops(n, W, depth, d, zc, B, steps=steps)}

        def ref_step(head=ref):
            zr = z.repeat_interleave(L, 0).repeat(M, 1) * keep[:, None]
            loss = head.train_diffusion.training_losses(
                head.net, x0, t, dict(c=zr, chunk_idx=k), noise)["loss"].mean()
            loss.backward()

        def bf16(fn):
            def run():
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                    fn()
            return run

        variants = [("reference fp32", ref_step, None), ("reference bf16", bf16(ref_step), None)]
        if not args.no_compile:
            compiled = torch.compile(ref_step)
            variants.append(("reference bf16 + torch.compile", bf16(compiled), None))
        fused_step = bf16(lambda: fused.row_losses(x0, t, noise, k, z, ci,
                                                   reduction="mean").backward())
        variants.append(("fused bf16", fused_step, fused_reason))
        base = {}
        for name, fn, skip_reason in variants:
            row = {"shape": shape, "rows": n, "variant": name}
            if skip_reason:
                row["note"] = f"not run: {skip_reason}"
                rows_out.append(row)
                continue
            try:
                reset_peak(device)
                tm = time_fn(fn, device, repeats=args.repeats, warmup=2)
                sync(device)
            except Exception as e:  # noqa: BLE001 - e.g. compile unsupported here: report it
                row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows_out.append(row)
                continue
            base[name] = tm["ms"]
            ex = executed.get(name, flops)
            row.update(ms=tm["ms"], rows_per_s=n / (tm["ms"] / 1e3), executed_gflop=ex / 1e9,
                       reference_gflop=flops / 1e9, tflops=ex / (tm["ms"] / 1e3) / 1e12,
                       useful_tflops=flops / (tm["ms"] / 1e3) / 1e12,
                       peak_mib=peak_memory_mib(device),
                       speedup_vs_fp32=base["reference fp32"] / tm["ms"])
            if "reference bf16 + torch.compile" in base:
                row["speedup_vs_compiled_bf16"] = base["reference bf16 + torch.compile"] / tm["ms"]
            if peak:
                row["fraction_of_dense_bf16"] = row["tflops"] / peak
            rows_out.append(row)
            if name == "fused bf16" and peaks:
                measured = kernel_times_ms(fused_step, device) if device.type == "cuda" else {}
                model_rows += model_table(shape, n, W, depth, d, peaks, measured)
                row["pred_ms"] = sum(r["pred_ms"] for r in model_rows if r["shape"] == shape)
                if device.type == "cuda":  # a CPU time against GPU peak rates means nothing
                    row["fraction_of_model"] = row["pred_ms"] / tm["ms"]
            z.grad = None
            for p in list(ref.parameters()) + list(fused.parameters()):
                p.grad = None
    cfg = dict(width=W, depth=depth, token_dim=d, shapes={k: SHAPES[k] for k in
                                                          args.shapes.split(",")},
               scale=args.scale, mul_override=args.mul, repeats=args.repeats, dtype="bf16 autocast (fp32 masters)",
               statistic="median ms per forward+backward",
               perf_model=dict(peaks=peaks, kernels=model_rows,
                               note="pred_ms: roofline minimum at the peak rates; "
                                    "fraction_of_peak = pred_ms / measured_ms"))
    print_table(rows_out, ["shape", "rows", "variant", "ms", "rows_per_s", "executed_gflop",
                           "reference_gflop", "tflops", "useful_tflops",
                           "speedup_vs_fp32", "speedup_vs_compiled_bf16",
                           "fraction_of_dense_bf16", "pred_ms", "fraction_of_model", "peak_mib",
                           "note"],
                f"head forward+backward on {info.get('gpu', info['device'])}"
                + (f" (dense bf16 matmul: {peak:.0f} TFLOP/s)" if peak else ""))
    if model_rows:
        print_table(model_rows, ["shape", "kernel", "launches", "gflop", "mbytes", "pred_ms",
                                 "measured_ms", "fraction_of_peak"],
                    f"fused kernels: roofline prediction at {peaks['name']} peak rates"
                    + (" beside the measured time" if device.type == "cuda" else
                       " (no GPU here: prediction only)"))
    write_result("head", info, cfg, rows_out, args.out)
    return rows_out


if __name__ == "__main__":
    main()
