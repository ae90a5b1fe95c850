"""The MoCo-v2 two-view augmentation of densecl.data.augment, batched on the training device (data.augment_on=gpu).

Why: at a few hundred images per second and GPU, PIL in the data-loader workers becomes the bottleneck. The work
is split where the randomness allows it:
  - in the workers (TwoViewParams): nothing but reading. A JPEG stays encoded (densecl.data.sources.read_encoded),
    other images arrive as uint8 (3, H, W); both views' crop boxes and flips are drawn there from the sample's
    seed, with torchvision's RandomResizedCrop.get_params as the PIL path, from the size alone;
  - on the device (DeviceTwoViewAugmentation): JPEG decoding (nvjpeg on CUDA); each crop resized by torchvision's
    resized_crop, the PIL path's own function, on the tensor (PIL's box-to-pixel mapping and antialiasing; kornia's
    crop_and_resize does not antialias and needs the batch padded to its largest image, and its RandomResizedCrop
    also loops over the samples); then, in the PIL path's order, kornia's colour jitter, grayscale and blur, each
    one call per view slot over the B views with per-view parameters (drawn on torch's CPU generator, kornia's
    default), the horizontal flips and the ImageNet normalisation.
The batch it returns is what the PIL path's loader yields: views (B, 2, 3, S, S), boxes (B, 2, 4) as
(x0, y0, x1, y1) in original-image pixels, flips (B, 2). Differences from the PIL path: kornia's colour jitter
applies its four adjustments in one random order per call, so the first views of a batch share one order and the
second views another, where torchvision draws one per view (each view's distribution is the same; views of
different images are never compared by MoCo); the views stay float between the photometric steps (PIL rounds to
uint8 after each); the blur is an exact Gaussian truncated at 3 sigma where PIL approximates it with box blurs.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import kornia.augmentation as K
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from densecl.data.augment import (
    BLUR_PROBABILITY,
    BLUR_SIGMA_RANGE,
    COLOR_JITTER_PROBABILITY,
    FLIP_PROBABILITY,
    GRAYSCALE_PROBABILITY,
    IMAGENET_MEAN,
    IMAGENET_STD,
)
from densecl.data.sources import EncodedJpeg, load_rgb_image, to_rgb

RawImage = Tensor | EncodedJpeg  # uint8 (3, H, W), or a JPEG still encoded
BLUR_KERNEL = 2 * round(3 * BLUR_SIGMA_RANGE[1]) + 1  # covers 3 sigma of the widest blur either side: 13


def image_size(image: RawImage) -> tuple[int, int]:
    """(height, width) as displayed, without decoding."""
    if isinstance(image, EncodedJpeg):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


class TwoViewParams:
    """The workers' part: the image as read, and two independent views' crop boxes and flips.

    ``__call__`` returns ``(image, boxes, flips)``: image uint8 (3, H, W) or an EncodedJpeg; boxes float32 (2, 4)
    as (x0, y0, x1, y1) in the image's pixels; flips bool (2,). Every draw comes from torch's global generator,
    which densecl.data.sampling.SeededViews seeds per sample.
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.2, 1.0)):
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"TwoViewParams: scale must satisfy 0 < min <= max <= 1, got {scale!r}")
        self.size = int(size)
        self.scale = [float(scale[0]), float(scale[1])]
        self.ratio = [3.0 / 4.0, 4.0 / 3.0]  # torchvision's RandomResizedCrop default, as the PIL path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={tuple(self.scale)})"

    def __call__(self, image: Image.Image | Tensor | EncodedJpeg) -> tuple[RawImage, Tensor, Tensor]:
        if isinstance(image, Image.Image):
            image = TF.pil_to_tensor(to_rgb(image))
        height, width = image_size(image)
        shape_only = torch.zeros(()).expand(height, width)  # get_params reads the size alone: no pixels needed
        boxes, flips = [], []
        for _ in range(2):
            top, left, h, w = RandomResizedCrop.get_params(shape_only, self.scale, self.ratio)
            boxes.append([left, top, left + w, top + h])
            flips.append(bool(torch.rand(()) < FLIP_PROBABILITY))
        return image, torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips)


@dataclass
class RawBatch:
    """A loader batch of augment_on=gpu: images of any sizes as a list, their views' boxes and flips stacked."""

    images: list[RawImage]
    boxes: Tensor  # float32 (B, 2, 4)
    flips: Tensor  # bool (B, 2)

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> RawBatch:
        """Called by the DataLoader's pin_memory thread."""
        images = [
            dataclasses.replace(im, data=im.data.pin_memory()) if isinstance(im, EncodedJpeg)
            else im.pin_memory()
            for im in self.images
        ]
        return RawBatch(images, self.boxes.pin_memory(), self.flips.pin_memory())


def collate_raw(items: Sequence[tuple[RawImage, Tensor, Tensor]]) -> RawBatch:
    """The DataLoader's collate_fn for TwoViewParams items: variable-size images stay a list."""
    images, boxes, flips = zip(*items)
    return RawBatch(list(images), torch.stack(boxes), torch.stack(flips))


# ------------------------------------------------------------------------------------------ decoding


def orient(image: Tensor, orientation: int) -> Tensor:
    """(C, H, W) turned as PIL's ImageOps.exif_transpose turns an image with this EXIF orientation."""
    return {
        2: lambda t: t.flip(-1),
        3: lambda t: t.flip(-2, -1),
        4: lambda t: t.flip(-2),
        5: lambda t: t.transpose(-2, -1),
        6: lambda t: t.rot90(-1, (-2, -1)),
        7: lambda t: t.transpose(-2, -1).flip(-2, -1),
        8: lambda t: t.rot90(1, (-2, -1)),
    }.get(orientation, lambda t: t)(image)


