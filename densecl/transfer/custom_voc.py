"""A Pascal VOC folder as annotation tools write it: `Annotations/*.xml` and `JPEGImages/`, with or without
`ImageSets/Main` lists (labelImg and labelme's labelme2voc write none: every annotation is then the train split;
CVAT writes `default.txt`). Empty elements (labelme's `<difficult/>`, `<truncated/>`, `<size/>` parts) read as
their defaults, corners may be fractional, and the size an XML records must be its image's."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from densecl.transfer.custom_common import (
    CustomDataError,
    Img,
    Obj,
    check_box,
    detection_set,
    find_image,
    image_size,
    need,
    read_ids,
    train_and_val_ids,
)

# (train, val) list names under ImageSets/Main, the first pair whose train list exists: VOC's own, VOC2007's
# trainval/test, CVAT's single `default` subset.
LIST_PAIRS = (("train", "val"), ("trainval", "test"), ("default", None))


def read_voc(ds, root: Path, notes: list[str]):
    need(root / "Annotations", "VOC folder")
    image_dir = need(root / (ds.images or "JPEGImages"), "VOC image folder")
    train_ids, val_ids = _split_ids(ds, root, notes)
    parsed = {i: _parse_xml(root, image_dir, i) for i in dict.fromkeys(train_ids + val_ids)}
    return detection_set(ds.display_name, "voc", [parsed[i] for i in train_ids], [parsed[i] for i in val_ids],
                         ds.classes, None, str(root / "Annotations"), notes)


def _split_ids(ds, root: Path, notes: list[str]) -> tuple[list[str], list[str]]:
    lists = root / "ImageSets" / "Main"
    if ds.train is not None:  # a list's name, or "" for every annotation
        train_name, val_name = ds.train or None, ds.val
    else:
        train_name, val_name = next(((t, v) for t, v in LIST_PAIRS if (lists / f"{t}.txt").is_file()), (None, None))
        if ds.val is not None:
            val_name = ds.val
        elif val_name is not None and not (lists / f"{val_name}.txt").is_file():
            val_name = None
    if train_name is None:
        train_ids, where = sorted(p.stem for p in (root / "Annotations").glob("*.xml")), str(root / "Annotations")
        if not train_ids:
            raise CustomDataError(f"{where}: no .xml annotation (an empty split)")
    else:
        train_ids, where = read_ids(lists / f"{train_name}.txt"), str(lists / f"{train_name}.txt")
    val_list = None if val_name is None else lists / f"{val_name}.txt"
    return train_and_val_ids(ds, train_ids, where, val_list, every_file=train_name is None, notes=notes)


def _number(element, tag: str, source: str) -> float | None:
    """A numeric child's value; None when the child is missing or empty (labelme writes `<width/>`...)."""
    text = (element.findtext(tag) or "").strip() if element is not None else ""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise CustomDataError(f"{source}: <{tag}> is {text!r}, expected a number") from None


def _parse_xml(root: Path, image_dir: Path, image_id: str) -> Img:
    xml = need(root / "Annotations" / f"{image_id}.xml", "annotation")
    try:
        tree = ET.parse(xml)
    except ET.ParseError as err:
        raise CustomDataError(f"{xml}: not valid XML ({err})") from None
    try:
        image = find_image(image_dir, image_id, str(xml))
    except CustomDataError:
        recorded = (tree.findtext("filename") or "").strip()  # an image named otherwise than its XML
        if not recorded or not (image_dir / recorded).is_file():
            raise
        image = image_dir / recorded
    width, height = image_size(image)
    size = tree.find("size")
    recorded = (_number(size, "width", str(xml)), _number(size, "height", str(xml)))
    if all(recorded) and (int(recorded[0]), int(recorded[1])) != (width, height):
        raise CustomDataError(f"{xml}: <size> records {int(recorded[0])} x {int(recorded[1])}, but its image "
                              f"{image} is {width} x {height}")
    objects = []
    for k, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        source = f"{xml}: object {k} ({name!r})"
        if not name or box is None:
            raise CustomDataError(f"{source}: an object needs <name> and <bndbox>")
        corners = [_number(box, t, source) for t in ("xmin", "ymin", "xmax", "ymax")]
        if any(c is None for c in corners):
            raise CustomDataError(f"{source}: <bndbox> needs numeric xmin, ymin, xmax, ymax")
        x0, y0, x1, y1 = corners
        # VOC's 1-based inclusive pixels -> 0-based corners, as detectron2 reads VOC; a tool writing 0-based
        # corners puts a box at the left or top edge at 0: read as the edge.
        box = (max(x0 - 1, 0.0) if x0 >= 0 else x0 - 1, max(y0 - 1, 0.0) if y0 >= 0 else y0 - 1, x1, y1)
        check_box(source, box, width, height)
        difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "true")
        objects.append(Obj(name, box, source, difficult=difficult))
    return Img(str(image.absolute()), width, height, objects)
