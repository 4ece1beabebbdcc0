"""Pretrained teachers by name (timm:NAME, torchvision:NAME): weights from a local file, the
pooled pre-logit feature, input renormalisation, errors.

timm and torchvision are test requirements (requirements-nodeps.txt, installed by .ci/run with
--no-deps so pip never replaces the CPU torch): these tests run, never skip. The torchvision
wheel served here is built for a CUDA torch; it imports through the model layer's
_SkipOpRegistrations, which the last tests pin."""
import datetime
import importlib
import os
import sys
import types

import pytest
import torch

from gendd_fast.config import make_config
from gendd_fast.data.transforms import normalization_for
from gendd_fast.models import build_teacher, create_model, list_models
from gendd_fast.models.external import (ExternalBackbone, _SkipOpRegistrations, load_into,
                                        renormalisation, source_available)
from gendd_fast.train import train
from helpers import read_metrics


def test_timm_and_torchvision_import_here():
    """The CI promise: were either missing or failing, every test below would fail too."""
    assert source_available("torchvision") and source_available("timm")


def test_adapter_gives_the_pooled_feature_and_the_classifier():
    torch.manual_seed(0)
    ref = create_model("resnet18", 7).eval()
    net = create_model("resnet18", 7)
    net.load_state_dict(ref.state_dict())
    m = ExternalBackbone(net, "torchvision").eval()  # torchvision-style: a final Linear 'fc'
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(m.forward_features(x), ref.forward_features(x))
    torch.testing.assert_close(m(x), ref(x))
    assert m.num_features == 512 and m.fc.out_features == 7


def test_adapter_finds_the_last_linear_of_a_sequential_head():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
            self.classifier = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))

        def forward(self, x):
            return self.classifier(self.body(x))

    net = Net().eval()
    x = torch.randn(4, 3, 2, 2)
    want_feat, want_logits = net.body(x), net(x)
    m = ExternalBackbone(net, "torchvision").eval()
    torch.testing.assert_close(m.forward_features(x), want_feat)
    torch.testing.assert_close(m(x), want_logits)


def test_renormalisation_maps_data_normalisation_to_the_models():
    data = normalization_for("imagenet")
    beit = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    scale, shift = renormalisation(data, beit)
    raw = torch.rand(2, 3, 5, 5)
    mean_d, std_d = (torch.tensor(v).view(1, 3, 1, 1) for v in data)
    x_data = (raw - mean_d) / std_d
    m = ExternalBackbone(create_model("resnet18", 3), "torchvision", (scale, shift))
    seen = {}
    m.net.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    m.forward_features(x_data)
    torch.testing.assert_close(seen["x"], (raw - 0.5) / 0.5, rtol=1e-5, atol=1e-5)
    assert renormalisation(data, data) is None


def test_local_state_dict_loading_is_strict_and_weights_only(tmp_path):
    ref = create_model("resnet18", 5)
    path = os.path.join(str(tmp_path), "r18.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    net = create_model("resnet18", 5)
    load_into(net, path, "teacher weights")
    for k, v in ref.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)
    with pytest.raises(ValueError, match="does not fit .*right architecture"):
        load_into(create_model("resnet34", 5), path, "teacher weights")
    bad = os.path.join(str(tmp_path), "pickle.pth")
    torch.save({"model": {"a": [1, 2]}}, bad)
    with pytest.raises(ValueError, match="holds no state dict"):
        load_into(net, bad, "teacher weights")
    torch.save({"model": datetime.datetime(2020, 1, 1)}, bad)  # needs unpickling: refused
    with pytest.raises(ValueError, match="could not be read as tensors"):
        load_into(net, bad, "teacher weights")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_into(net, os.path.join(str(tmp_path), "missing.pth"), "teacher weights")


def test_clear_errors_for_names_flags_and_missing_packages(tmp_path):
    with pytest.raises(ValueError, match="timm:NAME or torchvision:NAME"):
        create_model("timm:", 10)
    with pytest.raises(ValueError, match="--teacher-pretrained applies to timm"):
        make_config(method="kd", teacher="resnet34", teacher_pretrained=True)
    with pytest.raises(ValueError, match="--teacher-weights applies to torchvision"):
        make_config(method="kd", teacher="timm:resnet18", teacher_weights="DEFAULT")
    import builtins
    real_import = builtins.__import__

    def no_timm(name, *a, **k):
        if name.split(".")[0] == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *a, **k)
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "timm"}
    for k in saved:
        del sys.modules[k]
    try:
        builtins.__import__ = no_timm
        with pytest.raises(ImportError, match="needs the 'timm' package"):
            create_model("timm:resnet18", 10)
    finally:
        builtins.__import__ = real_import
        sys.modules.update(saved)
    cfg = make_config(method="kd", teacher="resnet8", dataset="digits")
    with pytest.raises(ValueError, match="needs --teacher-checkpoint"):
        build_teacher(cfg, 10)


def test_list_models_shows_external_names():
    lines = list_models()
    assert any(line.startswith("timm:NAME") and "beit_large_patch16_224" in line
               for line in lines)
    assert any(line.startswith("torchvision:NAME") and "--teacher-weights" in line
               for line in lines)


