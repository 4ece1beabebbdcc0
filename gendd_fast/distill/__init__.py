"""GenDD and the baselines the trainer ships beside it: one file per method, each registered
under its ``--method`` name (see base.py). Adding a method: a new file here with a
``@register("name")`` Distiller subclass, and its import below (the order is ``--help``'s)."""
from .base import (Distiller, Teacher, build_distiller, cross_entropy, method, method_names,
                   register)
from .ce import CE
from .kd import KD
from .dkd import DKD
from .ikl import IKL
from .gendd import GenDD, GenDDPretrain
from .losses import dkd_loss, ikl_loss, kd_loss

__all__ = ["CE", "KD", "DKD", "IKL", "GenDD", "GenDDPretrain", "Distiller", "Teacher",
           "build_distiller", "cross_entropy", "kd_loss", "dkd_loss", "ikl_loss", "method",
           "method_names", "register"]
