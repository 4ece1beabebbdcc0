"""``ikl``: IKL-KD, the improved KL divergence loss (Cui et al., NeurIPS 2024)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..distributed import all_reduce_sum
from .base import Distiller, _fp32, _has_labels, cross_entropy, register, soft_labels
from .losses import ikl_loss


@register("ikl")
class IKL(Distiller):
    """IKL-KD: ``ce_weight * CE + min(progress / warmup, 1) * IKL`` (Cui et al., NeurIPS 2024).

    IKL's weighted MSE on logit differences weighs class pairs by the outer product of a class
    distribution. With ``gi`` (global information, the paper's ImageNet setting) that is the
    class-wise mean of the teacher's ``softmax(t / T2)`` over the previous epoch's training
    images of the sample's class (soft labels mix those rows); a class not yet seen for a whole
    epoch uses the sample's own teacher probabilities, as ``gi=False`` always does. The class
    means are accumulated per process and all-reduced once, when an epoch ends, so the prior is
    the same on every rank; they are buffers, saved with the checkpoint.
    """
    needs_teacher = True
    needs_labels = False

    @classmethod
    def from_config(cls, cfg, student, teacher, head_cls=None):
        return cls(student, teacher.fc.out_features, cfg.ikl_alpha, cfg.ikl_beta, cfg.ikl_T,
                   cfg.ikl_T2, cfg.ikl_gi, cfg.ikl_warmup, cfg.ikl_ce_weight, cfg.labels)

    def __init__(self, student, num_classes: int, alpha=1.0, beta=0.5, T=1.0, T2=1.0, gi=True,
                 warmup=1.0, ce_weight=1.0, labels=True):
        super().__init__(student)
        self.alpha, self.beta, self.T, self.T2 = alpha, beta, T, T2
        self.gi, self.warmup, self.ce_weight = gi and labels, warmup, ce_weight
        self.use_labels, self.num_classes = labels, num_classes
        k = num_classes if self.gi else 0
        self.register_buffer("prior", torch.zeros(k, k))
        self.register_buffer("prior_seen", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("acc_sum", torch.zeros(k, k))
        self.register_buffer("acc_n", torch.zeros(k))
        self.register_buffer("prior_epoch", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _roll_epoch(self, epoch: int):
        """At the first step of a new epoch, the finished epoch's class means become the prior."""
        if epoch <= int(self.prior_epoch):
            return
        all_reduce_sum(self.acc_sum)
        all_reduce_sum(self.acc_n)
        seen = self.acc_n > 0
        self.prior[seen] = self.acc_sum[seen] / self.acc_n[seen, None]
        self.prior_seen |= seen
        self.acc_sum.zero_()
        self.acc_n.zero_()
        self.prior_epoch.fill_(epoch)

    def class_weights(self, teacher_logits, y_soft, progress: float):
        p_t = F.softmax(teacher_logits.float() / self.T2, dim=1)
        if not self.gi:
            return p_t
        # progress runs over (e, e + 1] during epoch e (it is e + 1 at its last step)
        epoch = max(0, math.ceil(progress - 1e-9) - 1)
        self._roll_epoch(epoch)
        with torch.no_grad(), _fp32(p_t):  # class means in fp32, not autocast's bf16
            self.acc_sum += y_soft.t() @ p_t
            self.acc_n += y_soft.sum(0)
            ready = self.prior_seen.float()
            w = y_soft @ (self.prior * ready[:, None])
            return w + (y_soft * (1 - ready)).sum(1, keepdim=True) * p_t

    def forward(self, images, labels, teacher_out, progress: float = 0.0):
        logits = self.student(images)
        t = teacher_out[1].float()
        has = self.use_labels and _has_labels(labels)
        if self.gi and not has:
            raise ValueError("IKL with global information needs labels (use --labels true, "
                             "or --ikl-gi false for unlabelled data)")
        y = soft_labels(labels, logits.shape[1]) if has else None
        w = self.class_weights(t, y, progress) if y is not None else \
            F.softmax(t / self.T2, dim=1)
        ramp = min(progress / self.warmup, 1.0) if self.warmup > 0 else 1.0
        ikl, wmse, sce = ikl_loss(logits, t, w.detach(), self.alpha, self.beta, self.T)
        loss = ramp * ikl
        parts = {"ikl": ikl.detach(), "wmse": wmse.detach(), "sce": sce.detach()}
        if has:
            ce = cross_entropy(logits, labels)
            loss = loss + self.ce_weight * ce
            parts["ce"] = ce.detach()
        return loss, parts