# -- with the libraries -------------------------------------------------------------------------
def test_torchvision_teacher_from_a_local_file_matches_the_zoo(tmp_path):
    torch.manual_seed(0)
    ref = create_model("resnet18", 1000).eval()  # torchvision's exact keys
    path = os.path.join(str(tmp_path), "resnet18.pth")
    torch.save(ref.state_dict(), path)
    cfg = make_config(method="gendd", teacher="torchvision:resnet18", teacher_weights=path,
                      dataset="digits")
    t = build_teacher(cfg, 1000).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(t.forward_features(x), ref.forward_features(x))
    with pytest.raises(ValueError, match="unknown weights 'NOPE'"):
        build_teacher(make_config(method="kd", teacher="torchvision:resnet18",
                                  teacher_weights="NOPE"), 1000)
    with pytest.raises(ValueError, match="torchvision has no model"):
        create_model("torchvision:resnet_nope", 10)


def test_timm_vit_pre_logit_feature_through_timm_pretrained_loading(tmp_path):
    timm = importlib.import_module("timm")
    torch.manual_seed(0)
    # pretrained weights are ImageNet-1k's: 1000 classes, as timm's loader expects
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    path = os.path.join(str(tmp_path), "vit.pth")
    torch.save(ref.state_dict(), path)
    cfg = make_config(method="gendd", teacher="timm:vit_tiny_patch16_224",
                      teacher_pretrained=True, teacher_checkpoint=path, dataset="synthetic",
                      num_classes=1000)
    t = build_teacher(cfg, 1000).eval()
    x = torch.randn(2, 3, 224, 224)
    # the trainer's input is renormalised to the model's (ViT: mean = std = 0.5)
    scale, shift = renormalisation(normalization_for("synthetic"),
                                   (ref.pretrained_cfg["mean"], ref.pretrained_cfg["std"])) \
        or ((1.0,) * 3, (0.0,) * 3)
    xin = x * torch.tensor(scale).view(1, 3, 1, 1) + torch.tensor(shift).view(1, 3, 1, 1)
    want = ref.forward_head(ref.forward_features(xin), pre_logits=True)
    torch.testing.assert_close(t.forward_features(x), want, rtol=1e-4, atol=1e-4)
    assert t.num_features == 192  # 3 tokens of 64 for GenDD
    with pytest.raises(ValueError, match="timm has no model"):
        create_model("timm:no_such_net_xyz", 10)
    with pytest.raises(ValueError, match="classifies 1000 classes but the dataset has 10"):
        build_teacher(cfg, 10)


def test_gendd_with_a_timm_teacher_trains_end_to_end(tmp_path):
    timm = importlib.import_module("timm")
    ref = timm.create_model("resnet18", pretrained=False)
    path = os.path.join(str(tmp_path), "r18.pth")
    torch.save(ref.state_dict(), path)
    cfg = make_config(method="gendd", teacher="timm:resnet18", teacher_pretrained=True,
                      teacher_checkpoint=path, student="resnet8", dataset="synthetic",
                      num_classes=1000, synthetic_size=64,
                      batch_size=32, epochs=1, max_steps=3, workers=0, device="cpu",
                      diffloss_w=32, diffloss_d=1, mul=1, sampling_steps="4", plot=False,
                      progress=False, sample_eval="never",
                      output=os.path.join(str(tmp_path), "run"))
    train(cfg)
    assert len(read_metrics(cfg.output)) >= 1


def test_a_10_class_local_timm_file_builds_with_its_class_count_and_trains(tmp_path):
    """--teacher-pretrained with a 10-class file: built with 10 classes, no download wording.
    Planted bug checked: building with timm's 1000-class default (the old path) failed here
    with 'size mismatch ... download'."""
    timm = importlib.import_module("timm")
    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    path = os.path.join(str(tmp_path), "r10t_10cls.pth")
    torch.save({"state_dict": ref.state_dict()}, path)
    kw = dict(method="gendd", teacher="timm:resnet10t", teacher_pretrained=True,
              teacher_checkpoint=path, student="resnet8", dataset="synthetic", num_classes=10,
              synthetic_size=32, batch_size=16, epochs=1, max_steps=2, workers=0,
              device="cpu", diffloss_w=32, diffloss_d=1, mul=1, sampling_steps="4",
              plot=False, progress=False, sample_eval="never")
    t = build_teacher(make_config(**kw), 10).eval()
    assert t.fc.out_features == 10
    for k, v in ref.state_dict().items():
        assert torch.equal(t.net.state_dict().get(k, t.fc.state_dict().get(k.split(".")[-1])), v)
    with pytest.raises(ValueError, match="classifies 10 classes but the dataset has 100") as e:
        build_teacher(make_config(**dict(kw, num_classes=100)), 100)
    assert "download" not in str(e.value)
    cfg = make_config(**kw, output=os.path.join(str(tmp_path), "run"))
    train(cfg)
    assert len(read_metrics(cfg.output)) >= 1


def test_op_registration_skip_is_inert_where_torchvision_ops_load(monkeypatch):
    """On a GPU machine with a matching torch nothing changes: with the ops loaded the finder
    declines, and it declines every other module always."""
    finder = _SkipOpRegistrations()
    monkeypatch.setitem(sys.modules, "torchvision.extension",
                        types.SimpleNamespace(_has_ops=lambda: True))
    assert finder.find_spec("torchvision._meta_registrations", None) is None
    monkeypatch.setitem(sys.modules, "torchvision.extension",
                        types.SimpleNamespace(_has_ops=lambda: False))
    assert finder.find_spec("torchvision._meta_registrations", None) is not None
    assert finder.find_spec("torchvision.models", None) is None
    assert finder not in sys.meta_path  # active only while import_source runs
