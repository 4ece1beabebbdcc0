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
from .imagenet import IMAGENET_MODELS

MODELS = {**CIFAR_MODELS, **IMAGENET_MODELS}


def list_models():
    return sorted(MODELS, key=str.lower)


class _ExternalBackbone(Backbone):
    """Adapts a timm or torchvision classifier to the zoo's interface."""

    def __init__(self, net: nn.Module, source: str):
        super().__init__()
        self.net = net
        if source == "timm":
            self.num_features = net.num_features
            self.fc = net.get_classifier()
            net.reset_classifier(0)  # forward_head(pre_logits) then gives the pooled feature
            self._features = lambda x: net.forward_head(net.forward_features(x), pre_logits=True)
        else:
            head_name = next((n for n in ("fc", "classifier", "heads", "head")
                              if hasattr(net, n)), None)
            if head_name is None:
                raise ValueError("torchvision model has no recognisable classifier")
            head = getattr(net, head_name)
            linear = head if isinstance(head, nn.Linear) else [m for m in head.modules()
                                                                if isinstance(m, nn.Linear)][-1]
            self.fc = linear
            self.num_features = linear.in_features
            if isinstance(head, nn.Linear):
                setattr(net, head_name, nn.Identity())
            else:  # e.g. Sequential(Dropout, Linear): keep everything but the last Linear
                for name, m in head.named_children():
                    if m is linear:
                        setattr(head, name, nn.Identity())
            self._features = net

    def forward_features(self, x):
        return self._features(x)


def _external(name: str, num_classes: int) -> Backbone:
    source, _, arch = name.partition(":")
    try:
        if source == "timm":
            import timm
            return _ExternalBackbone(timm.create_model(arch, num_classes=num_classes), "timm")
        import torchvision
        return _ExternalBackbone(torchvision.models.get_model(arch, num_classes=num_classes),
                                 "torchvision")
    except ImportError as e:
        raise ImportError(f"model {name!r} needs the '{source}' package, which is not importable "
                          f"here ({e}); use a zoo model: {', '.join(list_models())}") from e


def create_model(name: str, num_classes: int) -> Backbone:
    if name.startswith(("timm:", "torchvision:")):
        return _external(name, num_classes)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())} "
                         f"(or timm:NAME / torchvision:NAME where installed)")
    return MODELS[name](num_classes)


_CLASSIFIER_PREFIXES = ("classifier.0.", "classifier.", "linear.", "head.fc.", "head.")


def remap_classifier_keys(state: Dict[str, torch.Tensor], model: nn.Module):
    """Rename the classifier of a zoo checkpoint (``linear``/``classifier``...) to ``fc``."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if isinstance(model, _ExternalBackbone) or any(k.startswith("fc.") for k in state):
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
    from ..checkpoint import read_checkpoint
    ckpt = read_checkpoint(path, f"{what} checkpoint")
    state = ckpt
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict", "student"):
            if key in ckpt and isinstance(ckpt[key], dict):
                state = ckpt[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} checkpoint {path!r} holds no state dict (expected "
                         f"{{'model': state_dict}})")
    state = remap_classifier_keys(state, model)
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
    model.load_state_dict(state)
    return ckpt
