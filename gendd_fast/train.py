"""The GenDD trainer.

    python -m gendd_fast.train                        # the embedded digits demo: table at the end
    python -m gendd_fast.train --config cifar100_resnet32x4_resnet8x4 --data-path DATA
    torchrun --nproc_per_node 8 -m gendd_fast.train --config imagenet_r34_r18 --data-path IMNET

:func:`train` runs a :class:`Trainer` through its phases, in this order: ``set_up`` (process group,
data, models, optimiser), ``resume``, ``prepare_loop`` (DDP, logs, signals), then per epoch
``train_epoch`` and ``evaluate_and_save``, then ``final_evaluation`` and ``clean_up``. Each phase
is one method that fits on a screen. The command line lives in :mod:`gendd_fast.cli`; see
``--help`` for every flag and ``configs/`` for the paper's recipes.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Dict, Optional

import torch
import torch.nn as nn

from . import checkpoint as ckpt_io
from .build import build_method, configure_sampler, sampling_kwargs
from .config import Config, config_diff
from .data import build_loaders, describe_pipeline
from .distill import method
from .distributed import (all_gather_object, all_reduce_max, any_rank, broadcast_object,
                          init_distributed, shutdown)
from .evaluate import describe_sampling, evaluate, format_results, training_class_counts
from .signal_policy import EvaluationStopped
from .logs import MetricsLog, Progress, fmt_time, plot_curves
from .notice import notice
from .optim import LRSchedule, build_optimizer
from .precision import autocast_for, resolve_amp
from .run_lock import RunLock, RunLockError, describe as describe_holder
from . import cuda_graph_step, signal_policy, teacher_cache


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN or Inf loss."""


def train(cfg: Config) -> Dict:
    """Train as ``cfg`` says; returns the final metrics (rank 0's view)."""
    trainer = Trainer(cfg)
    with signal_policy.installed(trainer.stop):
        try:
            return trainer.run()
        finally:  # every exit path, an exception included, frees the output folder
            trainer.release_lock()


def no_buffer_sync_kwargs() -> Dict:
    """DDP without a buffer broadcast every forward (BatchNorm statistics stay per rank, as in
    the reference). Newer torch spells it ``forward_sync_buffers=False`` and warns (a
    FutureWarning on every rank) for ``broadcast_buffers``; its one-off sync at start-up is
    harmless here, every rank builds or loads the same buffers."""
    import inspect
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class Trainer:
    """One training run. The attributes are the run's state; each method is one phase."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.results: Dict = {}
        self.stop = {"signal": None, "phase": "set-up"}  # the signal policy's record
        self.stopping = False                         # the stop all ranks agreed on
        self.epoch, self.start_step, self.global_step = 0, 0, 0
        self.best = {"score": -1.0, "epoch": -1}  # the checkpoint kept as best.pt
        self.resumed_from: Optional[str] = None
        self.lock: Optional[RunLock] = None          # OUTPUT/.gendd.lock, rank 0 only

    def run(self) -> Dict:
        self.set_up()
        self.resume()
        self.prepare_loop()
        finished = self.global_step >= self.total_steps
        while self.epoch < self.cfg.epochs and not finished:
            epoch_done = self.train_epoch()
            if not epoch_done:  # stopped mid-epoch (max-steps or a signal): keep the position
                self.save(self.epoch, self.step)
                break
            if not self.evaluate_and_save():  # a signal during the evaluation: saved, stop
                break
            self.epoch += 1
            finished = self.global_step >= self.total_steps or self.stop_agreed()
        self.final_evaluation()
        return self.clean_up()

    # -- set-up ---------------------------------------------------------------------------------
    def set_up(self):
        if self.cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available on this machine "
                             "(torch.cuda.is_available() is False); use --device cpu or auto")
        self.env = env = init_distributed(self.cfg.device)
        self.cfg = cfg = self.cfg.resolved()
        self.device, self.main_rank = env.device, env.is_main
        self.guard_output()
        self.amp = resolve_amp(cfg.amp, self.device)
        torch.manual_seed(cfg.seed + env.rank)  # ranks draw different t, noise and dropout
        torch.backends.cudnn.benchmark = True
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.loaders = build_loaders(cfg, env.rank, env.world, self.device)
        self.num_classes = cfg.num_classes or self.loaders.num_classes
        self.distiller, self.teacher = build_method(cfg, self.num_classes, self.device)
        self.optimizer = build_optimizer(cfg, self.distiller, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.steps_per_epoch = len(self.loaders.train)
        self.schedule = LRSchedule(cfg, self.steps_per_epoch)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)

    def guard_output(self):
        """Before anything is built: refuse a fresh run over a folder's checkpoint (one decision,
        rank 0's, for every rank) and remove temporary files of writes that were killed."""
        cfg = self.cfg
        why = None
        if self.main_rank:  # first the lock: a second run must not touch the first one's files
            try:
                self.lock = RunLock(cfg.output).acquire()
                if self.lock.stale:
                    notice(f"took over the lock of a run that is no longer running "
                           f"({describe_holder(self.lock.stale)}) in {cfg.output}")
                why = ckpt_io.output_refusal(cfg.output)
            except RunLockError as e:
                why = str(e)
        why = broadcast_object(why)
        if why:
            raise ckpt_io.CheckpointError(why)
        fresh = ckpt_io.resume_path(cfg.resume, cfg.output) is None
        why = ckpt_io.fresh_run_refusal(cfg.output, cfg.overwrite) \
            if fresh and self.main_rank else None
        why = broadcast_object(why)
        if why:
            raise ckpt_io.CheckpointError(why)
        if self.main_rank:
            if fresh and cfg.overwrite and ckpt_io.existing_checkpoint(cfg.output):
                # the old run's best.pt would otherwise pass for this run's
                for name in ckpt_io.CHECKPOINT_NAMES:
                    if os.path.isfile(os.path.join(cfg.output, name)):
                        os.remove(os.path.join(cfg.output, name))
                notice(f"--overwrite: removed the checkpoints of the previous run in {cfg.output}")
            gone = ckpt_io.remove_stale_temps(cfg.output)
            if gone:
                notice(f"removed {len(gone)} temporary file(s) of interrupted checkpoint "
                       f"writes in {cfg.output}")

    def release_lock(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- resume ---------------------------------------------------------------------------------
    def resume(self):
        cfg = self.cfg
        # The teacher's identity is its content: resuming with another teacher file is refused.
        self.teacher_id = broadcast_object(
            ckpt_io.file_identity(cfg.teacher_checkpoint)
            if self.main_rank and self.teacher is not None and cfg.teacher_checkpoint else None)
        path = ckpt_io.resume_path(cfg.resume, cfg.output)
        if cfg.resume == "auto" and path is None and self.main_rank:
            notice(f"--resume auto: no checkpoint in {cfg.output}; starting fresh")
        if not path:
            return
        state = ckpt_io.read_checkpoint(path, "resume checkpoint")
        why = ckpt_io.resume_state_problem(state, path, cfg.epochs, self.steps_per_epoch)
        if why:
            raise ckpt_io.CheckpointError(why)
        diff = config_diff(state.get("config", {}), dataclasses.asdict(cfg))
        if diff:
            raise ckpt_io.CheckpointError(
                f"cannot resume from {path}: it was written with a different config:\n  "
                + "\n  ".join(diff))
        if state["world_size"] != self.env.world:
            raise ckpt_io.CheckpointError(
                f"cannot resume from {path}: written by {state['world_size']} process(es), "
                f"this run has {self.env.world} (batch composition would change)")
        why = ckpt_io.teacher_mismatch(state.get("teacher"), self.teacher_id, path)
        if why:
            raise ckpt_io.CheckpointError(why)
        self.distiller.load_state_dict(ckpt_io.join_state(state))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.start_step = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best = state["global_step"], state["best"]
        ckpt_io.set_rng_state(state["rng"][self.env.rank])
        self.resumed_from = path
        if self.main_rank:
            notice(f"resumed from {path} at epoch {self.epoch + 1}, step {self.start_step} "
                   f"(global step {self.global_step})")
            try:
                repaired = ckpt_io.repair_best(state, cfg.output)
            except ckpt_io.CheckpointError as e:  # e.g. disk full: best.pt is not vital
                repaired = f"best.pt is stale and could not be rewritten ({e})"
            if repaired:
                notice(repaired)

    # -- what the loop needs: DDP, logs, autocast, sampler, signals -------------------------------
    def prepare_loop(self):
        cfg, env = self.cfg, self.env
        # from here on a signal is recorded and honoured at the next step or evaluation batch
        signal_policy.set_phase(self.stop, "training")
        self.model: nn.Module = self.distiller
        if env.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.distiller,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **no_buffer_sync_kwargs())
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.log = MetricsLog(cfg.output, cfg.tensorboard,
                              resume_step=self.global_step if self.resumed_from else None) \
            if self.main_rank else None
        self.progress = Progress(self.total_steps, start_step=self.global_step,
                                 enabled=self.main_rank and cfg.progress)
        self.ctx = autocast_for(self.device, self.amp)
        self.open_teacher_cache()
        self.sample_kw = sampling_kwargs(cfg)
        configure_sampler(self.distiller, cfg)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.check_every = 1 if self.device.type == "cpu" else max(cfg.log_interval, 1)
        # --cuda-graph: the whole step as one replayed graph (gendd_fast.cuda_graph_step)
        self.graph_step = cuda_graph_step.GraphedStep(self) if cuda_graph_step.resolve(self) \
            else None
        self.prepare_evaluation()
        self.t_run = time.time()
        if self.main_rank:
            notice(f"{cfg.method}: student {cfg.student}"
                   + (f", teacher {cfg.teacher}" if cfg.teacher else "")
                   + f", {cfg.dataset} ({self.num_classes} classes), {self.steps_per_epoch} "
                     f"steps/epoch x {cfg.epochs} epochs, {env.world} process(es) on "
                     f"{self.device}, amp {self.amp}, data {self.loaders.backend}"
                   + (f", head {type(self.distiller.head).__name__}"
                      if self.distiller.head is not None else "")
                   + (", CUDA-graphed step" if self.graph_step else ""))
            notice(f"images {describe_pipeline(cfg)}")

    def open_teacher_cache(self):
        """The teacher forward of each step: the teacher, None for methods that never read its
        outputs (GenDD's stage 1 uses its classifier only), or with --teacher-cache a lookup of
        the teacher's outputs computed once per augmented input (gendd_fast.teacher_cache)."""
        cfg = self.cfg
        uses = self.teacher is not None and type(self.distiller).uses_teacher_outputs
        self.teacher_forward = self.teacher if uses else None
        if not cfg.teacher_cache:
            return
        why = teacher_cache.refusal(cfg, self.loaders, uses)
        if why:
            raise teacher_cache.TeacherCacheError(f"--teacher-cache: {why}")
        self.teacher_forward = teacher_cache.open_cache(
            cfg, self.teacher, self.loaders, self.device, self.ctx, self.amp, self.teacher_id,
            self.main_rank, self.env.world)

    def stop_agreed(self) -> bool:
        """Whether to stop, decided for all ranks at once (an all-reduce of the stop flags):
        a SIGTERM that reached any rank stops every rank. A rank reading only its own flag
        leaves the others waiting in a collective. Every rank calls this at the same points."""
        if not self.stopping and any_rank(self.stop["signal"] is not None, self.device):
            self.stopping = True
            self.stop["signal"] = self.stop["signal"] or signal.SIGTERM
        return self.stopping

    # -- one epoch of training ------------------------------------------------------------------
    def train_epoch(self) -> bool:
        """Train from the current position to the end of the epoch, ``max_steps`` or a signal.
        Returns whether the epoch ran to its end."""
        cfg, epoch, spe = self.cfg, self.epoch, self.steps_per_epoch
        self.model.train()
        self.loaders.train.set_epoch(epoch, self.start_step)
        sums: Dict[str, torch.Tensor] = {}
        n_seen, n_steps, t_last, step = 0, 0, time.time(), self.start_step
        t_data, t_mark = 0.0, time.time()  # time waiting for batches, within the interval
        for step, (images, labels) in enumerate(self.loaders.train, start=self.start_step + 1):
            t_data += time.time() - t_mark
            self.step = step
            lr = (self.graph_step or self.train_step)(images, labels, epoch + step / spe)
            n_seen += images.shape[0]
            n_steps += 1
            for k, v in self.step_terms.items():
                sums[k] = sums.get(k, 0.0) + v.float()
            stop_now = False
            if self.global_step % self.check_every == 0:
                self.check_finite()
                stop_now = self.stop_agreed()
            if step % cfg.log_interval == 0 or step == spe:
                vals = {k: float(v) / n_steps for k, v in sums.items()}  # syncs the device
                wall = max(time.time() - t_last, 1e-9)
                img_s = n_seen * self.env.world / wall
                timing = dict(data_s=t_data, compute_s=max(wall - t_data, 0.0))
                if self.device.type == "cuda":
                    timing["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                self.progress.update(epoch, cfg.epochs, step, spe, self.global_step, vals, lr,
                                     img_s, timing)
                if self.log:
                    self.log.write("train", self.global_step, epoch=epoch + 1, lr=lr,
                                   img_s=img_s, **timing, **vals)
                sums, n_seen, n_steps, t_last, t_data = {}, 0, 0, time.time(), 0.0
            if cfg.save_every and self.global_step % cfg.save_every == 0 and step < spe:
                self.check_finite()
                self.save(epoch, step)
            if self.global_step >= self.total_steps or stop_now:
                break
            t_mark = time.time()
        self.step = step
        self.start_step = 0
        self.progress.end_epoch()
        self.check_finite()
        if self.loaders.train.bad_images and self.main_rank:
            notice(f"epoch {epoch + 1}: skipped {self.loaders.train.bad_images} undecodable "
                   f"images")
        return step >= spe

    def train_step(self, images, labels, progress_epochs: float) -> float:
        """One optimiser step; returns its learning rate. Leaves the loss terms in
        ``self.step_terms`` and flags a non-finite loss in ``self.bad_step`` (no sync here)."""
        lr, _ = self.schedule.apply(self.optimizer, self.global_step)
        with self.ctx:
            teacher_out = self.teacher_forward(images) if self.teacher_forward is not None \
                else None
            loss, parts = self.model(images, labels, teacher_out, progress_epochs)
        bad = self.bad_step
        bad.copy_(torch.where((bad < 0) & ~torch.isfinite(loss.detach()),
                              torch.full_like(bad, self.global_step + 1), bad))
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.distiller.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.step_terms = {"loss": loss.detach(), **parts}
        return lr

    def check_finite(self):
        """Stop on a NaN/Inf loss before anything is saved from the bad state."""
        flag = all_reduce_max(self.bad_step.clone())
        if int(flag) >= 0:
            where = ckpt_io.describe_newest_good(self.cfg.output)
            raise NonFiniteLoss(f"loss became NaN/Inf at step {int(flag)} (epoch "
                                f"{self.epoch + 1}); training stopped and {where}. Lower --lr, "
                                f"use --amp bf16 or off, or --clip-grad.")

    # -- evaluation and checkpoints ---------------------------------------------------------------
    def prepare_evaluation(self):
        """What each evaluation measures and what picks best.pt. GenDD is judged as the paper
        judges it, by sampling top-1 (the teacher's classifier on generated features), with
        ``--sample-eval every``; the linear probe picks best.pt otherwise. Unsupervised GenDD has
        no trained probe, so it always samples."""
        cfg = self.cfg
        gendd = method(cfg.method).samples
        self.sample_during = gendd and (cfg.sample_eval == "every"
                                        or (not cfg.labels and cfg.sample_eval == "end"))
        self.sample_final = gendd and cfg.sample_eval != "never"
        self.select_by = "sample_top1" if self.sample_during else "top1"
        if self.main_rank and gendd and not cfg.labels:
            if cfg.sample_eval == "end":
                notice("unsupervised GenDD: evaluating by sampling at every evaluation (the "
                       "linear probe is not trained without labels), best.pt chosen by it")
            elif cfg.sample_eval == "never":
                notice("unsupervised GenDD with --sample-eval never: best.pt is chosen by an "
                       "untrained linear probe and means nothing; use --sample-eval every")
        self.class_counts = training_class_counts(cfg, self.num_classes)
        self.eval_kw = dict(self.sample_kw, num_sampling=1)  # during training: one draw

    def _evaluate(self, sample: bool, sample_kw: Dict) -> Dict:
        """One evaluation pass; a stop agreed before any batch gives it up (EvaluationStopped).
        Ranks may hold one batch more or less of held-out data: the stop is asked (a
        collective) only over the batches every rank has."""
        common = -int(all_reduce_max(torch.tensor(-len(self.loaders.val), device=self.device)))
        return evaluate(self.distiller, self.loaders.val, self.device, self.amp, sample=sample,
                        sample_kw=sample_kw, class_counts=self.class_counts,
                        noise_seed=self.cfg.seed,
                        should_stop=lambda b: b < common and self.stop_agreed())

    def evaluate_and_save(self) -> bool:
        """At the end of an epoch: evaluate when due, track the best, save 'last' (and 'best').
        Returns False when a signal stopped the evaluation: then 'last' holds the position
        before it (the epoch's last step, the RNG as it was), so a resume evaluates again."""
        cfg, epoch = self.cfg, self.epoch
        last_epoch = epoch + 1 == cfg.epochs or self.global_step >= self.total_steps
        is_best = False
        if self.loaders.val is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
            rng_before = ckpt_io.rng_state()
            try:
                res = self._evaluate(self.sample_during, self.eval_kw)
            except EvaluationStopped:
                ckpt_io.set_rng_state(rng_before)
                self.save(epoch, self.steps_per_epoch)
                if self.main_rank:
                    notice(f"stopped by {signal_policy.name(self.stop['signal'])} during the "
                           f"evaluation of epoch {epoch + 1}; saved {cfg.output}/last.pt "
                           f"before it: --resume auto evaluates it again and continues")
                return False
            score = res[self.select_by]
            best = self.best.get("score", self.best.get("top1", -1.0))
            is_best = score > best
            if is_best:
                self.best = {"score": score, "metric": self.select_by, "epoch": epoch + 1,
                             **{k: v for k, v in res.items() if k != "n"}}
            self.results = res
            if self.main_rank:
                own = "linear-probe" if method(self.cfg.method).samples else "classifier"
                notice(f"epoch {epoch + 1}: held-out {own} top-1 {res['top1']:.2f} top-5 "
                       f"{res['top5']:.2f}" + (f", sampling top-1 {res['sample_top1']:.2f}"
                                               if "sample_top1" in res else "")
                       + f" (best {self.select_by} {self.best.get('score', best):.2f} @ epoch "
                         f"{self.best['epoch']})")
                self.log.write("val", self.global_step, epoch=epoch + 1,
                               **{k: v for k, v in res.items() if k != "n"})
        self.save(epoch + 1, 0, is_best)
        return True

    def checkpoint_state(self, epoch: int, step_in_epoch: int, rngs) -> Dict:
        model, extra = ckpt_io.split_state(self.distiller.state_dict())
        return {"format": ckpt_io.FORMAT, "model": model, "extra": extra,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "schedule": self.schedule.state_dict(), "epoch": epoch,
                "step_in_epoch": step_in_epoch, "global_step": self.global_step, "rng": rngs,
                "world_size": len(rngs), "config": dataclasses.asdict(self.cfg),
                "best": self.best, "teacher": self.teacher_id}

    def save(self, epoch: int, step_in_epoch: int, is_best: bool = False):
        rngs = all_gather_object(ckpt_io.rng_state())
        state = self.checkpoint_state(epoch, step_in_epoch, rngs) if self.main_rank else None
        # The loss can stay finite while weights or BatchNorm statistics are already Inf: check
        # everything that would be written, and write nothing bad (one decision for all ranks).
        bad = broadcast_object(ckpt_io.nonfinite_names({**state["model"], **state["extra"]})
                               if self.main_rank else None)
        if bad:
            raise NonFiniteLoss(f"the model holds NaN/Inf values ({', '.join(bad)}) at step "
                                f"{self.global_step} (epoch {self.epoch + 1}); it was not saved "
                                f"and {ckpt_io.describe_newest_good(self.cfg.output)}. Lower "
                                f"--lr, use --amp bf16 or off, or --clip-grad.")
        failed = None
        if self.main_rank:
            try:
                ckpt_io.atomic_save(state, os.path.join(self.cfg.output, "last.pt"))
                if is_best:
                    ckpt_io.atomic_save(state, os.path.join(self.cfg.output, "best.pt"))
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                failed = e
        # rank 0's outcome for all (also the barrier): a failed write must not leave the other
        # ranks waiting in their next collective
        why = broadcast_object(f"{type(failed).__name__}: {failed}" if failed else None)
        if failed is not None:
            raise failed
        if why:
            raise ckpt_io.CheckpointError(f"rank 0 could not save the checkpoint ({why})")

    def final_evaluation(self):
        """After a finished run, the paper's protocol: GenDD's last model and best.pt are each
        scored by sampling with ``--num-sampling`` draws per image (linear probe beside it);
        other methods report the last and the best evaluation they had."""
        cfg = self.cfg
        if not (self.loaders.val is not None and self.epoch >= cfg.epochs
                and self.best["epoch"] > 0):
            return
        last = dict(self.results)
        best = {k: v for k, v in self.best.items() if k not in ("score", "metric")}
        if self.stop_agreed():
            return self._final_stopped(last, ["last", "best"] if self.sample_final else [])
        if self.sample_final:
            t0 = time.time()
            kw = dict(self.sample_kw, num_sampling=cfg.num_sampling)
            reuse = self.sample_during and cfg.num_sampling == 1  # scored so already
            try:
                if not (reuse and "sample_top1" in last):
                    last = self._evaluate(True, kw)
            except EvaluationStopped:
                return self._final_stopped(last, ["last", "best"])
            try:
                if self.best["epoch"] == self.epoch:  # best.pt holds the last model's weights
                    best = dict(last, epoch=self.epoch)
                elif reuse and "sample_top1" in best:
                    pass
                else:
                    best = dict(self._evaluate_checkpoint(os.path.join(cfg.output, "best.pt"),
                                                          kw), epoch=self.best["epoch"])
            except EvaluationStopped:
                return self._final_stopped(dict(last, num_sampling=cfg.num_sampling), ["best"])
            if self.main_rank:
                steps = cfg.ddim_steps or cfg.sampling_steps
                how = describe_sampling(kw, steps, cfg.num_sampling)
                notice(f"final sampling evaluation ({how}, noise seed {cfg.seed}): best.pt "
                       f"(epoch {best['epoch']}) top-1 "
                       f"{best['sample_top1']:.2f}, last top-1 {last['sample_top1']:.2f} "
                       f"({time.time() - t0:.1f}s)")
                self.log.write("val", self.global_step, epoch=self.epoch,
                               num_sampling=cfg.num_sampling,
                               **{k: v for k, v in last.items() if k != "n"})
        if self.main_rank:
            self.log.write("best", self.global_step, selected_by=self.select_by,
                           **{k: v for k, v in best.items() if k != "n"})
        self.results = dict(last)
        self.results.update({f"best_{k}": v for k, v in best.items() if k != "n"})

    def _final_stopped(self, last: Dict, missing):
        """A signal during the final evaluation: write what was scored, mark the rest missing
        (a 'final_missing' record in metrics.jsonl and a line). The checkpoints are complete,
        so --resume auto runs the final evaluation again."""
        what = {"last": "the last model", "best": "best.pt"}
        if self.main_rank:
            if "last" not in missing and last:
                self.log.write("val", self.global_step, epoch=self.epoch,
                               **{k: v for k, v in last.items() if k != "n"})
            self.log.write("final_missing", self.global_step, epoch=self.epoch,
                           missing=list(missing), signal=signal_policy.name(self.stop["signal"]))
            notice(f"final evaluation stopped by {signal_policy.name(self.stop['signal'])}: "
                   + (f"not scored: {', '.join(what[m] for m in missing)} (marked missing in "
                      f"metrics.jsonl)" if missing else "nothing was left to score")
                   + f"; the checkpoints in {self.cfg.output} are complete, --resume auto runs "
                     f"the final evaluation again")
        self.results = dict(last) if "last" not in missing else {}
        self.results["final_missing"] = list(missing)

    def _evaluate_checkpoint(self, path: str, sample_kw: Dict) -> Dict:
        """Evaluate the weights in ``path`` with this run's model, then put the current weights
        back (the model leaves training as it ended)."""
        current = {k: v.detach().to("cpu", copy=True)
                   for k, v in self.distiller.state_dict().items()}
        state = ckpt_io.read_checkpoint(path, "best checkpoint")
        self.distiller.load_state_dict(ckpt_io.join_state(state))
        try:
            return self._evaluate(True, sample_kw)
        finally:
            self.distiller.load_state_dict(current)

    # -- clean-up -------------------------------------------------------------------------------
    def clean_up(self) -> Dict:
        cfg, results = self.cfg, self.results
        results.setdefault("best_top1", self.best.get("top1", -1.0))
        if isinstance(self.teacher_forward, teacher_cache.TeacherCache):
            results.update(self.teacher_forward.stats())
        results.update(best_epoch=self.best["epoch"], selected_by=self.select_by,
                       epochs_run=self.epoch, global_step=self.global_step,
                       seconds=time.time() - self.t_run, output=cfg.output)
        if self.main_rank:
            last_line = self.end_line()  # also metrics.jsonl's last record, before it closes
            self.log.close()
            if "top1" in results:
                draws = cfg.num_sampling if self.sample_final else 1
                how = (describe_sampling(self.sample_kw, cfg.ddim_steps or cfg.sampling_steps,
                                         draws) + f", noise seed {cfg.seed}") \
                    if self.sample_final else None
                print(format_results(results, draws=draws, selected_by=self.select_by,
                                     sampling=how), flush=True)
            if cfg.plot:
                png = plot_curves(self.log.path, os.path.join(cfg.output, "curves.png"))
                if png:
                    notice(f"curves: {png}")
            notice(last_line)
        self.model = None  # drop the DDP wrapper before leaving the process group
        shutdown()
        if self.stop["signal"] is not None:
            results["stopped_by_signal"] = self.stop["signal"]
        return results

    def end_line(self) -> str:
        """The run's last line, also recorded as metrics.jsonl's last record: finished, or
        interrupted (a signal, or --max-steps before the last epoch) and where to resume."""
        cfg, took = self.cfg, fmt_time(time.time() - self.t_run)
        finished = self.epoch >= cfg.epochs
        why = None
        if self.stop["signal"] is not None:
            why = f"signal {signal.Signals(self.stop['signal']).name}"
        elif not finished:
            why = f"--max-steps {cfg.max_steps}"
        if self.log:
            self.log.write("end", self.global_step, status="finished" if why is None else
                           "interrupted", reason=why, epoch=self.epoch, seconds=took)
        if why is None:
            return f"done in {took}; checkpoints in {cfg.output}"
        return (f"interrupted by {why} at epoch {self.epoch + 1}, global step "
                f"{self.global_step} after {took}; resume with --resume auto --output "
                f"{cfg.output}")


if __name__ == "__main__":  # `python -m gendd_fast.train`: the entry lives in gendd_fast.cli
    from gendd_fast.cli import train_cli
    train_cli()
