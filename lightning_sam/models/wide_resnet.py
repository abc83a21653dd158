"""Wide residual networks (Zagoruyko & Komodakis, 2016), the SAM paper's main CIFAR model (WRN-28-10)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class WideBasicBlock(nn.Module):
    """A pre-activation block: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus the shortcut.

    Where the shape changes, the shortcut is a 1x1 conv of the *pre-activated* input, as in the authors' code.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv.
        dropout: Dropout probability between the two convolutions.

    Example:

        block = WideBasicBlock(160, 320, stride=2)  # (B, 160, 32, 32) -> (B, 320, 16, 16)
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: a 3x3 stem and three groups of pre-activation blocks.

    The groups have ``16k``, ``32k`` and ``64k`` channels (``k = widen_factor``), ``(depth - 4) / 6`` blocks each,
    and strides 1, 2, 2; then BN-ReLU, global average pooling and a linear classifier. WRN-28-10 has 36.5M
    parameters (36,479,194 for 10 classes).

    Args:
        depth: Total depth, with ``(depth - 4) % 6 == 0`` (16, 22, 28, 40, ...).
        widen_factor: Width multiplier ``k``.
        num_classes: Output logits.
        dropout: Dropout probability inside each block (0.3 in some of the paper's settings).
        in_channels: Input image channels.

    Example:

        model = WideResNet(depth=16, widen_factor=8, num_classes=100)
        logits = model(torch.randn(8, 3, 32, 32))  # (8, 100)
    """

    def __init__(
        self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, dropout: float = 0.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        for name, value in (("widen_factor", widen_factor), ("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"depth must be an int >= 10 with (depth - 4) % 6 == 0 (e.g. 16, 22, 28, 40), got {depth!r}: a WRN"
                " has a stem, three groups of (depth - 4) / 6 two-conv blocks, and three more layers"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.num_classes = num_classes
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups = []
        for index, stride in enumerate((1, 2, 2)):
            in_planes, planes = widths[index], widths[index + 1]
            # Only a group's first block changes the width and the resolution.
            first = WideBasicBlock(in_planes, planes, stride, dropout)
            rest = [WideBasicBlock(planes, planes, 1, dropout) for _ in range(blocks - 1)]
            groups.append(nn.Sequential(first, *rest))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn(self.groups(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))
