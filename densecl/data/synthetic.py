"""Procedurally generated scenes: the project's built-in data, so every experiment runs with no download.

A scene holds several small objects whose class is a local appearance: a *shape* filled with a class-specific
texture family (dots, checks, stripes, speckle, cross-hatch, each at a class-specific scale), in random
colours, size, rotation and phase, so nothing global (mean colour, overall texture) identifies a class.
Objects occlude each other and sit on cluttered backgrounds among class-less, untextured distractor shapes;
most scenes hold several classes. Class identity is thus a property of small regions: what dense
pre-training should capture and a single global embedding averages away. (Version 1 drew every texture at
random, so only the outline told classes apart; a few hundred CPU iterations of pre-training learned nothing
a linear probe could use there.)
Scenes come with exact boxes, instance masks and semantic maps, and ``write_synthetic_dataset`` exports a set
in Pascal VOC and COCO layouts, so the downstream detection and segmentation code runs on it unchanged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent")

FORMAT_VERSION = 2  # 2: class-specific texture families, untextured distractors
VAL_INDEX_OFFSET = 1_000_000  # val scenes use generation indices disjoint from train's 0..num_train-1
MIN_VISIBLE_PIXELS = 20
MIN_VISIBLE_FRACTION = 0.1
OBJECTS_PER_SCENE = (4, 10)  # inclusive
DISTRACTORS_PER_SCENE = (2, 6)  # inclusive
OBJECT_DIAMETER_FRACTION = (0.10, 0.25)  # of the image side
NEAR_PREVIOUS_PROBABILITY = 0.35  # chance to place an object touching an earlier one, to make occlusions
JPEG_QUALITY = 95  # with 4:4:4 chroma, so thin coloured strokes and small objects keep their colour


@dataclass
class Scene:
    """One generated image and its annotations (visible parts only, after occlusion).

    boxes: float32 (n, 4) xyxy in pixels, x1/y1 exclusive (x1 = last visible column + 1);
    labels: int64 (n,) indices into CLASS_NAMES; masks: bool (n, H, W);
    semantic: uint8 (H, W) with 0 = background and c + 1 = class c.
    An instance left with fewer than MIN_VISIBLE_PIXELS visible pixels, or under MIN_VISIBLE_FRACTION of its
    area, is unrecognisable and is dropped: its visible sliver counts as background.
    """

    image: Image.Image
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    semantic: np.ndarray


# --------------------------------------------------------------------------------------------- shapes
# A shape is a list of drawing operations in unit coordinates (object radius 1, centred on the origin):
# ("polygon", vertices, fill) fills a polygon with 1 (paint) or 0 (cut a hole); ("line", vertices, width)
# draws a thick polyline, width in units of the radius.


def _regular_polygon(sides: int, phase: float = 0.0, radius: float = 1.0) -> np.ndarray:
    angles = phase + 2.0 * np.pi * np.arange(sides) / sides
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int, inner_radius: float) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner_radius)
    angles = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _plus(arm_half_width: float) -> np.ndarray:
    a = arm_half_width
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                     (-1, -a), (-a, -a)], dtype=np.float64)


_CIRCLE = _regular_polygon(40)
_SHAPE_OPERATIONS: dict[str, list[tuple]] = {
    "circle": [("polygon", _CIRCLE, 1)],
    "square": [("polygon", _regular_polygon(4, np.pi / 4), 1)],
    "triangle": [("polygon", _regular_polygon(3, -np.pi / 2), 1)],
    "star": [("polygon", _star(5, 0.42), 1)],
    "ring": [("polygon", _CIRCLE, 1), ("polygon", 0.55 * _CIRCLE, 0)],
    "cross": [("polygon", _plus(0.3), 1)],
    "hexagon": [("polygon", _regular_polygon(6), 1)],
    "crescent": [("polygon", _CIRCLE, 1), ("polygon", 0.85 * _CIRCLE + np.array([0.5, -0.15]), 0)],
}
assert tuple(_SHAPE_OPERATIONS) == CLASS_NAMES


def _blob_outline(rng: np.random.Generator) -> np.ndarray:
    """A smooth irregular closed outline (radius modulated by random low-frequency waves): no class's shape."""
    angles = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    radius = np.ones_like(angles)
    for frequency in (2, 3):
        radius += rng.uniform(0.15, 0.3) * np.cos(frequency * angles + rng.uniform(0, 2 * np.pi))
    radius = np.clip(radius / radius.max(), 0.25, 1.0)
    return radius[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)


