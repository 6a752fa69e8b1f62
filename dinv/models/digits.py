"""The embedded demo's networks, for scikit-learn's bundled handwritten digits (16x16, one
channel; the data itself is `dinv.datasets.load_digits`): a small BatchNorm CNN teacher to
invert and a smaller student to distill into."""
from __future__ import annotations

import torch
from torch import nn


# Output widths of the 3x3 conv-BN-ReLU layers; "M" is a 2x2 max-pool.
DIGITS_NET_LAYERS = (32, 32, "M", 64, 64, "M", 128)
DIGITS_STUDENT_LAYERS = (16, "M", 32, "M", 64)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU layers (`layers`: widths and "M" max-pools), global average pooling, a
    linear classifier (`features`, `classifier`)."""

    def __init__(self, layers, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        modules, width = [], in_channels
        for layer in layers:
            if layer == "M":
                modules.append(nn.MaxPool2d(2))
            else:
                modules.append(_conv_bn_relu(width, layer))
                width = layer
        self.features = nn.Sequential(*modules, nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DigitsNet(DigitsCNN):
    """The demo teacher: five conv-BN-ReLU layers (16x16 -> 8x8 -> 4x4), global average pooling,
    a linear classifier; about 140K parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__(DIGITS_NET_LAYERS, num_classes, in_channels)


class DigitsStudent(DigitsCNN):
    """The demo student: three conv-BN-ReLU layers, global average pooling, a linear classifier;
    about 25K parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__(DIGITS_STUDENT_LAYERS, num_classes, in_channels)
