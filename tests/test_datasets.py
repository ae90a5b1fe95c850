"""Pre-training image sources: a messy real-world folder, the synthetic scenes, and the builder."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from densecl.data.augment import TwoViewAugmentation
from densecl.data.sources import (
    IMAGE_EXTENSIONS,
    SyntheticScenes,
    UnlabeledImageFolder,
    build_pretrain_dataset,
)
from densecl.data.synthetic import generate_scene


def noise_image(seed: int, width: int = 48, height: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """A folder with good files of every extension in nested folders, odd colour modes and two broken files."""
    root = tmp_path_factory.mktemp("messy")
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    noise_image(0).save(root / "a" / "b" / "rgb.jpg")
    noise_image(1).save(root / "a" / "rgb.png")
    noise_image(2).save(root / "c" / "rgb.webp")
    noise_image(3).save(root / "rgb.bmp")
    noise_image(4).save(root / "c" / "UPPER.JPEG", format="JPEG")
    Image.new("L", (30, 20), 77).save(root / "gray.png")
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[:, :15] = (10, 200, 30, 255)  # left half opaque green, right half fully transparent black
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    palette_image = Image.new("P", (30, 20), 1)
    palette_image.putpalette([0, 0, 0, 250, 20, 40] + [0] * 762)
    palette_image.save(root / "palette.png")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    sixteen_bit = np.full((20, 30), 65535, dtype=np.uint16)
    sixteen_bit[:, :15] = 32896
    Image.fromarray(sixteen_bit).save(root / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    noise_image(5, width=40, height=20).save(root / "c" / "rotated.jpg", exif=exif)
    (root / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    buffer = io.BytesIO()
    noise_image(6, width=128, height=128).save(buffer, format="JPEG", quality=95)
    (root / "a" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "notes.txt").write_text("not an image")
    return root


GOOD_FILES = {"a/b/rgb.jpg", "a/rgb.png", "c/rgb.webp", "rgb.bmp", "c/UPPER.JPEG", "gray.png", "rgba.png",
              "palette.png", "cmyk.jpg", "gray16.png", "c/rotated.jpg"}


def build_folder(root, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = UnlabeledImageFolder(root, **kwargs)
    return dataset, [str(w.message) for w in caught]


def relative_names(dataset):
    return [dataset.path(i).relative_to(dataset.root).as_posix() for i in range(len(dataset))]


def test_scan_finds_every_image_in_sorted_order_and_skips_the_corrupt_header(messy_folder):
    dataset, messages = build_folder(messy_folder)
    names = relative_names(dataset)
    assert names == sorted(names)
    assert set(names) == GOOD_FILES | {"a/truncated.jpg"}  # truncation only shows when decoding
    assert dataset.num_skipped == 1 and dataset.skipped[0][0] == str(messy_folder / "corrupt.jpg")
    assert len(messages) == 1 and "corrupt.jpg" in messages[0]


def test_every_good_image_loads_as_rgb_with_the_right_content(messy_folder):
    dataset, _ = build_folder(messy_folder)
    images = {}
    for i, name in enumerate(relative_names(dataset)):
        if name in GOOD_FILES:
            images[name] = dataset[i]
    assert all(image.mode == "RGB" for image in images.values())
    assert np.array_equal(np.asarray(images["a/rgb.png"]), np.asarray(noise_image(1)))
    assert np.asarray(images["gray.png"]).tolist()[0][0] == [77, 77, 77]
    rgba = np.asarray(images["rgba.png"])
    assert rgba[0, 0].tolist() == [10, 200, 30] and rgba[0, -1].tolist() == [255, 255, 255]
    assert np.asarray(images["palette.png"])[0, 0].tolist() == [250, 20, 40]
    cmyk = np.asarray(images["cmyk.jpg"]).astype(int)
    assert cmyk[0, 0, 0] > 240 and cmyk[0, 0, 1:].max() < 15
    gray16 = np.asarray(images["gray16.png"])
    assert gray16[0, 0].tolist() == [128] * 3 and gray16[0, -1].tolist() == [255] * 3
    assert images["c/rotated.jpg"].size == (20, 40)  # stored 40x20, EXIF says rotate 90 degrees


def test_truncated_file_warns_is_counted_once_and_is_replaced_by_the_next_image(messy_folder):
    dataset, _ = build_folder(messy_folder)
    names = relative_names(dataset)
    broken = names.index("a/truncated.jpg")
    replacement = np.asarray(dataset[(broken + 1) % len(dataset)])
    with pytest.warns(UserWarning, match="truncated.jpg"):
        image = dataset[broken]
    assert np.array_equal(np.asarray(image), replacement)
    assert dataset.num_skipped == 2 and dataset.skipped[-1][0] == str(messy_folder / "a" / "truncated.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second visit must neither warn nor count again
        assert np.array_equal(np.asarray(dataset[broken]), replacement)
    assert dataset.num_skipped == 2


def test_transform_is_applied(messy_folder):
    dataset, _ = build_folder(messy_folder, transform=lambda image: image.size)
    assert dataset[relative_names(dataset).index("c/rotated.jpg")] == (20, 40)


@pytest.mark.parametrize("contents", ["empty", "only_corrupt", "only_other_extensions"])
def test_folders_without_a_readable_image_raise_naming_folder_and_extensions(tmp_path, contents):
    folder = tmp_path / contents
    folder.mkdir()
    if contents == "only_corrupt":
        (folder / "broken.png").write_bytes(b"definitely not a png")
    if contents == "only_other_extensions":
        noise_image(0).save(folder / "image.tiff")
    with pytest.raises(ValueError) as raised, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        UnlabeledImageFolder(folder)
    assert isinstance(raised.value, FileNotFoundError)
    assert str(folder) in str(raised.value) and all(ext in str(raised.value) for ext in IMAGE_EXTENSIONS)


def test_missing_folder_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UnlabeledImageFolder(tmp_path / "nowhere")


def test_folder_where_nothing_decodes_raises_instead_of_looping(tmp_path):
    buffer = io.BytesIO()
    noise_image(0, 128, 128).save(buffer, format="JPEG")
    (tmp_path / "half.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    dataset, _ = build_folder(tmp_path)
    with pytest.raises(RuntimeError, match="none of its 1 images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset[0]


def test_synthetic_scenes_match_the_generator_and_apply_the_transform():
    dataset = SyntheticScenes(num_images=5, image_size=64, seed=3)
    assert len(dataset) == 5
    assert np.array_equal(np.asarray(dataset[2]), np.asarray(generate_scene(3, 2, 64).image))
    assert not np.array_equal(np.asarray(dataset[2]), np.asarray(dataset[3]))
    with pytest.raises(IndexError):
        dataset[5]
    views, boxes, flips = SyntheticScenes(2, 64, transform=TwoViewAugmentation(size=32))[0]
    assert views.shape == (2, 3, 32, 32) and boxes.shape == (2, 4) and flips.dtype == torch.bool


def test_build_pretrain_dataset(messy_folder):
    synthetic = build_pretrain_dataset("synthetic", num_images=7, image_size=48, seed=1)
    assert isinstance(synthetic, SyntheticScenes) and len(synthetic) == 7 and synthetic[0].size == (48, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = build_pretrain_dataset("image_folder", root=str(messy_folder))
    assert isinstance(folder, UnlabeledImageFolder) and len(folder) == len(GOOD_FILES) + 1
    with pytest.raises(ValueError, match="`root`"):
        build_pretrain_dataset("image_folder")
    with pytest.raises(ValueError, match="'synthetic'.*'image_folder'"):
        build_pretrain_dataset("imagenet")