def _distractor_operations(rng: np.random.Generator) -> list[tuple]:
    """A class-less shape: a smooth irregular blob, an elongated ellipse, a bar or a zigzag stroke."""
    kind = rng.integers(4)
    if kind == 0:
        return [("polygon", _blob_outline(rng), 1)]
    if kind == 1:
        return [("polygon", _CIRCLE * np.array([1.0, rng.uniform(0.22, 0.4)]), 1)]
    if kind == 2:
        half_width = rng.uniform(0.08, 0.18)
        return [("polygon", np.array([(-1, -half_width), (1, -half_width), (1, half_width), (-1, half_width)]), 1)]
    xs = np.linspace(-1, 1, int(rng.integers(3, 6)))
    ys = np.where(np.arange(xs.size) % 2 == 0, -0.35, 0.35)
    return [("line", np.stack([xs, ys], 1), rng.uniform(0.12, 0.22))]


def _render_mask(operations: list[tuple], centre: np.ndarray, radius: float, angle: float) -> tuple:
    """Rasterise a shape into a small patch; returns (bool mask, x offset, y offset) in image pixels."""
    x0, y0 = int(math.floor(centre[0] - radius)) - 1, int(math.floor(centre[1] - radius)) - 1
    side = int(math.ceil(2 * radius)) + 3
    patch = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(patch)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    offset = centre - np.array([x0, y0])
    for kind, vertices, value in operations:
        points = [tuple(p) for p in (vertices @ rotation.T * radius + offset)]
        if kind == "polygon":
            draw.polygon(points, fill=value)
        else:
            draw.line(points, fill=1, width=max(1, round(value * radius)), joint="curve")
    return np.asarray(patch, dtype=bool), x0, y0


# ------------------------------------------------------------------------------------------- textures
# Each class has its own local appearance: a shape *and* a texture family (pattern and scale), drawn in two
# random colours at a random orientation and phase. Colour never identifies a class; distractors and
# background clutter are untextured (solid or gradient fills) so that texture marks an object, as parts do in
# natural images, and the class is read from the pattern and outline of a small region: a dense property.
CLASS_TEXTURES: dict[str, tuple[str, tuple[float, float]]] = {  # class -> (pattern, period range in pixels)
    "circle": ("dots", (3.0, 5.0)),
    "square": ("checker", (3.0, 5.0)),
    "triangle": ("stripes", (3.0, 4.5)),
    "star": ("speckle", (1.0, 1.0)),
    "ring": ("stripes", (6.0, 9.0)),
    "cross": ("checker", (6.0, 9.0)),
    "hexagon": ("dots", (6.0, 9.0)),
    "crescent": ("crosshatch", (4.0, 7.0)),
}
assert tuple(CLASS_TEXTURES) == CLASS_NAMES
# class_cue="colour": one fixed colour per class instead of its texture family, an easy set that a few hundred
# CPU iterations of fine-tuning learn (the default run's downstream set); the pre-training scenes keep textures
CLASS_COLOURS = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                          (145, 30, 180), (70, 240, 240), (240, 50, 230)], dtype=np.float32)
CLASS_CUES = ("texture", "colour")
STYLE_DEFAULTS = {"class_cue": "texture", "object_size": list(OBJECT_DIAMETER_FRACTION)}
STYLE_KEYS = tuple(STYLE_DEFAULTS)
UNTEXTURED_FILLS = ("solid", "gradient")  # distractors


