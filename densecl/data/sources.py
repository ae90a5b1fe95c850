"""Unlabelled image sources for pre-training: a folder of real images, or the built-in synthetic scenes.

Pre-training reads huge, messy folders (ImageNet, COCO, crawls) where a few files are always broken. The
folder dataset therefore scans cheaply (file headers only), converts every image to plain RGB, and turns a
broken file into a warning and a counted skip instead of a crashed run.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset

from densecl.data.scene_cache import cached_scenes
from densecl.data.settings import DataConfig, DataKind
from densecl.data.synthetic import generate_scene

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TRANSPARENT_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white


class ImageFolderError(FileNotFoundError, ValueError):
    """A folder that is missing or holds no readable image (catchable as either base class)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: high-bit-depth grays are rescaled, transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0  # 16-bit range onto 8 bits
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0  # float images in [0, 1]
        gray = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
        return gray.convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Decode a file fully, apply its EXIF orientation and return it as RGB; raises if the file is broken."""
    with Image.open(path) as image:
        image.load()  # decode now, so that truncated or corrupt data fails here and not later
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as error:  # a malformed EXIF block should not cost us good pixels
            warnings.warn(f"{path}: could not apply EXIF orientation ({error}); using the stored orientation",
                          stacklevel=2)
        return to_rgb(image)


JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera's multi-picture JPEG; decoders read its first (main) picture
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the stored image by 90 degrees


@dataclass
class EncodedJpeg:
    """A JPEG file's bytes, to be decoded on the training device, and its size as displayed (read from the header),
    from which the crops are drawn before any pixel is decoded."""

    data: torch.Tensor  # uint8 (N,): the file as it is on disk
    height: int  # after the EXIF orientation, as load_rgb_image returns the image
    width: int
    orientation: int = 1  # the EXIF orientation, applied after decoding (nvjpeg does not)
    path: str = ""  # for the warning when it cannot be decoded


def read_encoded(path: str | os.PathLike) -> EncodedJpeg | Image.Image:
    """A JPEG as its bytes and header (decoded later, on the training device); any other format decoded here
    by load_rgb_image, as the CPU path does (only JPEG has a device decoder). Raises if the header is broken."""
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as image:
        if image.format not in JPEG_FORMATS:
            return load_rgb_image(path)
        width, height = image.size
        try:
            orientation = int(image.getexif().get(ExifTags.Base.Orientation, 1))
        except Exception:  # as load_rgb_image: a malformed EXIF block keeps the stored orientation
            orientation = 1
    if orientation in SWAPPING_ORIENTATIONS:
        width, height = height, width
    return EncodedJpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), height, width, orientation, str(path))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class UnlabeledImageFolder(Dataset):
    """Every image file under ``root`` (recursive, sorted), returned as ``transform(read(path))``: by default
    ``read`` decodes to RGB (load_rgb_image); augment_on=gpu sets it to read_encoded.

    Files whose header cannot be read are skipped at scan time; files that fail when read are skipped in
    ``__getitem__``, which then returns the next readable image. Each skip warns, naming the file, and is
    recorded in ``skipped`` as (path, reason) for the files this process saw.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None,
                 check_headers: bool = True, read: Callable[[Path], Any] = load_rgb_image):
        self.root = Path(root).expanduser()
        self.transform = transform
        self.read = read
        self.skipped: list[tuple[str, str]] = []
        self._broken: set[int] = set()
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise ImageFolderError(f"image folder {self.root} {what}; expected a folder of image files ending "
                                   f"in {', '.join(IMAGE_EXTENSIONS)} (any case)")
        candidates = sorted(
            path.relative_to(self.root).as_posix()
            for path in self.root.rglob("*")
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        )
        readable = [name for name in candidates if not check_headers or self._header_is_readable(name)]
        if not readable:
            found = f"{len(candidates)} candidate files, none readable" if candidates else "no files"
            raise ImageFolderError(f"image folder {self.root} holds no readable image ({found}); expected "
                                   f"image files ending in {', '.join(IMAGE_EXTENSIONS)} (any case)")
        # Fixed-width bytes in one numpy array: no per-path Python objects, so DataLoader workers that fork
        # this dataset do not slowly copy it through reference-count updates.
        self._relative_paths = np.array([os.fsencode(name) for name in readable], dtype=np.bytes_)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self._relative_paths)

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(bytes(self._relative_paths[index]))

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.root}")
        index %= len(self)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._broken:
                continue
            path = self.path(candidate)
            try:
                image = self.read(path)
            except Exception as error:
                self._broken.add(candidate)
                self._skip(str(path), _describe(error), "while decoding; using the next readable image instead")
                continue
            return image if self.transform is None else self.transform(image)
        raise RuntimeError(f"image folder {self.root}: none of its {len(self)} images could be decoded; "
                           f"skipped: {self.skipped[:5]}{' ...' if self.num_skipped > 5 else ''}")

    def _header_is_readable(self, relative_path: str) -> bool:
        path = self.root / relative_path
        try:
            with Image.open(path) as image:
                width, height = image.size
            if width <= 0 or height <= 0:
                raise ValueError(f"empty image size {width}x{height}")
        except Exception as error:
            self._skip(str(path), _describe(error), "while reading its header")
            return False
        return True

    def _skip(self, path: str, reason: str, when: str) -> None:
        self.skipped.append((path, reason))
        warnings.warn(f"skipping unreadable image {path} ({reason}) {when}", stacklevel=3)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, images={len(self)}, skipped={self.num_skipped})"


