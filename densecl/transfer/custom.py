"""Labelled data of the user's own for the transfer stages, as annotation tools export it: a Pascal VOC folder,
COCO instances JSONs or a YOLO set for detection; label PNGs (class indices, or colours with a colour table) or
YOLO polygons for segmentation; each with its own classes. The format is found from the folder when
`custom.format` is auto (custom_voc, custom_coco, custom_yolo and custom_masks read them).

The whole set is read and checked before any training: a box outside its image, a class not in the given list,
a mask value that is neither a class nor the ignore value, a colour not in the table, a YOLO line that is not a
box or a polygon, an image the annotations name but the disk lacks, an empty split: each is a `CustomDataError`
naming the file. A checked set is written into the stage's folder (`prepare`) as what the stage registers with
detectron2: COCO JSONs for detection (every layout converted, so one evaluator, COCO's, gives AP, AP50, AP75 and
per-class AP), record lists and label maps made from colours or polygons for segmentation, and `dataset.json`
(name, format, classes, counts) for the report. No torch and no detectron2: the pipeline checks a set while it
composes the config, before any job starts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from densecl.files import write_json
from densecl.transfer.custom_coco import json_candidates, read_coco
from densecl.transfer.custom_common import (
    CustomDataError,
    LabelMaps,
    PreparedSet,
    class_count,
    first_missing_ancestor,
    metric_name,
    remove_new_folders,
)
from densecl.transfer.custom_masks import COLOUR_TABLE, read_masks
from densecl.transfer.custom_voc import read_voc
from densecl.transfer.custom_yolo import NAME_FILES, YAML_FILES, read_yolo
from densecl.typed_settings import check, result

__all__ = ["CustomDataError", "CustomDataset", "PreparedSet", "class_count", "detect_format", "metric_name",
           "prepare", "read_dataset"]

AUTO = "auto"
CUSTOM_FORMATS = ("voc", "coco", "yolo", "masks")
TASK_FORMATS = {"detection": ("voc", "coco", "yolo"), "segmentation": ("masks", "yolo")}
DETECTION_FORMATS, SEGMENTATION_FORMATS = TASK_FORMATS["detection"], TASK_FORMATS["segmentation"]
TRAIN_RECORDS, VAL_RECORDS, DATASET_FILE = "train.json", "val.json", "dataset.json"
PREPARED_FOLDER = "data"  # in the stage's folder: the checked set as the stage registers it
LABELS_FOLDER = "labels"  # in PREPARED_FOLDER: label maps made from colour masks or polygons


@dataclass
class CustomDataset:
    """Where a labelled set lives and how to read it (`downstream.<stage>.custom`). A split, folder or format
    left at None is the one the set's layout has (each reader's module says which)."""

    format: str = result(AUTO)  # auto (found from the folder) or one of CUSTOM_FORMATS
    root: str | None = result(None)  # the set's folder; every path below is relative to it
    name: str = result("")  # shown in the report and mlflow; "" = the folder's name
    # detection: None = the JSON's categories / YOLO's names that own an object, or every VOC class, sorted;
    # masks: the names of pixel values 0, 1, ... (None: a colour table's names)
    classes: tuple[str, ...] | None = result(None)
    # voc: a list's name under ImageSets/Main ("" = every annotation); coco: the JSON; yolo: a folder of images
    # or a list file; masks: a list file ("" = every label PNG)
    train: str | None = result(None)
    val: str | None = result(None)  # as `train`; None: the set's own validation split, if it has one
    val_fraction: float = result(0.0)  # > 0: evaluate on this seeded fraction of the train split instead
    split_seed: int = result(0)
    images: str | None = result(None)  # voc, masks: the image folder (JPEGImages); coco: where file_name starts
    labels: str | None = result(None)  # masks: the label PNGs' folder (SegmentationClass)
    colors: tuple[str, ...] | None = result(None)  # masks: 'name:r,g,b' per class (None: ROOT/labelmap.txt if any)
    ignore_label: int = result(255)  # masks: a pixel value neither trained on nor scored

    @property
    def display_name(self) -> str:
        return self.name or Path(self.root or "custom").name

    def validate(self) -> None:
        check(self.format in (AUTO, *CUSTOM_FORMATS), "format", self.format,
              f"allowed: {AUTO} (found from the folder), {', '.join(CUSTOM_FORMATS)}")
        check(bool(self.root), "root", self.root, "the labelled set's folder")
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction,
              "a fraction in [0, 1) of the train split to evaluate on (0: the set's own val split)")
        check(not (self.val and self.val_fraction > 0), "val", self.val,
              "null when val_fraction draws the validation images from the train split")
        check(0 <= self.ignore_label <= 255, "ignore_label", self.ignore_label, "a pixel value in [0, 255]")
        if self.format == "coco":
            for key in ("train", "val"):
                value = getattr(self, key)
                check(not value or value.endswith(".json"), key, value,
                      "coco: the instances JSON under root, e.g. annotations/instances_train.json")
        if self.classes is not None:
            duplicates = sorted(n for n, c in Counter(self.classes).items() if c > 1)
            check(not duplicates, "classes", list(self.classes), f"each class once; repeated: {duplicates}")


# ------------------------------------------------------------------------------------------- reading
def detect_format(ds: CustomDataset, root: Path, task: str) -> tuple[str, str]:
    """(format, what in the folder told it) for `task` ("detection" or "segmentation")."""
    yolo = [n for n in (*YAML_FILES, "obj.data", *NAME_FILES) if (root / n).is_file()]
    yolo += [p.name for p in sorted(root.glob("*.names"))] + (["labels/"] if (root / "labels").is_dir() else [])
    found = []
    if task == "detection":
        if (root / "Annotations").is_dir() and any((root / "Annotations").glob("*.xml")):
            found.append(("voc", "Annotations/"))
        if yolo:
            found.append(("yolo", yolo[0]))
        if jsons := json_candidates(root):
            found.append(("coco", str(jsons[0].relative_to(root))))
    else:
        labels = ds.labels or "SegmentationClass"
        if (root / labels).is_dir():
            found.append(("masks", f"{labels}/" + (f" and {COLOUR_TABLE}" if (root / COLOUR_TABLE).is_file() else "")))
        if yolo:
            found.append(("yolo", yolo[0]))
    if not found:
        expected = ("Annotations/*.xml (VOC), data.yaml, obj.names or classes.txt with labels/ (YOLO), or a COCO "
                    "JSON" if task == "detection" else
                    "SegmentationClass/ label PNGs, or a YOLO set of polygons (data.yaml, obj.names or classes.txt)")
        raise CustomDataError(f"{root}: no labelled set found for {task}; expected {expected} (or set custom.format)")
    return found[0]


def read_dataset(ds: CustomDataset, task: str | None = None, labels: LabelMaps | None = None) -> PreparedSet:
    """Read and check the whole set for `task` ("detection", "segmentation"; None: the format's own); raises
    CustomDataError naming the first bad file. Label maps made on the way go to `labels` (none written when
    it is None)."""
    ds.validate()
    root = Path(ds.root)
    if not root.is_dir():
        raise CustomDataError(f"labelled data set folder not found: {root}")
    task = task or ("segmentation" if ds.format == "masks" else "detection")
    notes: list[str] = []
    fmt, found_from = ds.format, ""
    if fmt == AUTO:
        fmt, found_from = detect_format(ds, root, task)
    elif fmt not in TASK_FORMATS[task]:
        raise CustomDataError(f"custom.format={fmt}: {task} reads {', '.join(TASK_FORMATS[task])}")
    labels = labels or LabelMaps(None)
    if fmt == "voc":
        data = read_voc(ds, root, notes)
    elif fmt == "coco":
        data = read_coco(ds, root, notes)
    elif fmt == "yolo":
        data = read_yolo(ds, root, task, labels, notes)
    else:
        data = read_masks(ds, root, labels, notes)
    data.found_from = found_from
    return data


def prepare(ds: CustomDataset, folder: str | Path, task: str | None = None) -> dict:
    """Check the set, then write train.json, val.json and dataset.json into `folder` (label maps made from
    colours or polygons into its labels/); returns the summary. A refused set leaves nothing behind."""
    folder = Path(folder)
    first_new = first_missing_ancestor(folder)
    labels = LabelMaps(folder / LABELS_FOLDER)
    try:
        data = read_dataset(ds, task, labels)
    except BaseException:
        labels.discard()
        remove_new_folders(first_new)
        raise
    write_json(folder / TRAIN_RECORDS, data.train)
    write_json(folder / VAL_RECORDS, data.val)
    summary = data.summary()
    write_json(folder / DATASET_FILE, summary)
    return summary


def describe(summary: dict) -> list[str]:
    """The lines a stage shows about its set: 'shelves (voc, found from Annotations/): 8 train and 4 val images,
    2 classes: gadget, widget', then what reading decided (classes left out, an unused list)."""
    found = f", found from {summary['found_from']}" if summary.get("found_from") else ""
    classes = summary["classes"]
    line = (f"{summary['name']} ({summary['format']}{found}): {summary['num_train']} train and {summary['num_val']} "
            f"val images, {class_count(len(classes))}: {', '.join(classes)}")
    return [line, *summary.get("notes", [])]
