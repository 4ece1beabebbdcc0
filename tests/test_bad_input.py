"""Bad input gets an error that names the problem (and nothing is half-written)."""
import pytest
import torch
from PIL import Image

from gendd_fast.config import config_from_args, make_config
from gendd_fast.data import DatasetError, build_datasets
from gendd_fast.models import create_model, load_checkpoint_weights
from gendd_fast.cli import train_main as main
from gendd_fast.train import train
from helpers import save_teacher, tiny_config


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model 'resnet9'; valid: .*resnet8x4"):
        create_model("resnet9", 10)


def test_unknown_method_and_dataset():
    with pytest.raises(ValueError, match=r"unknown method 'fitnet'; valid: ce, kd, dkd"):
        make_config(method="fitnet")
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'"):
        make_config(method="ce", dataset="mnist")
    with pytest.raises(SystemExit):  # argparse: a flag that does not exist
        config_from_args(["--methd", "kd"])


def test_method_needing_teacher_says_so(tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        make_config(method="kd")
    cfg = tiny_config(tmp_path, "kd", None)
    with pytest.raises(ValueError, match="needs --teacher-checkpoint"):
        train(cfg)


def test_teacher_checkpoint_of_wrong_architecture(tmp_path):
    path, _ = save_teacher(tmp_path, arch="wrn_16_1")
    m = create_model("resnet8", 4)
    with pytest.raises(ValueError, match=r"does not match CifarResNet: \d+ missing keys"):
        load_checkpoint_weights(path, m)


def test_teacher_checkpoint_with_other_class_count(tmp_path):
    path, _ = save_teacher(tmp_path, num_classes=100)
    with pytest.raises(ValueError, match="has 100 classes but the model was built for 4"):
        load_checkpoint_weights(path, create_model("resnet8", 4))


def test_teacher_checkpoint_missing_or_not_a_state_dict(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint_weights(str(tmp_path / "none.pt"), create_model("resnet8", 4))
    p = tmp_path / "list.pt"
    torch.save([1, 2, 3], p)
    with pytest.raises(ValueError, match="holds no state dict"):
        load_checkpoint_weights(str(p), create_model("resnet8", 4))


def test_token_size_must_divide_teacher_width(tmp_path):
    path, _ = save_teacher(tmp_path)
    cfg = tiny_config(tmp_path, "gendd", path, token_dim=48)
    with pytest.raises(ValueError, match="token size 48 does not divide the teacher's feature "
                                         "width 64"):
        train(cfg)


def test_dataset_paths(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_datasets(make_config(method="ce", dataset="cifar100",
                                   data_path=str(tmp_path / "nope")).resolved())
    with pytest.raises(DatasetError, match="is missing"):
        build_datasets(make_config(method="ce", dataset="cifar100",
                                   data_path=str(tmp_path)).resolved())
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no image here")
    with pytest.raises(DatasetError, match="has no images"):
        build_datasets(make_config(method="ce", dataset="imagefolder",
                                   data_path=str(tmp_path)).resolved())
    lst = tmp_path / "train.txt"
    lst.write_text("a.jpg 0\nb.jpg\n")
    with pytest.raises(DatasetError, match=r"train.txt:2: expected 'path label'"):
        build_datasets(make_config(method="ce", dataset="filelist", data_path=str(tmp_path),
                                   train_list=str(lst), val_list=str(lst)).resolved())


def test_corrupt_image_is_named(tmp_path):
    from gendd_fast.data import BadImageError
    for split in ("train", "val"):
        d = tmp_path / split / "a"
        d.mkdir(parents=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(d / "good.jpg")
        (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        _images(tmp_path / split / "b", ["good.png"])  # a single class is refused by itself
    cfg = make_config(method="ce", dataset="imagefolder", data_path=str(tmp_path)).resolved()
    train_ds, _, _ = build_datasets(cfg)
    bad = [i for i, s in enumerate(train_ds.samples) if s[0].endswith("broken.jpg")][0]
    with pytest.raises(BadImageError, match="broken.jpg"):
        train_ds[bad]
    cfg = make_config(method="ce", dataset="imagefolder", data_path=str(tmp_path),
                      skip_bad_images=True).resolved()
    train_ds, _, _ = build_datasets(cfg)
    assert train_ds[bad] is None


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "gendd_fast.train", "--method", "ce",
                        "--student", "nosuchnet", "--dataset", "synthetic", "--output",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown model 'nosuchnet'")
    assert "Traceback" not in r.stderr


def test_list_models(capsys):
    main(["--list-models"])
    names = capsys.readouterr().out.split()
    for n in ("resnet8x4", "resnet32x4", "wrn_40_2", "vgg13", "MobileNetV2", "ShuffleV1",
              "ShuffleV2", "resnet18", "resnet50", "mobilenet_v1"):
        assert n in names


# -- hostile-input probes (issue 11, item 8): each is refused before the first step, named ------
def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (20, 20), (10 * len(n), 40, 90)).save(folder / n)


def _filelist_cfg(tmp_path, train_lines, val_lines=("img/a.png 0", "img/b.png 1"), **over):
    _images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    (tmp_path / "train.txt").write_text("\n".join(train_lines) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(val_lines) + "\n")
    return make_config(method="ce", dataset="filelist", data_path=str(tmp_path),
                       train_list="train.txt", val_list="val.txt", **over).resolved()


def test_file_list_with_a_missing_image_is_named_before_training(tmp_path):
    cfg = _filelist_cfg(tmp_path, ["img/a.png 0", "img/b.png 1", "img/gone.png 1"])
    with pytest.raises(DatasetError, match=r"1 image\(s\) named in .*train.txt do not exist, "
                                           r"e.g. .*train.txt:3: '.*img/gone.png'"):
        build_datasets(cfg)


def test_file_list_negative_label_is_named(tmp_path):
    cfg = _filelist_cfg(tmp_path, ["img/a.png 0", "img/b.png -1"])
    with pytest.raises(DatasetError, match=r"train.txt:2: label -1 is negative"):
        build_datasets(cfg)


def test_file_list_label_out_of_range_is_named(tmp_path):
    cfg = _filelist_cfg(tmp_path, ["img/a.png 0", "img/b.png 1", "img/c.png 7"], num_classes=2)
    with pytest.raises(DatasetError, match=r"train.txt:3: label 7 is out of range for 2 classes"):
        build_datasets(cfg)
    cfg = _filelist_cfg(tmp_path, ["img/a.png 0", "img/b.png 1"],
                        val_lines=["img/a.png 0", "img/c.png 5"])
    with pytest.raises(DatasetError, match=r"val.txt:2: label 5 is out of range for 2 classes"):
        build_datasets(cfg)


def test_file_list_label_gap_does_not_build_a_bigger_model(tmp_path):
    """A label 7 in a 2-class list used to build an 8-class model silently."""
    cfg = _filelist_cfg(tmp_path, ["img/a.png 0", "img/b.png 1", "img/c.png 7"])
    with pytest.raises(DatasetError, match=r"labels run up to 7 but class\(es\) 2, 3, 4, 5, 6 "
                                           r"have no image.*--num-classes 8"):
        build_datasets(cfg)
    cfg = _filelist_cfg(tmp_path, ["img/a.png 0", "img/b.png 1", "img/c.png 7"], num_classes=8)
    assert build_datasets(cfg)[2] == 8  # asked for explicitly: allowed


def test_empty_class_folder_is_refused(tmp_path):
    for split in ("train", "val"):
        _images(tmp_path / split / "cat", ["1.png"])
        (tmp_path / split / "dog").mkdir(parents=True)
    (tmp_path / "val" / "dog" / "1.png").write_bytes(b"")  # val: only train's emptiness matters
    cfg = make_config(method="ce", dataset="imagefolder", data_path=str(tmp_path)).resolved()
    with pytest.raises(DatasetError, match=r"class folder\(s\) 'dog' hold no images"):
        build_datasets(cfg)


def test_num_classes_below_the_data_is_refused(tmp_path):
    cfg = make_config(method="ce", dataset="digits", num_classes=5).resolved()
    with pytest.raises(DatasetError, match="--num-classes 5 is smaller than the 10 classes"):
        build_datasets(cfg)


@pytest.mark.parametrize("flag,value,message", [
    ("log_interval", 0, "--log-interval must be at least 1"),
    ("eval_every", 0, "--eval-every must be at least 1"),
    ("token_dim", 0, "--token-dim must be at least 1"),
    ("max_steps", -3, "--max-steps must be at least 0"),
    ("save_every", -1, "--save-every must be at least 0"),
    ("warmup_epochs", -1.0, "--warmup-epochs must be at least 0"),
    ("workers", -2, "--workers must be at least 0"),
    ("lr", -1e-3, "--lr must be at least 0"),
    ("num_classes", 1, "--num-classes must be at least 2"),
])
def test_bad_numbers_are_refused_at_parse_time(flag, value, message):
    with pytest.raises(ValueError, match=message):
        make_config(method="ce", **{flag: value})


def test_bad_number_on_the_cli_is_one_line(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "gendd_fast.train", "--method", "ce", "--dataset",
                        "synthetic", "--eval-every", "0", "--output", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --eval-every must be at least 1, got 0")
