"""DenseCL's neck: a global MLP head and a dense 1x1-conv head side by side on C5 (no BN in either)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GlobalHead(nn.Module):
    """avg-pool -> Linear C->C -> ReLU -> Linear C->D (MoCo v2's projection)."""

    def __init__(self, in_channels: int, out_dim: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, in_channels), nn.ReLU(inplace=True), nn.Linear(in_channels, out_dim)
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # the official init touches only the Linear layers
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, c5: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.flatten(F.adaptive_avg_pool2d(c5, 1), 1))


class DenseHead(nn.Module):
    """1x1 conv C->C -> ReLU -> 1x1 conv C->D on the SxS grid; the convs keep PyTorch's default init."""

    def __init__(self, in_channels: int, out_dim: int = 128):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(inplace=True), nn.Conv2d(in_channels, out_dim, 1)
        )

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.convs(grid)


def pool_to_regions(c5: torch.Tensor, num_regions: int | None) -> torch.Tensor:
    """Adaptive average pooling to SxS; None keeps the native grid (7x7 at 224)."""
    if num_regions is None or tuple(c5.shape[-2:]) == (num_regions, num_regions):
        return c5
    return F.adaptive_avg_pool2d(c5, num_regions)
