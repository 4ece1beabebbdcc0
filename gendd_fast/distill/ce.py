"""``ce``: plain cross-entropy training (a teacher, or the from-scratch student)."""
from __future__ import annotations

from .base import Distiller, cross_entropy, register


@register("ce")
class CE(Distiller):
    @classmethod
    def from_config(cls, cfg, student, teacher=None, head_cls=None):
        return cls(student)

    def forward(self, images, labels, teacher_out=None, progress: float = 0.0):
        loss = cross_entropy(self.student(images), labels)
        return loss, {"ce": loss.detach()}
