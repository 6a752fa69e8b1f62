"""The embedded demo's networks, for scikit-learn's bundled handwritten digits (16x16, one
channel; the data itself is `dinv.datasets.load_digits`): a small BatchNorm CNN teacher to
invert and a smaller student to distill into."""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitsNet(nn.Module):
    """The demo teacher: five conv-BN-ReLU layers (16x16 -> 8x8 -> 4x4), global average pooling,
    a linear classifier; about 140K parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 32),
            _conv_bn_relu(32, 32),
            nn.MaxPool2d(2),
            _conv_bn_relu(32, 64),
            _conv_bn_relu(64, 64),
            nn.MaxPool2d(2),
            _conv_bn_relu(64, 128),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DigitsStudent(nn.Module):
    """The demo student: three conv-BN-ReLU layers, global average pooling, a linear classifier;
    about 25K parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 16),
            nn.MaxPool2d(2),
            _conv_bn_relu(16, 32),
            nn.MaxPool2d(2),
            _conv_bn_relu(32, 64),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
