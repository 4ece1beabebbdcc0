"""The one image-folder scanner: ROOT/CLASS/... -> (path, class index), every real directory once.

``os.walk(followlinks=True)`` has no loop check: ``ln -s .. train/a/up`` turned 12 images into 492
samples and gave class b's images to class a, and two self-links (``ln -s . l1; ln -s . l2``)
made the scan run forever. Here each directory is identified by its (device, inode) after
following links; one already visited (an ancestor: a loop; another class folder: a second label
for the same images) is skipped and named in a notice. Links to files and to directories outside
the tree are followed as before. Class folders are registered before any walk, so a link from
class a into class b leaves b's images labelled b.

Class names that would be ambiguous are refused: two class folders that are one directory (a
class folder linked under a second name), or names that differ only in case or Unicode form
(one class on a case-insensitive copy of the data, two here).
"""
from __future__ import annotations

import os
import unicodedata
from typing import Dict, List, Tuple

from ..notice import notice


class FolderScanError(ValueError):
    """A folder tree that cannot be scanned into unambiguous classes."""


def _key(path: str):
    st = os.stat(path)  # follows links
    return st.st_dev, st.st_ino


def class_folders(root: str) -> List[str]:
    """Sorted class folder names of ``root`` (directories, links to directories included),
    refused when two are one directory or differ only in case or Unicode form."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    seen: Dict[Tuple[int, int], str] = {}
    folded: Dict[str, str] = {}
    for c in classes:
        k = _key(os.path.join(root, c))
        if k in seen:
            raise FolderScanError(f"image folder {root!r}: class folders {seen[k]!r} and {c!r} "
                                  f"are the same directory (a link); their images would get two "
                                  f"labels. Remove one of them")
        seen[k] = c
        f = unicodedata.normalize("NFC", c).casefold()
        if f in folded:
            raise FolderScanError(f"image folder {root!r}: class folders {folded[f]!r} and {c!r} "
                                  f"differ only in case or Unicode form, so the class names are "
                                  f"ambiguous (one class on a case-insensitive file system). "
                                  f"Rename or merge them")
        folded[f] = c
    return classes


def scan(root: str, classes: List[str], extensions: Tuple[str, ...]
         ) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(samples, empty class names): files ending in ``extensions`` under each class folder,
    each real directory walked once. The order is the one the trainer always had (directories
    sorted by path, then files by name), so existing runs keep their data order."""
    visited = {_key(root): root}
    for c in classes:
        visited[_key(os.path.join(root, c))] = os.path.join(root, c)
    samples: List[Tuple[str, int]] = []
    empty: List[str] = []
    skipped: List[str] = []
    for ci, c in enumerate(classes):
        found = []  # (directory, its image names)
        stack = [os.path.join(root, c)]
        while stack:
            d = stack.pop()
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError as e:
                raise FolderScanError(f"cannot list {d!r}: {e.strerror or e}") from None
            subdirs, files = [], []
            for e in entries:
                try:
                    is_dir = e.is_dir()  # follows links; a broken link is neither
                except OSError:
                    continue
                if is_dir:
                    k = _key(e.path)
                    if k in visited:
                        skipped.append(f"{e.path} -> {visited[k]}")
                        continue
                    visited[k] = e.path
                    subdirs.append(e.path)
                elif e.name.lower().endswith(extensions) and e.is_file():
                    files.append(e.name)
            found.append((d, files))
            stack.extend(subdirs)
        for d, files in sorted(found):
            samples += [(os.path.join(d, f), ci) for f in files]
        if not any(files for _, files in found):
            empty.append(c)
    if skipped:
        notice(f"image folder {root!r}: skipped {len(skipped)} linked director"
               f"{'y' if len(skipped) == 1 else 'ies'} already scanned (a link loop or a second "
               f"path to the same images): {'; '.join(skipped[:3])}"
               f"{' ...' if len(skipped) > 3 else ''}")
    return samples, empty
