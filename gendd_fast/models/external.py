"""timm and torchvision models behind the zoo's interface, with their own pretrained weights.

``timm:NAME`` / ``torchvision:NAME`` build the library's model; :class:`ExternalBackbone` exposes
``forward_features`` (the pooled pre-logit feature: for ViT/BEiT timm's
``forward_head(..., pre_logits=True)``, whose width sets GenDD's token count), ``num_features`` and
the linear classifier as ``fc``. Pretrained weights come through the libraries' own loading and
caching (``timm.create_model(pretrained=True)``, torchvision's weights enums); a local file goes
through the same calls (timm's ``pretrained_cfg_overlay=dict(file=...)``; for torchvision the
architecture's own ``load_state_dict``), which is how the tests stay offline.

A pretrained teacher expects its own input normalisation (BEiT: mean = std = 0.5): the adapter
maps the trainer's normalised images to it with one affine op, so the student and the teacher
each see the input they were trained on.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .base import Backbone

SOURCES = ("timm", "torchvision")


def split_name(name: str) -> Tuple[str, str]:
    source, _, arch = name.partition(":")
    if source not in SOURCES or not arch:
        raise ValueError(f"model {name!r}: external models are named timm:NAME or "
                         f"torchvision:NAME")
    return source, arch


def import_source(source: str, name: str):
    try:
        if source == "timm":
            import timm
            return timm
        import torchvision
        import torchvision.models  # noqa: F401
        return torchvision
    except Exception as e:  # noqa: BLE001 - ImportError, or a CUDA-linked wheel failing on CPU
        from . import list_models
        raise ImportError(f"model {name!r} needs the '{source}' package, which is not "
                          f"importable here ({type(e).__name__}: {e}); use a zoo model: "
                          f"{', '.join(list_models(external=False))}") from e


def source_available(source: str) -> bool:
    try:
        import_source(source, source + ":")
        return True
    except ImportError:
        return False


def _last_linear(head: nn.Module) -> nn.Linear:
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"the classifier {type(head).__name__} holds no linear layer")
    return linears[-1]


class ExternalBackbone(Backbone):
    """Adapts a timm model (``forward_features``/``forward_head``/``get_classifier``) or a
    torchvision-style classifier (a ``fc``/``classifier``/``heads``/``head`` attribute ending in
    a Linear) to the zoo's interface. ``input_affine`` = (scale, shift) per channel maps the
    trainer's normalised input to the one the network expects."""

    def __init__(self, net: nn.Module, source: str,
                 input_affine: Optional[Tuple[Sequence[float], Sequence[float]]] = None):
        super().__init__()
        self.net, self.source = net, source
        if source == "timm":
            self.fc = _last_linear(net.get_classifier())
            self.num_features = self.fc.in_features
            net.reset_classifier(0)  # forward_head(pre_logits=True) is then the pooled feature
        else:
            head_name = next((n for n in ("fc", "classifier", "heads", "head")
                              if isinstance(getattr(net, n, None), nn.Module)), None)
            if head_name is None:
                raise ValueError(f"{type(net).__name__} has no recognisable classifier "
                                 f"(fc, classifier, heads or head)")
            head = getattr(net, head_name)
            self.fc = _last_linear(head)
            self.num_features = self.fc.in_features
            if head is self.fc:
                setattr(net, head_name, nn.Identity())
            else:  # e.g. Sequential(Dropout, Linear): keep everything but the last Linear
                for parent in head.modules():
                    for child_name, child in parent.named_children():
                        if child is self.fc:
                            setattr(parent, child_name, nn.Identity())
        scale, shift = input_affine if input_affine is not None else ((1.0,) * 3, (0.0,) * 3)
        self.register_buffer("in_scale", torch.tensor(scale).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("in_shift", torch.tensor(shift).view(1, -1, 1, 1), persistent=False)
        self.renormalise = input_affine is not None

    def forward_features(self, x):
        if self.renormalise:
            x = x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)
        if self.source == "timm":
            return self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return self.net(x)


