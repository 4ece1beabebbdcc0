"""``gendd-pretrain`` and ``gendd``: the two stages of Generative Distribution Distillation
(GenDD, Cui et al.)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .base import (Distiller, _fp32, cross_entropy, frozen_copy, labelled_ce, labelled_rows,
                   register)


@register("gendd-pretrain")
class GenDDPretrain(Distiller):
    """Stage 1: CE through the teacher's frozen classifier on ``proj(f_s)``."""
    needs_teacher = True
    uses_teacher_outputs = False  # the classifier only: no teacher forward per step

    @classmethod
    def from_config(cls, cfg, student, teacher, head_cls=None):
        return cls(student, teacher.fc)

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


@register("gendd")
class GenDD(Distiller):
    """Stage 2: the student's feature conditions a diffusion head that generates the teacher's.

    Steps (as in the public GenDD code): z = LayerNorm(f_s); distribution contraction of the
    target towards the teacher's class weight; Beta mixing of (z, target) across the batch;
    split tokenization, ``mul`` copies, condition dropout and the diffusion loss (inside the
    head's ``distill_loss``); plus CE of the student's own ``fc`` on detached features (the
    linear probe).
    """
    needs_teacher = True
    needs_labels = False
    samples = True

    @classmethod
    def from_config(cls, cfg, student, teacher, head_cls=None):
        if head_cls is None:
            raise ValueError("method 'gendd' needs a diffusion head class (build.choose_head)")
        return cls(student, teacher.fc, head_cls, cfg.token_dim, cfg.diffloss_w, cfg.diffloss_d,
                   cfg.sampling_steps, cfg.mul, cfg.cond_drop, cfg.beta,
                   cfg.smooth if cfg.labels else 0.0, cfg.labels, cfg.grad_checkpointing)

    @property
    def head(self):
        return self.diffloss

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

    # Set by the CUDA-graphed step (gendd_fast.cuda_graph_step), which decides both outside the
    # graph: a captured step can neither read device values on the host nor draw host randomness
    # per replay. A device tensor holding this step's mixing weight, and whether every row of
    # every batch carries a label (True) or none does (False): one decision per run instead of
    # a host sync per step (partly labelled batches are not graphed).
    graph_mix_weight: Optional[torch.Tensor] = None
    graph_has_labels: Optional[bool] = None

    def labelled_mask(self, labels):
        """:func:`labelled_rows`, or None (every row labelled) under the CUDA graph."""
        return labelled_rows(labels) if self.graph_has_labels is None else None

    def draw_mix_weight(self) -> float:
        """This step's Beta(beta, beta) mixing weight, drawn from the host RNG."""
        return float(torch.distributions.Beta(torch.tensor([self.beta]),
                                              torch.tensor([self.beta])).sample())

    def contract(self, t_feat, labels):
        """target = (1 - s) f_t + s W_t[y]  (soft labels: y @ W_t)."""
        if self.smooth <= 0 or not self.use_labels or labels is None \
                or self.graph_has_labels is False:
            return t_feat
        mask = self.labelled_mask(labels)
        if mask is not None and not bool(mask.any()):
            return t_feat
        w = self.teacher_fc.weight.float()
        if labels.is_floating_point():  # soft (mixed) labels: y @ W_t, in fp32 under autocast
            with _fp32(w):
                anchor = labels.float() @ w
        else:
            anchor = w[labels.clamp_min(0)]
        contracted = (1 - self.smooth) * t_feat + self.smooth * anchor
        # unlabelled rows: the teacher's feature itself, no contraction
        return contracted if mask is None else torch.where(mask[:, None], contracted, t_feat)

    def mix(self, z, target):
        """Beta(beta, beta) mixing of conditions and targets with a random partner."""
        if self.beta <= 0 or z.shape[0] < 2:
            return z, target
        m = self.graph_mix_weight if self.graph_mix_weight is not None \
            else self.draw_mix_weight()
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
        if self.use_labels and labels is not None and self.graph_has_labels is not False:
            ce = cross_entropy(logits, labels) if self.graph_has_labels else \
                labelled_ce(logits, labels)
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
