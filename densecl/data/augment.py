"""The MoCo-v2 two-view augmentation DenseCL pre-trains with, reporting each view's crop box and flip.

The boxes and flips let the engine compute the geometric correspondence between the two views (for
analysis and for the "geometric matching" variant) without re-deriving it from pixels. Every random draw
comes from torch's global generator, so that seeding torch inside ``torch.random.fork_rng`` makes a sample
reproducible; Python's ``random`` and numpy are never used here.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision.transforms import ColorJitter, RandomGrayscale, RandomResizedCrop
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

COLOR_JITTER_PROBABILITY = 0.8
GRAYSCALE_PROBABILITY = 0.2
BLUR_PROBABILITY = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)
FLIP_PROBABILITY = 0.5


def _bernoulli(probability: float) -> bool:
    return bool(torch.rand(()) < probability)


class TwoViewAugmentation:
    """Two independent MoCo-v2 views of one image, with their crop boxes and flips.

    ``__call__`` returns ``(views, boxes, flips)``:
      views: float32 (2, 3, size, size), normalised with the ImageNet mean and std;
      boxes: float32 (2, 4), each crop as (x0, y0, x1, y1) in the original image's pixel coordinates;
      flips: bool (2,), whether the view was mirrored horizontally (after cropping).
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.2, 1.0)):
        if size <= 0:
            raise ValueError(f"TwoViewAugmentation: size must be a positive int, got {size!r}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"TwoViewAugmentation: scale must satisfy 0 < min <= max <= 1, got {scale!r}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        # torchvision's RandomResizedCrop defaults: aspect ratio 3/4..4/3, bilinear interpolation.
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.interpolation = TF.InterpolationMode.BILINEAR
        self.color_jitter = ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
        self.grayscale = RandomGrayscale(p=GRAYSCALE_PROBABILITY)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale})"

    def __call__(self, img: Image.Image) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(img, Image.Image):
            raise TypeError(f"TwoViewAugmentation expects a PIL image, got {type(img).__name__}")
        if img.mode != "RGB":
            img = img.convert("RGB")
        views, boxes, flips = zip(*(self._one_view(img) for _ in range(2)))
        return torch.stack(views), torch.stack(boxes), torch.stack(flips)

    def _one_view(self, img: Image.Image) -> tuple[Tensor, Tensor, Tensor]:
        top, left, height, width = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        view = TF.resized_crop(
            img, top, left, height, width, [self.size, self.size], interpolation=self.interpolation, antialias=True
        )
        view = self._photometric(view)
        flipped = _bernoulli(FLIP_PROBABILITY)
        if flipped:
            view = TF.hflip(view)
        tensor = TF.normalize(TF.to_tensor(view), IMAGENET_MEAN, IMAGENET_STD)
        box = torch.tensor([left, top, left + width, top + height], dtype=torch.float32)
        return tensor, box, torch.tensor(flipped, dtype=torch.bool)

    def _photometric(self, view: Image.Image) -> Image.Image:
        """Colour jitter, grayscale and blur: the pixel-value part of the pipeline (no geometry)."""
        if _bernoulli(COLOR_JITTER_PROBABILITY):
            view = self.color_jitter(view)
        view = self.grayscale(view)
        if _bernoulli(BLUR_PROBABILITY):
            low, high = BLUR_SIGMA_RANGE
            sigma = low + (high - low) * float(torch.rand(()))
            view = view.filter(ImageFilter.GaussianBlur(radius=sigma))
        return view
