"""Label PNGs for segmentation: class indices (gray or VOC-palette PNGs, as VOC's SegmentationClass), or colours
with a colour table (CVAT's "Segmentation mask 1.1": RGB masks and `labelmap.txt`, lines `name:r,g,b::`; or
`custom.colors`). Colour masks are converted to class indices once, each colour checked against the table,
and written into the stage's folder (custom_common.LabelMaps). Lists: `ImageSets/Segmentation/{train,val}.txt`,
CVAT's `default.txt`, or every label PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from densecl.transfer.custom_common import (
    CustomDataError,
    LabelMaps,
    PreparedSet,
    check_metric_names,
    find_image,
    image_size,
    need,
    read_ids,
    train_and_val_ids,
)

COLOUR_TABLE = "labelmap.txt"
LIST_PAIRS = (("train", "val"), ("default", None))  # under ImageSets/Segmentation


def read_masks(ds, root: Path, labels: LabelMaps, notes: list[str]) -> PreparedSet:
    image_dir = need(root / (ds.images or "JPEGImages"), "image folder")
    label_dir = need(root / (ds.labels or "SegmentationClass"), "label folder")
    table = colour_table(ds, root)
    if table is not None:
        table_names = [n for n, _ in table]
        classes = tuple(ds.classes) if ds.classes is not None else tuple(table_names)
        missing = [n for n in table_names if n not in classes]
        if missing:
            raise CustomDataError(f"{table_source(ds, root)}: colours of classes not in custom.classes: {missing}")
    elif ds.classes is None:
        raise CustomDataError(
            f"{label_dir}: label PNGs of class indices need custom.classes (the names of pixel values 0, 1, ..., "
            f"background included), or a colour table ({COLOUR_TABLE} in {root}, or custom.colors)"
        )
    else:
        classes = tuple(ds.classes)
    check_metric_names(classes)
    if ds.ignore_label < len(classes):
        raise CustomDataError(f"custom.ignore_label={ds.ignore_label} is class {classes[ds.ignore_label]!r}; "
                              f"expected a pixel value in [{len(classes)}, 255]")
    train_ids, val_ids = _split_ids(ds, root, label_dir, notes)
    allowed = set(range(len(classes))) | {ds.ignore_label}
    colours = None if table is None else {_code(rgb): classes.index(n) for n, rgb in table}
    recipe = repr(sorted(colours.items())) if colours else ""
    records = {}
    for i in dict.fromkeys(train_ids + val_ids):
        label = need(label_dir / f"{i}.png", "label PNG")
        image = find_image(image_dir, i, str(label))
        size = image_size(image)
        if colours is None:
            _check_indices(label, size, allowed, classes, ds.ignore_label)
            path = str(label.absolute())
        else:
            path = labels.add(i, [label], recipe, lambda label=label, size=size: _indices(label, size, colours))
        records[i] = {"file_name": str(image.absolute()), "sem_seg_file_name": path, "image_id": i,
                      "ignore_label": ds.ignore_label}
    return PreparedSet(ds.display_name, "masks", classes, [records[i] for i in train_ids],
                       [records[i] for i in val_ids], ignore_label=ds.ignore_label, notes=notes)


def _split_ids(ds, root: Path, label_dir: Path, notes: list[str]) -> tuple[list[str], list[str]]:
    lists = root / "ImageSets" / "Segmentation"
    if ds.train is not None:  # a list file under root, or "" for every label PNG
        train_file, val_file = (root / ds.train if ds.train else None), (root / ds.val if ds.val else None)
    else:
        train_name, val_name = next(((t, v) for t, v in LIST_PAIRS if (lists / f"{t}.txt").is_file()), (None, None))
        train_file = lists / f"{train_name}.txt" if train_name else None
        val_file = root / ds.val if ds.val else (lists / f"{val_name}.txt" if val_name else None)
        if val_file is not None and not val_file.is_file() and not ds.val:
            val_file = None
    if train_file is None:
        train_ids, where = sorted(p.stem for p in label_dir.glob("*.png")), str(label_dir)
        if not train_ids:
            raise CustomDataError(f"{label_dir}: no label PNG (an empty split)")
    else:
        train_ids, where = read_ids(train_file), str(train_file)
    return train_and_val_ids(ds, train_ids, where, val_file, every_file=train_file is None, notes=notes)


# ------------------------------------------------------------------------------------------- colours
def table_source(ds, root: Path) -> str:
    return "custom.colors" if ds.colors else str(root / COLOUR_TABLE)


def colour_table(ds, root: Path) -> list[tuple[str, tuple[int, int, int]]] | None:
    """[(class, (r, g, b))] from custom.colors or ROOT/labelmap.txt (`name:r,g,b:parts:actions`, # comments);
    None when there is neither."""
    if ds.colors:
        entries = [(f"custom.colors[{k}]", e) for k, e in enumerate(ds.colors)]
    elif (root / COLOUR_TABLE).is_file():
        path = root / COLOUR_TABLE
        entries = [(f"{path}:{n}", line.strip()) for n, line in enumerate(path.read_text().splitlines(), start=1)
                   if line.strip() and not line.lstrip().startswith("#")]
    else:
        return None
    table, seen = [], {}
    for source, entry in entries:
        parts = entry.split(":")
        try:
            rgb = tuple(int(v) for v in parts[1].split(","))
        except (IndexError, ValueError):
            rgb = ()
        if len(parts) < 2 or not parts[0].strip() or len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise CustomDataError(f"{source}: {entry!r} is not 'name:r,g,b' (three values in 0..255)")
        if rgb in seen:
            raise CustomDataError(f"{source}: colour {list(rgb)} is already {seen[rgb]!r}'s")
        seen[rgb] = parts[0].strip()
        table.append((parts[0].strip(), rgb))
    if not table:
        raise CustomDataError(f"{table_source(ds, root)}: no colour")
    return table


def _code(rgb) -> int:
    return (int(rgb[0]) << 16) | (int(rgb[1]) << 8) | int(rgb[2])


def _indices(path: Path, size: tuple[int, int], colours: dict[int, int]) -> np.ndarray:
    """The colour mask as class indices; a colour not in the table is an error naming a pixel that has it."""
    with Image.open(path) as label:
        _check_size(path, label.size, size)
        pixels = np.asarray(label.convert("RGB")).astype(np.int64)
    codes = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    found, inverse = np.unique(codes, return_inverse=True)
    unknown = [c for c in found.tolist() if c not in colours]
    if unknown:
        y, x = (int(v[0]) for v in np.nonzero(codes == unknown[0]))
        raise CustomDataError(f"{path}: colour {[int(v) for v in pixels[y, x]]} (e.g. at x={x}, y={y}) is not in the "
                              f"colour table; {len(unknown)} unknown colour(s) in all")
    lookup = np.array([colours[c] for c in found.tolist()], dtype=np.uint8)
    return lookup[inverse.reshape(codes.shape)]


def _check_size(path: Path, label_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    if label_size != image_size:
        raise CustomDataError(f"{path}: {label_size[0]} x {label_size[1]} but its image is "
                              f"{image_size[0]} x {image_size[1]}")


def _check_indices(path: Path, size: tuple[int, int], allowed: set[int], classes, ignore: int) -> None:
    with Image.open(path) as label:
        if label.mode not in ("P", "L"):
            raise CustomDataError(
                f"{path}: a {label.mode} PNG; labels must hold class indices (a gray or a palette PNG, as VOC's "
                f"SegmentationClass), or give the colour table of colour masks ({COLOUR_TABLE} beside "
                "SegmentationClass, as CVAT writes it, or custom.colors: ['background:0,0,0', ...])"
            )
        _check_size(path, label.size, size)
        values = np.unique(np.asarray(label))
    bad = sorted(int(v) for v in values if int(v) not in allowed)
    if bad:
        raise CustomDataError(
            f"{path}: pixel values {bad} are neither a class (0..{len(classes) - 1}: {', '.join(classes)}) nor "
            f"the ignore value {ignore}"
        )
