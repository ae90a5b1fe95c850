"""Labelled data of the user's own for the transfer stages: a Pascal VOC folder or a COCO instances JSON for
detection, a folder of label PNGs for segmentation, with their own classes.

The whole set is read and checked before any training: a box outside its image, a class not in the given list,
a mask value that is neither a class nor the ignore value, an image the annotations name but the disk lacks,
an empty split: each is a `CustomDataError` naming the file. A checked set is written into the stage's folder
(`prepare`) as what the stage registers with detectron2: COCO JSONs for detection (VOC XML converted, so one
evaluator, COCO's, gives AP, AP50, AP75 and per-class AP for both layouts), record lists for segmentation, and
`dataset.json` (name, classes, counts) for the report. No torch and no detectron2: the pipeline checks a set
while it composes the config, before any job starts.
"""

from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from densecl.files import write_json
from densecl.typed_settings import check, result

CUSTOM_FORMATS = ("voc", "coco", "masks")
DETECTION_FORMATS = ("voc", "coco")
SEGMENTATION_FORMATS = ("masks",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
TRAIN_RECORDS, VAL_RECORDS, DATASET_FILE = "train.json", "val.json", "dataset.json"
PREPARED_FOLDER = "data"  # in the stage's folder: the checked set as the stage registers it


class CustomDataError(ValueError):
    """Labelled data that cannot be trained on; the message names the file and what was expected."""


@dataclass
class CustomDataset:
    """Where a labelled set lives and how to read it (`downstream.<stage>.custom`)."""

    format: str = result("voc")  # one of CUSTOM_FORMATS
    root: str | None = result(None)  # the set's folder; every path below is relative to it
    name: str = result("")  # shown in the report and mlflow; "" = the folder's name
    classes: tuple[str, ...] | None = result(None)  # detection: None = every class the annotations name, sorted
    # voc: ImageSets/Main/<train>.txt; masks: a list file of ids ("" = every label PNG); coco: the JSON file.
    train: str = result("train")
    val: str | None = result("val")  # as `train`; None: draw `val_fraction` of the train split with `split_seed`
    val_fraction: float = result(0.0)
    split_seed: int = result(0)
    images: str = result("JPEGImages")  # coco, masks: the image folder
    labels: str = result("SegmentationClass")  # masks: index or VOC-palette PNGs, one per image, same stem
    ignore_label: int = result(255)  # masks: a pixel value neither trained on nor scored

    @property
    def display_name(self) -> str:
        return self.name or Path(self.root or "custom").name

    def validate(self) -> None:
        check(self.format in CUSTOM_FORMATS, "format", self.format, f"allowed: {', '.join(CUSTOM_FORMATS)}")
        check(bool(self.root), "root", self.root, "the labelled set's folder")
        check(self.val is not None or 0 < self.val_fraction < 1, "val_fraction", self.val_fraction,
              "with val=null, a fraction in (0, 1) of the train split to evaluate on")
        check(self.val is None or self.val_fraction == 0, "val", self.val,
              "null when val_fraction draws the validation images, or val_fraction=0")
        if self.format == "coco":
            for key in ("train", "val"):
                value = getattr(self, key)
                check(value is None or value.endswith(".json"), key, value,
                      "coco: the instances JSON under root, e.g. annotations/instances_train.json")
        if self.format == "masks":
            check(bool(self.classes), "classes", self.classes,
                  "masks: the class names, in the order of their pixel values (0, 1, ...)")
            check(0 <= self.ignore_label <= 255 and self.ignore_label >= len(self.classes), "ignore_label",
                  self.ignore_label, f"a pixel value in [{len(self.classes)}, 255] (not a class index)")
        if self.classes is not None:
            duplicates = sorted(n for n, c in Counter(self.classes).items() if c > 1)
            check(not duplicates, "classes", list(self.classes), f"each class once; repeated: {duplicates}")


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

    def summary(self) -> dict:
        counts = {"num_train": _count_images(self.train), "num_val": _count_images(self.val)}
        if isinstance(self.train, dict):
            per_class = Counter(a["category_id"] for a in self.train["annotations"])
            counts["train_objects_per_class"] = {c: per_class[i + 1] for i, c in enumerate(self.classes)}
        return {"name": self.name, "format": self.format, "classes": list(self.classes), **counts,
                "has_masks": self.has_masks, "mask_format": self.mask_format, "ignore_label": self.ignore_label}


def _count_images(split: dict | list) -> int:
    return len(split["images"]) if isinstance(split, dict) else len(split)


# ------------------------------------------------------------------------------------------- reading
def read_dataset(ds: CustomDataset) -> PreparedSet:
    """Read and check the whole set; raises CustomDataError naming the first bad file."""
    ds.validate()
    root = Path(ds.root)
    if not root.is_dir():
        raise CustomDataError(f"labelled data set folder not found: {root}")
    reader = {"voc": _read_voc, "coco": _read_coco, "masks": _read_masks}[ds.format]
    return reader(ds, root)


def prepare(ds: CustomDataset, folder: str | Path) -> dict:
    """Check the set, then write train.json, val.json and dataset.json into `folder`; returns the summary."""
    data = read_dataset(ds)
    folder = Path(folder)
    write_json(folder / TRAIN_RECORDS, data.train)
    write_json(folder / VAL_RECORDS, data.val)
    summary = data.summary()
    write_json(folder / DATASET_FILE, summary)
    return summary


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise CustomDataError(f"{what} not found: {path}")
    return path


def _read_ids(list_file: Path) -> list[str]:
    ids = [line.split()[0] for line in _need(list_file, "split list").read_text().splitlines() if line.strip()]
    if not ids:
        raise CustomDataError(f"{list_file} lists no images (an empty split); expected one image id per line")
    return ids


def _split(ids: list, ds: CustomDataset, source: str) -> tuple[list, list]:
    """The train split and a seeded `val_fraction` of it, disjoint; each non-empty."""
    ids = sorted(ids)
    shuffled = list(ids)
    random.Random(ds.split_seed).shuffle(shuffled)
    num_val = round(ds.val_fraction * len(ids))
    if num_val == 0 or num_val == len(ids):
        raise CustomDataError(
            f"{source}: {len(ids)} images cannot be split with val_fraction={ds.val_fraction} "
            "into two non-empty splits"
        )
    val = set(shuffled[:num_val])
    return [i for i in ids if i not in val], [i for i in ids if i in val]


def _find_image(folder: Path, stem: str, source: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    raise CustomDataError(f"{source}: no image {folder / stem}.* (looked for {', '.join(IMAGE_SUFFIXES)})")


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as err:
        raise CustomDataError(f"{path}: not a readable image ({err})") from None


def _unknown_classes_error(unknown: Counter, example: dict[str, Path], classes) -> CustomDataError:
    names = ", ".join(f"{n!r} x{c} (e.g. {example[n]})" for n, c in sorted(unknown.items()))
    return CustomDataError(f"objects of classes not in the given list: {names}; the list: {list(classes)}")


def _check_box(source: str, box: tuple[float, float, float, float], width: int, height: int) -> None:
    """(x0, y0, x1, y1) in pixels, inside the image, with a positive area."""
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise CustomDataError(f"{source}: box {list(box)} has zero area")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise CustomDataError(f"{source}: box {list(box)} lies outside its {width} x {height} image")


# --------------------------------------------------------------------------------------------- VOC
def _read_voc(ds: CustomDataset, root: Path) -> PreparedSet:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        _need(root / sub, "VOC folder")
    lists = root / "ImageSets" / "Main"
    train_ids = _read_ids(lists / f"{ds.train}.txt")
    if ds.val is None:
        train_ids, val_ids = _split(train_ids, ds, str(lists / f"{ds.train}.txt"))
    else:
        val_ids = _read_ids(lists / f"{ds.val}.txt")
    parsed = {i: _parse_voc_xml(root, i) for i in dict.fromkeys(train_ids + val_ids)}
    found = Counter(obj["name"] for image in parsed.values() for obj in image["objects"])
    example = {}
    for image in parsed.values():
        for obj in image["objects"]:
            example.setdefault(obj["name"], image["xml"])
    classes = tuple(ds.classes) if ds.classes is not None else tuple(sorted(found))
    unknown = Counter({n: c for n, c in found.items() if n not in classes})
    if unknown:
        raise _unknown_classes_error(unknown, example, classes)
    if not classes:
        raise CustomDataError(f"{root / 'Annotations'}: no object in any annotation of the two splits")
    category = {name: k + 1 for k, name in enumerate(classes)}
    return PreparedSet(
        ds.display_name, "voc", classes,
        _voc_as_coco([parsed[i] for i in train_ids], category, difficult_ignored=False),
        _voc_as_coco([parsed[i] for i in val_ids], category, difficult_ignored=True),
    )  # fmt: skip


def _parse_voc_xml(root: Path, image_id: str) -> dict:
    xml = _need(root / "Annotations" / f"{image_id}.xml", "annotation")
    image = _find_image(root / "JPEGImages", image_id, str(xml))
    try:
        tree = ET.parse(xml)
    except ET.ParseError as err:
        raise CustomDataError(f"{xml}: not valid XML ({err})") from None
    size = tree.find("size")
    width, height = (int(float(size.findtext(k, "0"))) for k in ("width", "height")) if size is not None else (0, 0)
    if width <= 0 or height <= 0:
        width, height = _image_size(image)
    objects = []
    for k, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        source = f"{xml}: object {k} ({name!r})"
        if not name or box is None:
            raise CustomDataError(f"{source}: an object needs <name> and <bndbox>")
        try:
            x0, y0, x1, y1 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise CustomDataError(f"{source}: <bndbox> needs numeric xmin, ymin, xmax, ymax") from None
        box = (x0 - 1, y0 - 1, x1, y1)  # VOC's 1-based inclusive pixels -> 0-based corners, as detectron2 reads VOC
        _check_box(source, box, width, height)
        objects.append({"name": name, "box": box, "difficult": obj.findtext("difficult", "0").strip() == "1"})
    return {"xml": xml, "file_name": str(image.absolute()), "width": width, "height": height, "objects": objects}


def _voc_as_coco(images: list[dict], category: dict[str, int], difficult_ignored: bool) -> dict:
    """COCO instances; difficult objects train (as detectron2 trains VOC) and are crowd regions, ignored, in
    evaluation (as the VOC evaluator ignores them)."""
    out = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in category.items()]}
    for image_id, image in enumerate(images, start=1):
        out["images"].append({"id": image_id, "file_name": image["file_name"], "width": image["width"],
                              "height": image["height"]})
        for obj in image["objects"]:
            x0, y0, x1, y1 = obj["box"]
            out["annotations"].append({
                "id": len(out["annotations"]) + 1, "image_id": image_id, "category_id": category[obj["name"]],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                "iscrowd": int(difficult_ignored and obj["difficult"]),
            })  # fmt: skip
    return out


