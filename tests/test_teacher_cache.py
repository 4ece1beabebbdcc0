"""--teacher-cache: the teacher's outputs computed once per augmented input, looked up by content.

What must hold: a run with the cache trains exactly as the run without it (same losses, same
weights); every input training can draw is in the table; a lookup never returns another input's
outputs (it misses, and the teacher runs); a file made for another teacher or other data is
refused by name; settings where no input repeats are refused."""
import dataclasses
import random

import numpy as np
import pytest
import torch

from gendd_fast import teacher_cache as tc
from gendd_fast.data.datasets import ArrayDataset
from gendd_fast.data.transforms import pad_crop_flip
from gendd_fast.train import train

from helpers import read_metrics, save_teacher, tiny_config


def _arrays(n=5, size=6, seed=0):
    g = np.random.RandomState(seed)
    return g.randint(0, 256, size=(n, size, size, 3)).astype(np.uint8), np.arange(n) % 3


# -- the key ---------------------------------------------------------------------------------------
def test_content_hash_sees_every_bit_and_ignores_the_memory_format():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5)
    h = tc.content_hash(x)
    assert h.shape == (6, 2) and h.dtype == torch.int64
    assert len({tuple(r) for r in h.tolist()}) == 6
    assert torch.equal(tc.content_hash(x.contiguous(memory_format=torch.channels_last)), h)
    assert torch.equal(tc.content_hash(x.clone()), h)
    for where in [(0, 0, 0, 0), (3, 2, 4, 1), (5, 2, 4, 4)]:  # one element, one ulp
        y = x.clone()
        y[where] = torch.nextafter(y[where], torch.tensor(float("inf")))
        changed = (tc.content_hash(y) != h).any(1)
        assert changed.tolist() == [i == where[0] for i in range(6)]
    # two inputs that are permutations of each other's values are different inputs
    a = torch.arange(12.0).view(1, 3, 2, 2)
    assert not torch.equal(tc.content_hash(a), tc.content_hash(a.flip(-1)))


# -- the augmentation set ----------------------------------------------------------------------------
@pytest.mark.parametrize("pad,flip", [(2, False), (1, True), (0, True)])
def test_variants_are_exactly_the_inputs_training_can_draw(pad, flip):
    images, labels = _arrays()
    ds = ArrayDataset(images, labels, True, pad=pad, flip=flip)
    assert ds.augmentation_count() == (2 * pad + 1) ** 2 * (2 if flip else 1)
    for i in range(len(ds)):
        variants = ds.augmentation_variants(i)
        assert variants.shape == (ds.augmentation_count(), 3, 6, 6)
        listed = {v.numpy().tobytes() for v in variants}
        drawn = {pad_crop_flip(images[i], pad, flip, random.Random(s)).numpy().tobytes()
                 for s in range(400)}
        assert drawn <= listed          # every input training draws is in the table
        assert len(drawn) == len(listed)  # and every listed one can be drawn


def test_randaugment_has_no_finite_variant_set():
    images, labels = _arrays()
    ds = ArrayDataset(images, labels, True, pad=2, flip=False)
    ds.augment = lambda x, seed: x
    assert ds.augmentation_count() is None
    with pytest.raises(Exception, match="not a finite set"):
        ds.augmentation_variants(0)


# -- lookups ------------------------------------------------------------------------------------------
class _CountingTeacher:
    def __init__(self):
        self.calls = 0
        g = torch.Generator().manual_seed(3)
        self.w = torch.randn(3 * 6 * 6, 8, generator=g)

    def __call__(self, x):
        self.calls += 1
        f = x.reshape(len(x), -1) @ self.w
        return f, f[:, :3] * 2


def test_a_lookup_returns_the_teachers_outputs_and_an_unknown_input_runs_the_teacher():
    images, labels = _arrays(n=4)
    ds = ArrayDataset(images, labels, True, pad=1, flip=True)
    teacher = _CountingTeacher()

    def normalize(u8):
        return (u8.float() - 100.0) / 50.0
    table = tc.build(teacher, ds, normalize, torch.autocast("cpu", enabled=False), batch=20)
    assert len(table["keys"]) == len(ds) * ds.augmentation_count()
    cache = tc.TeacherCache(teacher, table, torch.device("cpu"))
    teacher.calls = 0
    x = normalize(torch.stack([ds[(i % 4, s)][0] for i, s in enumerate(range(11))]))
    f, z = cache(x)
    want_f, want_z = teacher(x)
    assert torch.allclose(f, want_f, atol=1e-5) and torch.allclose(z, want_z, atol=1e-5)
    assert teacher.calls == 1 and cache.misses == 0  # the call above was the reference's own
    y = x.clone()
    y[3, 0, 0, 0] += 1.0  # an input no augmentation produces
    f2, _ = cache(y)
    assert teacher.calls == 2 and cache.misses == 1 and cache.lookups == 22
    assert torch.allclose(f2, teacher(y)[0], atol=1e-5)


# -- in the trainer -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path, _ = save_teacher(tmp_path_factory.mktemp("teacher"))
    return path


