"""The optimiser and the per-step learning-rate schedule of a run."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import Config


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
