"""dinv.augment: the jitter/flip views as index math, and the students' augmentations."""
import pytest
import torch
import torch.nn.functional as F

from dinv.augment import apply_view, random_flip, random_translate, view_indices


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("dy,dx", [(0, 0), (3, -2), (-7, 9)])
def test_jitter_flip_index_math_is_roll_then_flip(dy, dx, flip):
    x = torch.randn(2, 3, 7, 9)
    expected = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip:
        expected = torch.flip(expected, dims=(3,))
    assert torch.equal(apply_view(x, view_indices(7, 9, dy, dx, flip)), expected)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("dy,dx", [(0, 0), (2, -1), (-3, 4)])
def test_shift_jitter_pads_with_the_background(dy, dx, flip):
    x = torch.randn(2, 3, 7, 9)
    background = torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1)
    padded = F.pad(x, (9, 9, 7, 7), value=float("nan"))
    expected = padded[:, :, 7 - dy:14 - dy, 9 - dx:18 - dx]
    if flip:
        # The roll mode's order: shift, then mirror the shifted view.
        expected = torch.flip(expected, dims=(3,))
    expected = torch.where(torch.isnan(expected), background.expand_as(expected), expected)
    got = apply_view(x, view_indices(7, 9, dy, dx, flip, mode="shift"), background)
    assert torch.equal(got, expected)


def test_shift_jitter_never_wraps_a_stroke_across_the_border():
    """A bright column at the right edge, shifted right: the roll brings it in at the left, the
    shift does not."""
    x = torch.zeros(1, 1, 4, 4)
    x[..., -1] = 1.0
    rolled = apply_view(x, view_indices(4, 4, 0, 1, False, mode="roll"))
    shifted = apply_view(x, view_indices(4, 4, 0, 1, False, mode="shift"), torch.zeros(1, 1, 1, 1))
    assert rolled[..., 0].sum() == 4 and shifted.sum() == 0


def test_random_translate_pads_with_the_darkest_value_and_is_seeded():
    x = torch.rand(5, 1, 6, 6) + 1.0
    x[0, 0, 0, 0] = 0.0
    a = random_translate(x, 2, torch.Generator().manual_seed(0))
    b = random_translate(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert set(torch.unique(a[a < 1.0]).tolist()) <= {0.0}  # padding is the batch minimum


def test_random_flip_mirrors_some_images():
    x = torch.arange(4.0).view(1, 1, 1, 4).repeat(64, 1, 1, 1)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 3).sum().item()
    assert 10 < flipped < 54 and torch.equal(out[out[:, 0, 0, 0] == 3], x.flip(3)[:flipped])
