"""From a config to the objects a run needs: the diffusion head class, the distiller (student,
teacher, head) and the sampler settings. Used by the trainer and by the evaluation alike."""
from __future__ import annotations

from typing import Dict

import torch

from .config import Config
from .distill import Teacher, build_distiller, method
from .models import build_teacher, create_model
from .notice import notice
from .precision import resolve_amp
from .public_checkpoint import load_public_teacher, load_student_weights, read_public


def choose_head(cfg: Config, device: torch.device):
    """The diffusion head class: the fused Triton head on CUDA (or when asked), else the
    reference. A fused head that cannot run falls back with one notice."""
    from .head import DiffLoss
    want = cfg.head if cfg.head != "auto" else ("fused" if device.type == "cuda" else "torch")
    if want == "torch":
        return DiffLoss
    from .fused_head import FusedDiffLoss, fused_unavailable_reason
    why = fused_unavailable_reason(device)
    if not why:  # every kernel of a step compiled for this GPU and held to its limits, now
        from .launch_check import TOKENS_PER_IMAGE, fused_launch_problem
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            resolve_amp(cfg.amp, device), torch.float32)
        rows = [cfg.batch_size * (cfg.mul or 1) * t for t in TOKENS_PER_IMAGE]
        why = fused_launch_problem(device, dtype, dict(
            width=cfg.diffloss_w, depth=cfg.diffloss_d, token_dim=cfg.token_dim, rows=rows,
            images=cfg.batch_size, z=[t * cfg.token_dim for t in TOKENS_PER_IMAGE]))
        if why and cfg.head == "fused":  # asked for explicitly: stop before step 1, say why
            raise ValueError(f"--head fused cannot run on {device}: {why}")
    if why:
        notice(f"fused head unavailable ({why}); using the reference head")
        return DiffLoss
    return FusedDiffLoss


def build_method(cfg: Config, num_classes: int, device: torch.device, teacher_weights=True,
                 init_weights=True):
    """(distiller, teacher) on ``device``. Evaluation passes ``teacher_weights=False`` and
    ``init_weights=False``: the checkpoint being evaluated carries every weight (the teacher's
    classifier and the student), so neither the teacher file nor the ``--init`` file it was
    trained from needs to exist any more."""
    teacher = None
    if method(cfg.method).needs_teacher:  # zoo + checkpoint, or timm/torchvision with their own weights
        public = (read_public(cfg.teacher_checkpoint)
                  if teacher_weights and cfg.teacher_checkpoint else None)
        tmodel = build_teacher(cfg, num_classes, teacher_weights and public is None)
        if public is not None:  # the student of a public GenDD run, as the teacher
            load_public_teacher(public, tmodel, cfg.teacher_checkpoint)
        teacher = Teacher(tmodel).to(device)
    student = create_model(cfg.student, num_classes)
    if cfg.init and init_weights:
        notice(load_student_weights(cfg.init, student))
    head_cls = choose_head(cfg, device) if method(cfg.method).samples else None
    distiller = build_distiller(cfg, student, teacher.model if teacher else None, head_cls)
    distiller = distiller.to(device)
    if cfg.channels_last:
        distiller = distiller.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    return distiller, teacher


def sampling_kwargs(cfg: Config) -> Dict:
    """Sampler settings from a config: respaced ancestral sampling, or DDIM when asked."""
    kw = dict(cfg=cfg.cfg, temperature=cfg.temperature, num_sampling=cfg.num_sampling)
    if cfg.ddim_steps:
        kw.update(sampler="ddim", eta=0.0)
    return kw


def configure_sampler(distiller, cfg: Config):
    """Respace the head's sampler to the config's steps (no-op for methods without a head)."""
    head = distiller.head
    if head is not None:
        head.set_sampling_steps(f"ddim{cfg.ddim_steps}" if cfg.ddim_steps else cfg.sampling_steps)
