"""Configs and recipes; the host data path: datasets, sharded resumable sampling, normalisation."""
import glob
import io
import os
import pickle
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from gendd_fast.config import CONFIG_DIR, config_from_args, load_yaml, make_config
from gendd_fast.data import EpochSampler, build_datasets, build_loaders
from gendd_fast.data.datasets import WebDatasetShards, load_digits_arrays
from gendd_fast.data.transforms import normalization_for, random_resized_crop_box


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))))
def test_every_recipe_loads(path):
    extra = []
    data = load_yaml(path)
    if data["method"] != "ce" and "teacher" not in data:
        extra = ["--teacher", "resnet32x4", "--student", "resnet8x4"]
    cfg, _ = config_from_args(["--config", path] + extra)
    assert cfg.method == data["method"]
    if cfg.method == "gendd":
        assert (cfg.token_dim, cfg.diffloss_w, cfg.diffloss_d, cfg.cond_drop) == (64, 1024, 3, 0.2)
        assert cfg.mul == (30 if cfg.dataset == "cifar100" else 10)


def test_cli_overrides_recipe_and_recipe_overrides_defaults():
    cfg, _ = config_from_args(["--config", "cifar100_resnet32x4_resnet8x4", "--lr", "0.5",
                               "--channels-last", "--no-plot", "--betas", "0.9", "0.96"])
    assert cfg.smooth == 0.7 and cfg.lr == 0.5 and cfg.channels_last and not cfg.plot
    assert cfg.betas == [0.9, 0.96] and cfg.epochs == 240