CLI_ARGS = ["--method", "kd", "--dataset", "synthetic", "--synthetic-size", "64",
            "--num-classes", "4", "--image-size", "16", "--teacher", "resnet8", "--device", "cpu"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory, teacher_file):
    """One cache for tiny_config's data and teacher, built ahead from the command line."""
    path = str(tmp_path_factory.mktemp("cache") / "cache.pt")
    info = tc.main(CLI_ARGS + ["--teacher-checkpoint", teacher_file, "--teacher-cache", path])
    return path, info


def test_the_cache_can_be_built_ahead_from_the_command_line(shared_cache):
    path, info = shared_cache
    assert info["path"] == path and info["entries"] == 64 * 162  # pad 4, flips: 9 x 9 x 2


@pytest.mark.parametrize("method", ["kd", "gendd"])
def test_a_cached_run_trains_exactly_as_the_uncached_one(tmp_path, teacher_file, shared_cache,
                                                         method):
    plain = tiny_config(tmp_path / "plain", method, teacher_file, epochs=1)
    cached = dataclasses.replace(tiny_config(tmp_path / "cached", method, teacher_file,
                                             epochs=1), teacher_cache=shared_cache[0])
    a, b = train(plain), train(cached)
    assert b["teacher_cache_misses"] == 0 and b["teacher_cache_lookups"] == 64
    la = [r["loss"] for r in read_metrics(plain.output)]
    lb = [r["loss"] for r in read_metrics(cached.output)]
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    assert a["top1"] == b["top1"]


def test_the_trainer_builds_a_missing_cache_and_a_later_run_reads_it(tmp_path, teacher_file,
                                                                    capsys):
    cache = str(tmp_path / "cache.pt")
    cfg = dataclasses.replace(tiny_config(tmp_path / "a", "kd", teacher_file, synthetic_size=16,
                                          batch_size=8, epochs=1), teacher_cache=cache)
    first = train(cfg)
    assert "through the teacher" in capsys.readouterr().err
    again = train(dataclasses.replace(cfg, output=str(tmp_path / "b")))
    assert "through the teacher" not in capsys.readouterr().err
    assert first["teacher_cache_misses"] == again["teacher_cache_misses"] == 0
    assert [r["loss"] for r in read_metrics(str(tmp_path / "a" / "run"))] == \
        [r["loss"] for r in read_metrics(str(tmp_path / "b"))]


def test_a_cache_made_for_another_teacher_or_other_images_is_refused(tmp_path, teacher_file,
                                                                    shared_cache):
    other, _ = save_teacher(tmp_path, seed=7)
    cfg = dataclasses.replace(tiny_config(tmp_path / "b", "kd", other, max_steps=1),
                              teacher_cache=shared_cache[0])
    with pytest.raises(tc.TeacherCacheError, match="teacher_checkpoint_sha256"):
        train(cfg)
    data = dataclasses.replace(cfg, synthetic_size=48, output=str(tmp_path / "c"),
                               teacher_checkpoint=teacher_file)
    with pytest.raises(tc.TeacherCacheError, match="images"):
        train(data)


def test_a_file_that_is_not_a_teacher_cache_is_refused(tmp_path, teacher_file):
    bogus = tmp_path / "cache.pt"
    torch.save({"keys": torch.zeros(2, 2, dtype=torch.int64)}, bogus)
    cfg = dataclasses.replace(tiny_config(tmp_path / "a", "kd", teacher_file, max_steps=1),
                              teacher_cache=str(bogus))
    with pytest.raises(tc.TeacherCacheError, match="not a teacher cache"):
        train(cfg)


@pytest.mark.parametrize("over,why", [
    (dict(randaug="rand-m9-n2"), "continuous"),
    (dict(mixup=0.2), "Mixup"),
    (dict(method="gendd-pretrain"), "no teacher forward"),
])
def test_settings_where_no_input_repeats_are_refused(tmp_path, teacher_file, over, why):
    over = dict(over)
    method = over.pop("method", "kd")
    cfg = dataclasses.replace(tiny_config(tmp_path, method, teacher_file, max_steps=1, **over),
                              teacher_cache=str(tmp_path / "cache.pt"))
    with pytest.raises(tc.TeacherCacheError, match=why):
        train(cfg)
    assert not (tmp_path / "cache.pt").exists()


def test_a_method_without_a_teacher_refuses_the_flag(tmp_path):
    with pytest.raises(ValueError, match="no teacher to cache"):
        tiny_config(tmp_path, "ce", teacher_cache=str(tmp_path / "c.pt"))


def test_build_file_with_replace_rebuilds_a_file_made_for_another_teacher(tmp_path,
                                                                         teacher_file):
    cache = str(tmp_path / "cache.pt")
    cfg = dataclasses.replace(tiny_config(tmp_path, "kd", teacher_file, synthetic_size=16),
                              teacher_cache=cache)
    tc.build_file(cfg)
    other, _ = save_teacher(tmp_path, seed=7)
    renamed = dataclasses.replace(cfg, teacher_checkpoint=other)
    with pytest.raises(tc.TeacherCacheError, match="teacher_checkpoint_sha256"):
        tc.build_file(renamed)
    tc.build_file(renamed, replace=True)
    res = train(dataclasses.replace(renamed, max_steps=1))  # the rebuilt file now matches
    assert res["teacher_cache_misses"] == 0
