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
from typing import Callable, Dict, Optional

import torch

from .distill import method
from .distributed import all_reduce_sum
from .precision import autocast_for, resolve_amp
from .signal_policy import EvaluationStopped


# ImageNet-LT's groups (Liu et al., 2019): classes with more than 100 training images are
# "many-shot", 20 to 100 "medium-shot", fewer than 20 "few-shot".
SHOT_GROUPS = (("many", lambda c: c > 100), ("medium", lambda c: (c >= 20) & (c <= 100)),
               ("few", lambda c: c < 20))


def class_counts_from_list(samples) -> torch.Tensor:
    """Training images per class from ``(path, label)`` pairs (a training file list)."""
    labels = torch.tensor([int(lab) for _, lab in samples], dtype=torch.long)
    return torch.bincount(labels)


def training_class_counts(cfg, num_classes: Optional[int] = None) -> Optional[torch.Tensor]:
    """Per-class training counts when the shot split applies (``--shot-split``): ``on`` needs a
    ``--train-list``; ``auto`` reports for a training list whose counts span the many-shot and
    the few-shot groups (a long-tailed list, as ImageNet-LT's). Classes the list never names
    count 0, up to ``num_classes`` (the model's) or ``--num-classes``."""
    if cfg.shot_split == "off":
        return None
    if not (cfg.dataset == "filelist" and cfg.train_list):
        if cfg.shot_split == "on":
            raise ValueError("--shot-split on needs the training file list (--dataset filelist "
                             "--train-list FILE) to count the images of each class")
        return None
    import os
    from .data.datasets import read_file_list
    path = cfg.train_list
    if cfg.data_path and not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(cfg.data_path, path)
    counts = class_counts_from_list(read_file_list(path, cfg.data_path))
    total = max(num_classes or 0, cfg.num_classes or 0)
    if counts.numel() < total:
        counts = torch.cat([counts, counts.new_zeros(total - counts.numel())])
    long_tailed = bool((counts > 100).any()) and bool(((counts > 0) & (counts < 20)).any())
    return counts if (cfg.shot_split == "on" or long_tailed) else None


@torch.no_grad()
def evaluate(distiller, loader, device: torch.device, amp: str = "off", sample: bool = False,
             sample_kw: Optional[Dict] = None, max_batches: Optional[int] = None,
             class_counts: Optional[torch.Tensor] = None, noise_seed: int = 0,
             should_stop: Optional[Callable[[int], bool]] = None) -> Dict:
    """Top-1/top-5 (%) over the loader, summed over ranks. Keys: top1, top5 and, when sampling,
    sample_top1, sample_top5; n is the number of images scored. With ``class_counts`` (training
    images per class) also many/medium/few-shot top-1 per prediction (``many``,
    ``sample_many``, ...): the hits of the held-out images of each group over their number.
    Sampling noise is keyed by (``noise_seed``, image index, draw): the same checkpoint scores
    the same from the trainer and from ``gendd_fast.evaluate``.
    ``should_stop(b)`` is asked before batch ``b`` (the trainer's signal policy): True gives up
    the pass with :class:`~gendd_fast.signal_policy.EvaluationStopped`."""
    was_training = distiller.training
    distiller.eval()
    counts: Dict[str, torch.Tensor] = {}
    per_class: Dict[str, torch.Tensor] = {}
    n = torch.zeros((), dtype=torch.float64, device=device)
    seen = None
    if class_counts is not None:
        seen = torch.zeros(class_counts.numel(), dtype=torch.float64, device=device)
    ctx = autocast_for(device, amp)
    ids = image_indices(loader)
    start = 0
    for b, (x, y) in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        if should_stop is not None and should_stop(b):
            distiller.train(was_training)
            raise EvaluationStopped(b)
        kw = dict(sample_kw or {})
        if sample:
            kw.update(image_ids=_batch_ids(ids, start, y.numel()), noise_seed=noise_seed)
        start += y.numel()
        outs = distiller.eval_logits(x, ctx, sample=sample, **kw)
        n += y.numel()
        if seen is not None:
            seen += torch.bincount(y, minlength=seen.numel()).double()
        for name, logits in outs.items():
            k = min(5, logits.shape[1])
            top = logits.float().topk(k, dim=1).indices
            hit = top == y[:, None]
            c = torch.stack([hit[:, :1].any(1).sum(), hit.any(1).sum()]).double()
            counts[name] = counts.get(name, torch.zeros(2, dtype=torch.float64,
                                                        device=device)) + c
            if seen is not None:
                h = torch.bincount(y, weights=hit[:, 0].double(), minlength=seen.numel())
                per_class[name] = per_class.get(name, 0) + h
    distiller.train(was_training)
    all_reduce_sum(n)
    res = {"n": int(n.item())}
    for name, c in counts.items():
        all_reduce_sum(c)
        res[f"{name}top1"] = 100.0 * c[0].item() / max(n.item(), 1)
        res[f"{name}top5"] = 100.0 * c[1].item() / max(n.item(), 1)
    if seen is not None:
        all_reduce_sum(seen)
        cc = class_counts.to(device)
        for name, h in per_class.items():
            all_reduce_sum(h)
            for group, member in SHOT_GROUPS:
                m = member(cc)
                total = seen[m].sum().item()
                res[f"{name}{group}"] = 100.0 * h[m].sum().item() / total if total else None
    return res


