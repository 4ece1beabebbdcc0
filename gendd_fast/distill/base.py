"""The interface every training method shares, the frozen teacher, and the method registry.

``forward(images, labels, teacher_out, progress)`` returns ``(loss, parts)``: the scalar to
minimise and a dict of its detached terms for logging. ``predict(images)`` returns the logits the
method is evaluated by (the student's own classifier; for GenDD, its linear probe).

The frozen teacher is *not* a sub-module: its features are computed outside (under no-grad,
before DDP's forward) and passed in as ``teacher_out = (features, logits)``, so DDP never
broadcasts or syncs the teacher, and checkpoints hold the student side only. Module names follow
the public GenDD code (``student``, ``cls_projector.0``, ``diffloss.net.*``) so its checkpoints
load.

Each method is a :class:`Distiller` subclass in a file of its own, registered with
:func:`register` under its ``--method`` name, and declares what the rest of the trainer asks of
it: ``needs_teacher``, ``needs_labels`` (False: runs with ``--labels false`` too), ``samples``
(has a generative head: sampling evaluation, sampler settings) and ``from_config``. The trainer,
the config's validation, evaluation and the report ask :func:`method` (or the distiller's class),
never a list of names.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def labelled_rows(labels):
    """Per-sample mask of the rows that carry a label: soft labels always do; hard labels are -1
    where unlabelled (``--labeled-fraction``, unlabelled shards). None when every row has one."""
    if labels is None:
        return None
    if labels.is_floating_point():
        return None
    mask = labels >= 0
    return None if bool(mask.all()) else mask


def labelled_ce(logits, labels):
    """CE averaged over the labelled rows only (0 when the batch has none): with a labelled
    fraction, the supervised term keeps its weight per labelled image however few a batch has."""
    mask = labelled_rows(labels)
    if mask is None:
        return cross_entropy(logits, labels)
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return cross_entropy(logits[mask], labels[mask])


def cross_entropy(logits, labels):
    """CE with hard (B,) or soft (B, K) labels."""
    if labels.is_floating_point():
        return torch.sum(-labels * F.log_softmax(logits.float(), dim=1), dim=1).mean()
    return F.cross_entropy(logits.float(), labels)


class Distiller(nn.Module):
    """A training method: the student, and whatever else it trains."""
    name = ""               # the --method name (set by register)
    needs_teacher = False   # trains against a frozen teacher's features / logits
    needs_labels = True     # False: also trains without labels (--labels false)
    samples = False         # has a generative head (sampling evaluation, sampler settings)
    uses_teacher_outputs = True  # reads teacher_out (False: the trainer skips the forward)

    @classmethod
    def from_config(cls, cfg, student: nn.Module, teacher: Optional[nn.Module], head_cls=None):
        """The method built from a run's config (``teacher``: the teacher model, None without
        one; ``head_cls``: the diffusion head class, for methods that sample)."""
        raise NotImplementedError(f"{cls.__name__} does not say how to build itself")

    @property
    def head(self) -> Optional[nn.Module]:
        """The generative head of a method that samples (None otherwise)."""
        return None

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


_METHODS: Dict[str, Type[Distiller]] = {}


def register(name: str):
    """Class decorator: make a :class:`Distiller` subclass the method ``--method name``."""
    def add(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_METHODS[name].__name__} "
                             f"and {cls.__name__})")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return add


def method_names() -> Tuple[str, ...]:
    """Every registered method, in registration order (distill/__init__.py's import order)."""
    return tuple(_METHODS)


def method(name: str) -> Type[Distiller]:
    """The class registered as ``name``; a clear error naming the choices otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(_METHODS)}") from None


def build_distiller(cfg, student: nn.Module, teacher: Optional[nn.Module], head_cls=None):
    cls = method(cfg.method)
    if cls.needs_teacher and teacher is None:
        raise ValueError(f"method {cfg.method!r} needs a teacher")
    return cls.from_config(cfg, student, teacher, head_cls)