# -------------------------------------------------------------------------------------------- COCO
def _read_coco(ds: CustomDataset, root: Path) -> PreparedSet:
    image_dir = _need(root / ds.images, "image folder")
    train_file = _need(root / ds.train, "COCO instances JSON")
    train = _load_coco(train_file, image_dir)
    if ds.val is None:
        train_ids, val_ids = _split([im["id"] for im in train["images"]], ds, str(train_file))
        train, val = _subset(train, train_ids), _subset(train, val_ids)
        val_file = train_file
    else:
        val_file = _need(root / ds.val, "COCO instances JSON")
        val = _load_coco(val_file, image_dir)
    names = {file: {c["id"]: c["name"] for c in data["categories"]} for file, data in ((train_file, train),
                                                                                         (val_file, val))}
    found, example = Counter(), {}
    for file, data in ((train_file, train), (val_file, val)):
        for a in data["annotations"]:
            found[names[file][a["category_id"]]] += 1
            example.setdefault(names[file][a["category_id"]], file)
    if ds.classes is not None:
        classes = tuple(ds.classes)
    else:  # the JSON's categories in id order, as detectron2 orders them
        classes = tuple(dict.fromkeys(n for _, n in sorted(names[train_file].items())))
        classes += tuple(n for n in sorted(found) if n not in classes)
    unknown = Counter({n: c for n, c in found.items() if n not in classes})
    if unknown:
        raise _unknown_classes_error(unknown, example, classes)
    category = {name: k + 1 for k, name in enumerate(classes)}
    train, val = (_renumber(data, names[file], category) for file, data in ((train_file, train), (val_file, val)))
    objects = [a for data in (train, val) for a in data["annotations"] if not a.get("iscrowd", 0)]
    with_mask = [a for a in objects if a.get("segmentation")]
    if with_mask and len(with_mask) != len(objects):
        raise CustomDataError(
            f"{train_file}: {len(with_mask)} of {len(objects)} objects have a segmentation: give every object "
            "a mask (Mask R-CNN trains on them) or none (boxes only)"
        )
    rle = any(isinstance(a["segmentation"], dict) for a in with_mask)
    return PreparedSet(ds.display_name, "coco", classes, train, val, has_masks=bool(with_mask),
                       mask_format="bitmask" if rle else "polygon")


