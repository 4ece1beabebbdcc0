"""``dkd``: decoupled knowledge distillation (Zhao et al., CVPR 2022)."""
from __future__ import annotations

import torch

from .base import Distiller, hard_labels, labelled_ce, labelled_rows, register
from .losses import dkd_loss


@register("dkd")
class DKD(Distiller):
    """CE + min(epoch / warmup, 1) * (alpha TCKD + beta NCKD) (Zhao et al., CVPR 2022)."""
    needs_teacher = True

    @classmethod
    def from_config(cls, cfg, student, teacher, head_cls=None):
        return cls(student, cfg.dkd_alpha, cfg.dkd_beta, cfg.dkd_T, cfg.dkd_warmup,
                   cfg.dkd_ce_weight)

    def __init__(self, student, alpha=1.0, beta=8.0, T=4.0, warmup=20, ce_weight=1.0):
        super().__init__(student)
        self.alpha, self.beta, self.T = alpha, beta, T
        self.warmup, self.ce_weight = warmup, ce_weight

    def forward(self, images, labels, teacher_out, progress: float = 0.0):
        logits = self.student(images)
        ce = labelled_ce(logits, labels)
        ramp = min(progress / self.warmup, 1.0) if self.warmup > 0 else 1.0
        # DKD splits on one target class: with soft (mixed) labels, their largest entry; on an
        # unlabelled image, the teacher's top class (it learns from the teacher's logits there).
        target = hard_labels(labels)
        mask = labelled_rows(labels)
        if mask is not None:
            target = torch.where(mask, target, teacher_out[1].argmax(1))
        dkd = dkd_loss(logits, teacher_out[1], target, self.alpha, self.beta, self.T)
        return self.ce_weight * ce + ramp * dkd, {"ce": ce.detach(), "dkd": dkd.detach()}
