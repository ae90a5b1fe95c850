"""Pascal VOC's classes and the parts of a VOC2012 segmentation folder, shared by the feature-quality signals
(densecl.evaluation.quality) and the transfer stages (densecl.transfer.layouts). No torch."""

from __future__ import annotations

from pathlib import Path

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
SEGMENTATION_PARTS = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/train.txt",
                      "ImageSets/Segmentation/val.txt")  # what a VOC2012 folder needs to serve as the signals' set


def missing_segmentation_parts(root: str | Path) -> list[str]:
    """The parts of a VOC2012 segmentation folder that `root` lacks (none: it can be the signals' set)."""
    return [name for name in SEGMENTATION_PARTS if not (Path(root) / name).exists()]
