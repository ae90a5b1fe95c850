"""What every reader of the user's labelled sets shares (densecl.transfer.custom and its format readers
custom_voc, custom_coco, custom_yolo, custom_masks): the error they raise, the checked set they return, split
lists and seeded splits, image files and their sizes, box checks, detection objects written as COCO instances,
and the label maps a reader makes (colour masks converted, polygons drawn), written once into the stage's
folder. No torch and no detectron2.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_EXIF_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (detectron2 applies them when reading)


class CustomDataError(ValueError):
    """Labelled data that cannot be trained on; the message names the file and what was expected."""


def class_count(n: int) -> str:
    """'1 class', '3 classes'."""
    return f"{n} class" if n == 1 else f"{n} classes"


@dataclass
class PreparedSet:
    """A checked set: COCO dicts (detection) or record lists (segmentation) per split, and its summary."""

    name: str
    format: str
    classes: tuple[str, ...]
    train: dict | list
    val: dict | list
    has_masks: bool = False  # detection: every object has a mask (COCO segmentation)
    mask_format: str = "polygon"  # "bitmask" when a mask is COCO RLE
    ignore_label: int = 255
    notes: list[str] = field(default_factory=list)  # what reading decided for the user: shown with the classes
    found_from: str = ""  # custom.format auto: what in the folder told the format

    def num_images(self, split: str) -> int:
        """The images of split "train" or "val"."""
        records = self.train if split == "train" else self.val
        return len(records["images"]) if isinstance(records, dict) else len(records)

    def summary(self) -> dict:
        counts = {"num_train": self.num_images("train"), "num_val": self.num_images("val")}
        if isinstance(self.train, dict):
            per_class = Counter(a["category_id"] for a in self.train["annotations"] if not a["iscrowd"])
            counts["train_objects_per_class"] = {c: per_class[i + 1] for i, c in enumerate(self.classes)}
        return {"name": self.name, "format": self.format, "found_from": self.found_from,
                "classes": list(self.classes), **counts,
                "has_masks": self.has_masks, "mask_format": self.mask_format, "ignore_label": self.ignore_label,
                "notes": list(self.notes)}


# ------------------------------------------------------------------------------------------- files
def need(path: Path, what: str) -> Path:
    if not path.exists():
        raise CustomDataError(f"{what} not found: {path}")
    return path


def read_ids(list_file: Path) -> list[str]:
    """The first word of each line (VOC's lists, CVAT's default.txt; per-class lists' '-1/1' column dropped)."""
    ids = [line.split()[0] for line in need(list_file, "split list").read_text().splitlines() if line.strip()]
    if not ids:
        raise CustomDataError(f"{list_file} lists no images (an empty split); expected one image id per line")
    return ids


def split_off(ids: list, fraction: float, seed: int, source: str) -> tuple[list, list]:
    """The ids sorted, less a seeded `fraction` of them, and that fraction: disjoint, each non-empty."""
    ids = sorted(ids)
    shuffled = list(ids)
    random.Random(seed).shuffle(shuffled)
    num_val = round(fraction * len(ids))
    if num_val == 0 or num_val == len(ids):
        raise CustomDataError(
            f"{source}: {len(ids)} images cannot be split with val_fraction={fraction} into two non-empty splits"
        )
    val = set(shuffled[:num_val])
    return [i for i in ids if i not in val], [i for i in ids if i in val]


def held_out(ids: list, ds, where: str, unused: object, notes: list[str]) -> tuple[list, list]:
    """`split_off` by the set's `val_fraction` and `split_seed`; a validation split the set has too (`unused`,
    None when it has none) is said in `notes` to be unused."""
    if unused:
        notes.append(f"val_fraction draws the validation images from the train split; {unused} is unused")
    return split_off(ids, ds.val_fraction, ds.split_seed, where)


def train_and_val_ids(ds, train_ids: list[str], where: str, val_list: Path | None, every_file: bool,
                      notes: list[str]) -> tuple[list[str], list[str]]:
    """(train, val) ids of a set of one file per image (VOC's XMLs, label PNGs): a seeded `val_fraction` of the
    train ids, else the ids `val_list` names, left out of the train ids when those are every file (`every_file`)."""
    if ds.val_fraction > 0:
        return held_out(train_ids, ds, where, val_list, notes)
    if val_list is None:
        raise no_val_split(where)
    val_ids = read_ids(val_list)
    if every_file:
        held = set(val_ids)
        train_ids = [i for i in train_ids if i not in held]
    return train_ids, val_ids


def no_val_split(where: str) -> CustomDataError:
    return CustomDataError(
        f"{where}: the set has no validation split; set custom.val_fraction (e.g. 0.2) to evaluate on a seeded "
        "part of the train split, or custom.val to name one"
    )


def find_image(folder: Path, stem: str, source: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    raise CustomDataError(f"{source}: no image {folder / stem}.* (looked for {', '.join(IMAGE_SUFFIXES)})")


def image_files(folder: Path) -> list[Path]:
    """Every image under `folder`, sub-folders walked, in path order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as detectron2 reads the image: from the header, turned by its EXIF orientation."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(_EXIF_ORIENTATION) in _TURNED
    except OSError as err:
        raise CustomDataError(f"{path}: not a readable image ({err})") from None
    return (height, width) if turned else (width, height)


def check_box(source: str, box: tuple[float, float, float, float], width: int, height: int) -> None:
    """(x0, y0, x1, y1) in pixels, inside the image, with a positive area."""
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise CustomDataError(f"{source}: box {list(box)} has zero area")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise CustomDataError(f"{source}: box {list(box)} lies outside its {width} x {height} image")


# ------------------------------------------------------------------------------------ detection sets
@dataclass
class Obj:
    """One labelled object: its class, its box (pixel corners, exclusive), and where it was read."""

    name: str
    box: tuple[float, float, float, float]
    source: str
    difficult: bool = False  # VOC: trains, ignored when scoring (as VOC's own evaluation)
    crowd: bool = False  # COCO iscrowd: a region neither trained on nor scored
    segmentation: list | dict | None = None  # COCO polygons (pixel coordinates) or RLE
    area: float | None = None  # COCO's (the mask's); None: the box's


@dataclass
class Img:
    file_name: str
    width: int
    height: int
    objects: list[Obj]


def metric_name(class_name: str) -> str:
    """A class name as it may appear in a metric name (mlflow takes letters, digits, _ - . and spaces; a `/`
    would nest the metric's file): every other character becomes '_'."""
    return re.sub(r"[^\w.\- ]", "_", class_name)


def check_metric_names(classes: tuple[str, ...]) -> None:
    seen: dict[str, str] = {}
    for name in classes:
        safe = metric_name(name)
        if safe in seen:
            raise CustomDataError(
                f"classes {seen[safe]!r} and {name!r} would share the metric name {safe!r} (characters other "
                "than letters, digits, '_', '-', '.' and spaces become '_'): rename one"
            )
        seen[safe] = name


def detection_set(name: str, fmt: str, train: list[Img], val: list[Img], given: tuple[str, ...] | None,
                  declared: tuple[str, ...] | None, where: str, notes: list[str]) -> PreparedSet:
    """COCO instances per split with categories 1..K in the class order: `given` (the user's list), else the
    `declared` classes (a COCO JSON's categories, YOLO's names) less those that own no object in any split
    (left out, said in `notes`), else every class the objects name, sorted. Difficult objects are crowd regions
    in val (ignored when scoring, as VOC's evaluation ignores them) and train as any object."""
    objects = [o for image in train + val for o in image.objects]
    found = Counter(o.name for o in objects)
    if given is not None:
        classes = tuple(given)
    elif declared is not None:
        classes = tuple(n for n in dict.fromkeys(declared) if found[n])
        unused = [n for n in dict.fromkeys(declared) if not found[n]]
        if unused:
            notes.append(f"left out of the classes, owning no object in any split: {', '.join(unused)} "
                         "(custom.classes lists the classes to keep)")
    else:
        classes = tuple(sorted(found))
    unknown = Counter({n: c for n, c in found.items() if n not in classes})
    if unknown:
        example = {}
        for o in objects:
            example.setdefault(o.name, o.source)
        names = ", ".join(f"{n!r} x{c} (e.g. {example[n]})" for n, c in sorted(unknown.items()))
        raise CustomDataError(f"objects of classes not in the given list: {names}; the list: {list(classes)}")
    if not classes:
        raise CustomDataError(f"{where}: no object in any annotation of the two splits")
    check_metric_names(classes)
    solid = [o for o in objects if not o.crowd]
    with_mask = [o for o in solid if o.segmentation]
    if with_mask and len(with_mask) != len(solid):
        bare = next(o for o in solid if not o.segmentation)
        raise CustomDataError(
            f"{bare.source}: {len(with_mask)} of {len(solid)} objects have a segmentation (not this one): give "
            "every object a mask (Mask R-CNN trains on them) or none (boxes only)"
        )
    rle = any(isinstance(o.segmentation, dict) for o in with_mask)
    category = {c: k + 1 for k, c in enumerate(classes)}
    return PreparedSet(name, fmt, classes, as_coco(train, category, False), as_coco(val, category, True),
                       has_masks=bool(with_mask), mask_format="bitmask" if rle else "polygon", notes=notes)


def as_coco(images: list[Img], category: dict[str, int], difficult_ignored: bool) -> dict:
    out = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in category.items()]}
    for image_id, image in enumerate(images, start=1):
        out["images"].append({"id": image_id, "file_name": image.file_name, "width": image.width,
                              "height": image.height})
        for o in image.objects:
            x0, y0, x1, y1 = o.box
            entry = {"id": len(out["annotations"]) + 1, "image_id": image_id, "category_id": category[o.name],
                     "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": o.area if o.area is not None else (x1 - x0) * (y1 - y0),
                     "iscrowd": int(o.crowd or (difficult_ignored and o.difficult))}
            if o.segmentation:
                entry["segmentation"] = o.segmentation
            out["annotations"].append(entry)
    return out


# --------------------------------------------------------------------------------------- label maps
class LabelMaps:
    """Label maps a reader makes (colour masks converted to class indices, polygons drawn): each made and
    checked once, then written into `folder` (the prepared set's labels/) under a name that holds what it was
    made from, so that a rerun of the stage finds it there. Without a folder (a check before any job starts)
    they are made and checked, and nothing is written."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.written: list[Path] = []

    def add(self, stem: str, sources: list[Path], recipe: str, make: Callable[[], np.ndarray]) -> str:
        """The path of `stem`'s label map, made by `make` unless written earlier from the same `sources`
        (their size and time) and `recipe` (e.g. the colour table)."""
        key = hashlib.sha1(recipe.encode())
        for source in sources:
            stat = source.stat()
            key.update(f"{source.absolute()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        name = f"{stem}-{key.hexdigest()[:12]}.png"
        if self.folder is None:
            make()
            return name
        target = self.folder / name
        if not target.is_file():
            values = make()
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            Image.fromarray(values.astype(np.uint8)).save(partial, format="PNG")  # 2-D uint8: a gray PNG
            os.replace(partial, target)
            self.written.append(target)
        return str(target.absolute())

    def discard(self) -> None:
        """Remove what this reading wrote (a set refused halfway leaves nothing)."""
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written = []


def remove_new_folders(first_new: Path | None) -> None:
    if first_new is not None and first_new.exists():
        shutil.rmtree(first_new, ignore_errors=True)


def first_missing_ancestor(path: Path) -> Path | None:
    """The outermost folder of `path` (itself included) that does not exist yet: what a failed prepare removes."""
    path = path.absolute()
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing
