"""The GenDD trainer.

    python -m gendd_fast.train                        # the embedded digits demo: table at the end
    python -m gendd_fast.train --config cifar100_resnet32x4_resnet8x4 --data-path DATA
    torchrun --nproc_per_node 8 -m gendd_fast.train --config imagenet_r34_r18 --data-path IMNET

Reads top to bottom: set-up (process group, data, models, optimiser, resume), the training loop,
evaluation and checkpoints, clean-up. See ``--help`` for every flag; ``configs/`` holds the
paper's recipes.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from typing import Dict

import torch
import torch.nn as nn

from . import checkpoint as ckpt_io
from .config import Config, config_diff, config_from_args
from .data import build_loaders
from .distill import Teacher, build_distiller
from .distributed import (all_gather_object, all_reduce_max, barrier, broadcast_object,
                          init_distributed, shutdown)
from .evaluate import (autocast_for, configure_sampler, evaluate, resolve_amp,
                       sampling_kwargs)
from .logs import MetricsLog, Progress, fmt_time, plot_curves
from .models import create_model, list_models, load_checkpoint_weights
from .notice import notice


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN or Inf loss."""


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
def choose_head(cfg: Config, device: torch.device):
    """The diffusion head class: the fused Triton head on CUDA (or when asked), else the
    reference. A fused head that cannot run falls back with one notice."""
    from .head import DiffLoss
    want = cfg.head if cfg.head != "auto" else ("fused" if device.type == "cuda" else "torch")
    if want == "torch":
        return DiffLoss
    from .fused_head import (TOKENS_PER_IMAGE, FusedDiffLoss, fused_launch_problem,
                             fused_unavailable_reason)
    why = fused_unavailable_reason(device)
    if not why:  # every kernel of a step compiled for this GPU and held to its limits, now
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            resolve_amp(cfg.amp, device), torch.float32)
        rows = [cfg.batch_size * (cfg.mul or 1) * t for t in TOKENS_PER_IMAGE]
        why = fused_launch_problem(device, dtype, dict(
            width=cfg.diffloss_w, depth=cfg.diffloss_d, token_dim=cfg.token_dim, rows=rows))
        if why and cfg.head == "fused":  # asked for explicitly: stop before step 1, say why
            raise RuntimeError(f"--head fused cannot run on {device}: {why}")
    if why:
        notice(f"fused head unavailable ({why}); using the reference head")
        return DiffLoss
    return FusedDiffLoss


def build_method(cfg: Config, num_classes: int, device: torch.device, teacher_weights=True):
    """(distiller, teacher) on ``device``. ``teacher_weights=False`` skips loading the teacher
    checkpoint (evaluation: the checkpoint being evaluated carries the teacher's classifier)."""
    teacher = None
    if cfg.method != "ce":
        tmodel = create_model(cfg.teacher, num_classes)
        if teacher_weights:
            if not cfg.teacher_checkpoint:
                raise ValueError(f"method {cfg.method!r} needs --teacher-checkpoint (a teacher "
                                 f"trained with --method ce, or a {{'model': state_dict}} file)")
            load_checkpoint_weights(cfg.teacher_checkpoint, tmodel, "teacher")
        teacher = Teacher(tmodel).to(device)
    student = create_model(cfg.student, num_classes)
    if cfg.init:
        notice(ckpt_io.load_student_weights(cfg.init, student))
    head_cls = choose_head(cfg, device) if cfg.method == "gendd" else None
    distiller = build_distiller(cfg, student, teacher.model if teacher else None, head_cls)
    distiller = distiller.to(device)
    if cfg.channels_last:
        distiller = distiller.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    return distiller, teacher


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device):
    """AdamW (or SGD) with no weight decay on 1-D parameters and on the diffusion head."""
    no_decay = model.no_decay_names()
    decay, plain = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (plain if n in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    if cfg.opt_impl == "apex":
        try:
            from apex.optimizers import FusedAdam, FusedSGD
        except ImportError as e:
            raise ImportError("--opt-impl apex: NVIDIA apex is not installed (it is not on "
                              "PyPI); use the default --opt-impl torch") from e
        if cfg.opt == "adamw":
            return FusedAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), adam_w_mode=True)
        return FusedSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    fused = device.type == "cuda"
    if cfg.opt == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                                 fused=fused or None)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                           fused=fused or None)


