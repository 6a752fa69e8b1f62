"""The embedded demo: scikit-learn's bundled handwritten digits (no download), a small BatchNorm
CNN teacher to invert, a smaller student to distill into, and the loop that trains them."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Mean and std of the training split's pixels (16x16, scaled to [0, 1]); hard-coded so that
# normalization does not depend on which split or seed a caller loads.
DIGITS_MEAN = (0.3052,)
DIGITS_STD = (0.3188,)
DIGITS_TEST_SIZE = 450


def load_digits(split: str = "train", size: int = 16, seed: int = 0):
    """(images [N, 1, size, size] float32 normalized with DIGITS_MEAN/DIGITS_STD, labels [N] int64).

    split: "train" (1347 images) or "test" (450), a stratified split fixed by `seed`, or "all"
    (1797, in scikit-learn's order). The 8x8 originals (values 0..16) are upsampled bilinearly."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    if split != "all":
        train_idx, test_idx = train_test_split(
            torch.arange(len(labels)).numpy(), test_size=DIGITS_TEST_SIZE,
            stratify=labels.numpy(), random_state=seed)
        index = torch.as_tensor(train_idx if split == "train" else test_idx)
        images, labels = images[index], labels[index]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        # Bilinear weights are convex, so this only trims float rounding.
        images = images.clamp_(0.0, 1.0)
    return (images - DIGITS_MEAN[0]) / DIGITS_STD[0], labels


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


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator):
    """Shifts each image by its own integer offsets in [-max_shift, max_shift] (both axes),
    filling the uncovered border with the batch's darkest value, which is the digits'
    background (a circular shift would wrap strokes around to the other side)."""
    n, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=images.min().item())
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).to(images.device)
    cols = (dx[:, None] + torch.arange(w)[None]).to(images.device)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     epochs: int = 30, lr: float = 0.05, seed: int = 0, augment: bool = True,
                     batch_size: int = 64, weight_decay: float = 5e-4, max_shift: int = 1):
    """Trains `model` in place with SGD (Nesterov momentum 0.9) and a per-step cosine learning
    rate from `lr` to zero; `augment` shifts the images by up to `max_shift` pixels.

    `seed` fixes the batch order and the shifts (the weights' initialization is the caller's).
    Runs on the device of `images`; returns the model, left in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator).to(labels.device)
        for start in range(0, len(labels), batch_size):
            batch = order[start:start + batch_size]
            inputs = images[batch]
            if augment:
                inputs = random_translate(inputs, max_shift, generator)
            loss = F.cross_entropy(model(inputs), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of `model` in eval mode (its mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size])
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(labels)
