"""``--cuda-graph``: the whole GenDD training step (teacher and student forward, the head's forward
and backward, gradient clipping, the AdamW step) captured once in a CUDA graph and replayed for
every batch, so the host launches one graph instead of a few hundred kernels per step.

PyTorch's whole-network capture recipe (``torch.cuda.graphs``): static input buffers that each
batch is copied into; a few eager warm-up steps on a side stream (they are real training steps);
gradients set to ``None`` before capture so the captured backward allocates them as static
tensors; AdamW with ``capturable=True`` and its lr and beta2 as device tensors that the schedule
refills before each replay. Capture does not execute, so the capturing call replays once.

Everything a captured step cannot do is decided outside it, per step on the host (lr, beta2, the
mixing weight, the step number for the non-finite flag) or once per run (whether batches carry
labels). :func:`refusal` names what rules the graph out; ``--cuda-graph on`` stops the run with
that line, ``auto`` trains eagerly.
"""
from __future__ import annotations

from typing import Optional

import torch

from .notice import notice

WARMUP_STEPS = 3  # eager steps on a side stream before capture (the recipe's warm-up)


def refusal(cfg, device: torch.device, world: int, amp: str, loaders, distiller) -> Optional[str]:
    """Why this run's step cannot be graphed, in one line; None when it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; this run is on {device}"
    if not getattr(loaders.train, "train", False) or cfg.skip_bad_images:
        return ("batch shapes are not fixed (" + ("--skip-bad-images drops images from a batch"
                if cfg.skip_bad_images else "the training loader keeps a short last batch")
                + "); a graph replays one shape")
    if cfg.labeled_fraction < 1:
        return ("--labeled-fraction below 1: batches mix labelled and unlabelled rows, whose "
                "masking reads the labels on the host")
    if cfg.method != "gendd":
        return f"only the GenDD step is graphed; --method {cfg.method} trains eagerly"
    if amp == "fp16":
        return "--amp fp16: the gradient scaler checks for Inf on the host every step"
    if cfg.opt != "adamw" or cfg.opt_impl != "torch":
        return "only torch's AdamW is graphed (capturable=True); use --opt adamw --opt-impl torch"
    if world > 1:
        return f"{world} processes: graphing the DDP all-reduce is not supported here"
    if cfg.teacher_cache:
        return ("--teacher-cache looks each batch up and decides on the host whether the "
                "teacher runs")
    if cfg.compile:
        return "--compile: torch.compile manages its own graphs"
    head = getattr(distiller, "head", None)
    if type(head).__name__ != "FusedDiffLoss":
        return (f"the {type(head).__name__} head checks its inputs on the host; the fused head "
                f"(--head fused) is graphed")
    return None


def resolve(trainer) -> bool:
    """Whether ``trainer`` graphs its step: ``--cuda-graph on`` raises the refusal (one line),
    ``auto`` graphs when nothing refuses (a notice on CUDA says why not), ``off`` never."""
    cfg = trainer.cfg
    if cfg.cuda_graph == "off":
        return False
    why = refusal(cfg, trainer.device, trainer.env.world, trainer.amp, trainer.loaders,
                  trainer.distiller)
    if why and cfg.cuda_graph == "on":
        raise ValueError(f"--cuda-graph on cannot apply: {why}")
    if why and trainer.device.type == "cuda" and trainer.main_rank:
        notice(f"training step not CUDA-graphed ({why})")
    return why is None


def make_capturable(optimizer, device: torch.device):
    """AdamW as the recipe needs it: ``capturable=True``, its step counters on the device (a
    resumed state holds them on the host), lr and beta2 as device tensors refilled per step.
    The foreach implementation, not the fused one: its capturable path is the one documented
    to take lr and betas as device tensors (a value read to the host during capture would be
    frozen at its captured value)."""
    for g in optimizer.param_groups:
        g["capturable"], g["fused"], g["foreach"] = True, None, True
        # fresh device tensors even where a resumed state holds tensors (loaded to the host)
        g["lr"] = torch.tensor(float(g["lr"]), device=device)
        b1, b2 = g["betas"]
        g["betas"] = (float(b1), torch.tensor(float(b2), device=device))
    for st in optimizer.state.values():
        if "step" in st and st["step"].device != device:
            st["step"] = st["step"].to(device=device, dtype=torch.float32)


class GraphedStep:
    """The trainer's step as a graph; called like :meth:`Trainer.train_step`."""

    def __init__(self, trainer, capturable: bool = True):
        """``capturable=False`` leaves the optimizer as it is: only for running the captured
        work (:meth:`_body`) eagerly on the CPU, as the no-host-sync test does."""
        self.t = trainer
        device = trainer.device
        if capturable:
            make_capturable(trainer.optimizer, device)
        d = trainer.distiller
        self.mix = getattr(d, "beta", 0) > 0 and trainer.cfg.batch_size >= 2  # as GenDD.mix
        d.graph_mix_weight = torch.zeros((), device=device) if self.mix else None
        self.step_no = torch.zeros((), dtype=torch.long, device=device)
        # the fused head caches its cast weights by version counter, which a replay does not
        # bump: forget the cache after each replay so an eager evaluation casts afresh
        self.invalidate = [m.invalidate_weights for m in d.modules()
                           if hasattr(m, "invalidate_weights")]
        self.static = None  # (images, labels): the buffers every batch is copied into
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.calls = 0
        self.terms = {}

    def _inputs(self, images, labels):
        if self.static is None:
            self.static = (images.clone(), labels.clone())
            # once, outside the graph: every row labelled, or none
            some = labels.is_floating_point() or bool((labels >= 0).any())
            every = labels.is_floating_point() or bool((labels >= 0).all())
            if some != every:
                raise ValueError("--cuda-graph: a training batch is partly labelled (labels -1 "
                                 "beside class indices); train with --cuda-graph off")
            self.t.distiller.graph_has_labels = every
            return
        for buf, x, what in zip(self.static, (images, labels), ("images", "labels")):
            if buf.shape != x.shape or buf.dtype != x.dtype:
                raise ValueError(f"--cuda-graph: a batch of {what} {tuple(x.shape)} {x.dtype} "
                                 f"does not match the captured {tuple(buf.shape)} {buf.dtype}; "
                                 f"train with --cuda-graph off")
            buf.copy_(x, non_blocking=True)

    def _body(self):
        """The captured work: the eager train_step without the host-side parts."""
        t = self.t
        images, labels = self.static
        with t.ctx:
            teacher_out = t.teacher_forward(images) if t.teacher_forward is not None else None
            loss, parts = t.model(images, labels, teacher_out, 0.0)  # GenDD ignores progress
        bad = t.bad_step
        bad.copy_(torch.where((bad < 0) & ~torch.isfinite(loss.detach()), self.step_no, bad))
        loss.backward()
        if t.cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(t.distiller.parameters(), t.cfg.clip_grad)
        t.optimizer.step()
        self.terms = {"loss": loss.detach(), **parts}

    def __call__(self, images, labels, progress_epochs: float) -> float:
        t = self.t
        step = t.global_step
        lr, beta2 = t.schedule(step), t.schedule.beta2(step)
        for g in t.optimizer.param_groups:  # device fills: no host sync
            g["lr"].fill_(lr)
            g["betas"][1].fill_(beta2)
        self.step_no.fill_(step + 1)
        if self.mix:
            t.distiller.graph_mix_weight.fill_(t.distiller.draw_mix_weight())
        self._inputs(images, labels)
        if self.graph is not None:
            self.graph.replay()
        elif self.calls < WARMUP_STEPS:  # the recipe's warm-up, on a side stream
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._body()
                t.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(side)
        else:
            t.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates them
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body()
            self.graph = graph
            graph.replay()  # capture recorded the step without running it
        self.calls += 1
        for f in self.invalidate:
            f()
        t.global_step += 1
        t.step_terms = self.terms
        return lr
