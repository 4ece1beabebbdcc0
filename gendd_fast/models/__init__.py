"""Model zoo: ``create_model(name, num_classes)`` and teacher checkpoint loading.

Names: the CIFAR family (``resnet8`` ... ``ShuffleV2``), the ImageNet family (``resnet18/34/50``,
``mobilenet_v1``), and, where those packages import, ``timm:NAME`` and ``torchvision:NAME``.
Every model exposes ``forward_features(x) -> (B, D)``, ``num_features`` and a linear ``fc``.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from .base import Backbone
from .cifar import CIFAR_MODELS
from .external import ExternalBackbone, create_external, source_available
from .imagenet import IMAGENET_MODELS

MODELS = {**CIFAR_MODELS, **IMAGENET_MODELS}


# Teachers of the paper's table that come from timm (BEiT-B/L, ImageNet-22k -> 1k fine-tuned).
TIMM_EXAMPLES = ("beit_large_patch16_224.in22k_ft_in22k_in1k",
                 "beit_base_patch16_224.in22k_ft_in22k_in1k")


def list_models(external: bool = True):
    """The zoo's names; with ``external``, also how to name timm/torchvision models."""
    names = sorted(MODELS, key=str.lower)
    if not external:
        return names
    state = {s: "importable" if source_available(s) else "not importable here"
             for s in ("timm", "torchvision")}
    return names + [
        f"timm:NAME          any timm model ({state['timm']}); add --teacher-pretrained for "
        f"timm's weights, e.g. " + ", ".join("timm:" + n for n in TIMM_EXAMPLES),
        f"torchvision:NAME   any torchvision classifier ({state['torchvision']}); add "
        f"--teacher-weights DEFAULT (or IMAGENET1K_V2, or a local state-dict file)"]


_ExternalBackbone = ExternalBackbone  # the name earlier code used


def create_model(name: str, num_classes: int) -> Backbone:
    """A randomly initialised model (zoo name, or timm:NAME / torchvision:NAME)."""
    if name.startswith(("timm:", "torchvision:")):
        return create_external(name, num_classes)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models(False))} "
                         f"(or timm:NAME / torchvision:NAME where installed)")
    return MODELS[name](num_classes)


def build_teacher(cfg, num_classes: int, load_weights: bool = True) -> Backbone:
    """The teacher a config names, with its weights: a zoo model from --teacher-checkpoint, a
    timm model with --teacher-pretrained (timm's download/cache, or --teacher-checkpoint FILE
    with the file's class count) or from --teacher-checkpoint, a torchvision model with
    --teacher-weights (an enum name or a file). ``load_weights=False`` builds the architecture
    only (evaluation: the checkpoint carries what is needed of the teacher)."""
    name = cfg.teacher
    if name.startswith(("timm:", "torchvision:")):
        from ..data.transforms import normalization_for
        if not load_weights:
            return create_external(name, num_classes)
        pretrained = bool(getattr(cfg, "teacher_pretrained", False))
        weights = getattr(cfg, "teacher_weights", None)
        if name.startswith("timm:"):
            weights = cfg.teacher_checkpoint
            if not pretrained and not weights:
                raise ValueError(f"teacher {name!r} needs weights: --teacher-pretrained "
                                 f"(timm's), or --teacher-checkpoint FILE")
        elif not weights:
            weights = cfg.teacher_checkpoint
            if not weights:
                raise ValueError(f"teacher {name!r} needs weights: --teacher-weights DEFAULT "
                                 f"(torchvision's), or a state-dict file")
        return create_external(name, num_classes, pretrained, weights,
                               data_norm=normalization_for(cfg.dataset))
    model = create_model(name, num_classes)
    if load_weights:
        if not cfg.teacher_checkpoint:
            raise ValueError(f"method {cfg.method!r} needs --teacher-checkpoint (a teacher "
                             f"trained with --method ce, or a {{'model': state_dict}} file)")
        load_checkpoint_weights(cfg.teacher_checkpoint, model, "teacher")
    return model


_CLASSIFIER_PREFIXES = ("classifier.0.", "classifier.", "linear.", "head.fc.", "head.")


def remap_classifier_keys(state: Dict[str, torch.Tensor], model: nn.Module):
    """Rename the classifier of a zoo checkpoint (``linear``/``classifier``...) to ``fc``."""
    from ..checkpoint import strip_module
    state = strip_module(state)
    if isinstance(model, ExternalBackbone) or any(k.startswith("fc.") for k in state):
        return state
    out = {}
    for k, v in state.items():
        for p in _CLASSIFIER_PREFIXES:
            if k.startswith(p) and k[len(p):] in ("weight", "bias"):
                k = "fc." + k[len(p):]
                break
        out[k] = v
    return out


def load_checkpoint_weights(path: str, model: nn.Module, what: str = "teacher"):
    """Load ``{'model': sd}`` (or a bare state dict) strictly, with errors that name the problem."""
    from ..checkpoint import read_weights
    state = remap_classifier_keys(read_weights(path, f"{what} checkpoint"), model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{what} checkpoint {path!r} does not match {type(model).__name__}: "
            f"{len(missing)} missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''} - is it the right architecture?")
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        fc = [b for b in bad if b[0].startswith("fc.")]
        if fc:
            raise ValueError(f"{what} checkpoint {path!r} has {fc[0][1][0]} classes but the "
                             f"model was built for {fc[0][2][0]} (fc.weight {fc[0][1]} vs "
                             f"{fc[0][2]})")
        raise ValueError(f"{what} checkpoint {path!r}: shapes differ, e.g. {bad[0][0]} is "
                         f"{bad[0][1]} in the file and {bad[0][2]} in the model")
    from ..checkpoint import weight_problem
    why = weight_problem(state, own, path, what)
    if why:
        raise ValueError(why)
    model.load_state_dict(state)
    return {"model": state}
