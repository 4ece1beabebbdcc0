"""Evaluate a trained student: linear-probe top-1/top-5 and, for GenDD, top-1/top-5 by sampling
(the teacher's classifier on features the head generates from the student's condition).

    python -m gendd_fast.evaluate --checkpoint runs/gendd/best.pt --sampling-steps 64 --cfg 2.0

The checkpoint carries its config, so the dataset, models and head are rebuilt from it; flags
override what the evaluation may change (data paths, sampling settings, batch size, device).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Dict, Optional

import torch

from .distributed import all_reduce_sum
from .precision import autocast_for, resolve_amp


@torch.no_grad()
def evaluate(distiller, loader, device: torch.device, amp: str = "off", sample: bool = False,
             sample_kw: Optional[Dict] = None, max_batches: Optional[int] = None) -> Dict:
    """Top-1/top-5 (%) over the loader, summed over ranks. Keys: top1, top5 and, when sampling,
    sample_top1, sample_top5; n is the number of images scored."""
    was_training = distiller.training
    distiller.eval()
    counts: Dict[str, torch.Tensor] = {}
    n = torch.zeros((), dtype=torch.float64, device=device)
    ctx = autocast_for(device, amp)
    for b, (x, y) in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        outs = distiller.eval_logits(x, ctx, sample=sample, **(sample_kw or {}))
        n += y.numel()
        for name, logits in outs.items():
            k = min(5, logits.shape[1])
            top = logits.float().topk(k, dim=1).indices
            hit = top == y[:, None]
            c = torch.stack([hit[:, :1].any(1).sum(), hit.any(1).sum()]).double()
            counts[name] = counts.get(name, torch.zeros(2, dtype=torch.float64,
                                                        device=device)) + c
    distiller.train(was_training)
    all_reduce_sum(n)
    res = {"n": int(n.item())}
    for name, c in counts.items():
        all_reduce_sum(c)
        res[f"{name}top1"] = 100.0 * c[0].item() / max(n.item(), 1)
        res[f"{name}top5"] = 100.0 * c[1].item() / max(n.item(), 1)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gendd_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by the trainer")
    p.add_argument("--data-path", default=None)
    p.add_argument("--val-path", default=None)
    p.add_argument("--val-list", default=None)
    p.add_argument("--sampling-steps", default=None, help="respacing, e.g. 64 or 100")
    p.add_argument("--ddim-steps", type=int, default=None, help="sample with DDIM instead")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--num-sampling", type=int, default=None,
                   help="draws averaged per image before classifying")
    p.add_argument("--no-sample", action="store_true", help="linear probe only")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default=None, choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--head", default=None, choices=["auto", "fused", "torch"])
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = p.parse_args(argv)

    from .build import build_method, configure_sampler, sampling_kwargs
    from .checkpoint import join_state, read_checkpoint
    from .config import Config, validate
    from .data import build_loaders
    from .distributed import init_distributed

    ckpt = read_checkpoint(args.checkpoint)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise SystemExit(f"error: {args.checkpoint!r} is not a gendd_fast training checkpoint "
                         f"(no 'config'/'model')")
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k in fields})
    over = {"data_path": args.data_path, "val_path": args.val_path, "val_list": args.val_list,
            "sampling_steps": args.sampling_steps, "ddim_steps": args.ddim_steps,
            "cfg": args.cfg, "temperature": args.temperature, "num_sampling": args.num_sampling,
            "eval_batch_size": args.batch_size, "amp": args.amp, "head": args.head,
            "workers": args.workers}
    cfg = dataclasses.replace(cfg, device=args.device,
                              **{k: v for k, v in over.items() if v is not None})
    validate(cfg)
    env = init_distributed(cfg.device)
    torch.manual_seed(args.seed)
    loaders = build_loaders(cfg, env.rank, env.world, env.device)
    if loaders.val is None:
        raise SystemExit("error: this dataset has no evaluation split (give --val-path)")
    distiller, _ = build_method(cfg, loaders.num_classes, env.device, teacher_weights=False)
    distiller.load_state_dict(join_state(ckpt))
    configure_sampler(distiller, cfg)
    sample = hasattr(distiller, "diffloss") and not args.no_sample
    res = evaluate(distiller, loaders.val, env.device, resolve_amp(cfg.amp, env.device),
                   sample=sample, sample_kw=sampling_kwargs(cfg))
    res.update(checkpoint=args.checkpoint, method=cfg.method,
               sampling_steps=cfg.sampling_steps, ddim_steps=cfg.ddim_steps, cfg=cfg.cfg,
               num_sampling=cfg.num_sampling)
    if env.is_main:
        print(f"{'metric':<14} value")
        for k in ("top1", "top5", "sample_top1", "sample_top5"):
            if k in res:
                print(f"{k:<14} {res[k]:.2f}")
        print(f"{'images':<14} {res['n']}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":  # `python -m gendd_fast.evaluate`: the entry lives in gendd_fast.cli
    from gendd_fast.cli import evaluate_cli
    evaluate_cli()
