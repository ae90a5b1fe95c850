"""Small labelled sets of classes no other test uses, written the way people bring them: the textbook layouts
(a Pascal VOC folder with lists, COCO instances JSONs, VOC-palette label PNGs) and the exports of annotation
tools (labelImg, labelme, CVAT, Label Studio, Roboflow, Ultralytics), each as that tool writes it.

Images are non-square (112 x 80: a width/height swap shows), the first object of each split touches the
image's right and bottom edges, and the second image of each split holds a difficult object (VOC's
`difficult`, COCO's `iscrowd`, the ignore value in label PNGs; formats without the notion write it as a plain
object). Each writer returns the `Item`s it wrote, with the file stem it gave each image and the objects as the
format scores them."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from densecl.data.synthetic import voc_palette

CLASSES = ("gadget", "widget")  # sorted; widget: a red rectangle, gadget: a blue cross
UNSORTED = ("widget", "gadget")  # the class-id order the tool exports use
WIDTH, HEIGHT = 112, 80
COLOURS = {"rectangle": (220, 40, 40), "cross": (40, 60, 220)}
MASK_COLOURS = {"background": (0, 0, 0), "widget": (250, 50, 83), "gadget": (51, 221, 255)}  # CVAT's table


@dataclass(frozen=True)
class Thing:
    """An object: its class, its box as exclusive pixel corners, and whether it is difficult."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool = False
    shape: str = ""  # "" = its class's: a widget's rectangle, a gadget's cross (a renamed class keeps it)

    @property
    def drawn(self) -> str:
        return self.shape or ("rectangle" if self.name == "widget" else "cross")

    def polygon(self) -> list[float]:
        """A rectangle for a widget, a cross (two bars through the box's middle) for a gadget: edges on pixel
        borders, so that every rasteriser agrees on its pixels."""
        x0, y0, x1, y1 = (int(v) for v in self.box)
        if self.drawn == "rectangle":
            return [x0, y0, x1, y0, x1, y1, x0, y1]
        (a, b), (c, d) = _bar(x0, x1), _bar(y0, y1)
        points = [(a, y0), (b, y0), (b, c), (x1, c), (x1, d), (b, d), (b, y1), (a, y1), (a, d), (x0, d), (x0, c),
                  (a, c)]
        return [float(v) for p in points for v in p]

    def mask(self, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
        x0, y0, x1, y1 = (int(v) for v in self.box)
        out = np.zeros((height, width), dtype=bool)
        if self.drawn == "rectangle":
            out[y0:y1, x0:x1] = True
        else:
            (a, b), (c, d) = _bar(x0, x1), _bar(y0, y1)
            out[y0:y1, a:b] = True
            out[c:d, x0:x1] = True
        return out


def _bar(low: int, high: int) -> tuple[int, int]:
    """The middle half of [low, high)."""
    quarter = (high - low) // 4
    return low + quarter, high - quarter


@dataclass(frozen=True)
class Item:
    stem: str  # the file name the writer gave the image, without its suffix
    split: str  # "train" or "val" as the test drew them; a layout without lists puts every image in train
    things: tuple[Thing, ...]


def scenes(num_train: int, num_val: int, seed: int = 0, empty: int = 0) -> list[Item]:
    """Images with one or two objects that do not overlap; `empty` more train images without any."""
    rng = np.random.default_rng(seed)
    items = []
    for split, count in (("train", num_train), ("val", num_val)):
        for k in range(count):
            things = []
            for half in range(1 + int(k == 1 or rng.integers(0, 2))):
                name = UNSORTED[k % 2] if half == 0 else UNSORTED[int(rng.integers(0, 2))]
                side = int(rng.integers(16, 34))
                tall = int(rng.integers(16, min(34, HEIGHT)))
                lo, hi = (0, WIDTH // 2) if half == 0 else (WIDTH // 2, WIDTH)
                if k == 0 and half == 0:  # at the right and bottom edges
                    box = (WIDTH - side, HEIGHT - tall, WIDTH, HEIGHT)
                    things.append(Thing(name, box))
                    continue
                x0 = int(rng.integers(lo, hi - side + 1))
                y0 = int(rng.integers(0, HEIGHT - tall + 1))
                things.append(Thing(name, (x0, y0, x0 + side, y0 + tall), difficult=(k == 1 and half == 1)))
            if k == 0 and len(things) == 2:  # the edge object took the right half: the other one goes left
                x0, y0, x1, y1 = things[1].box
                things[1] = replace(things[1], box=(x0 - WIDTH // 2, y0, x1 - WIDTH // 2, y1))
            items.append(Item(f"{split}_{k:03d}", split, tuple(things)))
    items += [Item(f"train_empty_{k:03d}", "train", ()) for k in range(empty)]
    return items


def plain(items: list[Item]) -> list[Item]:
    """The items with no difficult object (formats without the notion: each is an object like any other)."""
    return [replace(i, things=tuple(replace(t, difficult=False) for t in i.things)) for i in items]


def renamed(items: list[Item], stem) -> list[Item]:
    return [replace(i, stem=stem(i)) for i in items]


def picture(item: Item, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(_digest(item.stem) + seed)
    pixels = rng.normal(128, 12, (HEIGHT, WIDTH, 3)).clip(0, 255).astype(np.uint8)
    for t in item.things:
        pixels[t.mask()] = COLOURS[t.drawn]
    return Image.fromarray(pixels)


def _digest(text: str) -> int:
    return zlib.crc32(text.encode())


def save_images(folder: Path, items: list[Item], suffix: str = ".jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        picture(item).save(folder / f"{item.stem}{suffix}", quality=95)


def label_map(item: Item, classes=("background", *CLASSES), ignore: int = 255, outline: bool = True) -> np.ndarray:
    """Class indices in `classes` order; a difficult object, and the outline of every object, the ignore value."""
    out = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for t in item.things:
        m = t.mask()
        out[m] = ignore if t.difficult else classes.index(t.name)
        if outline:
            inner = m.copy()
            inner[1:, :] &= m[:-1, :]
            inner[:-1, :] &= m[1:, :]
            inner[:, 1:] &= m[:, :-1]
            inner[:, :-1] &= m[:, 1:]
            out[m & ~inner] = ignore
    return out


def _lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def _yolo_lines(item: Item, names, polygons: bool) -> list[str]:
    lines = []
    for t in item.things:
        if polygons:
            p = t.polygon()
            coords = [v / (WIDTH if k % 2 == 0 else HEIGHT) for k, v in enumerate(p)]
        else:
            x0, y0, x1, y1 = t.box
            coords = [(x0 + x1) / 2 / WIDTH, (y0 + y1) / 2 / HEIGHT, (x1 - x0) / WIDTH, (y1 - y0) / HEIGHT]
        lines.append(" ".join([str(names.index(t.name)), *(f"{v:.6f}" for v in coords)]))
    return lines


def _coco(items: list[Item], category: dict[str, int], file_name, masks: bool, first_id: int = 0) -> dict:
    data = {"images": [], "annotations": [], "categories": []}
    for k, item in enumerate(items, start=first_id):
        data["images"].append({"id": k, "file_name": file_name(item), "width": WIDTH, "height": HEIGHT})
        for t in item.things:
            x0, y0, x1, y1 = t.box
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "image_id": k, "category_id": category[t.name],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(t.mask().sum()) if masks else (x1 - x0) * (y1 - y0),
                "iscrowd": int(t.difficult), "segmentation": [t.polygon()] if masks else [],
            })  # fmt: skip
    return data


# ------------------------------------------------------------------------------ the textbook layouts
def voc_xml(item: Item, corner=lambda v: str(int(v)), extra: str = "<difficult>{d}</difficult>") -> str:
    parts = [f"<annotation><filename>{item.stem}.jpg</filename>",
             f"<size><width>{WIDTH}</width><height>{HEIGHT}</height><depth>3</depth></size>"]
    for t in item.things:  # VOC: 1-based, inclusive
        x0, y0, x1, y1 = t.box
        parts.append(f"<object><name>{t.name}</name>{extra.format(d=int(t.difficult))}<bndbox>"
                     f"<xmin>{corner(x0 + 1)}</xmin><ymin>{corner(y0 + 1)}</ymin><xmax>{corner(x1)}</xmax>"
                     f"<ymax>{corner(y1)}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def write_voc(root: Path, num_train: int = 24, num_val: int = 8, seed: int = 0) -> list[Item]:
    """Annotations/, JPEGImages/, ImageSets/Main/{train,val}.txt."""
    items = scenes(num_train, num_val, seed)
    save_images(root / "JPEGImages", items)
    (root / "Annotations").mkdir(exist_ok=True)
    for item in items:
        (root / "Annotations" / f"{item.stem}.xml").write_text(voc_xml(item))
    for split in ("train", "val"):
        _lines(root / "ImageSets" / "Main" / f"{split}.txt", [i.stem for i in items if i.split == split])
    return items


def write_coco(root: Path, num_train: int = 24, num_val: int = 8, seed: int = 0) -> list[Item]:
    """images/ and annotations/{train,val}.json with polygon masks; category ids 7 and 3 (not 1..K); a
    difficult object is a crowd region."""
    items = scenes(num_train, num_val, seed)
    save_images(root / "images", items)
    category = {"widget": 7, "gadget": 3}
    for split, first in (("train", 0), ("val", 100)):
        data = _coco([i for i in items if i.split == split], category, lambda i: f"{i.stem}.jpg", True, first)
        data["categories"] = [{"id": i, "name": n} for n, i in category.items()]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(data))
    return items


def write_masks(root: Path, num_train: int = 24, num_val: int = 8, seed: int = 0, ignore: int = 255) -> list[Item]:
    """JPEGImages/, SegmentationClass/ as VOC-palette PNGs (outlines and difficult objects `ignore`),
    ImageSets/Segmentation/{train,val}.txt; classes ("background", "gadget", "widget")."""
    items = scenes(num_train, num_val, seed)
    save_images(root / "JPEGImages", items)
    (root / "SegmentationClass").mkdir(exist_ok=True)
    palette = voc_palette().reshape(-1).tolist()
    for item in items:
        label = Image.fromarray(label_map(item, ignore=ignore), mode="P")
        label.putpalette(palette)
        label.save(root / "SegmentationClass" / f"{item.stem}.png")
    for split in ("train", "val"):
        _lines(root / "ImageSets" / "Segmentation" / f"{split}.txt", [i.stem for i in items if i.split == split])
    return items


# ------------------------------------------------------------------------------ annotation tools' exports
def write_labelimg(root: Path, items: list[Item]) -> list[Item]:
    """labelImg's Pascal VOC: Annotations/ and JPEGImages/ only (no ImageSets), integer 1-based corners, its
    <folder>, <path>, <source>, <pose>, <truncated> and <segmented> elements."""
    save_images(root / "JPEGImages", items)
    extra = "<pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
    for item in items:
        xml = voc_xml(item, extra=extra).replace(
            "<annotation>", f"<annotation><folder>JPEGImages</folder><path>{root}/JPEGImages/{item.stem}.jpg</path>"
            "<source><database>Unknown</database></source><segmented>0</segmented>")
        (root / "Annotations").mkdir(exist_ok=True)
        (root / "Annotations" / f"{item.stem}.xml").write_text(xml)
    return items


def write_labelme_voc(root: Path, items: list[Item]) -> list[Item]:
    """labelme's labelme2voc.py: JPEGImages/, Annotations/ with empty <folder/>, <pose/>, <truncated/>,
    <difficult/>, fractional corners, class_names.txt; no ImageSets. labelme has no difficult flag."""
    items = [replace(i, things=tuple(replace(t, difficult=False, box=(t.box[0] + 0.5, t.box[1] + 0.25, *t.box[2:]))
                                     for t in i.things)) for i in items]
    save_images(root / "JPEGImages", items)
    (root / "Annotations").mkdir(exist_ok=True)
    for item in items:
        xml = voc_xml(item, corner=lambda v: f"{v:.2f}", extra="<pose/><truncated/><difficult/>").replace(
            "<annotation>", "<annotation><folder/><database/><segmented/>")
        (root / "Annotations" / f"{item.stem}.xml").write_text(xml)
    _lines(root / "class_names.txt", ["_background_", *UNSORTED])
    return items


def write_cvat_voc(root: Path, items: list[Item]) -> list[Item]:
    """CVAT's "Pascal VOC 1.1": Annotations/, JPEGImages/, ImageSets/Main/default.txt (one subset) and a
    <label>_default.txt per class, labelmap.txt; corners as floats, <occluded> beside <difficult>."""
    save_images(root / "JPEGImages", items)
    (root / "Annotations").mkdir(exist_ok=True)
    for item in items:
        xml = voc_xml(item, corner=lambda v: f"{float(v)}",
                      extra="<truncated>0</truncated><occluded>0</occluded><difficult>{d}</difficult>")
        (root / "Annotations" / f"{item.stem}.xml").write_text(xml)
    _lines(root / "ImageSets" / "Main" / "default.txt", [i.stem for i in items])
    for name in UNSORTED:
        _lines(root / "ImageSets" / "Main" / f"{name}_default.txt",
               [f"{i.stem} {1 if any(t.name == name for t in i.things) else -1}" for i in items])
    _lines(root / "labelmap.txt", ["# label:color_rgb:parts:actions",
                                   *(f"{n}:{','.join(map(str, c))}::" for n, c in MASK_COLOURS.items())])
    return items


def write_cvat_yolo(root: Path, items: list[Item]) -> list[Item]:
    """CVAT's "YOLO 1.1" (Darknet): obj.data, obj.names, train.txt of data/obj_train_data/<image>, and the
    images with their .txt boxes in obj_train_data/."""
    items = plain(items)
    save_images(root / "obj_train_data", items)
    for item in items:
        _lines(root / "obj_train_data" / f"{item.stem}.txt", _yolo_lines(item, UNSORTED, polygons=False))
    _lines(root / "obj.names", UNSORTED)
    _lines(root / "obj.data", [f"classes = {len(UNSORTED)}", "train = data/train.txt", "names = data/obj.names",
                               "backup = backup/"])
    _lines(root / "train.txt", [f"data/obj_train_data/{i.stem}.jpg" for i in items])
    return items


def write_cvat_masks(root: Path, items: list[Item]) -> list[Item]:
    """CVAT's "Segmentation mask 1.1": labelmap.txt, ImageSets/Segmentation/default.txt, SegmentationClass/ as
    RGB colour masks, SegmentationObject/, JPEGImages/. Colour masks carry no ignore value."""
    items = plain(items)
    save_images(root / "JPEGImages", items)
    for folder in ("SegmentationClass", "SegmentationObject"):
        (root / folder).mkdir(exist_ok=True)
    for item in items:
        index = label_map(item, classes=tuple(MASK_COLOURS), outline=False)
        colours = np.array(list(MASK_COLOURS.values()), dtype=np.uint8)
        Image.fromarray(colours[index]).save(root / "SegmentationClass" / f"{item.stem}.png")
        objects = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
        for k, t in enumerate(item.things, start=1):
            objects[t.mask()] = (k * 60, 255 - k * 60, k * 30)
        Image.fromarray(objects).save(root / "SegmentationObject" / f"{item.stem}.png")
    _lines(root / "ImageSets" / "Segmentation" / "default.txt", [i.stem for i in items])
    _lines(root / "labelmap.txt", ["# label:color_rgb:parts:actions",
                                   *(f"{n}:{','.join(map(str, c))}::" for n, c in MASK_COLOURS.items())])
    return items


def write_label_studio_yolo(root: Path, items: list[Item]) -> list[Item]:
    """Label Studio's YOLO export: classes.txt, images/ and labels/ (file names prefixed by an upload id),
    notes.json; no split."""
    items = renamed(plain(items), lambda i: f"{_digest(i.stem):08x}-{i.stem}")
    save_images(root / "images", items)
    for item in items:
        _lines(root / "labels" / f"{item.stem}.txt", _yolo_lines(item, UNSORTED, polygons=False))
    _lines(root / "classes.txt", UNSORTED)
    (root / "notes.json").write_text(json.dumps({"categories": [{"id": k, "name": n} for k, n in enumerate(UNSORTED)],
                                                 "info": {"year": 2024, "version": "1.0"}}))
    return items


def write_label_studio_coco(root: Path, items: list[Item]) -> list[Item]:
    """Label Studio's COCO export: result.json (file names `images/...` from the export's folder, category
    ids from 0, rectangles with an empty segmentation) and images/."""
    items = renamed(plain(items), lambda i: f"{_digest(i.stem):08x}-{i.stem}")
    save_images(root / "images", items)
    category = {n: k for k, n in enumerate(UNSORTED)}
    data = _coco(items, category, lambda i: f"images/{i.stem}.jpg", masks=False)
    data["categories"] = [{"id": k, "name": n} for n, k in category.items()]
    data["info"] = {"year": 2024, "contributor": "Label Studio"}
    (root / "result.json").write_text(json.dumps(data))
    return items


ROBOFLOW_NAMES = {"widget": "red widget", "gadget": "gadget/v2"}  # names with a space and a slash


def write_roboflow_coco(root: Path, items: list[Item]) -> list[Item]:
    """Roboflow's COCO export: train/ and valid/, each with its images and _annotations.coco.json; category 0
    a root category that every class names as its supercategory and no annotation uses; polygon masks."""
    items = [replace(i, stem=f"{i.stem}_jpg.rf.{_digest(i.stem) % 16**6:06x}", things=tuple(
        replace(t, name=ROBOFLOW_NAMES[t.name], shape=t.drawn, difficult=False) for t in i.things)) for i in items]
    category = {n: k for k, n in enumerate(ROBOFLOW_NAMES.values(), start=1)}
    for split, folder in (("train", "train"), ("val", "valid")):
        chosen = [i for i in items if i.split == split]
        save_images(root / folder, chosen)
        data = _coco(chosen, category, lambda i: f"{i.stem}.jpg", masks=True)
        data["categories"] = [{"id": 0, "name": "parts-Xk2f", "supercategory": "none"}] + [
            {"id": k, "name": n, "supercategory": "parts-Xk2f"} for n, k in category.items()]
        (root / folder / "_annotations.coco.json").write_text(json.dumps(data))
    (root / "README.roboflow.txt").write_text("exported from roboflow.com\n")
    return items


def write_roboflow_yolo(root: Path, items: list[Item]) -> list[Item]:
    """Roboflow's YOLOv8 export: data.yaml (train: ../train/images, val: ../valid/images, nc, names as a list),
    {train,valid}/{images,labels}; polygons."""
    items = plain(items)
    for split, folder in (("train", "train"), ("val", "valid")):
        chosen = [i for i in items if i.split == split]
        save_images(root / folder / "images", chosen)
        for item in chosen:
            _lines(root / folder / "labels" / f"{item.stem}.txt", _yolo_lines(item, UNSORTED, polygons=True))
    spec = {"train": "../train/images", "val": "../valid/images", "nc": len(UNSORTED), "names": list(UNSORTED),
            "roboflow": {"workspace": "w", "project": "p", "version": 1}}
    (root / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return items


def write_ultralytics(root: Path, items: list[Item], polygons: bool = True) -> list[Item]:
    """Ultralytics' layout: data.yaml (path, train: images/train, val: images/val, names as a dict id: name),
    images/{train,val}, labels/{train,val}; an image without objects has no label file."""
    items = plain(items)
    for split in ("train", "val"):
        chosen = [i for i in items if i.split == split]
        save_images(root / "images" / split, chosen)
        for item in chosen:
            if item.things:
                _lines(root / "labels" / split / f"{item.stem}.txt", _yolo_lines(item, UNSORTED, polygons))
    spec = {"path": str(root), "train": "images/train", "val": "images/val", "names": dict(enumerate(UNSORTED))}
    (root / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return items


def write_labelme_coco(root: Path, items: list[Item]) -> list[Item]:
    """labelme's labelme2coco.py: annotations.json (category `_background_` id 0 before the classes,
    file names `JPEGImages/...`, polygons) and JPEGImages/; one JSON for the whole set."""
    items = plain(items)
    save_images(root / "JPEGImages", items)
    category = {n: k for k, n in enumerate(UNSORTED, start=1)}
    data = _coco(items, category, lambda i: f"JPEGImages/{i.stem}.jpg", masks=True)
    data["categories"] = [{"supercategory": None, "id": 0, "name": "_background_"}] + [
        {"supercategory": None, "id": k, "name": n} for n, k in category.items()]
    data.update(info={"description": None}, licenses=[{"url": None, "id": 0, "name": None}], type="instances")
    (root / "annotations.json").write_text(json.dumps(data))
    return items