def renormalisation(data_norm, model_norm):
    """(scale, shift) taking x normalised with ``data_norm`` = (mean, std) to ``model_norm``:
    ((x * s_d + m_d) - m_t) / s_t. None when the two agree."""
    (m_d, s_d), (m_t, s_t) = data_norm, model_norm
    if all(abs(a - b) < 1e-6 for a, b in zip(list(m_d) + list(s_d), list(m_t) + list(s_t))):
        return None
    scale = [sd / st for sd, st in zip(s_d, s_t)]
    shift = [(md - mt) / st for md, st, mt in zip(m_d, s_t, m_t)]
    return scale, shift


def read_state_dict(path: str, what: str):
    """A state dict from a local file (``{'model'|'state_dict': sd}`` or bare), never unpickled:
    the package's one weights reader (:func:`gendd_fast.checkpoint.read_weights`)."""
    from ..checkpoint import read_weights
    return read_weights(path, what)


def load_into(net: nn.Module, path: str, what: str):
    state = read_state_dict(path, what)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{what} {path!r} does not fit {type(net).__name__}: "
                         f"{str(e).splitlines()[0]} - is it the right architecture?") from e


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------
def _timm(arch: str, name: str, num_classes: int, pretrained: bool, file: Optional[str]):
    timm = import_source("timm", name)
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:12]}*")[:8]
        raise ValueError(f"timm has no model {arch!r}" + (f"; similar: {', '.join(close)}"
                                                           if close else ""))
    if pretrained:
        kw = {"pretrained_cfg_overlay": dict(file=file)} if file else {}
        try:
            net = timm.create_model(arch, pretrained=True, **kw)
        except (RuntimeError, OSError, ValueError) as e:
            raise ValueError(f"timm could not load pretrained weights for {arch!r} "
                             f"({type(e).__name__}: {e}); check the name (with its tag, e.g. "
                             f"beit_large_patch16_224.in22k_ft_in22k_in1k) and that the "
                             f"weights are downloadable or cached") from e
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        norm = (tuple(cfg.get("mean", ())), tuple(cfg.get("std", ())))
        return net, norm if len(norm[0]) == 3 else None
    net = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    if file:
        load_into(net, file, "teacher checkpoint")
    return net, None


def _torchvision(arch: str, name: str, num_classes: int, weights: Optional[str]):
    tv = import_source("torchvision", name)
    known = tv.models.list_models()
    if arch not in known:
        raise ValueError(f"torchvision has no model {arch!r}; valid: {', '.join(known)}")
    if weights and not os.path.isfile(weights):
        enum = tv.models.get_model_weights(arch)
        try:
            w = enum[weights]
        except KeyError:
            raise ValueError(f"torchvision {arch}: unknown weights {weights!r}; valid: "
                             f"{', '.join(['DEFAULT'] + [e.name for e in enum])} (or a local "
                             f"state-dict file)") from None
        net = tv.models.get_model(arch, weights=w)
        t = w.transforms()
        return net, (tuple(t.mean), tuple(t.std))
    net = tv.models.get_model(arch, weights=None, num_classes=num_classes)
    if weights:
        load_into(net, weights, "teacher weights")
    return net, None


def create_external(name: str, num_classes: int, pretrained: bool = False,
                    weights: Optional[str] = None, data_norm=None) -> ExternalBackbone:
    """``timm:NAME`` (``pretrained``; ``weights`` = a local file for timm's loader) or
    ``torchvision:NAME`` (``weights`` = an enum name such as DEFAULT, or a local file).
    ``data_norm`` (mean, std) of the trainer's input, to renormalise for pretrained weights."""
    source, arch = split_name(name)
    if source == "timm":
        net, norm = _timm(arch, name, num_classes, pretrained, weights)
    else:
        net, norm = _torchvision(arch, name, num_classes, weights)
    affine = renormalisation(data_norm, norm) if (data_norm and norm) else None
    model = ExternalBackbone(net, source, affine)
    if model.fc.out_features != num_classes:
        raise ValueError(f"teacher {name!r} classifies {model.fc.out_features} classes but the "
                         f"dataset has {num_classes}: a pretrained ImageNet teacher needs "
                         f"ImageNet-1k labels (or --num-classes {model.fc.out_features})")
    return model