def _decode_jpegs(jpegs: list[EncodedJpeg], device: torch.device) -> list[Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        return decode_jpeg([j.data for j in jpegs], mode=ImageReadMode.RGB, device=device)


def _decode_one(jpeg: EncodedJpeg, device: torch.device) -> Tensor | None:
    """One JPEG the batched decoder refused: alone, then with PIL (CMYK, odd markings); None if both fail."""
    try:
        return orient(_decode_jpegs([jpeg], device)[0], jpeg.orientation)
    except RuntimeError:
        pass
    try:
        return TF.pil_to_tensor(load_rgb_image(io.BytesIO(jpeg.data.numpy().tobytes()))).to(device)
    except Exception:
        return None


def decode_images(images: Sequence[RawImage], device: torch.device) -> list[Tensor | None]:
    """Each image as uint8 (3, H, W) on `device`, JPEGs decoded there in one batched call; None for an image
    that cannot be decoded or whose pixels disagree with the size its crops were drawn from."""
    out: list[Tensor | None] = [None if isinstance(im, EncodedJpeg) else im.to(device, non_blocking=True)
                                for im in images]
    jpeg_at = [i for i, im in enumerate(images) if isinstance(im, EncodedJpeg)]
    if jpeg_at:
        jpegs = [images[i] for i in jpeg_at]
        try:
            decoded = [orient(t, j.orientation) for t, j in zip(_decode_jpegs(jpegs, device), jpegs)]
        except RuntimeError:  # the batched decoder fails as a whole: find the culprits one by one
            decoded = [_decode_one(j, device) for j in jpegs]
        for i, image in zip(jpeg_at, decoded):
            if image is not None and tuple(image.shape[-2:]) != image_size(images[i]):
                image = _decode_one(images[i], device)  # e.g. an EXIF orientation read differently
            out[i] = image if image is not None and tuple(image.shape[-2:]) == image_size(images[i]) else None
    return out


def _replace_undecodable(batch: RawBatch, images: list[Tensor | None]) -> tuple[list[Tensor], Tensor, Tensor]:
    """Each image that could not be decoded replaced by the next decodable one of the batch, with its boxes and
    flips: the workers only read headers, so a file broken further in fails here, after its batch was drawn (the
    CPU path takes the next readable file instead)."""
    good = [i for i, im in enumerate(images) if im is not None]
    if len(good) == len(images):
        return images, batch.boxes, batch.flips
    broken = [getattr(batch.images[i], "path", "") or f"item {i}" for i, im in enumerate(images) if im is None]
    if not good:
        raise RuntimeError(f"none of the {len(images)} images of this batch could be decoded: {broken}")
    source = [i if images[i] is not None else min(good, key=lambda g: (g - i) % len(images))
              for i in range(len(images))]
    warnings.warn(f"skipping undecodable image(s) {', '.join(broken)}; using other images of the batch in their "
                  f"place", stacklevel=3)
    return [images[j] for j in source], batch.boxes[source], batch.flips[source]


# -------------------------------------------------------------------------------------- augmentation


class DeviceTwoViewAugmentation:
    """The device's part: RawBatch -> (views, boxes, flips), as TwoViewAugmentation's batches.

    Random draws (kornia's, on torch's CPU generator) come from the global generator: seed it around each call
    for reproducible batches (densecl.data.sampling.SeededBatchAugmentation does, per step).
    """

    def __init__(self, size: int = 224):
        self.size = int(size)
        self.photometric = torch.nn.Sequential(
            # ColorJitter, not ColorJiggle: torchvision's formulas (brightness multiplies, contrast and saturation
            # blend with the gray mean and the grayscale image) and factor ranges.
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=COLOR_JITTER_PROBABILITY),
            K.RandomGrayscale(p=GRAYSCALE_PROBABILITY),  # ITU-R 601 luma, as PIL's convert("L")
            # PIL's GaussianBlur(radius) blurs with sigma = radius pixels and repeats the edge pixels
            K.RandomGaussianBlur((BLUR_KERNEL, BLUR_KERNEL), BLUR_SIGMA_RANGE, border_type="replicate",
                                 p=BLUR_PROBABILITY),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"

    def crops(self, images: Sequence[Tensor], boxes: Tensor) -> Tensor:
        """uint8 (2B, 3, S, S): each view's box resized as the PIL path does (bilinear, antialiased, rounded)."""
        size = [self.size, self.size]
        return torch.stack([
            TF.resized_crop(image, y0, x0, y1 - y0, x1 - x0, size, interpolation=TF.InterpolationMode.BILINEAR,
                            antialias=True)
            for image, image_boxes in zip(images, boxes.long().tolist())
            for x0, y0, x1, y1 in image_boxes
        ])

    def __call__(self, batch: RawBatch, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        images, boxes, flips = _replace_undecodable(batch, decode_images(batch.images, device))
        views = self.crops(images, boxes).float().div_(255.0).unflatten(0, (len(images), 2))
        # One call per view slot: kornia draws one jitter order per call, so the two views of an image get
        # independent orders as in the PIL path (images of a batch share theirs; MoCo never compares them).
        views = torch.stack([self.photometric(views[:, v]) for v in range(2)], dim=1)
        mirrored = flips[:, :, None, None, None].to(device, non_blocking=True)
        views = torch.where(mirrored, views.flip(-1), views)
        return TF.normalize(views, IMAGENET_MEAN, IMAGENET_STD), boxes, flips
