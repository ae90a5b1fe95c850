"""A YOLO set as annotation tools write it: images, and per image a `.txt` of normalised `class cx cy w h` boxes
or `class x1 y1 x2 y2 ...` polygons (Ultralytics' segmentation labels), in `labels/` beside `images/` or next
to each image; class names in Ultralytics' `data.yaml` (`path`, `train`, `val`, `names` as a list or a dict),
CVAT/Darknet's `obj.data` + `obj.names` + `train.txt`, or a plain `classes.txt` (Label Studio). An image
without a label file is an image without objects. Polygons are instance masks for detection and are drawn
into label maps (0 = background, each class from 1) for segmentation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from pycocotools import mask as mask_utils

from densecl.transfer.custom_common import (
    CustomDataError,
    Img,
    LabelMaps,
    Obj,
    PreparedSet,
    check_metric_names,
    detection_set,
    held_out,
    image_files,
    image_size,
    need,
    no_val_split,
)

YAML_FILES = ("data.yaml", "data.yml", "dataset.yaml")
NAME_FILES = ("obj.names", "classes.txt")  # CVAT/Darknet, Label Studio
EPSILON = 1e-6  # normalised coordinates this far outside [0, 1] are the exporting tool's rounding, clipped
BACKGROUND = "background"


@dataclass
class Layout:
    names: tuple[str, ...]
    names_source: str
    train: list[Path]  # image folders or .txt lists
    val: list[Path]
    where: str  # what defined the splits, for messages


def read_yolo(ds, root: Path, task: str, labels: LabelMaps, notes: list[str]) -> PreparedSet:
    layout = find_layout(ds, root)
    names = tuple(ds.classes) if ds.classes is not None else layout.names
    train = _images(layout.train, root)
    if ds.val_fraction > 0:
        keep, held = held_out(list(range(len(train))), ds, layout.where, ", ".join(map(str, layout.val)), notes)
        train, val = [train[i] for i in keep], [train[i] for i in held]
    elif not layout.val:
        raise no_val_split(layout.where)
    else:
        val = _images(layout.val, root)
    if not train or not val:
        raise CustomDataError(f"{layout.where}: the {'train' if not train else 'val'} split holds no image")
    source = layout.names_source if ds.classes is None else "custom.classes"
    parsed = {split: [_read_image(p, names, source) for p in images] for split, images in (("train", train),
                                                                                           ("val", val))}
    if task == "detection":
        return detection_set(ds.display_name, "yolo", parsed["train"], parsed["val"], ds.classes, names,
                             layout.where, notes)
    return _segmentation_set(ds, parsed, names, labels, layout.where, notes)


# ------------------------------------------------------------------------------------------ layouts
def find_layout(ds, root: Path) -> Layout:
    """Class names and split sources from the custom keys, data.yaml, obj.data/obj.names or classes.txt."""
    yaml_file = next((root / n for n in YAML_FILES if (root / n).is_file()), None)
    if ds.train is not None:  # the splits named by the user, the names wherever the set keeps them
        if ds.classes is not None:
            names, names_source = tuple(ds.classes), "custom.classes"
        elif yaml_file is not None:
            names, names_source = _ultralytics(yaml_file, ds, splits=False).names, str(yaml_file)
        elif (root / "obj.data").is_file():
            layout = _darknet(root, ds, splits=False)
            names, names_source = layout.names, layout.names_source
        else:
            names, names_source = _names(root)
        train = [_resolve(root, ds.train, "custom.train")] if ds.train else [need(root / "images", "image folder")]
        val = [_resolve(root, ds.val, "custom.val")] if ds.val else []
        return Layout(names, names_source, train, val, str(root / (ds.train or "images")))
    if yaml_file is not None:
        return _ultralytics(yaml_file, ds)
    if (root / "obj.data").is_file():
        return _darknet(root, ds)
    names, names_source = (tuple(ds.classes), "custom.classes") if ds.classes is not None else _names(root)
    if (root / "train.txt").is_file():  # obj.names + train.txt without obj.data
        val = [_resolve(root, ds.val, "custom.val")] if ds.val else _existing(root, "valid.txt", "val.txt")
        return Layout(names, names_source, [root / "train.txt"], val, str(root / "train.txt"))
    images = need(root / "images", "image folder (YOLO: images/ and labels/)")
    split_folders = [images / s for s in ("train", "val", "valid") if (images / s).is_dir()]
    if split_folders and split_folders[0].name == "train":
        val = [_resolve(root, ds.val, "custom.val")] if ds.val else split_folders[1:2]
        return Layout(names, names_source, [split_folders[0]], val, str(split_folders[0]))
    val = [_resolve(root, ds.val, "custom.val")] if ds.val else []
    return Layout(names, names_source, [images], val, str(images))


def _existing(root: Path, *names: str) -> list[Path]:
    return [root / n for n in names if (root / n).is_file()][:1]


def _resolve(base: Path, entry: str, key: str) -> Path:
    """`entry` under `base`; Roboflow's data.yaml writes '../train/images' for the folder beside it."""
    path = Path(entry) if Path(entry).is_absolute() else base / entry
    if not path.exists() and entry.startswith("../"):
        path = base / entry[3:]
    if not path.exists():
        raise CustomDataError(f"{key}: {entry!r} is neither a folder of images nor a list of them under {base}")
    return path


