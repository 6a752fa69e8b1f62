"""CIFAR-sized (32x32) classifiers used as teachers and students in the DeepInversion paper's
CIFAR-10 experiments: ResNet-18/34 with a 3x3 stride-1 stem and no max-pool (so the four stages
run at 32, 16, 8 and 4 pixels), and VGG-11 with BatchNorm."""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the input; a 1x1 conv-BN projects the input when the block
    changes the resolution or the width."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of BasicBlocks; `blocks_per_stage` gives the depth ([2, 2, 2, 2] is ResNet-18)."""

    def __init__(self, blocks_per_stage, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        stages = []
        width = 64
        for index, num_blocks in enumerate(blocks_per_stage):
            out_width = 64 * 2 ** index
            first_stride = 1 if index == 0 else 2
            for block in range(num_blocks):
                stages.append(BasicBlock(width, out_width, first_stride if block == 0 else 1))
                width = out_width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.stages(self.stem(x)))
        return self.classifier(torch.flatten(features, 1))


def resnet18_cifar(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet([2, 2, 2, 2], num_classes=num_classes, **kwargs)


def resnet34_cifar(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet([3, 4, 6, 3], num_classes=num_classes, **kwargs)


# Output widths of the 3x3 conv-BN-ReLU layers; "M" is a 2x2 max-pool. Five pools take 32x32
# down to 1x1, so the classifier sees exactly 512 features.
VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class CifarVGG(nn.Module):
    """VGG with BatchNorm after every conv and a single linear classifier."""

    def __init__(self, layers=VGG11_LAYERS, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        modules = []
        width = in_channels
        for layer in layers:
            if layer == "M":
                modules.append(nn.MaxPool2d(2))
            else:
                modules += [nn.Conv2d(width, layer, 3, padding=1, bias=False),
                            nn.BatchNorm2d(layer), nn.ReLU(inplace=True)]
                width = layer
        self.features = nn.Sequential(*modules)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg11_bn_cifar(num_classes: int = 10, **kwargs) -> CifarVGG:
    return CifarVGG(VGG11_LAYERS, num_classes=num_classes, **kwargs)
