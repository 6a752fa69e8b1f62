"""CIFAR-sized (32x32) classifiers used as teachers and students in the DeepInversion paper's
CIFAR-10 experiments: ResNet-18/34 with a 3x3 stride-1 stem and no max-pool (so the four stages
run at 32, 16, 8 and 4 pixels), and VGG-11 with BatchNorm.

The ResNets are module for module the reference's (NVlabs/DeepInversion cifar10/resnet_cifar.py,
itself DAFL's resnet.py): `conv1`, `bn1`, `layer1`..`layer4` of BasicBlocks (`conv1`, `bn1`,
`conv2`, `bn2`, `shortcut`), `linear`, with the same forward, so a checkpoint of the reference's
ResNet18/ResNet34 loads as it is (strict) and gives the same logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the input; a 1x1 conv-BN (`shortcut.0`, `shortcut.1`) projects
    the input when the block changes the resolution or the width, else `shortcut` is an empty
    nn.Sequential (the identity), as in the reference."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of BasicBlocks; `blocks_per_stage` gives the depth ([2, 2, 2, 2] is ResNet-18).

    For 32x32 inputs the last stage's 4x4 maps are averaged by `F.avg_pool2d(out, 4)` exactly as
    the reference does; other input sizes are averaged globally (adaptive pooling), so the
    classifier always sees 512 features. `forward(x, out_feature=True)` returns
    (logits, features) like the reference's."""

    def __init__(self, blocks_per_stage, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if len(blocks_per_stage) != 4:
            raise ValueError(f"blocks_per_stage needs 4 stages, got {list(blocks_per_stage)}")
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, blocks_per_stage[0], stride=1)
        self.layer2 = self._make_layer(128, blocks_per_stage[1], stride=2)
        self.layer3 = self._make_layer(256, blocks_per_stage[2], stride=2)
        self.layer4 = self._make_layer(512, blocks_per_stage[3], stride=2)
        self.linear = nn.Linear(512 * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, out_feature: bool = False):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if out.shape[-2:] == (4, 4):
            # The reference's pooling: not bitwise the same as the adaptive one.
            out = F.avg_pool2d(out, 4)
        else:
            out = F.adaptive_avg_pool2d(out, 1)
        feature = torch.flatten(out, 1)
        out = self.linear(feature)
        return (out, feature) if out_feature else out


def resnet18_cifar(num_classes: int = 10, **kwargs) -> CifarResNet:
    """The reference's ResNet18 (DAFL / NVlabs DeepInversion cifar10/resnet_cifar.py)."""
    return CifarResNet([2, 2, 2, 2], num_classes=num_classes, **kwargs)


def resnet34_cifar(num_classes: int = 10, **kwargs) -> CifarResNet:
    """The reference's ResNet34, the paper's CIFAR-10 teacher."""
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