def _names(root: Path) -> tuple[tuple[str, ...], str]:
    files = [root / n for n in NAME_FILES if (root / n).is_file()] or sorted(root.glob("*.names"))
    if not files:
        raise CustomDataError(f"{root}: no class names (YOLO: data.yaml, obj.names or classes.txt, one name per "
                              "line in class-id order), and custom.classes is not given")
    return _names_from(files[0])


def _ultralytics(yaml_file: Path, ds, splits: bool = True) -> Layout:
    try:
        spec = yaml.safe_load(yaml_file.read_text()) or {}
    except yaml.YAMLError as err:
        raise CustomDataError(f"{yaml_file}: not valid YAML ({err})") from None
    if not isinstance(spec, dict):
        raise CustomDataError(f"{yaml_file}: expected keys path, train, val, names")
    if ds.classes is not None:
        names = tuple(ds.classes)
    else:
        raw = spec.get("names")
        if isinstance(raw, dict):
            try:
                ids = sorted(int(k) for k in raw)
            except (TypeError, ValueError):
                raise CustomDataError(f"{yaml_file}: names' keys must be class ids 0, 1, ...; got "
                                      f"{list(raw)}") from None
            if ids != list(range(len(ids))):
                raise CustomDataError(f"{yaml_file}: names' ids must be 0..{len(ids) - 1}; got {ids}")
            names = tuple(str(raw[k] if k in raw else raw[str(k)]).strip() for k in ids)
        elif isinstance(raw, list) and raw:
            names = tuple(str(n).strip() for n in raw)
        else:
            raise CustomDataError(f"{yaml_file}: names must list the class names (a list, or a dict id: name)")
    base = yaml_file.parent
    if spec.get("path"):
        base = Path(spec["path"]) if Path(spec["path"]).is_absolute() else yaml_file.parent / spec["path"]
        if not base.is_dir():
            base = yaml_file.parent  # a `path` of the machine it was exported on: the folder beside the yaml
    if not splits:
        return Layout(names, str(yaml_file), [], [], str(yaml_file))
    if not spec.get("train"):
        raise CustomDataError(f"{yaml_file}: train must name the training images (a folder or a list file)")

    def sources(key: str) -> list[Path]:
        entries = spec.get(key) or []
        entries = [entries] if isinstance(entries, str) else list(entries)
        return [_resolve(base, str(e), f"{yaml_file}: {key}") for e in entries]

    val = [_resolve(base, ds.val, "custom.val")] if ds.val else sources("val")
    return Layout(names, str(yaml_file), sources("train"), val, str(yaml_file))


