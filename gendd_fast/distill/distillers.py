"""The training methods, one module each, behind one interface.

``forward(images, labels, teacher_out, progress)`` returns ``(loss, parts)``: the scalar to
minimise and a dict of its detached terms for logging. ``predict(images)`` returns the logits the
method is evaluated by (the student's own classifier; for GenDD, its linear probe).

The frozen teacher is *not* a sub-module: its features are computed outside (under no-grad,
before DDP's forward) and passed in as ``teacher_out = (features, logits)``, so DDP never
broadcasts or syncs the teacher, and checkpoints hold the student side only. Module names follow
the public GenDD code (``student``, ``cls_projector.0``, ``diffloss.net.*``) so its checkpoints
load.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import all_reduce_sum
from .losses import dkd_loss, ikl_loss, kd_loss


def frozen_copy(module: nn.Module) -> nn.Module:
    m = copy.deepcopy(module)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _has_labels(labels) -> bool:
    return labels is not None and (labels.is_floating_point() or bool((labels >= 0).all()))


def _fp32(t: torch.Tensor):
    """A region where matmuls stay in float32 even under autocast."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def hard_labels(labels):
    """Class indices from hard (B,) or soft (B, K) labels (the soft label's largest entry)."""
    return labels.argmax(1) if labels.is_floating_point() else labels


def soft_labels(labels, num_classes: int):
    """(B, K) float label distributions from hard (B,) or soft (B, K) labels."""
    if labels.is_floating_point():
        return labels.float()
    return F.one_hot(labels, num_classes).float()


def cross_entropy(logits, labels):
    """CE with hard (B,) or soft (B, K) labels."""
    if labels.is_floating_point():
        return torch.sum(-labels * F.log_softmax(logits.float(), dim=1), dim=1).mean()
    return F.cross_entropy(logits.float(), labels)


class Distiller(nn.Module):
    needs_teacher = False

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def predict(self, images):
        return self.student(images)

    @torch.no_grad()
    def eval_logits(self, images, autocast, sample: bool = False, **_):
        """Logits to score, by name ('' is the method's own prediction)."""
        with autocast:
            return {"": self.predict(images)}


class CE(Distiller):
    def forward(self, images, labels, teacher_out=None, progress: float = 0.0):
        loss = cross_entropy(self.student(images), labels)
        return loss, {"ce": loss.detach()}


class KD(Distiller):
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) (Hinton et al.).

    ``labels=False`` is the unsupervised KL baseline: the teacher's soft targets only, no CE
    (and the KL term at full weight, not (1 - alpha))."""
    needs_teacher = True

    def __init__(self, student, T: float = 4.0, alpha: float = 0.1, labels: bool = True):
        super().__init__(student)
        self.T, self.alpha, self.use_labels = T, alpha, labels

    def forward(self, images, labels, teacher_out, progress: float = 0.0):
        logits = self.student(images)
        kd = kd_loss(logits, teacher_out[1], self.T)
        if not self.use_labels:
            return kd, {"kd": kd.detach()}
        ce = cross_entropy(logits, labels)
        loss = self.alpha * ce + (1 - self.alpha) * kd
        return loss, {"ce": ce.detach(), "kd": kd.detach()}


class DKD(Distiller):
    """CE + min(epoch / warmup, 1) * (alpha TCKD + beta NCKD) (Zhao et al., CVPR 2022)."""
    needs_teacher = True

    def __init__(self, student, alpha=1.0, beta=8.0, T=4.0, warmup=20, ce_weight=1.0):
        super().__init__(student)
        self.alpha, self.beta, self.T = alpha, beta, T
        self.warmup, self.ce_weight = warmup, ce_weight

    def forward(self, images, labels, teacher_out, progress: float = 0.0):
        logits = self.student(images)
        ce = cross_entropy(logits, labels)
        ramp = min(progress / self.warmup, 1.0) if self.warmup > 0 else 1.0
        # DKD splits on one target class: with soft (mixed) labels, their largest entry.
        dkd = dkd_loss(logits, teacher_out[1], hard_labels(labels), self.alpha, self.beta,
                       self.T)
        return self.ce_weight * ce + ramp * dkd, {"ce": ce.detach(), "dkd": dkd.detach()}


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


class GenDDPretrain(Distiller):
    """Stage 1: CE through the teacher's frozen classifier on ``proj(f_s)``."""
    needs_teacher = True

    def __init__(self, student, teacher_fc: nn.Linear):
        super().__init__(student)
        d_s, d_t = student.num_features, teacher_fc.in_features
        self.proj = nn.Identity() if d_s == d_t else nn.Linear(d_s, d_t)
        self.teacher_fc = frozen_copy(teacher_fc)
        self.student.fc.requires_grad_(False)  # not used in this stage

    def predict(self, images):
        return self.teacher_fc(self.proj(self.student.forward_features(images)))

    def forward(self, images, labels, teacher_out=None, progress: float = 0.0):
        loss = cross_entropy(self.predict(images), labels)
        return loss, {"ce": loss.detach()}


