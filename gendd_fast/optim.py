"""The optimiser of a run and the per-step schedule of its hyper-parameters (learning rate and
AdamW's beta2), as the public GenDD code sets them.

- Weight decay by parameter *name*: the reference puts every parameter whose name contains
  ``diffloss`` or ``ln`` in a group without decay and decays everything else, student BatchNorm
  weights and biases and the condition LayerNorm (``cls_projector.0``) included.
- Learning rate: linear warm-up, then one of ``cos`` (per-step cosine to ``min_lr``),
  ``cos-epoch`` (the reference's ImageNet schedule: constant within an epoch, warm-up
  ``lr * (e + 1) / W`` and cosine ``min_lr + (lr - min_lr) * (1 + cos(pi * (e - W + 1) / (E - W))) / 2``
  for 0-based epoch ``e``) or ``step`` (x ``decay_rate`` at each of ``decay_epochs``).
- beta2: with ``beta2_end`` set, a per-step cosine ramp from ``betas[1]`` to ``beta2_end`` that
  reaches ``beta2_end`` on the run's last step (reference: 0.95 -> 0.999 on CIFAR, 0.96 -> 0.999
  on ImageNet and CC3M).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn as nn

from .config import Config

NO_DECAY_SUBSTRINGS = ("diffloss", "ln")


def decays(name: str) -> bool:
    """Whether the parameter called ``name`` is weight-decayed (the reference's rule)."""
    return not any(s in name for s in NO_DECAY_SUBSTRINGS)


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """[decayed group, undecayed group] of the trainable parameters, split by name."""
    decay, plain = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(n) else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device):
    """AdamW (or SGD) over :func:`param_groups`. SGD is plain momentum SGD, no Nesterov, as
    the public code's teacher training and ImageNet-LT scripts use it."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.opt_impl == "apex":
        try:
            from apex.optimizers import FusedAdam, FusedSGD
        except ImportError as e:
            raise ImportError("--opt-impl apex: NVIDIA apex is not installed (it is not on "
                              "PyPI); use the default --opt-impl torch") from e
        if cfg.opt == "adamw":
            return FusedAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), adam_w_mode=True)
        return FusedSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)
    fused = device.type == "cuda"
    if cfg.opt == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                                 fused=fused or None)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False,
                           fused=fused or None)


class LRSchedule:
    """Learning rate and beta2 as functions of the global step (0-based). Its state is saved in
    checkpoints, so a resumed run continues the schedule it started with."""

    def __init__(self, cfg: Config, steps_per_epoch: int):
        self.base, self.min_lr, self.kind = cfg.lr, cfg.min_lr, cfg.sched
        self.spe = steps_per_epoch
        self.epochs = cfg.epochs
        self.total = cfg.epochs * steps_per_epoch
        self.warmup_epochs = cfg.warmup_epochs
        self.warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        self.decay_epochs, self.rate = list(cfg.decay_epochs), cfg.decay_rate
        self.beta2_start = cfg.betas[1]
        self.beta2_end = cfg.beta2_end

    def __call__(self, step: int) -> float:
        if self.kind == "cos-epoch":
            return self._per_epoch(step // self.spe)
        if step < self.warmup:
            return self.base * (step + 1) / self.warmup
        if self.kind == "cos":
            prog = (step - self.warmup) / max(1, self.total - self.warmup)
            return self.min_lr + (self.base - self.min_lr) * 0.5 * (1 + math.cos(math.pi * prog))
        epoch = step // self.spe
        return self.base * self.rate ** sum(epoch >= e for e in self.decay_epochs)

    def _per_epoch(self, epoch: int) -> float:
        w = int(round(self.warmup_epochs))
        if epoch < w:
            return self.base * (epoch + 1) / w
        prog = (epoch - w + 1) / max(1, self.epochs - w)
        return self.min_lr + (self.base - self.min_lr) * 0.5 * (1 + math.cos(math.pi * prog))

    def beta2(self, step: int) -> float:
        """The reference's cosine ramp: beta2_start at step 0, beta2_end at the last step."""
        if self.beta2_end is None:
            return self.beta2_start
        prog = min(step / max(1, self.total - 1), 1.0)
        return self.beta2_end - 0.5 * (self.beta2_end - self.beta2_start) * (
            1 + math.cos(math.pi * prog))

    def apply(self, optimizer, step: int) -> Tuple[float, float]:
        """Set every group's lr (and beta2, for Adam-type groups) for ``step``; returns both."""
        lr, beta2 = self(step), self.beta2(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
            if "betas" in g:
                g["betas"] = (g["betas"][0], beta2)
        return lr, beta2

    def state_dict(self):
        return dict(self.__dict__)

    def load_state_dict(self, state):
        self.__dict__.update(state)
