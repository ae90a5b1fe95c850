"""The pre-training data's settings: which unlabelled images, and where their two views are made (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from densecl.typed_settings import check, check_positive, neutral, result


class DataKind(StrEnum):
    synthetic = "synthetic"  # generated scenes (densecl.data.synthetic): no download
    image_folder = "image_folder"  # any folder of images, searched recursively, labels unused


class AugmentOn(StrEnum):
    """Where the two-view augmentation runs (both give the same distributions: tests/test_gpu_augment.py)."""

    cpu = "cpu"  # PIL, one image at a time, in the data-loader workers (the official code's path)
    gpu = "gpu"  # batched on the training device (kornia); the workers only read files: JPEGs decode there too


@dataclass
class DataConfig:
    """The unlabelled images pre-training reads."""

    kind: DataKind = result(DataKind.synthetic)
    root: str | None = result(None)  # image_folder
    num_images: int = result(2048)  # synthetic: number of scenes
    image_size: int = result(160)  # synthetic: scene side in pixels
    seed: int = result(0)  # synthetic: fixed across training seeds, so that those measure training noise alone
    augment_on: AugmentOn = result(AugmentOn.cpu)
    # synthetic: generate the scenes once into one uint8 array in this folder, shared by every run and job that
    # asks for the same scenes (the same pixels as generating them on the fly); None = generate on the fly
    cache_dir: str | None = neutral(None)

    def validate(self, check_paths: bool = False) -> None:
        check(self.kind in tuple(DataKind), "kind", self.kind, f"allowed: {', '.join(DataKind)}")
        check(self.augment_on in tuple(AugmentOn), "augment_on", self.augment_on,
              f"allowed: {', '.join(AugmentOn)}")
        if self.kind == DataKind.image_folder:
            check(bool(self.root), "root", None, "data kind image_folder needs data.root=/path/to/images")
            if check_paths:
                check(Path(self.root).is_dir(), "root", self.root,
                      "allowed: an existing folder of images (it does not exist)")
        else:
            check_positive(self, "num_images", "image_size")
