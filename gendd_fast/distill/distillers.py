"""The old home of the training methods, kept so ``gendd_fast.distill.distillers`` imports still
work: each method now has a file of its own (base.py, ce.py, kd.py, dkd.py, ikl.py, gendd.py)."""
from .base import (Distiller, Teacher, build_distiller, cross_entropy, frozen_copy,  # noqa: F401
                   hard_labels, labelled_ce, labelled_rows, soft_labels)
from .ce import CE  # noqa: F401
from .dkd import DKD  # noqa: F401
from .gendd import GenDD, GenDDPretrain  # noqa: F401
from .ikl import IKL  # noqa: F401
from .kd import KD  # noqa: F401