def _darknet(root: Path, ds, splits: bool = True) -> Layout:
    """CVAT's "YOLO 1.1": obj.data (classes, train, valid, names, backup) whose paths start with Darknet's data/."""
    spec = {}
    for line in (root / "obj.data").read_text().splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            spec[key.strip()] = value.strip()
    if ds.classes is not None:
        names, names_source = tuple(ds.classes), "custom.classes"
    elif spec.get("names"):
        names_file = _darknet_path(root, spec["names"], "obj.data: names")
        names, names_source = _names_from(names_file)
    else:
        names, names_source = _names(root)
    if not splits:
        return Layout(names, names_source, [], [], str(root / "obj.data"))
    train = [_darknet_path(root, spec.get("train", "train.txt"), "obj.data: train")]
    val = [_resolve(root, ds.val, "custom.val")] if ds.val else (
        [_darknet_path(root, spec["valid"], "obj.data: valid")] if spec.get("valid") else [])
    return Layout(names, names_source, train, val, str(root / "obj.data"))


def _names_from(path: Path) -> tuple[tuple[str, ...], str]:
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise CustomDataError(f"{path}: holds no class name; expected one per line in class-id order")
    return names, str(path)


def _darknet_path(root: Path, entry: str, key: str) -> Path:
    for candidate in (root / entry, root / Path(*Path(entry).parts[1:]) if len(Path(entry).parts) > 1 else None):
        if candidate is not None and candidate.exists():
            return candidate
    raise CustomDataError(f"{key}: {entry!r} found neither under {root} nor there without its first folder")


def _images(sources: list[Path], root: Path) -> list[Path]:
    images = []
    for source in sources:
        if source.is_dir():
            found = image_files(source)
            if not found:
                raise CustomDataError(f"{source}: no image (looked for .jpg, .png, ... in it and its sub-folders)")
            images += found
            continue
        for n, line in enumerate(source.read_text().splitlines(), start=1):
            entry = line.strip()
            if not entry:
                continue
            path = _listed(entry, source, root)
            if path is None:
                raise CustomDataError(f"{source}:{n}: image {entry!r} not found (under {source.parent} or {root})")
            images.append(path)
    return list(dict.fromkeys(images))


def _listed(entry: str, list_file: Path, root: Path) -> Path | None:
    path = Path(entry)
    if path.is_absolute():
        return path if path.is_file() else None
    candidates = [list_file.parent / entry, root / entry]
    if len(path.parts) > 1:  # Darknet's lists start with data/
        candidates.append(root / Path(*path.parts[1:]))
    return next((c for c in candidates if c.is_file()), None)


# -------------------------------------------------------------------------------------------- labels
def label_file(image: Path) -> Path | None:
    """Ultralytics' rule (the last images/ folder of the path becomes labels/, the suffix .txt), else the .txt
    beside the image (Darknet, CVAT); None when there is neither."""
    parts = image.parts
    if "images" in parts:
        k = len(parts) - 1 - parts[::-1].index("images")
        candidate = Path(*parts[:k], "labels", *parts[k + 1 :]).with_suffix(".txt")
        if candidate.is_file():
            return candidate
    beside = image.with_suffix(".txt")
    return beside if beside.is_file() else None


def _read_image(image: Path, names: tuple[str, ...], names_source: str) -> Img:
    width, height = image_size(image)
    labels = label_file(image)
    objects = [] if labels is None else _read_labels(labels, names, names_source, width, height)
    return Img(str(image.absolute()), width, height, objects)