def _texture(rng: np.random.Generator, height: int, width: int, pattern: str,
             period_range: tuple[float, float] = (3.0, 8.0)) -> np.ndarray:
    """A fill of the named pattern in two random colours, at a random orientation, phase and period."""
    colour_a, colour_b = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    if pattern == "solid":
        return np.broadcast_to(colour_a, (height, width, 3))
    if pattern == "speckle":
        weight = rng.random((height, width), dtype=np.float32)
    else:
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        phi = rng.uniform(0, np.pi)
        u = xs * math.cos(phi) + ys * math.sin(phi) + rng.uniform(0, 10)
        v = -xs * math.sin(phi) + ys * math.cos(phi) + rng.uniform(0, 10)
        period = rng.uniform(*period_range)
        if pattern == "stripes":
            weight = np.floor(u / (period / 2)) % 2
        elif pattern == "checker":
            weight = (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2
        elif pattern == "dots":
            weight = ((u % period - period / 2) ** 2 + (v % period - period / 2) ** 2) < (0.3 * period) ** 2
        elif pattern == "crosshatch":
            weight = ((u % period) < 0.35 * period) | ((v % period) < 0.35 * period)
        elif pattern == "gradient":
            weight = (u - u.min()) / max(float(np.ptp(u)), 1e-6)
        else:
            raise ValueError(f"unknown texture pattern {pattern!r}")
    return colour_a + weight.astype(np.float32)[..., None] * (colour_b - colour_a)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Clutter: a colour gradient, low-frequency colour noise, irregular blobs, random lines and arcs."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phi = rng.uniform(0, 2 * np.pi)
    ramp = xs * math.cos(phi) + ys * math.sin(phi)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    colour_a, colour_b = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    canvas = colour_a + ramp[..., None] * (colour_b - colour_a)
    grid = int(rng.integers(3, 8))
    coarse = np.clip(rng.normal(128, 40, size=(grid, grid, 3)), 0, 255).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    canvas = np.clip(canvas + blotches - 128.0, 0, 255).astype(np.uint8)

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):  # large irregular blobs (never circles: those are a class)
        outline = _blob_outline(rng) * rng.uniform(0.1, 0.35) * size + rng.uniform(0, size, 2)
        draw.polygon([tuple(p) for p in outline], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    for _ in range(int(rng.integers(4, 14))):  # lines
        x0, y0, x1, y1 = rng.uniform(-0.1, 1.1, 4) * size
        draw.line((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(1, 4))):  # arcs
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.05, 0.25) * size
        start = rng.uniform(0, 360)
        draw.arc((cx - r, cy - r, cx + r, cy + r), start, start + rng.uniform(60, 300),
                 fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    return np.asarray(image, dtype=np.float32).copy()


def _paste(canvas: np.ndarray, owner: np.ndarray, owner_id: int, mask: np.ndarray, x0: int, y0: int,
           texture: np.ndarray) -> None:
    """Paint texture through mask at (x0, y0), clipped to the canvas, and record who owns those pixels."""
    size = canvas.shape[0]
    h, w = mask.shape
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    local = mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    canvas[cy0:cy1, cx0:cx1][local] = texture[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0][local]
    owner[cy0:cy1, cx0:cx1][local] = owner_id


# -------------------------------------------------------------------------------------------- scenes
def check_style(class_cue: str, object_size) -> None:
    if class_cue not in CLASS_CUES:
        raise ValueError(f"class_cue={class_cue!r}: expected one of {', '.join(CLASS_CUES)}")
    if len(object_size) != 2 or not 0 < object_size[0] <= object_size[1] <= 1:
        raise ValueError(f"object_size={tuple(object_size)}: expected (low, high) with 0 < low <= high <= 1")


def generate_scene(seed: int, index: int, image_size: int = 160, class_cue: str = "texture",
                   object_size: tuple[float, float] = OBJECT_DIAMETER_FRACTION) -> Scene:
    """Scene number ``index`` of the set ``seed``: a pure function of its arguments. ``class_cue``: what tells
    the classes apart besides the shape (their texture families, or a fixed colour each: an easier set);
    ``object_size``: the range of object diameters as a fraction of the side."""
    if image_size < 32:
        raise ValueError(f"generate_scene: image_size must be at least 32 pixels, got {image_size}")
    if seed < 0 or index < 0:
        raise ValueError(f"generate_scene: seed and index must be non-negative, got seed={seed}, index={index}")
    check_style(class_cue, object_size)
    rng = np.random.default_rng([seed, index])
    size = image_size
    canvas = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int16)  # -1 = background or distractor

    num_objects = int(rng.integers(OBJECTS_PER_SCENE[0], OBJECTS_PER_SCENE[1] + 1))
    labels = rng.integers(len(CLASS_NAMES), size=num_objects)
    radii = rng.uniform(*object_size, size=num_objects) * size / 2
    centres = np.zeros((num_objects, 2))
    for i in range(num_objects):
        if i > 0 and rng.random() < NEAR_PREVIOUS_PROBABILITY:
            j = int(rng.integers(i))
            direction = rng.uniform(0, 2 * np.pi)
            distance = (radii[i] + radii[j]) * rng.uniform(0.4, 0.9)
            centres[i] = centres[j] + distance * np.array([math.cos(direction), math.sin(direction)])
        else:
            centres[i] = rng.uniform(0, size, 2)
        centres[i] = np.clip(centres[i], radii[i], size - radii[i])

    num_distractors = int(rng.integers(DISTRACTORS_PER_SCENE[0], DISTRACTORS_PER_SCENE[1] + 1))
    # Paint objects and distractors in a random order so that each can occlude the other.
    items = [("object", i) for i in range(num_objects)] + [("distractor", i) for i in range(num_distractors)]
    full_area = np.zeros(num_objects, dtype=np.int64)
    for position in rng.permutation(len(items)):
        kind, i = items[position]
        angle = rng.uniform(0, 2 * np.pi)
        if kind == "object":
            name = CLASS_NAMES[labels[i]]
            operations, centre, radius, owner_id = _SHAPE_OPERATIONS[name], centres[i], radii[i], i
            fill = CLASS_TEXTURES[name]
        else:
            fill = (UNTEXTURED_FILLS[int(rng.integers(len(UNTEXTURED_FILLS)))],)
            operations = _distractor_operations(rng)
            radius = rng.uniform(*object_size) * size / 2 * rng.uniform(1.0, 1.6)
            centre, owner_id = rng.uniform(0, size, 2), -1
        mask, x0, y0 = _render_mask(operations, centre, radius, angle)
        if kind == "object":
            full_area[i] = mask.sum()
        if kind == "object" and class_cue == "colour":
            fill_pixels = np.broadcast_to(CLASS_COLOURS[labels[i]], (*mask.shape, 3))
        else:
            fill_pixels = _texture(rng, *mask.shape, *fill)
        _paste(canvas, owner, owner_id, mask, x0, y0, fill_pixels)

    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * 3.0  # sensor noise
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))

    masks = owner[None] == np.arange(num_objects, dtype=np.int16)[:, None, None]
    visible = masks.sum(axis=(1, 2))
    keep = (visible >= MIN_VISIBLE_PIXELS) & (visible >= MIN_VISIBLE_FRACTION * np.maximum(full_area, 1))
    masks, labels = masks[keep], labels[keep].astype(np.int64)
    semantic = np.zeros((size, size), dtype=np.uint8)
    boxes = np.zeros((len(labels), 4), dtype=np.float32)
    for k, (mask, label) in enumerate(zip(masks, labels)):
        semantic[mask] = label + 1
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return Scene(image=image, boxes=boxes, labels=labels, masks=masks, semantic=semantic)