def image_indices(loader) -> Optional[torch.Tensor]:
    """The dataset index of each image the loader yields on this rank, in order: the loader's
    own account (``image_indices()``, the DataLoader and DALI paths), else None (then rank r is
    taken to yield images r, r + world, ..., the evaluation sampler's order)."""
    own = getattr(loader, "image_indices", None)
    ids = own() if own is not None else None
    return torch.as_tensor(ids, dtype=torch.long) if ids is not None else None


def _batch_ids(ids: Optional[torch.Tensor], start: int, n: int) -> torch.Tensor:
    if ids is not None:
        return ids[start:start + n]
    import torch.distributed as dist
    on = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
    return rank + world * torch.arange(start, start + n)


def describe_sampling(sample_kw: Dict, steps, draws: int) -> str:
    """'N draw(s), S steps, ddpm|ddim, guidance G, temperature T' for tables and logs."""
    sampler = sample_kw.get("sampler", "ddpm")
    return (f"{draws} draw{'s' if draws != 1 else ''}, {steps} steps, {sampler}, guidance "
            f"{sample_kw.get('cfg', 1.0):g}, temperature {sample_kw.get('temperature', 1.0):g}")


def format_results(results: Dict, draws: int = 1, selected_by: str = "top1",
                   sampling: Optional[str] = None) -> str:
    """The end-of-run table: each metric for the last model and for best.pt (``best_*`` keys),
    sampling first when the run has it (the paper's headline), then the linear probe, then the
    many/medium/few-shot split when it was measured."""
    rows = []
    # A GenDD student's own classifier is a linear probe on detached features; for CE / KD / DKD
    # it is simply the model's classifier, and calling it a probe would misdescribe it.
    sampled = any(k.startswith(("sample_", "best_sample_")) for k in results)
    own = "linear probe" if sampled else "classifier"
    for prefix, what in (("sample_", f"sampling ({draws} draw{'s' if draws > 1 else ''})"),
                         ("", own)):
        for metric in ("top1", "top5", "many", "medium", "few"):
            key = prefix + metric
            if key in results or f"best_{key}" in results:
                label = {"top1": "top-1", "top5": "top-5"}.get(metric, f"{metric}-shot top-1")
                rows.append((f"{what} {label}", results.get(key), results.get(f"best_{key}")))

    def cell(v):
        return f"{v:>8.2f}" if isinstance(v, (int, float)) else f"{'-':>8}"
    chosen = {"sample_top1": "sampling top-1", "top1": f"{own} top-1"}.get(selected_by,
                                                                           selected_by)
    width = max([34] + [len(r[0]) for r in rows])
    lines = [f"| {'held-out accuracy (%)':<{width}} | {'last':>8} | {'best':>8} |",
             f"|{'-' * (width + 2)}|{'-' * 10}|{'-' * 10}|"]
    lines += [f"| {name:<{width}} | {cell(a)} | {cell(b)} |" for name, a, b in rows]
    if results.get("best_epoch", -1) and results.get("best_epoch", -1) > 0:
        lines.append(f"best.pt: epoch {results['best_epoch']}, chosen by {chosen}")
    if sampling:
        lines.append(f"sampling: {sampling}")
    return "\n".join(lines)


def add_evaluation_options(p: argparse.ArgumentParser):
    """The options every evaluation entry shares: where the data is, how to sample, where to
    run. Each maps to the Config field of the same name (see :func:`evaluation_overrides`)."""
    from .config import EVALUATION_FIELDS, add_field_option
    for name, flag in EVALUATION_FIELDS:  # Config declares which (config.option's evaluate)
        add_field_option(p, name, flag, "(default: the checkpoint's)")
    p.add_argument("--no-sample", action="store_true", help="student classifiers only")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling noise (default: the run's --seed, so the number "
                        "matches the trainer's final evaluation)")


def evaluation_overrides(args) -> Dict:
    """Config fields the shared options override (None: keep the checkpoint's value)."""
    from .config import EVALUATION_FIELDS
    return {name: getattr(args, name) for name, _ in EVALUATION_FIELDS}


