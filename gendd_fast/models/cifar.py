"""CIFAR-family backbones with the module names of the widely shared CIFAR-100 KD model zoo.

The published CIFAR-100 teachers (``{'model': state_dict}``) use these layer names; only the
classifier is named differently in some families (``linear``, ``classifier``, ``classifier.0``),
and :func:`gendd_fast.models.remap_classifier_keys` renames it to ``fc`` on load.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Backbone, init_conv_bn


# --- ResNet (CIFAR) ----------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(Backbone):
    def __init__(self, depth, num_filters, num_classes=100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = num_filters[3]
        self.fc = nn.Linear(num_filters[3], num_classes)
        init_conv_bn(self)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


# --- Wide ResNet ---------------------------------------------------------------------------
class WideBasic(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (None if self.equal_in_out else
                             nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False))

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return (x if self.equal_in_out else self.convShortcut(o)) + out


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasic(in_planes if i == 0 else out_planes, out_planes,
                                               stride if i == 0 else 1)
                                     for i in range(nb_layers)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(Backbone):
    def __init__(self, depth, widen_factor, num_classes=100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.num_features = ch[3]
        self.fc = nn.Linear(ch[3], num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


# --- VGG (BN) --------------------------------------------------------------------------------
VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _vgg_stage(cfg, in_ch):
    layers = []
    for v in cfg:
        layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_ch = v
    return nn.Sequential(*layers[:-1])  # the stage's last ReLU is applied in forward


class VGG(Backbone):
    def __init__(self, cfg, num_classes=100):
        super().__init__()
        chans = [3] + [stage[-1] for stage in cfg]
        for i, stage in enumerate(cfg):
            setattr(self, f"block{i}", _vgg_stage(stage, chans[i]))
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.num_features = 512
        self.fc = nn.Linear(512, num_classes)
        init_conv_bn(self)

    def forward_features(self, x):
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = F.relu(self.block4(x))
        return self.pool4(x).flatten(1)


# --- MobileNetV2 (CIFAR, width 0.5) -------------------------------------------------------
def _conv_bn(inp, oup, stride):
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


def _conv_1x1_bn(inp, oup):
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        mid = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, mid, 1, 1, 0, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(Backbone):
    def __init__(self, expansion=6, num_classes=100, width_mult=0.5):
        super().__init__()
        setting = [[1, 16, 1, 1], [expansion, 24, 2, 1], [expansion, 32, 3, 2],
                   [expansion, 64, 4, 2], [expansion, 96, 3, 1], [expansion, 160, 3, 2],
                   [expansion, 320, 1, 1]]
        in_ch = int(32 * width_mult)
        self.conv1 = _conv_bn(3, in_ch, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            out = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(in_ch, out, stride, t))
                in_ch = out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_1x1_bn(in_ch, self.last_channel)
        self.num_features = self.last_channel
        self.fc = nn.Linear(self.last_channel, num_classes)
        init_conv_bn(self)

    def forward_features(self, x):
        x = self.conv1(x)
        for b in self.blocks:
            x = b(x)
        return F.adaptive_avg_pool2d(self.conv2(x), 1).flatten(1)


# --- ShuffleNet V1 / V2 --------------------------------------------------------------------
def channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        g = 1 if in_planes == 24 else groups
        self.groups1 = g
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 \
            else nn.Sequential()

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.groups1)
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1)) if self.stride == 2 else F.relu(out + res)


class ShuffleNetV1(Backbone):
    def __init__(self, num_classes=100, out_planes=(240, 480, 960), num_blocks=(4, 8, 4),
                 groups=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.num_features = out_planes[2]
        self.fc = nn.Linear(out_planes[2], num_classes)
        init_conv_bn(self)

    def _make_layer(self, out_planes, num_blocks, groups):
        layers = []
        for i in range(num_blocks):
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(ShuffleV1Block(self.in_planes, out_planes - cat_planes,
                                         2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class ShuffleV2Basic(nn.Module):
    def __init__(self, in_channels, split_ratio=0.5):
        super().__init__()
        self.split = int(in_channels * split_ratio)
        c = in_channels - self.split
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        x1, x2 = x[:, : self.split], x[:, self.split:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2Down(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        out1 = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        out2 = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        out2 = F.relu(self.bn5(self.conv5(out2)))
        return channel_shuffle(torch.cat([out1, out2], 1), 2)


class ShuffleNetV2(Backbone):
    def __init__(self, num_classes=100, out_channels=(116, 232, 464, 1024),
                 num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.num_features = out_channels[3]
        self.fc = nn.Linear(out_channels[3], num_classes)
        init_conv_bn(self)

    def _make_layer(self, out_channels, num_blocks):
        layers = [ShuffleV2Down(self.in_channels, out_channels)]
        layers += [ShuffleV2Basic(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


_S = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)
CIFAR_MODELS = {
    **{f"resnet{d}": (lambda d: lambda nc: CifarResNet(d, _S, nc))(d)
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda nc: CifarResNet(8, _X4, nc),
    "resnet32x4": lambda nc: CifarResNet(32, _X4, nc),
    "wrn_16_1": lambda nc: WideResNet(16, 1, nc),
    "wrn_16_2": lambda nc: WideResNet(16, 2, nc),
    "wrn_40_1": lambda nc: WideResNet(40, 1, nc),
    "wrn_40_2": lambda nc: WideResNet(40, 2, nc),
    **{name: (lambda c: lambda nc: VGG(c, nc))(cfg) for name, cfg in VGG_CFG.items()},
    "MobileNetV2": lambda nc: MobileNetV2(6, nc, 0.5),
    "ShuffleV1": lambda nc: ShuffleNetV1(nc),
    "ShuffleV2": lambda nc: ShuffleNetV2(nc),
}
