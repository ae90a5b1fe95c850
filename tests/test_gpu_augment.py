"""data.augment_on=gpu: the batched device augmentation returns what the PIL path returns (boxes and flips that
describe the pixels, the same distributions), reproducibly, and pre-training with it resumes exactly."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from densecl.data.augment import IMAGENET_MEAN, IMAGENET_STD, TwoViewAugmentation
from densecl.data.gpu_augment import DeviceTwoViewAugmentation, TwoViewParams, collate_raw, decode_images
from densecl.data.sampling import SeededBatchAugmentation
from densecl.data.settings import DataConfig
from densecl.data.sources import load_rgb_image, read_encoded
from densecl.data.synthetic import generate_scene
from densecl.training.checkpoint import load_checkpoint
from densecl.training.pretrain import build_dataset, pretrain
from tests.test_engine import tiny_config

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
CPU = torch.device("cpu")


def to_255(views: torch.Tensor) -> torch.Tensor:
    return (views * STD + MEAN) * 255.0


def coordinate_tensor(width: int, height: int) -> torch.Tensor:
    """uint8 (3, H, W): red = x, green = y, blue = 0."""
    xs = torch.arange(width, dtype=torch.uint8)[None, :].expand(height, width)
    ys = torch.arange(height, dtype=torch.uint8)[:, None].expand(height, width)
    return torch.stack([xs, ys, torch.zeros_like(xs)])


def seeded_items(params: TwoViewParams, images, seed: int) -> list:
    """What SeededViews gives the loader: each item drawn under its own seed."""
    items = []
    for k, image in enumerate(images):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100_003 + k)
            items.append(params(image))
    return items


def augment(images, size: int, seed: int, device_aug: DeviceTwoViewAugmentation | None = None, batch_size: int = 16):
    """(views, boxes, flips) of the images in loader-sized batches, each with its own device-side draws."""
    device_aug = device_aug or DeviceTwoViewAugmentation(size)
    items, parts = seeded_items(TwoViewParams(size), images, seed), []
    for start in range(0, len(items), batch_size):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100_003 + start)
            parts.append(device_aug(collate_raw(items[start : start + batch_size]), CPU))
    return tuple(torch.cat(part) for part in zip(*parts))


# ------------------------------------------------------------------------------------- geometry and types


@pytest.mark.parametrize("seed", range(3))
def test_types_shapes_and_view_pixels_match_boxes_and_flips_for_mixed_sizes(seed):
    size, sources = 48, [coordinate_tensor(256, 200), coordinate_tensor(180, 240), coordinate_tensor(96, 64)] * 2
    device_aug = DeviceTwoViewAugmentation(size)
    device_aug.photometric = torch.nn.Identity()  # keep only the geometry
    views, boxes, flips = augment(sources, size, seed, device_aug)
    assert views.shape == (6, 2, 3, size, size) and views.dtype == torch.float32
    assert boxes.shape == (6, 2, 4) and boxes.dtype == torch.float32
    assert flips.shape == (6, 2) and flips.dtype == torch.bool
    for source, pair, pair_boxes, pair_flips in zip(sources, views, boxes, flips):
        height, width = source.shape[-2:]
        for view, box, flipped in zip(pair, pair_boxes, pair_flips):
            x0, y0, x1, y1 = box.tolist()
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            pixels = to_255(view)
            # output pixel u shows source x = x0 + (u + 0.5) * box width / size - 0.5 (the PIL path's mapping)
            expected_x = x0 + (torch.arange(size) + 0.5) * (x1 - x0) / size - 0.5
            expected_y = y0 + (torch.arange(size) + 0.5) * (y1 - y0) / size - 0.5
            if flipped:
                expected_x = expected_x.flip(0)
            inner = slice(3, size - 3)  # resampling near the crop border sees clamped pixels
            error_x = (pixels[0].mean(0) - expected_x)[inner].abs().max().item()
            error_y = (pixels[1].mean(1) - expected_y)[inner].abs().max().item()
            assert max(error_x, error_y) < 1.5, f"{box.tolist()} flip={bool(flipped)}: {error_x:.1f}, {error_y:.1f} px"
    assert flips.any() and not flips.all()  # both cases checked


def test_jpeg_decoding_matches_the_pil_path_including_exif_orientation(tmp_path):
    scene = generate_scene(0, 1, 96).image.resize((120, 90))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed 90 x 120
    scene.save(tmp_path / "rotated.jpg", quality=90, exif=exif.tobytes())
    scene.convert("L").save(tmp_path / "gray.jpg")
    scene.convert("CMYK").save(tmp_path / "cmyk.jpg")
    raw = (tmp_path / "rotated.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    names = ["rotated", "gray", "cmyk", "truncated"]
    encoded = [read_encoded(tmp_path / f"{name}.jpg") for name in names]
    assert (encoded[0].height, encoded[0].width) == (120, 90)
    decoded = decode_images(encoded, CPU)
    for name, image in zip(names[:3], decoded):
        assert torch.equal(image, TF.pil_to_tensor(load_rgb_image(tmp_path / f"{name}.jpg"))), name
    assert decoded[3] is None  # broken past its header: the batch replaces it (see the image-folder test)


# ------------------------------------------------------------------------- distributions against the PIL path

NUM_SAMPLES, VIEW_SIZE, SCENE_SIZE = 400, 32, 96
QUANTILES = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])


@functools.cache
def scenes() -> tuple[Image.Image, ...]:
    return tuple(generate_scene(0, i, SCENE_SIZE).image for i in range(16))


def view_statistics(views: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> dict[str, torch.Tensor]:
    """Crop geometry, photometric rates and colour statistics of N samples of scenes()[k % 16], each view also
    against its plain crop (same box and flip, no photometric step) to tell which steps touched it."""
    sources = [TF.pil_to_tensor(scenes()[k % len(scenes())]).float() for k in range(views.shape[0])]
    plain = torch.stack([
        torch.stack([TF.resized_crop(src, int(b[1]), int(b[0]), int(b[3] - b[1]), int(b[2] - b[0]),
                                     [VIEW_SIZE, VIEW_SIZE], antialias=True) for b in pair_boxes])
        for src, pair_boxes in zip(sources, boxes)
    ]).float()
    plain = torch.where(flips[..., None, None, None], plain.flip(-1), plain).flatten(0, 1)
    pixels = to_255(views).flatten(0, 1)
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    gray = (pixels - pixels[:, :1]).abs().amax((1, 2, 3)) < 0.01  # equal channels before normalisation
    means, plain_means = pixels.mean((2, 3)), plain.mean((2, 3))

    def sharpness(x):  # gradient energy over contrast: what blurring lowers and jitter leaves alone
        dx, dy = x[..., 1:] - x[..., :-1], x[..., 1:, :] - x[..., :-1, :]
        return (dx.abs().mean((1, 2, 3)) + dy.abs().mean((1, 2, 3))) / x.std((1, 2, 3)).clamp_min(1e-6)

    colourfulness = (pixels.amax(1) - pixels.amin(1)).mean((1, 2)) / (plain.amax(1) - plain.amin(1)).mean((1, 2))
    colour = ~gray
    return {
        "area": (width * height / SCENE_SIZE**2).flatten(),
        "log_ratio": torch.log(width / height).flatten(),
        "flip_rate": flips.float().mean(),
        "gray_rate": gray.float().mean(),
        "jitter_rate": ((means - plain_means).abs().amax(1) > 0.5)[colour].float().mean(),
        "blur_rate": (sharpness(pixels) / sharpness(plain) < 0.9)[colour].float().mean(),
        "sharpness_ratio": (sharpness(pixels) / sharpness(plain))[colour],
        "channel_mean": means.mean(0),
        "channel_std": pixels.std((2, 3)).mean(0),
        "brightness_ratio": means.mean(1) / plain_means.mean(1),
        "contrast_ratio": pixels.std((1, 2, 3)) / plain.std((1, 2, 3)),
        "colourfulness_ratio": colourfulness[colour],
    }


def pil_path_statistics(seed: int = 1) -> dict[str, torch.Tensor]:
    aug, samples = TwoViewAugmentation(VIEW_SIZE), []
    for k in range(NUM_SAMPLES):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100_003 + k)
            samples.append(aug(scenes()[k % len(scenes())]))
    return view_statistics(*(torch.stack(part) for part in zip(*samples)))


def gpu_path_statistics(seed: int = 1) -> dict[str, torch.Tensor]:
    images = [scenes()[k % len(scenes())] for k in range(NUM_SAMPLES)]
    return view_statistics(*augment(images, VIEW_SIZE, seed))


@pytest.fixture(scope="module")
def both_paths():
    return pil_path_statistics(), gpu_path_statistics()


def assert_close(name: str, gpu: torch.Tensor, pil: torch.Tensor, tol: float) -> None:
    gap = (gpu - pil).abs().max().item()
    assert gap <= tol, f"{name}: gpu {gpu.numpy().round(3)} vs PIL {pil.numpy().round(3)} (gap {gap:.3f} > {tol})"


def assert_geometry_matches(gpu: dict, pil: dict) -> None:
    # measured at 400 samples (seeds 1-6 of each path): area means 0.53-0.55, log-ratio means within 0.01 of 0
    for key in ("area", "log_ratio"):
        assert_close(f"{key} mean", gpu[key].mean(), pil[key].mean(), 0.04)
        assert_close(f"{key} quantiles", gpu[key].quantile(QUANTILES), pil[key].quantile(QUANTILES), 0.06)
    assert abs(gpu["flip_rate"] - 0.5) < 0.07


def assert_rates_match(gpu: dict, pil: dict) -> None:
    # binomial noise over 800 views is about 0.015; measured on seeds 1-6: grayscale 0.17-0.21, jitter 0.79-0.82
    for stats in (gpu, pil):
        assert abs(stats["gray_rate"] - 0.2) < 0.07, f"grayscale rate {stats['gray_rate']:.3f}, expected 0.2"
        assert abs(stats["jitter_rate"] - 0.8) < 0.07, f"colour jitter rate {stats['jitter_rate']:.3f}, expected 0.8"
    # blur: half the views, those of a small sigma not visibly softer: 0.35-0.44 on either path (seeds 1-6)
    assert_close("blur rate", gpu["blur_rate"], pil["blur_rate"], 0.1)
    assert_close("sharpness ratio quantiles", gpu["sharpness_ratio"].quantile(QUANTILES[:2]),
                 pil["sharpness_ratio"].quantile(QUANTILES[:2]), 0.1)


def assert_colours_match(gpu: dict, pil: dict) -> None:
    # seeds 1-6 of each path: channel means 119.8-125.0 (the device path about 1 level brighter: PIL rounds to
    # uint8 after each step), mean channel stds 40.4-43.4
    assert_close("channel means", gpu["channel_mean"], pil["channel_mean"], 4.0)
    assert_close("channel stds", gpu["channel_std"], pil["channel_std"], 2.5)
    # the lower half of each ratio to the plain crop, where jitter strength shows: at most 0.064 apart over
    # any pair of seeds (the upper tails depend more on which crops were drawn)
    for key in ("brightness_ratio", "contrast_ratio", "colourfulness_ratio"):
        assert_close(f"{key} quantiles", gpu[key].quantile(QUANTILES[:3]), pil[key].quantile(QUANTILES[:3]), 0.07)


def test_crop_geometry_and_flips_follow_the_pil_path(both_paths):
    assert_geometry_matches(both_paths[1], both_paths[0])


def test_jitter_grayscale_and_blur_rates_follow_the_pil_path(both_paths):
    assert_rates_match(both_paths[1], both_paths[0])


def test_colour_statistics_follow_the_pil_path(both_paths):
    assert_colours_match(both_paths[1], both_paths[0])


# ------------------------------------------------------------------------------------------ reproducibility


def gpu_config(**pretrain_fields):
    data = DataConfig(kind="synthetic", num_images=16, image_size=64, seed=0, augment_on="gpu")
    return tiny_config(data=data, **pretrain_fields)


def test_the_same_seed_and_step_give_the_same_batch_whatever_the_global_rng():
    cfg = gpu_config()

    def batch(step: int):
        dataset = build_dataset(cfg)
        raw = collate_raw([dataset[(0, i)] for i in range(4)])
        torch.manual_seed(step)  # the global stream must not matter, and must be left as it was
        before = torch.get_rng_state()
        out = SeededBatchAugmentation(DeviceTwoViewAugmentation(cfg.pretrain.crop_size), cfg.seed)(raw, CPU, 3)
        assert torch.equal(torch.get_rng_state(), before)
        return out

    first, second = batch(0), batch(1)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    dataset = build_dataset(cfg)
    raw = collate_raw([dataset[(0, i)] for i in range(4)])
    other_step = SeededBatchAugmentation(DeviceTwoViewAugmentation(cfg.pretrain.crop_size), cfg.seed)(raw, CPU, 4)
    assert torch.equal(other_step[1], first[1]) and not torch.equal(other_step[0], first[0])  # same crops, new colours


# ----------------------------------------------------------------------------------------------- engine


def test_interrupted_then_resumed_equals_uninterrupted_on_the_gpu_path(tmp_path, monkeypatch):
    calls = []
    original = DeviceTwoViewAugmentation.__call__
    monkeypatch.setattr(DeviceTwoViewAugmentation, "__call__",
                        lambda self, *args: calls.append(1) or original(self, *args))
    cfg = gpu_config(iters=2, ckpt_every=100)
    reference = pretrain(cfg, tmp_path / "straight")
    assert reference.completed and len(calls) == 2
    stopped = pretrain(cfg, tmp_path / "resumed", should_stop=lambda: True)  # preempted after step 1
    assert not stopped.completed and stopped.iterations == 1
    resumed = pretrain(cfg, tmp_path / "resumed")
    assert resumed.completed and resumed.iterations == 2 and len(calls) == 4
    a, b = load_checkpoint(reference.checkpoint_path), load_checkpoint(resumed.checkpoint_path)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    drop = "images_per_sec"
    assert {k: v for k, v in a["metrics"].items() if k != drop} == {k: v for k, v in b["metrics"].items() if k != drop}


def test_a_folder_of_jpegs_of_different_sizes_trains_on_the_gpu_path(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    sizes = [(96, 72), (64, 112), (140, 90), (100, 130)]
    for i, (width, height) in enumerate(sizes):
        generate_scene(0, i, 96).image.resize((width, height)).save(root / f"{i}.jpg", quality=90)
    rgba = np.random.default_rng(0).integers(0, 256, (70, 90, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(root / "transparent.png")  # decoded in the worker, as the PIL path does
    raw = (root / "0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(raw[: len(raw) // 2])  # its header reads: it fails on the device
    data = DataConfig(kind="image_folder", root=str(root), augment_on="gpu")
    cfg = tiny_config(data=data, iters=None, epochs=1, batch_size=3, queue_len=6, num_workers=1, ckpt_every=100,
                      corr_eval_crop=48, corr_eval_pairs=4, corr_eval_every=1)  # one epoch: every file is drawn
    seen = []
    with pytest.warns(UserWarning, match="undecodable image.*truncated.jpg"):
        result = pretrain(cfg, tmp_path / "run", on_step=lambda s, m: seen.append(m))
    assert result.completed and result.iterations == 2
    assert all(math.isfinite(v) for m in seen for v in m.values())
    assert "corr_acc_eval" in seen[-1]  # the fixed evaluation pairs, drawn with the PIL path
