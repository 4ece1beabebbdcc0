"""timm and torchvision models behind the zoo's interface, with their own pretrained weights.

``timm:NAME`` / ``torchvision:NAME`` build the library's model; :class:`ExternalBackbone` exposes
``forward_features`` (the pooled pre-logit feature: for ViT/BEiT timm's
``forward_head(..., pre_logits=True)``, whose width sets GenDD's token count), ``num_features`` and
the linear classifier as ``fc``. Pretrained weights come through the libraries' own loading and
caching (``timm.create_model(pretrained=True)``, torchvision's weights enums). A local file is
read as tensors only and loaded strictly into the architecture built with the file's own class
count (``--teacher-pretrained`` then adds the architecture's pretrained input normalisation);
that is how the tests stay offline, and nothing is downloaded when a file is given.

Where the installed torchvision cannot load its compiled ops (a wheel built for another torch,
as on this project's CPU machines), it is imported without their Python registrations: see
:class:`_SkipOpRegistrations`. timm imports torchvision, so both then work on CPU.

A pretrained teacher expects its own input normalisation (BEiT: mean = std = 0.5): the adapter
maps the trainer's normalised images to it with one affine op, so the student and the teacher
each see the input they were trained on.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..thirdparty import _SkipOpRegistrations, import_library  # noqa: F401 (tests)
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
        return import_library(source)
    except Exception as e:  # noqa: BLE001 - ImportError, or a wheel failing in another way
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
def _classes_in(state, net, file: str) -> int:
    """The class count of a timm state dict: the rows of its classifier's weight."""
    key = (getattr(net, "pretrained_cfg", {}) or {}).get("classifier") or "fc"
    w = state.get(f"{key}.weight")
    if w is None:
        raise ValueError(f"teacher file {file!r} has no {key}.weight (the classifier of this "
                         f"architecture) - is it the right architecture?")
    return int(w.shape[0])


def _timm(arch: str, name: str, num_classes: int, pretrained: bool, file: Optional[str]):
    timm = import_source("timm", name)
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:12]}*")[:8]
        raise ValueError(f"timm has no model {arch!r}" + (f"; similar: {', '.join(close)}"
                                                           if close else ""))
    if pretrained and not file:
        try:
            net = timm.create_model(arch, pretrained=True)
        except (RuntimeError, OSError, ValueError) as e:
            raise ValueError(f"timm could not load pretrained weights for {arch!r} "
                             f"({type(e).__name__}: {e}); check the name (with its tag, e.g. "
                             f"beit_large_patch16_224.in22k_ft_in22k_in1k) and that the "
                             f"weights are downloadable or cached") from e
        return net, _timm_norm(net)
    if file:
        # A local file: built with the file's class count (a 10-class fine-tune is as valid as
        # ImageNet's 1000) and loaded strictly, tensors only; the normalisation is the
        # architecture's pretrained one when pretrained, else the trainer's own.
        state = read_state_dict(file, "teacher checkpoint")
        net = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        n = _classes_in(state, net, file)
        if n != num_classes:
            net.reset_classifier(n)  # create_external then names the mismatch
        load_into(net, file, "teacher checkpoint")
        return net, _timm_norm(net) if pretrained else None
    return timm.create_model(arch, pretrained=False, num_classes=num_classes), None


def _timm_norm(net):
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    norm = (tuple(cfg.get("mean", ())), tuple(cfg.get("std", ())))
    return norm if len(norm[0]) == 3 else None


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
        what = f"teacher file {weights!r}" if weights and os.path.isfile(weights) else \
            f"teacher {name!r}"
        hint = f"pass --num-classes {model.fc.out_features} if the data's labels fit it" \
            if model.fc.out_features > num_classes else "is it the right file?"
        raise ValueError(f"{what} classifies {model.fc.out_features} classes but the dataset "
                         f"has {num_classes}: {hint}")
    return model
