"""What every backbone in the zoo exposes, so the distillers never special-case one."""
import torch.nn as nn


class Backbone(nn.Module):
    """A classifier split into ``forward_features`` (pooled penultimate feature) and ``fc``.

    Subclasses set ``self.num_features`` and a linear ``self.fc`` and implement
    ``forward_features(x) -> (B, num_features)``.
    """

    num_features: int

    def forward_features(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        return self.fc(self.forward_features(x))


def init_conv_bn(module: nn.Module):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