class GenDD(Distiller):
    """Stage 2: the student's feature conditions a diffusion head that generates the teacher's.

    Steps (``shared/gendd-method.md``): z = LayerNorm(f_s); distribution contraction of the
    target towards the teacher's class weight; Beta mixing of (z, target) across the batch;
    split tokenization, ``mul`` copies, condition dropout and the diffusion loss (inside the
    head's ``distill_loss``); plus CE of the student's own ``fc`` on detached features (the
    linear probe).
    """
    needs_teacher = True

    def __init__(self, student, teacher_fc: nn.Linear, head_cls, token_dim=64, width=1024,
                 depth=3, sampling_steps="64", mul=30, cond_drop=0.2, beta=1.0, smooth=0.9,
                 labels=True, grad_checkpointing=False):
        super().__init__(student)
        d_s, d_t = student.num_features, teacher_fc.in_features
        if d_t % token_dim:
            raise ValueError(f"token size {token_dim} does not divide the teacher's feature "
                             f"width {d_t}; pick a --token-dim that divides {d_t}")
        self.num_tokens = d_t // token_dim
        self.cls_projector = nn.Sequential(nn.LayerNorm(d_s))
        self.diffloss = head_cls(token_dim, d_s, depth, width, sampling_steps, self.num_tokens,
                                 grad_checkpointing=grad_checkpointing)
        self.teacher_fc = frozen_copy(teacher_fc)
        self.mul, self.cond_drop, self.beta = mul, cond_drop, beta
        self.smooth, self.use_labels = smooth, labels
        if not labels:  # no labels, no linear probe to train
            self.student.fc.requires_grad_(False)

    def predict(self, images):
        """The linear probe: the student's own classifier on its feature."""
        return self.student(images)

    def contract(self, t_feat, labels):
        """target = (1 - s) f_t + s W_t[y]  (soft labels: y @ W_t)."""
        if self.smooth <= 0 or not self.use_labels or not _has_labels(labels):
            return t_feat
        w = self.teacher_fc.weight.float()
        if labels.is_floating_point():  # soft (mixed) labels: y @ W_t, in fp32 under autocast
            with _fp32(w):
                anchor = labels.float() @ w
        else:
            anchor = w[labels]
        return (1 - self.smooth) * t_feat + self.smooth * anchor

    def mix(self, z, target):
        """Beta(beta, beta) mixing of conditions and targets with a random partner."""
        if self.beta <= 0 or z.shape[0] < 2:
            return z, target
        m = float(torch.distributions.Beta(torch.tensor([self.beta]),
                                           torch.tensor([self.beta])).sample())
        perm = torch.randperm(z.shape[0], device=z.device)
        return m * z + (1 - m) * z[perm], m * target + (1 - m) * target[perm]

    def forward(self, images, labels, teacher_out, progress: float = 0.0):
        f_s = self.student.forward_features(images)
        logits = self.student.fc(f_s.detach())
        z = self.cls_projector(f_s)
        target = self.contract(teacher_out[0].float(), labels)
        z, target = self.mix(z, target)
        diff = self.diffloss.distill_loss(target, z, self.mul, self.cond_drop)
        parts = {"diff": diff.detach()}
        loss = diff
        if self.use_labels and _has_labels(labels):
            ce = cross_entropy(logits, labels)
            loss = loss + ce
            parts["ce"] = ce.detach()
        return loss, parts

    @torch.no_grad()
    def eval_logits(self, images, autocast, sample: bool = False, cfg=2.0, temperature=1.0,
                    num_sampling=1, generator=None, image_ids=None, noise_seed=0, **sample_kw):
        """The linear probe's logits and, with ``sample``, the teacher classifier's logits on
        features generated from the student's condition (averaged over ``num_sampling``
        draws). The student runs under ``autocast``; the sampler in float32. With
        ``image_ids`` (the images' dataset indices) each image's noise of draw j is seeded by
        (``noise_seed``, index, j) (see :func:`gendd_fast.sampling.image_noises`); without,
        it comes from ``generator`` (or the global generator)."""
        with autocast:
            f_s = self.student.forward_features(images)
            out = {"": self.student.fc(f_s)}
        if sample:
            from ..sampling import image_noises
            z = self.cls_projector(f_s.float())
            head = self.diffloss
            feats = 0.0
            for draw in range(num_sampling):
                kw = dict(sample_kw)
                if image_ids is not None:
                    kw["noise"], kw["step_noises"] = image_noises(
                        noise_seed, image_ids, draw, head.num_chunks, head.in_channels,
                        head.gen_diffusion.num_timesteps, z.device)
                feats = feats + head.generate(z, cfg=cfg, temperature=temperature,
                                              generator=generator, **kw)
            out["sample_"] = self.teacher_fc(feats / num_sampling)
        return out


class Teacher(nn.Module):
    """A frozen, eval-mode teacher returning ``(features, logits)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # always eval: BN statistics stay the teacher's
        return super().train(False)

    @torch.no_grad()
    def forward(self, images) -> Tuple[torch.Tensor, torch.Tensor]:
        feat = self.model.forward_features(images)
        return feat, self.model.fc(feat)


def build_distiller(cfg, student: nn.Module, teacher: Optional[nn.Module], head_cls=None):
    m = cfg.method
    if m == "ce":
        return CE(student)
    if teacher is None:
        raise ValueError(f"method {m!r} needs a teacher")
    if m == "kd":
        return KD(student, cfg.kd_T, cfg.kd_alpha, cfg.labels)
    if m == "ikl":
        return IKL(student, teacher.fc.out_features, cfg.ikl_alpha, cfg.ikl_beta, cfg.ikl_T,
                   cfg.ikl_T2, cfg.ikl_gi, cfg.ikl_warmup, cfg.ikl_ce_weight, cfg.labels)
    if m == "dkd":
        return DKD(student, cfg.dkd_alpha, cfg.dkd_beta, cfg.dkd_T, cfg.dkd_warmup,
                   cfg.dkd_ce_weight)
    if m == "gendd-pretrain":
        return GenDDPretrain(student, teacher.fc)
    if m == "gendd":
        return GenDD(student, teacher.fc, head_cls, cfg.token_dim, cfg.diffloss_w,
                     cfg.diffloss_d, cfg.sampling_steps, cfg.mul, cfg.cond_drop, cfg.beta,
                     cfg.smooth if cfg.labels else 0.0, cfg.labels, cfg.grad_checkpointing)
    raise ValueError(f"unknown method {m!r}")
