"""GenDD and the baselines the trainer ships beside it."""
from .distillers import (CE, DKD, IKL, GenDD, GenDDPretrain, KD, Distiller, Teacher,
                         build_distiller, cross_entropy)
from .losses import dkd_loss, ikl_loss, kd_loss

__all__ = ["CE", "KD", "DKD", "IKL", "GenDD", "GenDDPretrain", "Distiller", "Teacher",
           "build_distiller", "cross_entropy", "kd_loss", "dkd_loss", "ikl_loss"]
