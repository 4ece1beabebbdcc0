"""GenDD and the baselines the trainer ships beside it."""
from .distillers import (CE, DKD, GenDD, GenDDPretrain, KD, Distiller, Teacher, build_distiller,
                         cross_entropy)
from .losses import dkd_loss, kd_loss

__all__ = ["CE", "KD", "DKD", "GenDD", "GenDDPretrain", "Distiller", "Teacher",
           "build_distiller", "cross_entropy", "kd_loss", "dkd_loss"]
