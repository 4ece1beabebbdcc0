"""16-bit and float images keep their true range on both data paths (gendd_fast/data/pixels.py).
On main the torch path used convert("RGB"): a 16-bit PNG came out saturated at 255 and a float
TIFF in [0, 1] came out black; each test below failed there, as its docstring says."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gendd_fast.config import make_config
from gendd_fast.data import BadImageError, build_loaders, dali
from gendd_fast.data.datasets import ImageFileDataset

DEV = torch.device("cpu")


def _gray16(h, w, seed):
    return np.random.RandomState(seed).randint(0, 65536, (h, w)).astype(np.uint16)


def _float01(h, w, seed):
    return np.random.RandomState(seed).rand(h, w).astype(np.float32)


def _folder(root, kind):
    """train/ and val/ with two classes of 36x36 images (no resize on the val path)."""
    for split in ("train", "val"):
        for ci, c in enumerate(("a", "b")):
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(3):
                if kind == "png16":
                    Image.fromarray(_gray16(36, 36, 10 * ci + i)).save(os.path.join(d, f"{i}.png"))
                else:
                    Image.fromarray(_float01(36, 36, 10 * ci + i), mode="F").save(
                        os.path.join(d, f"{i}.tiff"))
    return str(root)


def _expected(kind, seed):
    if kind == "png16":
        return (_gray16(36, 36, seed).astype(np.int64) * 255 + 32767) // 65535
    return np.floor(_float01(36, 36, seed) * np.float32(255) + np.float32(0.5)).astype(np.int64)


@pytest.mark.parametrize("kind", ["png16", "float_tiff"])
def test_torch_path_keeps_the_true_range(tmp_path, kind):
    """The decoded 8-bit levels are the file's values scaled by their range (round half up)."""
    root = _folder(tmp_path, kind)
    ext = "png" if kind == "png16" else "tiff"
    ds = ImageFileDataset([(os.path.join(root, "val", "a", f"0.{ext}"), 0)], False, 36, 36)
    x, _ = ds[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 36, 36)
    want = torch.from_numpy(_expected(kind, 0)).to(torch.uint8)
    for c in range(3):
        assert torch.equal(x[c], want)
    # not saturated, not black: the probe's symptoms
    assert 0.2 < (x.float().mean() / 255) < 0.8


@pytest.mark.parametrize("kind", ["png16", "float_tiff"])
def test_dali_and_torch_give_the_same_pixels(tmp_path, kind):
    """The DALI path (CPU decoders here) and the DataLoader path give identical validation
    batches for 16-bit and float images (on main the torch side was saturated / black)."""
    assert dali.available()
    root = _folder(tmp_path, kind)
    out = {}
    for backend in ("dali", "torch"):
        cfg = make_config(method="ce", dataset="imagefolder", data_path=root, image_size=36,
                          val_resize=36, batch_size=2, eval_batch_size=6, workers=0,
                          data_backend=backend).resolved()
        L = build_loaders(cfg, 0, 1, DEV)
        assert L.backend == backend
        L.val.set_epoch(0)
        out[backend] = torch.cat([b[0] for b in L.val])
    torch.testing.assert_close(out["dali"], out["torch"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_float_image_outside_0_1_is_refused_by_name_on_both_paths(tmp_path, backend):
    """A float TIFF with values outside [0, 1] has no knowable range: refused before the run on
    either path, naming the file (main: the torch path made it black or clipped, DALI
    rescaled it by its own rule)."""
    root = _folder(tmp_path, "float_tiff")
    bad = os.path.join(root, "train", "b", "hdr.tiff")
    Image.fromarray(_float01(36, 36, 99) * 4 - 1, mode="F").save(bad)
    cfg = make_config(method="ce", dataset="imagefolder", data_path=root, image_size=36,
                      val_resize=36, batch_size=2, workers=0, data_backend=backend).resolved()
    with pytest.raises(BadImageError, match=r"hdr\.tiff.*not \[0, 1\]"):
        build_loaders(cfg, 0, 1, DEV)


def test_eight_bit_images_are_unchanged(tmp_path):
    """RGB, palette and grayscale 8-bit files decode exactly as before (a guard for the new
    rule; passes on main too)."""
    arr = np.random.RandomState(0).randint(0, 256, (20, 20, 3), dtype=np.uint8)
    paths = []
    for mode in ("RGB", "L", "P"):
        p = tmp_path / f"{mode}.png"
        im = Image.fromarray(arr)
        (im if mode == "RGB" else im.convert(mode)).save(p)
        paths.append((str(p), 0))
    ds = ImageFileDataset(paths, False, 20, 20)
    for i, (p, _) in enumerate(paths):
        want = torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(ds[i][0], want)
