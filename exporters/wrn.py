"""Wide ResNet (Zagoruyko & Komodakis 2016), WRN-d-k, for 1- or 3-channel images.

depth d = 6n + 4 (n pre-activation basic blocks per group), widths
16, 16k, 32k, 64k; groups 2 and 3 halve the resolution. WRN-10-2 on 28x28
Fashion-MNIST has ~0.3 M parameters and trains in seconds per thousand images
on one core -- the size the fixtures use; the seed (4.2) used a WRN on CIFAR-100.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, plus a 1x1 conv shortcut
    when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if (cin != cout or stride != 1) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(torch.relu(self.bn2(y))))
        # The shortcut reads the pre-activated input when it projects (as in the reference code).
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-widen: conv(16) -> 3 groups of n blocks -> BN-ReLU -> global avg pool -> fc."""

    def __init__(self, depth: int = 10, widen: int = 2, num_classes: int = 10, in_channels: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.depth, self.widen = depth, widen
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks = []
        cin = widths[0]
        for g, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def name(self) -> str:
        return f"WRN-{self.depth}-{self.widen}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))
