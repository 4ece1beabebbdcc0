"""Sampler latency: the reference Python loop against the native loop (gendd_fast._C).

    python benchmarks/bench_sampler.py                     # GPU when there is one
    python benchmarks/bench_sampler.py --device cpu --images 32

For each shape (CIFAR: teacher resnet32x4 -> 4 tokens, z 256; ResNet-34 teacher: 8 tokens, z 512;
head width 1024, depth 3) it samples ``--images`` images with ``--steps`` respaced steps and
classifier-free guidance ``--cfg``, and times: the reference loop in fp32 (the paper's
setting), the reference loop under bf16 autocast, the extension with fp32 weights, the
extension with bf16 weights, and on CUDA the bf16 extension replayed as one CUDA graph. Same inputs for every variant; each one's largest difference from the fp32 reference,
relative to the reference's largest value, is printed beside its time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RESULTS, device_info, peak_memory_mib, pick_device, print_table, reset_peak,  # noqa: E402
                    time_fn, write_result)

from gendd_fast import DiffLoss, sampler_ext  # noqa: E402
from gendd_fast.sampling import reference_sample  # noqa: E402

SHAPES = {"cifar": dict(tokens=4, z=256), "r34": dict(tokens=8, z=512)}


def make_head(tokens, z, width, depth, steps, device):
    head = DiffLoss(64, z, depth, width, str(steps), tokens)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking weights: the zero-initialised layers drawn at random
        for p in head.parameters():
            if bool((p == 0).all()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return head.to(device).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--shapes", default="cifar,r34")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the reference column
    info = device_info(device)
    if not sampler_ext.available():
        raise SystemExit(f"the extension is unavailable: {sampler_ext._state['why']}")
    info["extension_with_cuda"] = bool(sampler_ext.load_extension().with_cuda)
    rows = []
    for shape in args.shapes.split(","):
        L, zc = SHAPES[shape]["tokens"], SHAPES[shape]["z"]
        head = make_head(L, zc, args.width, args.depth, args.steps, device)
        B = args.images
        g = torch.Generator(device="cpu").manual_seed(1)
        z = torch.randn(B, zc, generator=g).to(device)
        n = B * L
        k = torch.arange(L).repeat(B).to(device)
        z_rows = z.repeat_interleave(L, 0)
        zz, kk = torch.cat([z_rows, torch.zeros_like(z_rows)]), torch.cat([k, k])
        x_T = torch.randn(n, 64, generator=g).to(device)
        noises = torch.randn(args.steps, n, 64, generator=g).to(device)
        doubled = dict(noise=torch.cat([x_T, x_T]), step_noises=torch.cat([noises, noises], 1))

        def ref(ctx=contextlib.nullcontext()):
            with ctx, torch.no_grad():
                return reference_sample(head, zz, kk, cfg=args.cfg, **doubled)[:n]

        bf16 = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        variants = [("reference fp32", lambda: ref()),
                    ("reference bf16 autocast", lambda: ref(bf16)),
                    ("extension fp32", lambda: sampler_ext.sample(head, z_rows, k, x_T, noises,
                                                                  cfg=args.cfg))]
        head_bf16 = copy.deepcopy(head).to(torch.bfloat16)
        variants.append(("extension bf16", lambda: sampler_ext.sample(
            head_bf16, z_rows, k, x_T, noises, cfg=args.cfg)))
        if device.type == "cuda":
            graphed = sampler_ext.GraphedSampler(head_bf16, n, cfg=args.cfg)
            variants.append(("extension bf16 + CUDA graph",
                             lambda: graphed(z_rows, k, x_T, noises)))
        want = ref()
        base = {}
        for name, fn in variants:
            reset_peak(device)
            t = time_fn(fn, device, repeats=args.repeats)
            out = fn()
            # relative to the largest reference value: an untrained head's samples are large
            err = ((out.float() - want).abs().max() / want.abs().max()).item()
            row = {"shape": shape, "variant": name, "ms_per_batch": t["ms"],
                   "images_per_s": B / (t["ms"] / 1e3), "max_rel_diff_vs_fp32_ref": err,
                   "peak_mib": peak_memory_mib(device)}
            base.setdefault(name, t["ms"])
            row["speedup_vs_ref_fp32"] = base["reference fp32"] / t["ms"]
            if "reference bf16 autocast" in base:
                row["speedup_vs_ref_bf16"] = base["reference bf16 autocast"] / t["ms"]
            rows.append(row)
    cfg = dict(images=args.images, steps=args.steps, cfg=args.cfg, width=args.width,
               depth=args.depth, token_dim=64, shapes={s: SHAPES[s] for s in args.shapes.split(",")},
               repeats=args.repeats, statistic="median wall time per batch")
    print_table(rows, ["shape", "variant", "ms_per_batch", "images_per_s", "speedup_vs_ref_fp32",
                       "speedup_vs_ref_bf16", "max_rel_diff_vs_fp32_ref", "peak_mib"],
                f"sampler: {args.images} images, {args.steps} steps, cfg {args.cfg}, W "
                f"{args.width}, on {info.get('gpu', info['device'])}")
    write_result("sampler", info, cfg, rows, args.out or RESULTS)
    return rows


if __name__ == "__main__":
    main()
