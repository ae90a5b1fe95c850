"""Small labelled sets of classes no other test uses, written in the layouts people bring (a Pascal VOC folder,
a COCO instances JSON with polygon masks, images + VOC-palette label PNGs) for the custom-data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from densecl.data.synthetic import voc_palette

CLASSES = ("gadget", "widget")  # widget: a red square, gadget: a blue disc
COLOURS = {"widget": (220, 40, 40), "gadget": (40, 60, 220)}


def scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[tuple[str, tuple[int, int, int, int]]]]:
    """A grey, slightly noisy image with one or two objects that do not overlap; [(class, (x0, y0, x1, y1))]
    with exclusive pixel corners."""
    pixels = rng.normal(128, 12, (size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    objects = []
    halves = [(0, size // 2), (size // 2, size)]
    for k in range(int(rng.integers(1, 3))):
        name = CLASSES[int(rng.integers(0, 2))]
        side = int(rng.integers(size // 4, size // 2 - 2))
        x0 = int(rng.integers(halves[k][0], halves[k][1] - side + 1))
        y0 = int(rng.integers(0, size - side + 1))
        box = (x0, y0, x0 + side, y0 + side)
        shape = draw.rectangle if name == "widget" else draw.ellipse
        shape((box[0], box[1], box[2] - 1, box[3] - 1), fill=COLOURS[name])
        objects.append((name, box))
    return image, objects


def label_map(objects, size: int, classes=CLASSES) -> np.ndarray:
    """Class indices (0 background, classes from 1 in `classes` order), a 255 border around each object."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for name, (x0, y0, x1, y1) in objects:
        shape = draw.rectangle if name == "widget" else draw.ellipse
        shape((x0, y0, x1 - 1, y1 - 1), fill=255)
        shape((x0 + 1, y0 + 1, x1 - 2, y1 - 2), fill=classes.index(name) + 1)
    return np.asarray(canvas)


def polygon(name: str, box) -> list[float]:
    x0, y0, x1, y1 = box
    if name == "widget":
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    return [float(v) for a in angles for v in (cx + r * np.cos(a), cy + r * np.sin(a))]


def write_scenes(root: Path, num_train: int, num_val: int, size: int = 96, seed: int = 0) -> dict[str, list]:
    """JPEGImages/<id>.jpg for both splits; returns {"train": [(id, objects)], "val": [...]}."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, count in (("train", num_train), ("val", num_val)):
        splits[split] = []
        for k in range(count):
            image_id = f"{split}_{k:03d}"
            image, objects = scene(rng, size)
            image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            splits[split].append((image_id, objects))
    return splits


def voc_xml(image_id: str, objects, size: int) -> str:
    parts = [f"<annotation><filename>{image_id}.jpg</filename>",
             f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>"]
    for name, (x0, y0, x1, y1) in objects:  # VOC: 1-based, inclusive
        parts.append(f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin>"
                     f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def write_voc(root: Path, num_train: int = 24, num_val: int = 8, size: int = 96, seed: int = 0) -> dict:
    splits = write_scenes(root, num_train, num_val, size, seed)
    (root / "Annotations").mkdir(exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        for image_id, objects in items:
            (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, objects, size))
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i, _ in items))
    return splits


def write_coco(root: Path, num_train: int = 24, num_val: int = 8, size: int = 96, seed: int = 0) -> dict:
    """images/ and annotations/{train,val}.json with polygon masks; category ids 7 and 3 (not 1..K)."""
    splits = write_scenes(root, num_train, num_val, size, seed)
    (root / "JPEGImages").rename(root / "images")
    category_id = {"widget": 7, "gadget": 3}
    (root / "annotations").mkdir(exist_ok=True)
    for split, items in splits.items():
        data = {"images": [], "annotations": [],
                "categories": [{"id": i, "name": n} for n, i in category_id.items()]}
        for k, (image_id, objects) in enumerate(items, start=100):
            data["images"].append({"id": k, "file_name": f"{image_id}.jpg", "width": size, "height": size})
            for name, (x0, y0, x1, y1) in objects:
                data["annotations"].append({
                    "id": len(data["annotations"]) + 1, "image_id": k, "category_id": category_id[name],
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                    "segmentation": [polygon(name, (x0, y0, x1, y1))],
                })  # fmt: skip
        (root / "annotations" / f"{split}.json").write_text(json.dumps(data))
    return splits


def write_masks(root: Path, num_train: int = 24, num_val: int = 8, size: int = 96, seed: int = 0) -> dict:
    """JPEGImages/, SegmentationClass/ as VOC-palette PNGs, ImageSets/Segmentation/{train,val}.txt; classes
    ("background", "gadget", "widget")."""
    splits = write_scenes(root, num_train, num_val, size, seed)
    (root / "SegmentationClass").mkdir(exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    palette = voc_palette().reshape(-1).tolist()
    for split, items in splits.items():
        for image_id, objects in items:
            label = Image.fromarray(label_map(objects, size), mode="P")
            label.putpalette(palette)
            label.save(root / "SegmentationClass" / f"{image_id}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i, _ in items))
    return splits
