"""gendd_fast.data.datasets: the CIFAR reader (real pickle layouts, no code run from a file,
labels out of range named) and corrupt images named, in the main process and in a worker."""
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

from gendd_fast.config import make_config
from gendd_fast.data import BadImageError, DatasetError, build_datasets
from gendd_fast.data.datasets import load_cifar_arrays
from helpers import _env, _folder_cmd, _image_folder, _Payload


# Hostile input and faults (moved from the campaign file test_hardening.py): no code runs from a
# checkpoint or a CIFAR file, signals and full disks are survived with a clear message, and nothing
# on disk is silently lost or left stale.


def _write_cifar10(root, n=20, protocol=pickle.DEFAULT_PROTOCOL, payload=None, labels=None):
    """A tiny CIFAR-10 python folder: the real files' layout (dict of bytes keys, a uint8
    (N, 3072) array and a list of labels)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"batch_label": b"fake", b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
                 b"labels": list(labels if labels is not None else rng.randint(0, 10, n).tolist()),
                 b"filenames": [b"x.png"] * n}
        if payload is not None and name == "data_batch_1":
            entry[b"extra"] = payload
        with open(d / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=protocol)
    return str(root)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5])
def test_cifar_reader_loads_real_layout(tmp_path, protocol):
    root = _write_cifar10(tmp_path, protocol=protocol)
    (xtr, ytr), (xva, yva) = load_cifar_arrays(root, 10)
    assert xtr.shape == (100, 32, 32, 3) and xtr.dtype == np.uint8 and len(ytr) == 100
    assert xva.shape == (20, 32, 32, 3)
    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "rb") as fh:
        raw = pickle.load(fh)
    assert np.array_equal(xva, raw[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_cifar_reader_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    root = _write_cifar10(tmp_path / "c", payload=_Payload(marker))
    with pytest.raises(DatasetError, match=r"data_batch_1.*refused to load posix.system"):
        load_cifar_arrays(root, 10)
    assert not marker.exists(), "the CIFAR file's payload ran"


def test_cifar_labels_out_of_range_are_named(tmp_path):
    root = _write_cifar10(tmp_path, labels=[0, 1, 2, 10] * 5)
    cfg = make_config(method="ce", dataset="cifar10", data_path=root).resolved()
    with pytest.raises(DatasetError, match=r"label 10 .* out of range for 10 classes"):
        build_datasets(cfg)


# -- 8. corrupt images: named, on every path ------------------------------------------------------
def test_corrupt_jpeg_in_the_main_process_is_named(tmp_path):
    from gendd_fast.data import build_loaders
    data = _image_folder(tmp_path / "data")
    with open(os.path.join(data, "train", "a", "zz_broken.jpg"), "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    cfg = make_config(method="ce", dataset="imagefolder", data_path=data, image_size=16,
                      batch_size=4, workers=0, device="cpu").resolved()
    loaders = build_loaders(cfg, 0, 1, torch.device("cpu"))
    loaders.train.set_epoch(0)
    with pytest.raises(BadImageError, match=r"cannot decode image .*zz_broken.jpg.*"
                                            r"--skip-bad-images"):
        list(loaders.train)


def test_corrupt_jpeg_in_a_worker_is_one_line(tmp_path):
    """Through a DataLoader worker the error used to arrive wrapped in the worker's traceback,
    and the CLI printed a raw traceback."""
    data = _image_folder(tmp_path / "data")
    with open(os.path.join(data, "train", "a", "zz_broken.jpg"), "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    cmd = _folder_cmd(data, str(tmp_path / "run"), "--epochs", "1", "--workers", "1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env())
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: cannot decode image") and "zz_broken.jpg" in err
    assert "--skip-bad-images" in err
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
