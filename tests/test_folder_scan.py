"""The folder scanner (gendd_fast/data/folder_scan.py) on real symlinks, as the probe made them.
Each test failed on main (os.walk(followlinks=True) without a loop check), as its docstring says."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gendd_fast.config import make_config
from gendd_fast.data import DatasetError, build_datasets
from gendd_fast.data.datasets import scan_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder(root, classes=("a", "b"), n=6):
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(d / f"{i}.png")
    return root


def test_link_to_the_parent_neither_multiplies_nor_relabels(tmp_path, capsys):
    """`ln -s .. train/a/up`: on main 12 images became hundreds of samples and class b's images
    were also labelled a. Now: 12 samples, each with its own class, and the skipped link named."""
    root = _folder(tmp_path)
    os.symlink("..", root / "train" / "a" / "up")
    samples, classes = scan_image_folder(str(root / "train"))
    assert classes == ["a", "b"] and len(samples) == 12
    for path, label in samples:
        assert os.path.basename(os.path.dirname(path)) == classes[label]
    assert "up" in capsys.readouterr().err


def test_link_into_another_class_keeps_its_label(tmp_path):
    """A link from class a to class b's folder would give b's images a second label (a)."""
    root = _folder(tmp_path)
    os.symlink(os.path.join("..", "b"), root / "train" / "a" / "b_again")
    samples, _ = scan_image_folder(str(root / "train"))
    assert len(samples) == 12 and sum(label == 1 for _, label in samples) == 6


def test_two_self_links_do_not_hang(tmp_path):
    """`ln -s . l1; ln -s . l2` in a class folder: on main the scan ran forever (2^depth paths),
    no output; the subprocess here timed out. Now it ends at once with the images counted once."""
    root = _folder(tmp_path)
    os.symlink(".", root / "train" / "a" / "l1")
    os.symlink(".", root / "train" / "a" / "l2")
    code = ("import sys; from gendd_fast.data.datasets import scan_image_folder; "
            "print(len(scan_image_folder(sys.argv[1])[0]))")
    try:
        r = subprocess.run([sys.executable, "-c", code, str(root / "train")], cwd=REPO,
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        pytest.fail("the folder scan did not end within 60 s (symlink loop)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "12"


def test_a_class_folder_linked_under_a_second_name_is_refused(tmp_path):
    """`ln -s a c` at the class level: one directory, two class names (main: trained on both)."""
    root = _folder(tmp_path)
    os.symlink("a", root / "train" / "c")
    with pytest.raises(DatasetError, match="'a' and 'c' are the same directory"):
        scan_image_folder(str(root / "train"))


def test_class_names_differing_only_in_case_are_refused(tmp_path):
    """'Cat' and 'cat' are one class on a case-insensitive copy of the data (main: two)."""
    root = _folder(tmp_path, classes=("Cat", "cat"))
    with pytest.raises(DatasetError, match="differ only in case"):
        scan_image_folder(str(root / "train"))


def test_single_class_folder_is_refused(tmp_path):
    """A folder with one class trained and reported top-1 100.00 on main, although
    --num-classes 1 is refused. Now the data are refused by name."""
    root = _folder(tmp_path, classes=("only",))
    cfg = make_config(method="ce", dataset="imagefolder", data_path=str(root), image_size=8,
                      batch_size=4, workers=0, device="cpu").resolved()
    with pytest.raises(DatasetError, match="single class"):
        build_datasets(cfg)


def test_sample_order_is_the_one_the_trainer_always_had(tmp_path):
    """Nested folders come out as sorted(os.walk(...)) gave them, so existing runs keep their
    data order (a guard for the rewrite, not a probe failure: it passes on main too)."""
    root = _folder(tmp_path)
    for sub in ("s", "s-x", "s/deeper"):
        d = root / "train" / "a" / sub
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "z.png")
    samples, _ = scan_image_folder(str(root / "train"))
    expected = []
    for ci, c in enumerate(("a", "b")):
        for dirpath, _, files in sorted(os.walk(root / "train" / c)):
            expected += [(os.path.join(dirpath, f), ci) for f in sorted(files)]
    assert samples == expected
