"""ResNet trunk up to C5, with torchvision's module names so exported weights load into torchvision as-is."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

from densecl.method.settings import ARCHS


class ResNetTrunk(nn.Module):
    """torchvision ResNet without avgpool/fc; returns C5 (stride 32)."""

    def __init__(self, arch: str):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown backbone arch {arch!r}; expected one of {', '.join(ARCHS)}")
        net = getattr(models, arch)(weights=None)
        self.arch = arch
        self.out_channels = net.fc.in_features
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DenseCL's init: Kaiming-normal (fan_in, relu) convs, BN weight 1 / bias 0, no zero-init residual.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """C2..C5, for downstream heads that need intermediate stages."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