class LRSchedule:
    """Per-step learning rate: linear warm-up, then cosine to ``min_lr`` or step decay."""

    def __init__(self, cfg: Config, steps_per_epoch: int):
        self.base, self.min_lr, self.kind = cfg.lr, cfg.min_lr, cfg.sched
        self.spe = steps_per_epoch
        self.total = cfg.epochs * steps_per_epoch
        self.warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        self.decay_epochs, self.rate = list(cfg.decay_epochs), cfg.decay_rate

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base * (step + 1) / self.warmup
        if self.kind == "cos":
            prog = (step - self.warmup) / max(1, self.total - self.warmup)
            return self.min_lr + (self.base - self.min_lr) * 0.5 * (1 + math.cos(math.pi * prog))
        epoch = step // self.spe
        return self.base * self.rate ** sum(epoch >= e for e in self.decay_epochs)

    def state_dict(self):
        return dict(self.__dict__)

    def load_state_dict(self, state):
        self.__dict__.update(state)


def checkpoint_state(distiller, optimizer, scaler, schedule, cfg, epoch, step_in_epoch,
                     global_step, best, rngs):
    model, extra = ckpt_io.split_state(distiller.state_dict())
    return {"format": ckpt_io.FORMAT, "model": model, "extra": extra,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "schedule": schedule.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
            "global_step": global_step, "rng": rngs, "world_size": len(rngs),
            "config": dataclasses.asdict(cfg), "best": best}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def train(cfg: Config) -> Dict:
    """Train as ``cfg`` says; returns the final metrics (rank 0's view)."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return _train(cfg)
    finally:  # a caller's own SIGTERM handling comes back once training is over
        try:
            signal.signal(signal.SIGTERM, previous)
        except (ValueError, TypeError):
            pass


def _train(cfg: Config) -> Dict:
    env = init_distributed(cfg.device)
    cfg = cfg.resolved()
    device, main_rank = env.device, env.is_main
    amp = resolve_amp(cfg.amp, device)
    torch.manual_seed(cfg.seed + env.rank)  # ranks draw different t, noise and dropout
    torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    loaders = build_loaders(cfg, env.rank, env.world, device)
    num_classes = cfg.num_classes or loaders.num_classes
    distiller, teacher = build_method(cfg, num_classes, device)
    optimizer = build_optimizer(cfg, distiller, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    steps_per_epoch = len(loaders.train)
    schedule = LRSchedule(cfg, steps_per_epoch)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    # -- resume ---------------------------------------------------------------------------------
    start_epoch, start_step, global_step = 0, 0, 0
    best = {"top1": -1.0, "epoch": -1}
    path = ckpt_io.resume_path(cfg.resume, cfg.output)
    if cfg.resume == "auto" and path is None and main_rank:
        notice(f"--resume auto: no checkpoint in {cfg.output}; starting fresh")
    if path:
        state = ckpt_io.read_checkpoint(path, "resume checkpoint")
        diff = config_diff(state.get("config", {}), dataclasses.asdict(cfg))
        if diff:
            raise ckpt_io.CheckpointError(
                f"cannot resume from {path}: it was written with a different config:\n  "
                + "\n  ".join(diff))
        if state["world_size"] != env.world:
            raise ckpt_io.CheckpointError(
                f"cannot resume from {path}: written by {state['world_size']} process(es), "
                f"this run has {env.world} (batch composition would change)")
        distiller.load_state_dict(ckpt_io.join_state(state))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, start_step = state["epoch"], state["step_in_epoch"]
        global_step, best = state["global_step"], state["best"]
        ckpt_io.set_rng_state(state["rng"][env.rank])
        if main_rank:
            notice(f"resumed from {path} at epoch {start_epoch + 1}, step {start_step} "
                   f"(global step {global_step})")

    model: nn.Module = distiller
    if env.enabled:
        model = nn.parallel.DistributedDataParallel(
            distiller, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    if cfg.compile:
        model = torch.compile(model)

    log = MetricsLog(cfg.output, cfg.tensorboard, resume_step=global_step if path else None) \
        if main_rank else None
    progress = Progress(total_steps, enabled=main_rank and cfg.progress)
    ctx = autocast_for(device, amp)
    sample_kw = sampling_kwargs(cfg)
    configure_sampler(distiller, cfg)

    # A SIGTERM (pre-emption) saves 'last' at the next step boundary, then exits cleanly.
    stop = {"signal": None}
    if main_rank or env.enabled:
        def on_signal(signum, _frame):
            stop["signal"] = signum
        try:
            signal.signal(signal.SIGTERM, on_signal)
        except ValueError:  # not the main thread (e.g. called from a notebook worker)
            pass

    last_good = {"path": None, "step": None}

    def save(epoch, step_in_epoch, is_best=False):
        rngs = all_gather_object(ckpt_io.rng_state())
        if main_rank:
            state = checkpoint_state(distiller, optimizer, scaler, schedule, cfg, epoch,
                                     step_in_epoch, global_step, best, rngs)
            ckpt_io.atomic_save(state, os.path.join(cfg.output, "last.pt"))
            if is_best:
                ckpt_io.atomic_save(state, os.path.join(cfg.output, "best.pt"))
            last_good.update(path=os.path.join(cfg.output, "last.pt"), step=global_step)
        barrier()

    bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def check_finite(epoch):
        """Stop on a NaN/Inf loss before anything is saved from the bad state."""
        flag = all_reduce_max(bad_step.clone())
        if int(flag) >= 0:
            where = (f"the last good checkpoint, {last_good['path']} (step "
                     f"{last_good['step']}), is untouched" if last_good["path"]
                     else "no checkpoint had been written yet")
            raise NonFiniteLoss(f"loss became NaN/Inf at step {int(flag)} (epoch {epoch + 1}); "
                                f"training stopped and {where}. Lower --lr, use --amp bf16 "
                                f"or off, or --clip-grad.")

    check_every = 1 if device.type == "cpu" else max(cfg.log_interval, 1)
    results: Dict = {}
    t_run = time.time()
    if main_rank:
        notice(f"{cfg.method}: student {cfg.student}"
               + (f", teacher {cfg.teacher}" if cfg.teacher else "")
               + f", {cfg.dataset} ({num_classes} classes), {steps_per_epoch} steps/epoch x "
                 f"{cfg.epochs} epochs, {env.world} process(es) on {device}, amp {amp}, data "
                 f"{loaders.backend}"
               + (f", head {type(distiller.diffloss).__name__}"
                  if hasattr(distiller, "diffloss") else ""))

    epoch = start_epoch
    finished = global_step >= total_steps
    while epoch < cfg.epochs and not finished:
        # -- one epoch of training ----------------------------------------------------------------
        model.train()
        loaders.train.set_epoch(epoch, start_step)
        sums: Dict[str, torch.Tensor] = {}
        n_seen, n_steps, t_last, step = 0, 0, time.time(), start_step
        for step, (images, labels) in enumerate(loaders.train, start=start_step + 1):
            lr = schedule(global_step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            progress_epochs = epoch + step / steps_per_epoch
            with ctx:
                teacher_out = teacher(images) if teacher is not None else None
                loss, parts = model(images, labels, teacher_out, progress_epochs)
            bad_step.copy_(torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()),
                                       torch.full_like(bad_step, global_step + 1), bad_step))
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(distiller.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            n_seen += images.shape[0]
            n_steps += 1
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v.float()
            stop_now = False
            if global_step % check_every == 0:
                check_finite(epoch)
                stop_now = broadcast_object(stop["signal"]) is not None
            if step % cfg.log_interval == 0 or step == steps_per_epoch:
                vals = {k: float(v) / n_steps for k, v in sums.items()}
                img_s = n_seen * env.world / max(time.time() - t_last, 1e-9)
                progress.update(epoch, cfg.epochs, step, steps_per_epoch, global_step, vals, lr,
                                img_s)
                if log:
                    log.write("train", global_step, epoch=epoch + 1, lr=lr, img_s=img_s, **vals)
                sums, n_seen, n_steps, t_last = {}, 0, 0, time.time()
            if cfg.save_every and global_step % cfg.save_every == 0 and step < steps_per_epoch:
                check_finite(epoch)
                save(epoch, step)
            if global_step >= total_steps or stop_now:
                break
        start_step = 0
        progress.end_epoch()
        check_finite(epoch)
        epoch_done = step >= steps_per_epoch
        if loaders.train.bad_images and main_rank:
            notice(f"epoch {epoch + 1}: skipped {loaders.train.bad_images} undecodable images")

        # -- evaluation and checkpoints ---------------------------------------------------------
        if not epoch_done:  # stopped mid-epoch (max-steps or a signal): keep the position
            save(epoch, step)
            finished = True
            break
        last_epoch = epoch + 1 == cfg.epochs or global_step >= total_steps
        is_best = False
        if loaders.val is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
            do_sample = cfg.sample_eval == "every" and hasattr(distiller, "diffloss")
            res = evaluate(distiller, loaders.val, device, amp, sample=do_sample,
                           sample_kw=sample_kw)
            is_best = res["top1"] > best["top1"]
            if is_best:
                best = {"top1": res["top1"], "top5": res["top5"], "epoch": epoch + 1}
            results = res
            if main_rank:
                notice(f"epoch {epoch + 1}: held-out top-1 {res['top1']:.2f} top-5 "
                       f"{res['top5']:.2f}" + (f" sampling top-1 {res['sample_top1']:.2f}"
                                               if "sample_top1" in res else "")
                       + f" (best {best['top1']:.2f} @ {best['epoch']})")
                log.write("val", global_step, epoch=epoch + 1,
                          **{k: v for k, v in res.items() if k != "n"})
        save(epoch + 1, 0, is_best)
        epoch += 1
        finished = global_step >= total_steps or stop["signal"] is not None

    # -- final sampling evaluation (GenDD) --------------------------------------------------------
    if (hasattr(distiller, "diffloss") and cfg.sample_eval == "end" and loaders.val is not None
            and stop["signal"] is None and epoch >= cfg.epochs):
        t0 = time.time()
        res = evaluate(distiller, loaders.val, device, amp, sample=True, sample_kw=sample_kw)
        results.update(res)
        if main_rank:
            steps = f"ddim{cfg.ddim_steps}" if cfg.ddim_steps else cfg.sampling_steps
            notice(f"sampling evaluation ({steps} steps, cfg {cfg.cfg}): top-1 {res['sample_top1']:.2f} top-5 "
                   f"{res['sample_top5']:.2f}, linear probe top-1 {res['top1']:.2f} "
                   f"({time.time() - t0:.1f}s)")
            log.write("val", global_step, epoch=epoch, **{k: v for k, v in res.items() if k != "n"})

    results.update(best_top1=best["top1"], epochs_run=epoch, global_step=global_step,
                   seconds=time.time() - t_run, output=cfg.output)
    if main_rank:
        log.close()
        if cfg.plot:
            png = plot_curves(log.path, os.path.join(cfg.output, "curves.png"))
            if png:
                notice(f"curves: {png}")
        notice(f"done in {fmt_time(time.time() - t_run)}; checkpoints in {cfg.output}")
    model = None  # drop the DDP wrapper before leaving the process group
    shutdown()
    if stop["signal"] is not None:
        results["stopped_by_signal"] = stop["signal"]
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        from .demo import run_demo
        return run_demo()
    cfg, args = config_from_args(argv)
    if args.list_models:
        print("\n".join(list_models()))
        return None
    if args.demo:
        from .demo import run_demo
        return run_demo()
    return train(cfg)


def cli():
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
