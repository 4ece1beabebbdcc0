"""DALI's mixed (nvJPEG) pipelines on the GPU, and the trainer on top of them."""
import os

import numpy as np
import torch
from PIL import Image

from gendd_fast.config import make_config
from gendd_fast.data import build_loaders


def jpeg_folder(root, n=12):
    g = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                Image.fromarray(g.randint(0, 256, (375, 500, 3)).astype(np.uint8)).save(
                    os.path.join(root, split, c, f"{i}.jpg"), quality=90)
    return str(root)


def test_mixed_decode_batches_are_cuda_channels_last(tmp_path):
    root = jpeg_folder(tmp_path)
    cfg = make_config(method="ce", dataset="imagefolder", data_path=root, batch_size=8,
                      data_backend="dali", workers=4).resolved()
    L = build_loaders(cfg, 0, 1, torch.device("cuda"))
    assert L.backend == "dali"
    L.train.set_epoch(0)
    x, y = next(iter(L.train))
    assert x.is_cuda and x.shape == (8, 3, 224, 224) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.is_cuda and y.dtype == torch.int64


def test_trainer_on_dali(tmp_path):
    from gendd_fast.train import train
    root = jpeg_folder(tmp_path / "data")
    cfg = make_config(method="ce", dataset="imagefolder", data_path=root, batch_size=8,
                      epochs=1, student="resnet18", data_backend="dali", amp="bf16",
                      channels_last=True, output=str(tmp_path / "run"), plot=False,
                      progress=False, device="cuda", image_size=64, val_resize=72)
    res = train(cfg)
    assert res["n"] == 24