class SyntheticScenes(Dataset):
    """``num_images`` generated scenes (see densecl.data.synthetic), made on the fly, or read from a uint8 cache made
    once in ``cache_dir`` (densecl.data.scene_cache): the same pixels either way."""

    def __init__(self, num_images: int, image_size: int = 160, seed: int = 0,
                 transform: Callable[[Image.Image], Any] | None = None, cache_dir: str | os.PathLike | None = None):
        if num_images < 1:
            raise ValueError(f"SyntheticScenes: num_images must be >= 1, got {num_images}")
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.transform = transform
        self.cache_dir = cache_dir
        self._cached = None if cache_dir is None else cached_scenes(cache_dir, self.seed, self.num_images,
                                                                    self.image_size)

    def __len__(self) -> int:
        return self.num_images

    def _index(self, index: int) -> int:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic scenes")
        return index % self.num_images

    def pixels(self, index: int) -> np.ndarray:
        """Scene ``index`` as uint8 (H, W, 3)."""
        index = self._index(index)
        if self._cached is not None:
            return np.array(self._cached[index])
        return np.asarray(generate_scene(self.seed, index, self.image_size).image)

    def __getitem__(self, index: int):
        if self._cached is None:
            image = generate_scene(self.seed, self._index(index), self.image_size).image
        else:
            image = Image.fromarray(self.pixels(index))
        return image if self.transform is None else self.transform(image)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_images={self.num_images}, image_size={self.image_size}, "
                f"seed={self.seed})")


def build_pretrain_dataset(kind: str, transform: Callable[[Image.Image], Any] | None = None,
                           root: str | None = None, num_images: int = 2048, image_size: int = 160,
                           seed: int = 0, cache_dir: str | None = None) -> Dataset:
    """The pre-training image source named by ``kind``: "synthetic" scenes (kept in ``cache_dir`` when given)
    or an "image_folder" at ``root``."""
    if kind == DataKind.synthetic:
        return SyntheticScenes(num_images=num_images, image_size=image_size, seed=seed, transform=transform,
                               cache_dir=cache_dir)
    if kind == DataKind.image_folder:
        if not root:
            raise ValueError("build_pretrain_dataset: kind 'image_folder' needs the key `root` (the folder of "
                             f"images), got root={root!r}")
        return UnlabeledImageFolder(root, transform=transform)
    raise ValueError(f"build_pretrain_dataset: unknown kind {kind!r}; expected one of {[k.value for k in DataKind]}")


def first_images(data: DataConfig, count: int) -> list[Image.Image]:
    """The first `count` images of the configured source (scenes, or the files found walking the folder, a
    broken file skipped with a warning): what the correspondence figure shows."""
    if data.kind == DataKind.synthetic:
        return [generate_scene(data.seed, i, data.image_size).image for i in range(min(count, data.num_images))]
    images = []
    for folder, subfolders, files in os.walk(data.root):  # lazily: ImageNet has a million files
        subfolders.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                images.append(load_rgb_image(os.path.join(folder, name)))
            except Exception as err:  # a broken file is not worth losing the figure over
                warnings.warn(f"figure: skipping {name} ({err})", stacklevel=2)
            if len(images) == count:
                return images
    return images
