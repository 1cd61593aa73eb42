"""scenarios/transforms.py: what each transform does to the values, as the
"Transforms" table of docs/scenarios.md describes it, and the per-sample
randomness of the augmentations. (Batching invariants, parsing errors and
normalize: tests/test_scenarios.py.)"""

from __future__ import annotations

import torch
from contlearn.scenarios.transforms import (
    CenterCrop,
    Resize,
    Rotate,
    ToGray,
    ToRGB,
    parse_transforms,
)
from torch.nn import functional as F


def augment_of(*specs: str):
    ops, augment = parse_transforms(list(specs), "scenario.train_transform")
    assert not ops and augment is not None
    return augment


def crop_offsets(x: torch.Tensor, out: torch.Tensor, p: int) -> list[tuple[int, int] | None]:
    """For each sample, the (row, col) window of the zero-padded input that the
    output is, or None where no window (or more than one) is."""
    padded = F.pad(x, (p, p, p, p))
    h, w = x.shape[-2:]
    found = []
    for i in range(len(x)):
        windows = [(r, c) for r in range(2 * p + 1) for c in range(2 * p + 1)
                   if torch.equal(out[i], padded[i, :, r : r + h, c : c + w])]
        found.append(windows[0] if len(windows) == 1 else None)
    return found


# ------------------------------------------------------------ augmentations


def test_random_crop_zero_pads_and_reaches_every_offset():
    x = torch.rand(300, 2, 5, 5) + 0.5  # no zeros of its own: the padding shows
    out = augment_of("random_crop:2")(x, torch.Generator().manual_seed(0))
    offsets = crop_offsets(x, out, 2)
    assert None not in offsets  # each sample is a window of the zero-padded input
    assert set(offsets) == {(r, c) for r in range(5) for c in range(5)}  # from 0 to 2P, both ends included


def test_random_crop_draws_an_offset_per_sample():
    x = (torch.rand(1, 1, 6, 6) + 0.5).expand(32, -1, -1, -1)
    out = augment_of("random_crop:1")(x, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 4  # one image, many crops in one batch


def test_hflip_mirrors_each_sample_with_probability_one_half_by_default():
    x = torch.rand(1, 2, 3, 4).expand(2000, -1, -1, -1)
    out = augment_of("hflip")(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(3)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 0.45 < float(flipped.float().mean()) < 0.55  # each sample on its own, half of them


# ------------------------------------------------------- deterministic ops


def test_resize_is_bilinear_and_antialiased_like_torchvision():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(3, 2, 12, 12)
    for size in ((5, 5), (7, 4), (20, 17)):  # shrink, both, enlarge
        expected = TF.resize(x, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
        assert torch.allclose(Resize(size)(x), expected, atol=1e-6), size
    dot = torch.zeros(1, 1, 8, 8)
    dot[0, 0, 0, 0] = 1
    assert float(Resize((2, 2))(dot)[0, 0, 0, 0]) > 0  # shrinking averages: a small detail is not skipped


def test_grayscale_is_itu_r_601_2_luma():
    rgb = torch.eye(3).view(3, 3, 1, 1).expand(-1, -1, 2, 2)  # pure red, green, blue
    grey = ToGray()(rgb)
    assert grey.shape == (3, 1, 2, 2)
    assert torch.allclose(grey[:, 0, 0, 0], torch.tensor([0.299, 0.587, 0.114]))


def test_rgb_repeats_the_grey_channel_three_times():
    x = torch.rand(4, 1, 3, 3)
    assert torch.equal(ToRGB()(x), x.repeat(1, 3, 1, 1))


def test_rotation_by_a_multiple_of_360_degrees_leaves_images_unchanged():
    x = torch.rand(2, 1, 28, 28)  # an MNIST size, where resampling in place is not exact
    for degrees in (0, 360, -360):
        assert torch.equal(Rotate(degrees)(x), x), degrees  # experience 0 of a rotated stream is the raw data


def test_rotation_is_zero_outside_the_image():
    out = Rotate(45)(torch.ones(1, 1, 9, 9))[0, 0]
    assert out[0, 0] == out[0, -1] == out[-1, 0] == out[-1, -1] == 0  # corners rotated in from outside
    assert out[4, 4] == 1


def test_random_crop_pads_by_4_by_default():
    _, augment = parse_transforms(["random_crop"], "k")
    assert augment.ops[0].padding == 4


def test_center_crop_of_an_odd_margin_leans_top_left():
    x = torch.arange(25.0).view(1, 1, 5, 5)
    assert torch.equal(CenterCrop((2, 2))(x), x[..., 1:3, 1:3])  # margin 3: 1 above, 2 below
