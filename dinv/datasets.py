"""Real datasets: scikit-learn's bundled handwritten digits (the demo's, no download), and the
conversions the applications use to take a user's data as a Dataset, an (images, labels) pair or
an ImageFolder directory."""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def select_classes(images: torch.Tensor, labels: torch.Tensor, classes):
    """The (images, labels) whose label is one of `classes`."""
    keep = torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype))
    return images[keep], labels[keep]
