"""dinv's CIFAR ResNets against the DeepInversion reference's (NVlabs/DeepInversion
cifar10/resnet_cifar.py, DAFL's ResNet): the reference's checkpoints load unchanged and give the
same logits.

`RefResNet` below is written for this test from the reference file's structure (module names,
strides, widths, forward): conv1/bn1 stem, layer1..layer4 of BasicBlocks with conv1/bn1/conv2/bn2
and a `shortcut` that is an empty nn.Sequential or Sequential(1x1 conv, BN), `linear`; forward
relu(bn1(conv1 x)) -> layers -> F.avg_pool2d(out, 4) -> flatten -> linear.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinv import models

DEPTHS = {"resnet18_cifar": (2, 2, 2, 2), "resnet34_cifar": (3, 4, 6, 3)}


class RefBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        projection = stride != 1 or cin != cout
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride,
                                                 bias=False), nn.BatchNorm2d(cout))
                         if projection else nn.Sequential())

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        y += self.shortcut(x)
        return F.relu(y)


class RefResNet(nn.Module):
    def __init__(self, depths, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for stage, (width, count) in enumerate(zip((64, 128, 256, 512), depths), start=1):
            blocks = []
            for i in range(count):
                blocks.append(RefBlock(cin, width, (1 if stage == 1 else 2) if i == 0 else 1))
                cin = width
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in range(1, 5):
            out = getattr(self, f"layer{stage}")(out)
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


def randomized(model, seed):
    """`model` with every parameter and BatchNorm statistic random (fresh BatchNorm layers are
    the identity in eval mode, which would hide a mix-up of layers)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith(("bn1.weight", "bn2.weight", "shortcut.1.weight")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


def images(shape=(3, 3, 32, 32), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_reference_checkpoint_loads_strictly_with_identical_logits(name, tmp_path):
    reference = randomized(RefResNet(DEPTHS[name]), seed=len(name))
    path = tmp_path / "reference.pt"
    torch.save(reference.state_dict(), path)

    model = models.create(name)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    model.eval()
    x = images()
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(model(x), expected)
    assert expected.abs().max() > 0.1  # the check compares real numbers, not zeros


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_module_names_and_leaf_types_are_the_reference_ones(name):
    def layout(model):
        return [(n, type(m).__name__) for n, m in model.named_modules()
                if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.Sequential))]

    model = models.create(name)
    assert layout(model) == layout(RefResNet(DEPTHS[name]))
    assert list(model.state_dict()) == list(RefResNet(DEPTHS[name]).state_dict())
    # Identity shortcuts are empty Sequentials, as in the reference.
    identity = model.layer1[0].shortcut
    assert isinstance(identity, nn.Sequential) and len(identity) == 0
    assert len(model.layer2[0].shortcut) == 2


def test_reference_checkpoint_with_other_classes_loads_through_load_teacher(tmp_path):
    reference = randomized(RefResNet(DEPTHS["resnet34_cifar"], num_classes=100), seed=3)
    path = tmp_path / "rn34_c100.pt"
    torch.save({"net": reference.state_dict(), "acc": 95.4, "epoch": 199}, path)
    teacher = models.load_teacher(path, arch="resnet34_cifar")
    assert not teacher.training and teacher.linear.out_features == 100
    x = images()
    with torch.no_grad():
        assert torch.equal(teacher(x), reference(x))


def test_other_input_sizes_channels_and_features():
    model = models.create("resnet18_cifar").eval()
    with torch.no_grad():
        for size in (16, 24, 40, 64):
            assert model(images((2, 3, size, size))).shape == (2, 10)
        logits, features = model(images((2, 3, 32, 32)), out_feature=True)
        assert features.shape == (2, 512) and torch.equal(logits, model.linear(features))
        gray = models.create("resnet34_cifar", num_classes=5, in_channels=1).eval()
        assert gray(images((2, 1, 32, 32))).shape == (2, 5)
    assert isinstance(model, models.CifarResNet)
