"""timm and torchvision imports, with torchvision's compiled-op registrations skipped where
those ops cannot load (a leaf module: the model layer and the data augmentations use it)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Sequence

from .notice import notice


class _SkipOpRegistrations(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports torchvision's two modules that register Python kernels for its compiled ops
    (``nms``, ``roi_align``, ...) as empty modules, but only when those ops failed to load.

    Why: a torchvision wheel built for another torch (here a CUDA build next to the CPU torch)
    cannot load ``torchvision/_C.so``; its import then dies in ``_meta_registrations`` with
    "operator torchvision::nms does not exist", and timm, which imports torchvision, dies with
    it. The classification models and transforms timm and the teachers use need none of those
    ops. Where ``_C.so`` loads (a matching torch, GPU machines) this finder returns None and
    torchvision imports exactly as usual. It is on ``sys.meta_path`` only for the duration of
    :func:`import_source`."""
    SKIPPED = ("torchvision._meta_registrations", "torchvision._autograd_registrations")

    def __init__(self):
        self.used = False

    def find_spec(self, fullname, path, target=None):
        ext = sys.modules.get("torchvision.extension")
        if fullname not in self.SKIPPED or ext is None or ext._has_ops():
            return None
        self.used = True
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module):
        module.__doc__ = "skipped by gendd_fast: torchvision's compiled ops are not loaded"


def _import_with_skip(modules: Sequence[str]):
    finder = _SkipOpRegistrations()
    sys.meta_path.insert(0, finder)
    try:
        out = [importlib.import_module(m) for m in modules]
    finally:
        sys.meta_path.remove(finder)
    if finder.used:
        notice("torchvision's compiled ops do not load with this torch (a wheel built for "
               "another torch); imported without them: classification models work, detection "
               "ops such as nms do not", once=True)
    return out


def import_library(source: str):
    """``timm`` (torchvision first, through the skip) or ``torchvision`` (with its models)."""
    if source == "timm":
        if importlib.util.find_spec("torchvision") is not None:
            _import_with_skip(["torchvision", "torchvision.models"])
        return _import_with_skip(["timm"])[0]
    return _import_with_skip(["torchvision", "torchvision.models"])[0]
