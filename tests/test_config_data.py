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


# -- the rules the planted bugs of issue 22 broke ---------------------------------------------
def _crop_offset(out, padded, h, w):
    """The (y, x) at which ``out`` was cut from ``padded`` (pixel values are unique)."""
    hits = [(y, x) for y in range(padded.shape[0] - h + 1) for x in range(padded.shape[1] - w + 1)
            if np.array_equal(padded[y:y + h, x:x + w], out)]
    assert len(hits) == 1
    return hits[0]


def test_cifar_random_crop_offsets_cover_zero_to_twice_the_pad():
    """RandomCrop(32, padding=4): the crop's top-left corner in the padded image is uniform over
    0..2*pad on each axis, so over enough draws every one of the 9 x 9 offsets appears, each
    about 1/81 of the time.
    Planted: offsets drawn from 0..pad (the range halved) -> fails."""
    from gendd_fast.data.transforms import pad_crop_flip
    h = w = 6
    pad = 4
    img = (np.arange(h * w * 3, dtype=np.int32).reshape(h, w, 3) + 1).astype(np.int32)
    padded = np.zeros((h + 2 * pad, w + 2 * pad, 3), np.int32)
    padded[pad:pad + h, pad:pad + w] = img
    rng = random.Random(7)
    seen = {}
    for _ in range(1600):
        out = pad_crop_flip(img, pad, False, rng).permute(1, 2, 0).numpy()
        off = _crop_offset(out, padded, h, w)
        seen[off] = seen.get(off, 0) + 1
    assert set(seen) == {(y, x) for y in range(2 * pad + 1) for x in range(2 * pad + 1)}
    assert max(seen.values()) < 3 * 1600 / 81


def test_training_batches_are_all_full_and_evaluation_sees_every_image():
    """drop_last for training (every step has batch_size images, len() counts them), never for
    evaluation (the partial last batch is scored).
    Planted: drop_last off for training -> fails."""
    cfg = make_config(method="ce", dataset="synthetic", synthetic_size=70, num_classes=4,
                      image_size=8, batch_size=16, eval_batch_size=16, workers=0,
                      device="cpu").resolved()
    loaders = build_loaders(cfg, 0, 1, torch.device("cpu"))
    loaders.train.set_epoch(0)
    sizes = [x.shape[0] for x, _ in loaders.train]
    assert sizes == [16] * (70 // 16) and len(loaders.train) == 70 // 16
    loaders.val.set_epoch(0)
    val = [x.shape[0] for x, _ in loaders.val]
    assert sum(val) == 70 // 4 and val[-1] == 70 // 4 - 16


def test_recipe_keys_with_hyphens_are_the_fields(tmp_path):
    """A recipe may spell a field as its flag does: ``batch-size: 7`` is ``batch_size``.
    Planted: hyphens no longer mapped to underscores -> fails."""
    p = tmp_path / "r.yaml"
    p.write_text("method: ce\nbatch-size: 7\neval-every: 3\nlr: 0.25\n")
    assert load_yaml(str(p)) == {"method": "ce", "batch_size": 7, "eval_every": 3, "lr": 0.25}
    cfg, _ = config_from_args(["--config", str(p)])
    assert (cfg.batch_size, cfg.eval_every, cfg.lr) == (7, 3, 0.25)


@pytest.mark.parametrize("batch,want", [(16, 128), (128, 128), (512, 512)])
def test_eval_batch_size_defaults_to_the_larger_of_batch_size_and_128(batch, want):
    """Evaluation needs no gradients: its default batch is max(batch_size, 128).
    Planted: min instead of max -> fails."""
    cfg = make_config(method="ce", dataset="cifar100", batch_size=batch).resolved()
    assert cfg.eval_batch_size == want
    assert make_config(method="ce", batch_size=batch, eval_batch_size=40).resolved() \
        .eval_batch_size == 40


def test_epochs_are_part_of_the_run_identity():
    """A resume with another --epochs changes the schedule's length (cosine, beta2 ramp, step
    decay), so it is refused and the field is named, like lr; fields that do not change what
    is computed (output, workers) are not.
    Planted: epochs dropped from the run identity -> fails."""
    import dataclasses

    from gendd_fast.config import config_diff
    a = dataclasses.asdict(make_config(method="ce", epochs=10))
    b = dataclasses.asdict(make_config(method="ce", epochs=20, workers=3, output="elsewhere"))
    assert config_diff(a, b) == ["epochs: checkpoint has 10, this run has 20"]


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
