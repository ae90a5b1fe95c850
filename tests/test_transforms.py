"""Two-view augmentation: reproducible under a torch seed, boxes/flips that match the pixels, ImageNet stats."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from densecl.data.augment import IMAGENET_MEAN, IMAGENET_STD, TwoViewAugmentation

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def coordinate_image(width: int = 256, height: int = 200) -> Image.Image:
    """Red channel = x, green channel = y, blue = 0: every pixel names its own position."""
    xs = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :], (height, width))
    ys = np.broadcast_to(np.arange(height, dtype=np.uint8)[:, None], (height, width))
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1))


def unnormalise_to_255(view: torch.Tensor) -> torch.Tensor:
    return (view * STD + MEAN) * 255.0


def random_image(seed: int, width: int = 120, height: int = 90) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def test_output_types_and_shapes():
    views, boxes, flips = TwoViewAugmentation(size=32)(random_image(0))
    assert views.shape == (2, 3, 32, 32) and views.dtype == torch.float32
    assert boxes.shape == (2, 4) and boxes.dtype == torch.float32
    assert flips.shape == (2,) and flips.dtype == torch.bool


def test_fixed_torch_seed_reproduces_output_whatever_python_and_numpy_do():
    aug, img = TwoViewAugmentation(size=48), random_image(1)
    outputs = []
    for other_seed in (1, 2):
        random.seed(other_seed)
        np.random.seed(other_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            outputs.append(aug(img))
    for first, second in zip(*outputs):
        assert torch.equal(first, second)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(124)
        different = aug(img)
    assert not torch.equal(outputs[0][0], different[0])


def test_the_two_views_are_independent_draws():
    torch.manual_seed(0)
    aug, img = TwoViewAugmentation(size=32), random_image(2)
    same_box = sum(bool(torch.equal(boxes[0], boxes[1])) for _, boxes, _ in (aug(img) for _ in range(20)))
    assert same_box < 5


def test_boxes_lie_inside_the_image_and_respect_scale_and_flips_are_balanced():
    torch.manual_seed(0)
    width, height = 150, 100
    aug = TwoViewAugmentation(size=16, scale=(0.2, 1.0))
    img = random_image(3, width, height)
    all_boxes, all_flips = [], []
    for _ in range(100):
        _, boxes, flips = aug(img)
        all_boxes.append(boxes)
        all_flips.append(flips)
    boxes, flips = torch.cat(all_boxes), torch.cat(all_flips)
    x0, y0, x1, y1 = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
    assert (x1 > x0).all() and (y1 > y0).all()
    area_fraction = (x1 - x0) * (y1 - y0) / (width * height)
    # Integer rounding of the box sides lets the area stray slightly outside the requested scale range.
    assert area_fraction.min() > 0.18 and area_fraction.max() <= 1.0
    assert 0.3 < flips.float().mean() < 0.7


@pytest.mark.parametrize("seed", range(6))
def test_view_pixels_match_box_and_flip(monkeypatch, seed):
    size = 64
    aug = TwoViewAugmentation(size=size)
    monkeypatch.setattr(aug, "_photometric", lambda view: view)  # keep only the geometry
    torch.manual_seed(seed)
    views, boxes, flips = aug(coordinate_image())
    for view, box, flipped in zip(views, boxes, flips):
        pixels = unnormalise_to_255(view)
        x0, y0, x1, y1 = box.tolist()
        # Centre of output pixel u maps to x0 + (u + 0.5) * width / size - 0.5 in the source image.
        expected_x = x0 + (torch.arange(size) + 0.5) * (x1 - x0) / size - 0.5
        expected_y = y0 + (torch.arange(size) + 0.5) * (y1 - y0) / size - 0.5
        if flipped:
            expected_x = expected_x.flip(0)
        inner = slice(3, size - 3)  # resampling near the crop border sees clamped pixels
        red_row = pixels[0].mean(0)
        green_column = pixels[1].mean(1)
        assert torch.allclose(red_row[inner], expected_x[inner], atol=1.5)
        assert torch.allclose(green_column[inner], expected_y[inner], atol=1.5)


def test_flip_direction_survives_the_full_photometric_pipeline():
    # A gray left-to-right ramp: jitter, grayscale and blur are monotone per pixel or smoothing, so only
    # the flip can reverse the ramp's direction.
    ramp = np.broadcast_to(np.linspace(20, 235, 256).astype(np.uint8)[None, :, None], (200, 256, 3))
    img = Image.fromarray(np.ascontiguousarray(ramp))
    aug = TwoViewAugmentation(size=32)
    torch.manual_seed(0)
    seen = set()
    for _ in range(10):
        views, _, flips = aug(img)
        for view, flipped in zip(views, flips):
            row = unnormalise_to_255(view).mean(dim=(0, 1))
            rising = bool(row[-4:].mean() > row[:4].mean())
            assert rising != bool(flipped)
            seen.add(bool(flipped))
    assert seen == {True, False}


def test_normalisation_uses_imagenet_statistics(monkeypatch):
    aug = TwoViewAugmentation(size=16)
    monkeypatch.setattr(aug, "_photometric", lambda view: view)
    mean_colour = tuple(round(m * 255) for m in IMAGENET_MEAN)
    views, _, _ = aug(Image.new("RGB", (40, 30), mean_colour))
    assert views.abs().max() < 1.0 / 255 / min(IMAGENET_STD)
    white_views, _, _ = aug(Image.new("RGB", (40, 30), (255, 255, 255)))
    expected = (1.0 - MEAN) / STD
    assert torch.allclose(white_views, expected.expand_as(white_views[0]).expand_as(white_views), atol=1e-5)


def test_non_rgb_input_is_converted_and_bad_arguments_are_rejected():
    views, _, _ = TwoViewAugmentation(size=8)(Image.new("L", (20, 20), 128))
    assert views.shape == (2, 3, 8, 8)
    with pytest.raises(TypeError, match="PIL image"):
        TwoViewAugmentation(size=8)(torch.zeros(3, 20, 20))
    with pytest.raises(ValueError, match="scale"):
        TwoViewAugmentation(scale=(0.5, 0.2))
