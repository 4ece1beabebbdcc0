"""Where the package's top-level folders are: ``kernels/`` (the Triton kernels, imported as
``gendd_fast.kernels``), ``csrc/`` (the sampler extension's sources) and ``configs/`` (the
paper's recipes).

They sit at the top of the repository, beside ``gendd_fast/`` (the layout the README's table
describes). ``setup.py`` maps them into the package (``package_dir``), so an installed copy has
them at ``gendd_fast/kernels`` and so on. A source checkout run without installing it (the tests,
``python -m gendd_fast.cli`` from the repository root) finds them here instead: :func:`folder`
names the directory, and :func:`map_kernels` lets ``import gendd_fast.kernels`` load the
checkout's own ``kernels/``, never another copy's.
"""
import importlib.abc
import importlib.util
import os
import sys

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
TOP_DIR = os.path.dirname(PACKAGE_DIR)
# the folders setup.py maps into the package (its package_dir says the same; tests hold them)
MAPPED = ("kernels", "csrc", "configs")


def is_checkout() -> bool:
    """True when this package is a source checkout's ``gendd_fast/`` (setup.py beside it and the
    mapped folders at the top), False for an installed copy (the folders inside it)."""
    return (not os.path.isdir(os.path.join(PACKAGE_DIR, "kernels"))
            and os.path.isfile(os.path.join(TOP_DIR, "setup.py"))
            and os.path.isfile(os.path.join(TOP_DIR, "kernels", "__init__.py")))


def folder(name: str) -> str:
    """The directory of the mapped folder ``name`` (one of :data:`MAPPED`)."""
    if name not in MAPPED:
        raise ValueError(f"{name!r} is not one of the package's mapped folders {MAPPED}")
    return os.path.join(TOP_DIR if is_checkout() else PACKAGE_DIR, name)


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """Answers ``gendd_fast.kernels`` with the checkout's top-level ``kernels/``; its modules
    are then found through the package's ``__path__`` as usual."""

    def __init__(self, path):
        self.path = path

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "gendd_fast.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(self.path, "__init__.py"),
            submodule_search_locations=[self.path])


def map_kernels():
    """In a source checkout, make ``gendd_fast.kernels`` this checkout's ``kernels/`` (first in
    the import system, so an editable install of another checkout cannot answer instead)."""
    if not is_checkout():
        return
    path = os.path.join(TOP_DIR, "kernels")
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _KernelsFinder)]
    sys.meta_path.insert(0, _KernelsFinder(path))