# ------------------------------------------------------------------------------------ dataset export
@dataclass
class SyntheticDatasetPaths:
    root: Path
    voc_dir: Path
    coco_train_json: Path
    coco_val_json: Path
    image_dir: Path
    class_names: tuple[str, ...]
    num_train: int
    num_val: int


def voc_palette(num_colours: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: entry i spreads the bits of i over the high bits of R, G and B."""
    palette = np.zeros((num_colours, 3), dtype=np.uint8)
    for i in range(num_colours):
        code, colour = i, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        palette[i] = colour
    return palette


def _paths_for(root: Path, params: dict) -> SyntheticDatasetPaths:
    voc_dir = root / "voc"
    return SyntheticDatasetPaths(
        root=root, voc_dir=voc_dir, image_dir=voc_dir / "JPEGImages",
        coco_train_json=root / "coco" / "annotations" / "instances_train.json",
        coco_val_json=root / "coco" / "annotations" / "instances_val.json",
        class_names=tuple(params["class_names"]), num_train=params["num_train"], num_val=params["num_val"],
    )


def _voc_xml(name: str, scene: Scene) -> ET.ElementTree:
    annotation = ET.Element("annotation")

    def child(parent: ET.Element, tag: str, text: object | None = None) -> ET.Element:
        element = ET.SubElement(parent, tag)
        if text is not None:
            element.text = str(text)
        return element

    child(annotation, "folder", "JPEGImages")
    child(annotation, "filename", f"{name}.jpg")
    child(child(annotation, "source"), "database", "DenseCL synthetic scenes")
    size = child(annotation, "size")
    child(size, "width", scene.image.width)
    child(size, "height", scene.image.height)
    child(size, "depth", 3)
    child(annotation, "segmented", 1)
    for box, label in zip(scene.boxes, scene.labels):
        obj = child(annotation, "object")
        child(obj, "name", CLASS_NAMES[label])
        child(obj, "pose", "Unspecified")
        child(obj, "truncated", 0)
        child(obj, "difficult", 0)
        bndbox = child(obj, "bndbox")
        x0, y0, x1, y1 = (int(v) for v in box)
        # VOC boxes are 1-based and inclusive: pixel column c (0-based) is c + 1; the last column is x1 - 1.
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            child(bndbox, tag, value)
    ET.indent(annotation)
    return ET.ElementTree(annotation)


def _palette_png(indices: np.ndarray, palette: np.ndarray) -> Image.Image:
    image = Image.fromarray(indices.astype(np.uint8))
    image.putpalette(palette.tobytes())
    return image


def _write_split(voc_dir: Path, split: str, indices: list[int], image_size: int, seed: int, style: dict,
                 coco: dict, palette: np.ndarray) -> list[str]:
    from pycocotools import mask as mask_utils

    names = []
    for j, index in enumerate(indices):
        name = f"{split}_{j:06d}"
        scene = generate_scene(seed, index, image_size, **style)
        scene.image.save(voc_dir / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY, subsampling=0)
        _voc_xml(name, scene).write(voc_dir / "Annotations" / f"{name}.xml", encoding="utf-8")
        _palette_png(scene.semantic, palette).save(voc_dir / "SegmentationClass" / f"{name}.png")
        instance_map = np.zeros(scene.semantic.shape, dtype=np.uint8)
        for k, mask in enumerate(scene.masks):
            instance_map[mask] = k + 1
        _palette_png(instance_map, palette).save(voc_dir / "SegmentationObject" / f"{name}.png")

        image_id = index + 1  # COCO ids start at 1; generation indices are disjoint across splits
        coco["images"].append({"id": image_id, "file_name": f"{name}.jpg", "width": image_size,
                               "height": image_size})
        for box, label, mask in zip(scene.boxes, scene.labels, scene.masks):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = (float(v) for v in box)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": int(label) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()), "iscrowd": 0,
                "segmentation": rle,
            })
        names.append(name)
    return names


def _write_all(target: Path, params: dict) -> None:
    voc_dir = target / "voc"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject", "ImageSets/Main",
                "ImageSets/Segmentation"):
        (voc_dir / sub).mkdir(parents=True, exist_ok=True)
    (target / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    categories = [{"id": c + 1, "name": name, "supercategory": "shape"} for c, name in enumerate(CLASS_NAMES)]
    split_indices = {
        "train": list(range(params["num_train"])),
        "val": [VAL_INDEX_OFFSET + j for j in range(params["num_val"])],
    }
    names = {}
    for split, indices in split_indices.items():
        coco = {"info": {"description": "DenseCL synthetic scenes", "version": FORMAT_VERSION},
                "images": [], "annotations": [], "categories": categories}
        names[split] = _write_split(voc_dir, split, indices, params["image_size"], params["seed"],
                                    {k: params[k] for k in STYLE_KEYS if k in params}, coco, palette)
        (target / "coco" / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    lists = {"train": names["train"], "val": names["val"], "trainval": names["train"] + names["val"]}
    for split, split_names in lists.items():
        text = "".join(f"{n}\n" for n in split_names)
        (voc_dir / "ImageSets" / "Main" / f"{split}.txt").write_text(text)
        (voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(text)
    (voc_dir / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{n}\n" for n in names["val"]))
    (target / "meta.json").write_text(json.dumps(params, indent=2) + "\n")  # last: marks the set complete


def _existing_params(root: Path) -> dict | None:
    meta = root / "meta.json"
    if not meta.exists():
        return None
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"synthetic data set {root}: {meta} is not valid JSON ({error}); not touching it") from error


def write_synthetic_dataset(root, num_train: int, num_val: int, image_size: int = 160, seed: int = 0,
                            class_cue: str = "texture",
                            object_size: tuple[float, float] = OBJECT_DIAMETER_FRACTION) -> SyntheticDatasetPaths:
    """Write (once) a synthetic detection/segmentation set in VOC and COCO layouts under ``root``; the scenes
    as ``generate_scene`` makes them with ``class_cue`` and ``object_size``.

    Idempotent: a complete set with the same parameters is reused as is; a set with other parameters is an
    error (data is never overwritten). The set is built in a temporary sibling folder and renamed into place,
    so an interrupted run leaves nothing half-written at ``root``.
    """
    root = Path(root).expanduser().absolute()
    if num_train < 1 or num_val < 1:
        raise ValueError(f"write_synthetic_dataset: num_train and num_val must be >= 1, got {num_train}, {num_val}")
    params = {"format_version": FORMAT_VERSION, "num_train": int(num_train), "num_val": int(num_val),
              "image_size": int(image_size), "seed": int(seed), "class_names": list(CLASS_NAMES)}
    # recorded only when not the default, so that sets written before these options existed still match
    style = {"class_cue": class_cue, "object_size": [float(v) for v in object_size]}
    params.update({k: v for k, v in style.items() if v != STYLE_DEFAULTS[k]})
    check_style(class_cue, object_size)

    def reuse_or_refuse() -> SyntheticDatasetPaths | None:
        existing = _existing_params(root)
        if existing is None:
            return None
        if existing != params:
            raise ValueError(
                f"synthetic data set {root} already exists with other parameters: it holds {existing}, "
                f"requested {params}. Choose another folder or delete it yourself."
            )
        return _paths_for(root, params)

    paths = reuse_or_refuse()
    if paths is not None:
        return paths
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"synthetic data set folder {root} exists and is not an empty folder, but has no "
                         "meta.json: refusing to write into it")

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        _write_all(staging, params)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.rename(staging, root)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        paths = reuse_or_refuse()  # another process may have finished the same set meanwhile
        if paths is not None:
            return paths
        raise
    return _paths_for(root, params)
