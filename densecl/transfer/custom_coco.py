"""COCO instances JSONs as annotation tools write them: one JSON per split (`annotations/train.json`, CVAT's
`annotations/instances_default.json`), Roboflow's folder per split (`train/_annotations.coco.json` beside its
images, `valid/...`), one JSON for the whole set (labelme2coco's `annotations.json`, Label Studio's
`result.json`). Category ids may start at 0 or have gaps; a category that owns no annotation (labelme's
`_background_`, Roboflow's root category) is left out of the classes; `file_name` may hold sub-folders and is
looked up beside the JSON, under the set's folder and its `images/`; `iscrowd` objects are regions neither
trained on nor scored, as in COCO."""

from __future__ import annotations

import json
from pathlib import Path

from densecl.transfer.custom_common import (
    CustomDataError,
    Img,
    Obj,
    check_box,
    detection_set,
    held_out,
    image_size,
    need,
    no_val_split,
)

# Where tools put a split's JSON, (train, val), tried in this order when custom.train is not given.
SPLIT_FILES = (
    ("train/_annotations.coco.json", "valid/_annotations.coco.json"),  # Roboflow
    ("train/_annotations.coco.json", "val/_annotations.coco.json"),
    ("annotations/train.json", "annotations/val.json"),
    ("annotations/instances_train.json", "annotations/instances_val.json"),
    ("annotations/instances_train2017.json", "annotations/instances_val2017.json"),
)
ROUNDING = 0.01  # px a box may pass its image's edge by (float noise of the exporting tool), clipped


def read_coco(ds, root: Path, notes: list[str]):
    train_file, val_file = _json_files(ds, root)
    train, declared = _load(train_file, ds, root)
    if ds.val_fraction > 0:
        keep, held = held_out(list(range(len(train))), ds, str(train_file), val_file, notes)
        train, val = [train[i] for i in keep], [train[i] for i in held]
    elif val_file is None:
        raise no_val_split(str(train_file))
    else:
        val, val_declared = _load(val_file, ds, root)
        declared += tuple(n for n in val_declared if n not in declared)
    return detection_set(ds.display_name, "coco", train, val, ds.classes, declared, str(train_file), notes)


def json_candidates(root: Path) -> list[Path]:
    """The JSON files a COCO export may hold at its top, under annotations/ and in Roboflow's split folders."""
    found = [*root.glob("*.json"), *root.glob("annotations/*.json"), *root.glob("*/_annotations.coco.json")]
    return sorted(dict.fromkeys(found))


def _json_files(ds, root: Path) -> tuple[Path, Path | None]:
    if ds.train is not None:
        train = need(root / ds.train, "COCO instances JSON")
        return train, None if ds.val is None else need(root / ds.val, "COCO instances JSON")
    for train_name, val_name in SPLIT_FILES:
        if (root / train_name).is_file():
            val = root / (ds.val or val_name)
            return root / train_name, val if val.is_file() else None
    candidates = json_candidates(root)
    if len(candidates) == 1:
        return candidates[0], None if ds.val is None else need(root / ds.val, "COCO instances JSON")
    if not candidates:
        raise CustomDataError(f"{root}: no COCO instances JSON (looked for *.json, annotations/*.json and "
                              "*/_annotations.coco.json)")
    raise CustomDataError(f"{root}: several JSON files ({', '.join(str(p.relative_to(root)) for p in candidates)}); "
                          "name the train split's as custom.train (and the val split's as custom.val)")


def _image_bases(ds, root: Path, json_file: Path) -> list[Path]:
    if ds.images:
        return [root / ds.images]
    bases = [json_file.parent, root, root / "images", json_file.parent / "images", root / "JPEGImages"]
    return list(dict.fromkeys(bases))


def _load(json_file: Path, ds, root: Path) -> tuple[list[Img], tuple[str, ...]]:
    """The JSON's images with their objects, and its category names in id order."""
    try:
        data = json.loads(json_file.read_text())
        images, annotations, categories = data["images"], data.get("annotations", []), data["categories"]
        names = {c["id"]: str(c["name"]).strip() for c in categories}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CustomDataError(
            f"{json_file}: not a COCO instances JSON (images, annotations, categories): {err!r}"
        ) from None
    if not images:
        raise CustomDataError(f"{json_file}: lists no images (an empty split)")
    bases = _image_bases(ds, root, json_file)
    by_id: dict = {}
    for image in images:
        candidates = [base / image["file_name"] for base in bases]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            elsewhere = f" (nor under {', '.join(map(str, bases[1:]))})" if len(bases) > 1 else ""
            raise CustomDataError(f"{json_file}: image id {image['id']} names {candidates[0]}, which does not "
                                  f"exist{elsewhere}")
        width, height = image_size(path)
        recorded = (image.get("width") or 0, image.get("height") or 0)
        if all(recorded) and tuple(recorded) != (width, height):
            raise CustomDataError(f"{json_file}: image id {image['id']} records {recorded[0]} x {recorded[1]}, but "
                                  f"{path} is {width} x {height}")
        by_id[image["id"]] = Img(str(path.absolute()), width, height, [])
    for a in annotations:
        source = f"{json_file}: annotation id {a.get('id')}"
        if a.get("image_id") not in by_id:
            raise CustomDataError(f"{source}: image_id {a.get('image_id')} is not among the JSON's images")
        if a.get("category_id") not in names:
            raise CustomDataError(f"{source}: category_id {a.get('category_id')} is not among its categories")
        image = by_id[a["image_id"]]
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError):
            raise CustomDataError(f"{source}: bbox {a.get('bbox')!r} is not [x, y, width, height]") from None
        crowd = bool(a.get("iscrowd", 0))
        box = (x, y, x + w, y + h)
        if not crowd:
            box = _within_rounding(box, image.width, image.height)
            check_box(f"{source} (image {image.file_name})", box, image.width, image.height)
        image.objects.append(Obj(names[a["category_id"]], box, source, crowd=crowd,
                                 segmentation=a.get("segmentation") or None, area=a.get("area")))
    return list(by_id.values()), tuple(dict.fromkeys(n for _, n in sorted(names.items())))


def _within_rounding(box, width: int, height: int):
    x0, y0, x1, y1 = box
    return (0.0 if -ROUNDING <= x0 < 0 else x0, 0.0 if -ROUNDING <= y0 < 0 else y0,
            float(width) if width < x1 <= width + ROUNDING else x1,
            float(height) if height < y1 <= height + ROUNDING else y1)