def rebuild_for_evaluation(ckpt: Dict, cfg, overrides: Dict, device_pref: str, seed: int):
    """(cfg, env, loaders, distiller) for a checkpoint, in a fixed order (overrides, process
    group, seed, data, model, weights) so every evaluation entry draws the same sampling noise.
    The checkpoint carries every weight: neither the teacher nor the --init file is read."""
    from .build import build_method
    from .checkpoint import join_state
    from .config import validate
    from .data import build_loaders
    from .distributed import init_distributed
    cfg = dataclasses.replace(cfg, device=device_pref,
                              **{k: v for k, v in overrides.items() if v is not None})
    validate(cfg)
    env = init_distributed(cfg.device)
    torch.manual_seed(seed)
    loaders = build_loaders(cfg, env.rank, env.world, env.device)
    if loaders.val is None:
        raise ValueError("this dataset has no evaluation split (give --val-path)")
    distiller, _ = build_method(cfg, loaders.num_classes, env.device, teacher_weights=False,
                                init_weights=False)
    distiller.load_state_dict(join_state(ckpt))
    return cfg, env, loaders, distiller


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gendd_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint written by the trainer, or by the public GenDD code (then "
                        "give the run's recipe with --config, or --student/--teacher/--dataset)")
    p.add_argument("--config", action="append", default=[],
                   help="public checkpoints only: the recipe the run used (repeatable)")
    p.add_argument("--student", default=None, help="public checkpoints only: student model")
    p.add_argument("--teacher", default=None, help="public checkpoints only: teacher model")
    p.add_argument("--dataset", default=None, help="public checkpoints only: dataset kind")
    p.add_argument("--train-list", default=None,
                   help="training file list (class counts for the many/medium/few-shot split)")
    p.add_argument("--shot-split", default=None, choices=["auto", "on", "off"])
    add_evaluation_options(p)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = p.parse_args(argv)

    from .build import configure_sampler, sampling_kwargs
    from .checkpoint import CheckpointError, config_from_checkpoint, read_checkpoint
    from .public_checkpoint import as_trainer_checkpoint, read_public

    public = read_public(args.checkpoint)
    if public is not None:
        cfg, ckpt = _public_config(args, public), as_trainer_checkpoint(public)
    else:
        ckpt = read_checkpoint(args.checkpoint)
        try:
            cfg = config_from_checkpoint(ckpt, args.checkpoint)
        except CheckpointError:
            raise SystemExit(f"error: {args.checkpoint!r} is neither a gendd_fast training "
                             f"checkpoint (no 'config'/'model') nor one of the public GenDD code "
                             f"(no 'model.*' student keys)") from None
    over = dict(evaluation_overrides(args), train_list=args.train_list,
                shot_split=args.shot_split)
    seed = cfg.seed if args.seed is None else args.seed
    cfg, env, loaders, distiller = rebuild_for_evaluation(ckpt, cfg, over, args.device, seed)
    configure_sampler(distiller, cfg)
    sample = method(cfg.method).samples and not args.no_sample
    counts = training_class_counts(cfg, loaders.num_classes)
    kw = sampling_kwargs(cfg)
    res = evaluate(distiller, loaders.val, env.device, resolve_amp(cfg.amp, env.device),
                   sample=sample, sample_kw=kw, class_counts=counts, noise_seed=seed)
    res.update(checkpoint=args.checkpoint, method=cfg.method,
               sampling_steps=cfg.sampling_steps, ddim_steps=cfg.ddim_steps, cfg=cfg.cfg,
               num_sampling=cfg.num_sampling, sampler=kw.get("sampler", "ddpm"),
               temperature=cfg.temperature, noise_seed=seed)
    if env.is_main:
        if sample:
            print("sampling: " + describe_sampling(kw, cfg.ddim_steps or cfg.sampling_steps,
                                                    cfg.num_sampling) + f", noise seed {seed}")
        print(f"{'metric':<14} value")
        for k in ("top1", "top5", "sample_top1", "sample_top5", "many", "medium", "few",
                  "sample_many", "sample_medium", "sample_few"):
            if res.get(k) is not None:
                print(f"{k:<14} {res[k]:.2f}")
        print(f"{'images':<14} {res['n']}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=2)
    return res


def _public_config(args, state):
    """The config of a public GenDD checkpoint: the recipe(s) given, then what the tensors fix
    (method, head size, classes), then the model/dataset flags."""
    from .config import Config, find_config, load_yaml
    from .public_checkpoint import inferred_config
    values: Dict = {}
    for name in args.config:
        values.update(load_yaml(find_config(name)))
    values.update(inferred_config(state))
    for k in ("student", "teacher", "dataset"):
        if getattr(args, k):
            values[k] = getattr(args, k)
    if not values.get("student") or not values.get("teacher"):
        raise SystemExit(f"error: {args.checkpoint!r} was written by the public GenDD code and "
                         f"carries no config: give the run's recipe (--config NAME) or --student "
                         f"and --teacher (and --dataset)")
    return Config(**values).resolved()


if __name__ == "__main__":  # `python -m gendd_fast.evaluate`: the entry lives in gendd_fast.cli
    from gendd_fast.cli import evaluate_cli
    evaluate_cli()
