"""``kd``: Hinton et al.'s knowledge distillation, and (``--labels false``) the KL baseline."""
from __future__ import annotations

from .base import Distiller, labelled_ce, register
from .losses import kd_loss


@register("kd")
class KD(Distiller):
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) (Hinton et al.).

    ``labels=False`` is the unsupervised KL baseline: the teacher's soft targets only, no CE
    (and the KL term at full weight, not (1 - alpha))."""
    needs_teacher = True
    needs_labels = False

    @classmethod
    def from_config(cls, cfg, student, teacher, head_cls=None):
        return cls(student, cfg.kd_T, cfg.kd_alpha, cfg.labels)

    def __init__(self, student, T: float = 4.0, alpha: float = 0.1, labels: bool = True):
        super().__init__(student)
        self.T, self.alpha, self.use_labels = T, alpha, labels

    def forward(self, images, labels, teacher_out, progress: float = 0.0):
        logits = self.student(images)
        kd = kd_loss(logits, teacher_out[1], self.T)
        if not self.use_labels:
            return kd, {"kd": kd.detach()}
        ce = labelled_ce(logits, labels)
        loss = self.alpha * ce + (1 - self.alpha) * kd
        return loss, {"ce": ce.detach(), "kd": kd.detach()}
