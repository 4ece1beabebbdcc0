"""Images/s of a whole GenDD training step: the reference formulation against gendd_fast's.

    python benchmarks/bench_train.py                       # GPU: CIFAR and ImageNet shapes
    python benchmarks/bench_train.py --shapes cifar --batch 16 --steps 3   # a quick CPU look

One step = teacher forward (no grad), student forward, GenDD loss (contraction, mixing, tokens,
``mul`` copies, condition dropout, diffusion head), CE of the linear probe, backward, AdamW step.
Inputs are random tensors already on the device, so this measures compute, not data loading
(``bench_data.py`` does that).

- reference: fp32, eager, NCHW, the reference head (DiffLoss), AdamW (for-each), with the
  official code's precision settings (PyTorch's defaults: cuDNN convolutions may use TF32,
  matmuls do not);
- gendd_fast: bf16 autocast, channels-last, the fused head (FusedDiffLoss; the reference head
  with a notice where Triton cannot run), fused AdamW on CUDA, optionally ``--compile``.

Shapes: CIFAR resnet32x4 -> resnet8x4 (32 px, 30 copies), ImageNet ResNet-34 -> ResNet-18
(224 px, 10 copies); batch 64 per GPU, head width 1024.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RESULTS, device_info, peak_memory_mib, pick_device, print_table,  # noqa: E402
                    reset_peak, time_fn, write_result)

from gendd_fast import DiffLoss, FusedDiffLoss  # noqa: E402
from gendd_fast.distill import GenDD, Teacher  # noqa: E402
from gendd_fast.fused_head import fused_unavailable_reason  # noqa: E402
from gendd_fast.models import create_model  # noqa: E402

SHAPES = {"cifar": dict(teacher="resnet32x4", student="resnet8x4", size=32, classes=100, mul=30),
          "imagenet": dict(teacher="resnet34", student="resnet18", size=224, classes=1000,
                           mul=10)}


def build(shape, ours: bool, device, width, mul):
    torch.manual_seed(0)
    teacher = Teacher(create_model(shape["teacher"], shape["classes"])).to(device)
    student = create_model(shape["student"], shape["classes"])
    head = FusedDiffLoss if ours and not fused_unavailable_reason(device) else DiffLoss
    model = GenDD(student, teacher.model.fc, head, width=width, mul=mul).to(device)
    if ours:
        teacher = teacher.to(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    fused = ours and device.type == "cuda"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            betas=(0.9, 0.95), fused=fused or None)
    return teacher, model, opt, head.__name__


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shapes", default="cifar,imagenet")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mul", type=int, default=None, help="override the copies per token")
    ap.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    # the reference's own setting: the official code leaves PyTorch's defaults (cuDNN
    # convolutions may use TF32, matmuls do not)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    info = device_info(device)
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(args.batch, 3, shape["size"], shape["size"], generator=g).to(device)
        y = torch.randint(0, shape["classes"], (args.batch,), generator=g).to(device)
        variants = [("reference (fp32, eager, DiffLoss)", False, False)]
        variants.append(("gendd_fast (bf16, channels-last, fused head)", True, False))
        if args.compile:
            variants.append(("gendd_fast + torch.compile", True, True))
        base = None
        for label, ours, compiled in variants:
            teacher, model, opt, head_name = build(shape, ours, device, args.width,
                                                   args.mul or shape["mul"])
            xx = x.contiguous(memory_format=torch.channels_last) if ours else x
            fwd = torch.compile(model) if compiled else model
            ctx = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if ours
                   else torch.autocast(device_type=device.type, enabled=False))

            def step():
                with ctx:
                    t_out = teacher(xx)
                    loss, _ = fwd(xx, y, t_out)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            reset_peak(device)
            t = time_fn(step, device, repeats=args.steps, warmup=2)
            img_s = args.batch / (t["ms"] / 1e3)
            base = base or img_s
            rows.append({"shape": name, "variant": label, "head": head_name,
                         "ms_per_step": t["ms"], "images_per_s": img_s,
                         "speedup": img_s / base, "peak_mib": peak_memory_mib(device)})
            teacher = model = opt = fwd = None  # free before the next variant is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
    cfg = dict(batch=args.batch, width=args.width, steps=args.steps, mul_override=args.mul, shapes={
        k: SHAPES[k] for k in args.shapes.split(",")}, statistic="median ms per step")
    print_table(rows, ["shape", "variant", "head", "ms_per_step", "images_per_s", "speedup",
                       "peak_mib"],
                f"GenDD training step, batch {args.batch}, on {info.get('gpu', info['device'])}")
    write_result("train", info, cfg, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
