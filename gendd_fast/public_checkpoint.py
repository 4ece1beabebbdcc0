"""Checkpoints written by the public GenDD code, read into gendd_fast's names.

The public code saves its ``DiffModel`` whole. Its keys:

- ``model.*``: the student (its own classifier is ``model.fc``);
- ``classifier.*``: the teacher's frozen classifier; ``cls_centers``: a buffer copy of its weight;
- ``chunk_idx``: the token indices ``0..L-1`` (a buffer);
- ``cls_projector.0.*`` (the condition LayerNorm) and ``diffloss.net.*`` (the head) in stage 2,
  ``proj.*`` in stage 1.

CIFAR scripts save ``{'model': state, 'epoch', 'best_acc'}`` (``*_last.pth`` adds the run's
``argparse.Namespace`` as ``opt``); ImageNet scripts save ``{'state_dict': state, ...}`` from a
DistributedDataParallel model, so every key starts with ``module.``. gendd_fast names the same
tensors ``student.*``, ``teacher_fc.*``, ``cls_projector.0.*``, ``diffloss.net.*``, ``proj.*``
(``chunk_idx`` and ``cls_centers`` are derived, not stored).

Files are read with ``torch.load(weights_only=True)``: nothing in them is executed.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

import torch

from .checkpoint import (load_matching, read_checkpoint, read_weights, state_dict_in,
                         unfinished_stage)

TOP = ("model.", "classifier.", "cls_projector.", "diffloss.", "proj.")
BUFFERS = ("cls_centers", "chunk_idx")


class PublicCheckpointError(ValueError):
    """A file that claims the public layout but cannot be used as asked."""


def read(path: str) -> Any:
    """:func:`checkpoint.read_checkpoint`, with the CIFAR scripts' ``argparse.Namespace`` the one
    class let through (it only holds the run's options)."""
    return read_checkpoint(path, "checkpoint", allow=[argparse.Namespace])


def is_public(state: Optional[Dict[str, torch.Tensor]]) -> bool:
    """A ``DiffModel`` state: a ``model.*`` student and nothing outside the public names."""
    return bool(state) and any(k.startswith("model.") for k in state) and all(
        k.startswith(TOP) or k in BUFFERS for k in state)


def read_public(path: str) -> Optional[Dict[str, torch.Tensor]]:
    """The state dict of ``path`` when it is a public GenDD checkpoint, else None (any other
    file, including gendd_fast's own checkpoints, is left to the caller's loader)."""
    try:
        state = state_dict_in(read(path))
    except Exception:  # noqa: BLE001 - not loadable this way: not a public checkpoint
        return None
    return state if is_public(state) else None


def student_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The student's own state dict (``model.*``), classifier renamed to ``fc`` if needed."""
    from .models import remap_classifier_keys
    sub = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return remap_classifier_keys(sub, torch.nn.Module())


def to_gendd_fast(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A public ``DiffModel`` state under gendd_fast's distiller names."""
    out = {"student." + k: v for k, v in student_state(state).items()}
    for k, v in state.items():
        if k.startswith("classifier."):
            out["teacher_fc." + k[len("classifier."):]] = v
        elif k.startswith(("cls_projector.", "diffloss.", "proj.")):
            out[k] = v
    if "teacher_fc.weight" not in out and "cls_centers" in state:
        out["teacher_fc.weight"] = state["cls_centers"]
    return out


def as_trainer_checkpoint(state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """``{'model': student, 'extra': the rest}``, the shape of gendd_fast's own checkpoints."""
    own = to_gendd_fast(state)
    return {"model": {k[len("student."):]: v for k, v in own.items() if k.startswith("student.")},
            "extra": {k: v for k, v in own.items() if not k.startswith("student.")}}


def inferred_config(state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Config fields the tensors fix: method, head width/depth, token size, class count."""
    out: Dict[str, Any] = {}
    w = state.get("diffloss.net.input_proj.weight")
    if w is not None:
        out.update(method="gendd", diffloss_w=int(w.shape[0]), token_dim=int(w.shape[1]))
        blocks = {k.split(".")[3] for k in state if k.startswith("diffloss.net.res_blocks.")}
        out["diffloss_d"] = len(blocks)
    elif any(k.startswith("proj.") for k in state) or "classifier.weight" in state:
        out["method"] = "gendd-pretrain"
    cls = state.get("classifier.weight", state.get("cls_centers"))
    if cls is not None:
        out["num_classes"] = int(cls.shape[0])
    return out


def load_student_weights(path: str, student: torch.nn.Module) -> str:
    """``--init`` (the one loader of it): the student's tensors of a checkpoint of ours (its
    ``model``) or of a public GenDD checkpoint (its ``model.*``), non-strictly, as the public
    code reloads stage 1."""
    state = read_public(path)
    if state is None:
        return load_matching(read_weights(path, "initial weights", check=unfinished_stage),
                             student, path)
    return load_matching(student_state(state), student, path, "public GenDD layout",
                         PublicCheckpointError)


def load_teacher_weights(path: str, model: torch.nn.Module, what: str = "teacher"):
    """``--teacher-checkpoint``: the student of a public GenDD checkpoint, strictly; any other
    file (a plain ``{'model'|'state_dict': ...}`` teacher, ours) goes to the zoo's loader."""
    from .models import load_checkpoint_weights
    state = read_public(path)
    if state is None:
        return load_checkpoint_weights(path, model, what)
    return load_public_teacher(state, model, path, what)


def load_public_teacher(state: Dict[str, torch.Tensor], model: torch.nn.Module, path: str,
                        what: str = "teacher"):
    """The ``model.*`` of a public GenDD state into ``model``, strictly."""
    sub = student_state(state)
    missing = sorted(set(model.state_dict()) - set(sub))
    unexpected = sorted(set(sub) - set(model.state_dict()))
    if missing or unexpected:
        raise PublicCheckpointError(
            f"{what} checkpoint {path!r} (public GenDD layout): its model.* does not match "
            f"{type(model).__name__}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    from .checkpoint import weight_problem
    why = weight_problem(sub, model.state_dict(), path, what)
    if why:
        raise PublicCheckpointError(why)
    model.load_state_dict(sub)
    return {"model": sub}
