"""Model zoo: interface, published sizes, torchvision key names, teacher checkpoint remapping."""
import importlib.util

import pytest
import torch

from gendd_fast.models import (CIFAR_MODELS, IMAGENET_MODELS, create_model,
                               load_checkpoint_weights)
from helpers import save_teacher

# Parameter counts as published (CIFAR-100 KD model zoo tables; torchvision's model cards).
PUBLISHED_PARAMS = {
    ("resnet56", 100): 0.86e6, ("resnet110", 100): 1.74e6, ("resnet8x4", 100): 1.23e6,
    ("resnet32x4", 100): 7.43e6, ("wrn_40_2", 100): 2.25e6, ("wrn_16_2", 100): 0.70e6,
    ("wrn_40_1", 100): 0.57e6, ("vgg13", 100): 9.46e6, ("vgg8", 100): 3.96e6,
    ("MobileNetV2", 100): 0.81e6, ("ShuffleV1", 100): 0.95e6, ("ShuffleV2", 100): 1.36e6,
}
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_cifar_models_expose_features_and_fc(name):
    m = create_model(name, 7).eval()
    x = torch.randn(2, 3, 32, 32)
    f = m.forward_features(x)
    assert f.shape == (2, m.num_features)
    assert isinstance(m.fc, torch.nn.Linear) and m.fc.out_features == 7
    torch.testing.assert_close(m(x), m.fc(f))


@pytest.mark.parametrize("name", sorted(IMAGENET_MODELS))
def test_imagenet_models_expose_features_and_fc(name):
    m = create_model(name, 1000).eval()
    f = m.forward_features(torch.randn(1, 3, 224, 224))
    assert f.shape == (1, m.num_features) and m.fc.in_features == m.num_features
    want = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "mobilenet_v1": 1024}[name]
    assert m.num_features == want


@pytest.mark.parametrize("key,count", sorted(PUBLISHED_PARAMS.items()))
def test_cifar_sizes_match_published(key, count):
    n = sum(p.numel() for p in create_model(key[0], key[1]).parameters())
    assert abs(n - count) <= 0.006e6, (key, n)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_imagenet_resnets_match_torchvision(name):
    m = create_model(name, 1000)
    assert sum(p.numel() for p in m.parameters()) == TORCHVISION_PARAMS[name]
    keys = set(m.state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked",
              "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
              "layer2.0.downsample.1.running_var", "layer4.1.bn2.bias", "fc.weight", "fc.bias"):
        assert k in keys, k
    if name == "resnet50":
        assert "layer4.2.conv3.weight" in keys and "layer1.0.downsample.0.weight" in keys


@pytest.mark.parametrize("classifier,prefix", [("linear", ""), ("classifier", "module."),
                                               ("classifier.0", ""), ("fc", "module.")])
def test_teacher_checkpoint_remapping(tmp_path, classifier, prefix):
    path, saved = save_teacher(tmp_path, num_classes=5, arch="resnet8", classifier=classifier,
                               prefix=prefix)
    raw = torch.load(path)["model"]
    assert any(k.startswith(prefix + classifier + ".") for k in raw)
    m = create_model("resnet8", 5)
    load_checkpoint_weights(path, m)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(m.eval()(x), saved.eval()(x), rtol=0, atol=0)


def test_external_models_need_their_package():
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(ImportError, match="needs the 'timm' package.*use a zoo model"):
            create_model("timm:resnet18", 10)
    else:  # a GPU box with timm: the adapter exposes the zoo's interface
        m = create_model("timm:resnet18", 10)
        assert m.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, m.num_features)