def _read_labels(path: Path, names, names_source: str, width: int, height: int) -> list[Obj]:
    objects = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        source = f"{path}:{n}"
        try:
            values = [float(v) for v in parts[1:]]
        except ValueError:
            values = None
        if not parts[0].isdigit() or values is None or not (len(values) == 4 or (len(values) >= 6
                                                                               and len(values) % 2 == 0)):
            raise CustomDataError(f"{source}: {line.strip()!r} is neither 'class cx cy w h' (a box) nor 'class x1 "
                                  "y1 x2 y2 x3 y3 ...' (a polygon): a class id, then coordinates in [0, 1]")
        cls = int(parts[0])
        if cls >= len(names):
            raise CustomDataError(f"{source}: class {cls} is not among the {len(names)} names of {names_source} "
                                  f"(ids 0..{len(names) - 1})")
        outside = [v for v in values if not -EPSILON <= v <= 1 + EPSILON]
        if outside:
            raise CustomDataError(f"{source}: coordinate {outside[0]} lies outside [0, 1] (YOLO coordinates are "
                                  "fractions of the image's width and height)")
        values = [min(max(v, 0.0), 1.0) for v in values]
        if len(values) == 4:
            cx, cy, w, h = values
            box = (max(cx - w / 2, 0.0) * width, max(cy - h / 2, 0.0) * height, min(cx + w / 2, 1.0) * width,
                   min(cy + h / 2, 1.0) * height)
            polygon = None
        else:
            polygon = [v * (width if k % 2 == 0 else height) for k, v in enumerate(values)]
            box = (min(polygon[0::2]), min(polygon[1::2]), max(polygon[0::2]), max(polygon[1::2]))
        if not (box[2] > box[0] and box[3] > box[1]):
            raise CustomDataError(f"{source}: the {'box' if polygon is None else 'polygon'} has zero area")
        objects.append(Obj(names[cls], box, source, segmentation=None if polygon is None else [polygon]))
    return objects


# ---------------------------------------------------------------------------------------- segmentation
def _segmentation_set(ds, parsed: dict, names: tuple[str, ...], labels: LabelMaps, where: str,
                      notes: list[str]) -> PreparedSet:
    """Label maps drawn from the polygons, in each file's order: 0 background, the classes that own a polygon
    from 1 (the others left out, said in `notes`)."""
    objects = [o for images in parsed.values() for image in images for o in image.objects]
    boxes = [o for o in objects if o.segmentation is None]
    if boxes:
        raise CustomDataError(f"{boxes[0].source}: a box; segmentation needs polygons ('class x1 y1 x2 y2 x3 y3 "
                              "...', Ultralytics' segmentation labels)")
    found = {o.name for o in objects} if ds.classes is None else set(names)  # a given list is kept whole
    kept = tuple(n for n in dict.fromkeys(names) if n in found)
    unused = [n for n in dict.fromkeys(names) if n not in found]
    if unused:
        notes.append(f"left out of the classes, owning no polygon in any split: {', '.join(unused)}")
    if not objects:
        raise CustomDataError(f"{where}: no polygon in any label file of the two splits")
    if BACKGROUND in kept:
        raise CustomDataError(f"{where}: a class named {BACKGROUND!r}; label maps take 0 as the background: rename it")
    classes = (BACKGROUND, *kept)
    check_metric_names(classes)
    value = {n: k for k, n in enumerate(classes)}
    recipe = json.dumps(classes)
    records = {}
    for split, images in parsed.items():
        records[split] = []
        for image in images:
            path = Path(image.file_name)
            sources = [path] + ([lf] if (lf := label_file(path)) is not None else [])
            drawn = labels.add(path.stem, sources, recipe, lambda image=image: _draw(image, value))
            records[split].append({"file_name": image.file_name, "sem_seg_file_name": drawn,
                                   "image_id": path.stem, "ignore_label": ds.ignore_label})
    return PreparedSet(ds.display_name, "yolo", classes, records["train"], records["val"],
                       ignore_label=ds.ignore_label, notes=notes)


def _draw(image: Img, value: dict[str, int]) -> np.ndarray:
    """Each polygon filled with its class, later ones over earlier ones, rasterised as COCO rasterises polygon
    masks (pycocotools: a pixel belongs to a polygon when its centre lies inside), so that a set's label maps
    and its det_coco masks agree."""
    canvas = np.zeros((image.height, image.width), dtype=np.uint8)
    for o in image.objects:
        rle = mask_utils.frPyObjects(o.segmentation, image.height, image.width)
        canvas[mask_utils.decode(mask_utils.merge(rle)) > 0] = value[o.name]
    return canvas