def test_unknown_recipe_field_and_missing_recipe(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("method: ce\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown fields \['learning_rate'\]"):
        config_from_args(["--config", str(p)])
    with pytest.raises(FileNotFoundError, match="config 'nope' not found"):
        config_from_args(["--config", "nope"])


def test_resolved_defaults_follow_the_dataset():
    c = make_config(method="ce", dataset="cifar100").resolved()
    assert (c.image_size, c.mul) == (32, 30)
    i = make_config(method="ce", dataset="imagefolder").resolved()
    assert (i.image_size, i.val_resize, i.mul) == (224, 256, 10)


def test_epoch_sampler_shards_and_resumes():
    n, world = 23, 2
    shards = [list(EpochSampler(n, r, world, shuffle=True, seed=5)) for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == 12
    assert {i for s in shards for i, _ in s} == set(range(n))
    again = list(EpochSampler(n, 0, world, shuffle=True, seed=5))
    assert again == shards[0]  # a function of (seed, epoch) only
    s = EpochSampler(n, 0, world, shuffle=True, seed=5)
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in shards[0]]
    s.set_epoch(1, skip=5)
    full = EpochSampler(n, 0, world, shuffle=True, seed=5)
    full.set_epoch(1)
    assert list(s) == list(full)[5:] and len(s) == 7
    # evaluation: every sample exactly once over the ranks, nothing padded
    val = [[i for i, _ in EpochSampler(n, r, world, shuffle=False)] for r in range(world)]
    assert sorted(val[0] + val[1]) == list(range(n))


def test_augmentation_depends_on_the_sample_seed_only():
    cfg = make_config(method="ce", dataset="synthetic", synthetic_size=32).resolved()
    train, val, nc = build_datasets(cfg)
    a, b = train[(3, 777)], train[(3, 777)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert any(not torch.equal(train[(3, s)][0], a[0]) for s in range(20))
    assert torch.equal(val[(3, 1)][0], val[(3, 2)][0])  # no randomness in evaluation


def test_digits_split_is_stratified_and_fixed():
    (xtr, ytr), (xva, yva) = load_digits_arrays()
    assert xtr.shape == (1438, 32, 32, 3) and xva.shape == (359, 32, 32, 3)
    assert xtr.dtype == np.uint8 and sorted(set(yva.tolist())) == list(range(10))
    assert np.equal(load_digits_arrays()[1][1], yva).all()


def _fake_cifar100(root):
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d)
    g = np.random.RandomState(0)
    for name, n in (("train", 20), ("test", 10)):
        with open(os.path.join(d, name), "wb") as fh:
            pickle.dump({b"data": g.randint(0, 256, (n, 3072)).astype(np.uint8),
                         b"fine_labels": g.randint(0, 100, n).tolist()}, fh)


def test_cifar_pickles_and_loader_normalisation(tmp_path):
    _fake_cifar100(str(tmp_path))
    cfg = make_config(method="ce", dataset="cifar100", data_path=str(tmp_path), batch_size=4,
                      eval_batch_size=3, channels_last=True, workers=0).resolved()
    loaders = build_loaders(cfg, 0, 1, torch.device("cpu"))
    assert loaders.num_classes == 100 and len(loaders.train) == 5 and len(loaders.val) == 4
    x, y = next(iter(loaders.val))
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    raw = loaders.val.dataset[0][0].float()
    mean, std = normalization_for("cifar100")
    want = (raw / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(x[0], want, rtol=1e-5, atol=1e-5)


def _jpegs(root, classes=("a", "b"), per_class=3, size=(50, 40)):
    g = np.random.RandomState(1)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            arr = g.randint(0, 256, (size[1], size[0], 3)).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(root, c, f"{i}.jpg"), quality=90)


def test_imagefolder_and_file_list(tmp_path):
    _jpegs(str(tmp_path / "train"))
    _jpegs(str(tmp_path / "val"), per_class=2)
    cfg = make_config(method="ce", dataset="imagefolder", data_path=str(tmp_path),
                      image_size=24, val_resize=28).resolved()
    train, val, nc = build_datasets(cfg)
    assert nc == 2 and len(train) == 6 and len(val) == 4
    x, y = train[(0, 3)]
    assert x.shape == (3, 24, 24) and x.dtype == torch.uint8
    lst = tmp_path / "list.txt"
    lst.write_text("train/a/0.jpg 0\ntrain/b/1.jpg 1\n\nval/b/0.jpg 1\n")
    cfg = make_config(method="ce", dataset="filelist", data_path=str(tmp_path),
                      train_list="list.txt", val_list="list.txt", image_size=24).resolved()
    train, val, nc = build_datasets(cfg)
    assert nc == 2 and len(train) == 3 and [s[1] for s in val.samples] == [0, 1, 1]


def test_random_resized_crop_box_stays_inside():
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(10, 300), rng.randint(10, 300)
        x, y, cw, ch = random_resized_crop_box(w, h, (0.08, 1.0), rng)
        assert 0 <= x and 0 <= y and x + cw <= w and y + ch <= h and cw > 0 and ch > 0


def test_webdataset_shards(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (30, 20), (i * 60, 0, 0)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    ds = WebDatasetShards(str(tmp_path), train=True, image_size=16, val_resize=16)
    assert len(ds) == 3
    x, y = ds[(1, 5)]
    assert x.shape == (3, 16, 16) and y == -1  # unlabelled


def test_ranges_and_choices_come_from_the_field_declarations():
    """field_range / field_choices answer from each field's one declaration, and validation
    checks every declared range (a new field with a range is checked without more code).
    Planted: smooth declared without its range: the [0, 1) refusal below passes silently."""
    import dataclasses
    from gendd_fast.config import Config, Range, field_choices, field_range, validate
    assert field_range("smooth") == Range(0, 1, hi_open=True)
    assert field_range("lr") == Range(0) and field_range("student") is None
    assert field_choices("amp") == ("auto", "bf16", "fp16", "off")
    assert "gendd" in field_choices("method")
    for f in dataclasses.fields(Config):
        r = field_range(f.name)
        if r is None:
            continue
        bad = r.lo - 1 if r.lo is not None else r.hi + 1
        with pytest.raises(ValueError, match=f"--{f.name.replace('_', '-')} must be "):
            validate(dataclasses.replace(Config(teacher="resnet8"), **{f.name: bad}))
    with pytest.raises(ValueError, match=r"--smooth must be in \[0, 1\), got 1.0"):
        validate(Config(teacher="resnet8", smooth=1.0))


def test_data_path_without_dataset_is_inferred_with_a_notice_or_refused(tmp_path, capsys):
    """Planted bug checked: without infer_dataset_notice the folder trained the built-in digits
    (dataset 'digits') and the first assertion failed."""
    from gendd_fast.config import config_from_args
    root = tmp_path / "imgs"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
    cfg, _ = config_from_args(["--data-path", str(root), "--method", "ce"])
    assert cfg.dataset == "imagefolder"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without --dataset" in err[0] and "imagefolder" in err[0]
    cifar = tmp_path / "c"
    (cifar / "cifar-100-python").mkdir(parents=True)
    for f in ("train", "test"):
        (cifar / "cifar-100-python" / f).write_bytes(b"")
    assert config_from_args(["--data-path", str(cifar), "--method", "ce"])[0].dataset == "cifar100"
    # a given --dataset is never second-guessed
    given = ["--data-path", str(cifar), "--dataset", "cifar10", "--method", "ce"]
    assert config_from_args(given)[0].dataset == "cifar10"
    with pytest.raises(ValueError, match="without --dataset .*add --dataset"):
        config_from_args(["--data-path", str(tmp_path / "c" / "cifar-100-python" / "train")])
    with pytest.raises(ValueError, match="without --dataset"):
        config_from_args(["--data-path", str(tmp_path)])  # neither layout: refused
