"""The evaluations' settings: the dense linear probe and the linear classifier (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from densecl.method.settings import ARCHS
from densecl.typed_settings import check, check_positive, neutral, result

LAYERS = ("c3", "c4", "c5")
CLASS_WEIGHTINGS = ("none", "balanced")


@dataclass
class LinearProbeConfig:
    arch: str = result("resnet18")
    layer: str = result("c5")  # which stage's features the classifier sees
    image_size: int = result(160)  # synthetic scene side (labels at this resolution)
    input_size: int = result(320)  # images are resized to this before the backbone: C5 is then a 10x10 grid
    num_train: int = result(512)
    num_val: int = result(128)
    data_seed: int = result(0)  # scene seed: train scenes 0.., val scenes from VAL_INDEX_OFFSET
    epochs: int = result(40)
    batch_size: int = result(64)
    lr: float = result(0.5)  # on standardised features; at 0.05, 30 epochs of 4 steps stopped short of the optimum
    weight_decay: float = result(0.0)
    class_weighting: str = result("none")  # none | balanced: median-frequency weights, so rare classes are not ignored
    seed: int = result(0)
    device: str = neutral("auto")
    progress: bool = neutral(True)  # tqdm bars while features are extracted and the classifier is fitted

    def validate(self) -> None:
        check(self.arch in ARCHS, "arch", self.arch, f"allowed: {', '.join(ARCHS)}")
        check(self.class_weighting in CLASS_WEIGHTINGS, "class_weighting", self.class_weighting,
              f"allowed: {', '.join(CLASS_WEIGHTINGS)}")
        check(self.layer in LAYERS, "layer", self.layer, f"allowed: {', '.join(LAYERS)}")
        check_positive(self, "image_size", "input_size", "num_train", "num_val", "epochs", "batch_size")

    def summary(self) -> dict[str, Any]:
        """The resolved numbers a plan shows (pipelines.plan)."""
        return {"lr": self.lr, "batch": self.batch_size, "epochs": self.epochs, "features": self.layer,
                "input_size": self.input_size, "data": f"scenes: {self.num_train} train, {self.num_val} val images"}


@dataclass
class LinearClassifierConfig:
    root: str | None = result(None)  # a folder of class sub-folders of images
    val_root: str | None = result(None)  # the same classes, to score on; None: val_fraction of root, drawn with seed
    val_fraction: float = result(0.2)
    arch: str = result("resnet18")
    input_size: int = result(224)
    epochs: int = result(100)
    batch_size: int = result(256)
    lr: float = result(0.1)
    seed: int = result(0)
    device: str = neutral("auto")

    def validate(self) -> None:
        check(bool(self.root), "root", self.root, "a folder with one sub-folder of images per class")
        check(self.arch in ARCHS, "arch", self.arch, f"allowed: {', '.join(ARCHS)}")
        check(self.val_root is not None or 0 < self.val_fraction < 1, "val_fraction", self.val_fraction,
              "a fraction in (0, 1) of the images to score on, or a val_root")
        check_positive(self, "input_size", "epochs", "batch_size")
        check(self.lr > 0, "lr", self.lr, "allowed: a value > 0")

    def summary(self) -> dict[str, Any]:
        """The resolved numbers a plan shows (pipelines.plan)."""
        data = f"{self.root}, scored on " + (self.val_root or f"a {self.val_fraction:g} fraction of it")
        return {"lr": self.lr, "batch": self.batch_size, "epochs": self.epochs, "input_size": self.input_size,
                "data": data}

    def check_data(self) -> None:
        for key in ("root", "val_root"):
            folder = getattr(self, key)
            check(folder is None or Path(folder).is_dir(), key, folder, "an existing folder of class sub-folders")