def _load_coco(json_file: Path, image_dir: Path) -> dict:
    try:
        data = json.loads(json_file.read_text())
        images, annotations, categories = data["images"], data.get("annotations", []), data["categories"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CustomDataError(
            f"{json_file}: not a COCO instances JSON (images, annotations, categories): {err!r}"
        ) from None
    if not images:
        raise CustomDataError(f"{json_file}: lists no images (an empty split)")
    by_id = {}
    for image in images:
        path = image_dir / image["file_name"]
        if not path.is_file():
            raise CustomDataError(f"{json_file}: image id {image['id']} names {path}, which does not exist")
        width, height = image.get("width") or 0, image.get("height") or 0
        if width <= 0 or height <= 0:
            width, height = _image_size(path)
        by_id[image["id"]] = {**image, "file_name": str(path.absolute()), "width": width, "height": height}
    category_ids = {c["id"] for c in categories}
    for a in annotations:
        source = f"{json_file}: annotation id {a.get('id')}"
        if a.get("image_id") not in by_id:
            raise CustomDataError(f"{source}: image_id {a.get('image_id')} is not among the JSON's images")
        if a.get("category_id") not in category_ids:
            raise CustomDataError(f"{source}: category_id {a.get('category_id')} is not among its categories")
        image = by_id[a["image_id"]]
        x, y, w, h = a["bbox"]
        if not a.get("iscrowd", 0):
            _check_box(f"{source} (image {image['file_name']})", (x, y, x + w, y + h), image["width"], image["height"])
    return {"images": list(by_id.values()), "annotations": annotations, "categories": categories}


def _subset(data: dict, image_ids: list) -> dict:
    keep = set(image_ids)
    return {
        "images": [im for im in data["images"] if im["id"] in keep],
        "annotations": [a for a in data["annotations"] if a["image_id"] in keep],
        "categories": data["categories"],
    }


def _renumber(data: dict, names: dict[int, str], category: dict[str, int]) -> dict:
    """Categories 1..K in the class list's order (detectron2 maps ids to contiguous classes in id order)."""
    annotations = []
    for k, a in enumerate(data["annotations"], start=1):
        entry = {**a, "id": k, "category_id": category[names[a["category_id"]]]}
        entry.setdefault("area", a["bbox"][2] * a["bbox"][3])
        entry.setdefault("iscrowd", 0)
        annotations.append(entry)
    return {"images": data["images"], "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in category.items()]}


# ---------------------------------------------------------------------------------- segmentation masks
def _read_masks(ds: CustomDataset, root: Path) -> PreparedSet:
    image_dir, label_dir = _need(root / ds.images, "image folder"), _need(root / ds.labels, "label folder")
    if ds.train:
        train_ids = _read_ids(root / ds.train)
    else:
        train_ids = sorted(p.stem for p in label_dir.glob("*.png"))
        if not train_ids:
            raise CustomDataError(f"{label_dir}: no label PNG (an empty split)")
    if ds.val is None:
        train_ids, val_ids = _split(train_ids, ds, str(root / ds.train) if ds.train else str(label_dir))
    else:
        val_ids = _read_ids(root / ds.val)
    allowed = set(range(len(ds.classes))) | {ds.ignore_label}
    records = {}
    for i in dict.fromkeys(train_ids + val_ids):
        label = _need(label_dir / f"{i}.png", "label PNG")
        image = _find_image(image_dir, i, str(label))
        _check_label(label, _image_size(image), allowed, ds)
        records[i] = {"file_name": str(image.absolute()), "sem_seg_file_name": str(label.absolute()), "image_id": i,
                      "ignore_label": ds.ignore_label}
    return PreparedSet(ds.display_name, "masks", tuple(ds.classes), [records[i] for i in train_ids],
                       [records[i] for i in val_ids], ignore_label=ds.ignore_label)


def _check_label(path: Path, image_size: tuple[int, int], allowed: set[int], ds: CustomDataset) -> None:
    with Image.open(path) as label:
        if label.mode not in ("P", "L"):
            raise CustomDataError(
                f"{path}: a {label.mode} PNG; labels must hold class indices (a gray or a palette PNG, as VOC's "
                "SegmentationClass), not colours"
            )
        if label.size != image_size:
            raise CustomDataError(f"{path}: {label.size[0]} x {label.size[1]} but its image is "
                                  f"{image_size[0]} x {image_size[1]}")
        values = np.unique(np.asarray(label))
    bad = sorted(int(v) for v in values if int(v) not in allowed)
    if bad:
        raise CustomDataError(
            f"{path}: pixel values {bad} are neither a class (0..{len(ds.classes) - 1}: "
            f"{', '.join(ds.classes)}) nor the ignore value {ds.ignore_label}"
        )
