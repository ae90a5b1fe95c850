"""The user's own labelled data (densecl.transfer.custom): VOC folders with or without lists, COCO JSONs, YOLO
sets and label PNGs (indices or colours) are read into what the stages register, split as asked, and every
kind of bad input is refused before training with an error naming its file (and line, or pixel); the
`custom` preset's schedule follows max_iter, and each stage trains on such a set end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import labelled_sets as sets
import numpy as np
import pytest
from labelled_sets import CLASSES, UNSORTED, write_coco, write_cvat_masks, write_masks, write_ultralytics, write_voc
from PIL import Image

from densecl.transfer.custom import CustomDataError, CustomDataset, describe, prepare, read_dataset
from densecl.transfer.settings import COCODetectionConfig, SegmentationConfig, VOCDetectionConfig
from densecl.typed_settings import ConfigValueError

MASK_CLASSES = ("background", *CLASSES)


def voc_set(tmp_path: Path, **kwargs) -> tuple[Path, list]:
    root = tmp_path / "shelves"
    return root, write_voc(root, num_train=6, num_val=3, **kwargs)


def masks_dataset(root: Path, **kwargs) -> CustomDataset:
    return CustomDataset(**{"format": "masks", "root": str(root), "classes": MASK_CLASSES, **kwargs})


def coco_dataset(root: Path, **kwargs) -> CustomDataset:
    return CustomDataset(**{"format": "coco", "root": str(root), **kwargs})


def boxes_of(coco: dict) -> list[tuple[str, list]]:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    return [(names[a["category_id"]], a["bbox"]) for a in coco["annotations"]]


def as_bbox(box) -> list:
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


# ------------------------------------------------------------------------------------------------ reading
def test_a_voc_folder_becomes_coco_instances_with_its_own_classes_and_zero_based_boxes(tmp_path):
    root, items = voc_set(tmp_path)
    data = read_dataset(CustomDataset(root=str(root)))  # the format found from the folder
    assert (data.format, data.found_from) == ("voc", "Annotations/")
    assert data.classes == ("gadget", "widget")  # from the annotations, sorted
    assert data.name == "shelves"
    for split, coco in (("train", data.train), ("val", data.val)):
        written = [i for i in items if i.split == split]
        assert [Path(im["file_name"]).stem for im in coco["images"]] == [i.stem for i in written]
        assert {(im["width"], im["height"]) for im in coco["images"]} == {(sets.WIDTH, sets.HEIGHT)}
        assert boxes_of(coco) == [(t.name, as_bbox(t.box)) for i in written for t in i.things]
        # difficult objects train, and are crowd regions (ignored) when scoring
        crowd = [a["iscrowd"] for a in coco["annotations"]]
        assert crowd == [int(split == "val" and t.difficult) for i in written for t in i.things]
    assert any(t.difficult for i in items if i.split == "val" for t in i.things)


def test_a_given_class_list_sets_the_class_order(tmp_path):
    root, items = voc_set(tmp_path)
    data = read_dataset(CustomDataset(format="voc", root=str(root), classes=("widget", "gadget", "sprocket")))
    assert data.classes == ("widget", "gadget", "sprocket")
    assert data.train["categories"] == [{"id": 1, "name": "widget"}, {"id": 2, "name": "gadget"},
                                        {"id": 3, "name": "sprocket"}]
    first = items[0].things[0].name
    assert data.train["annotations"][0]["category_id"] == ("widget", "gadget").index(first) + 1


def test_voc_without_lists_is_one_train_split_that_a_fraction_splits(tmp_path):
    """labelImg and labelme2voc write no ImageSets: every annotation is the train split."""
    root = tmp_path / "labelimg"
    sets.write_labelimg(root, sets.scenes(8, 4))
    with pytest.raises(CustomDataError, match=r"Annotations: the set has no validation split; set "
                                              r"custom\.val_fraction"):
        read_dataset(CustomDataset(root=str(root)))
    data = read_dataset(CustomDataset(root=str(root), val_fraction=0.25))
    assert (len(data.train["images"]), len(data.val["images"])) == (9, 3)
    data = read_dataset(CustomDataset(root=str(root), train="", val_fraction=0.25))  # "" = every annotation
    assert (len(data.train["images"]), len(data.val["images"])) == (9, 3)


def test_cvat_default_list_and_labelme_empty_elements_are_read(tmp_path):
    items = sets.write_cvat_voc(tmp_path / "cvat", sets.scenes(4, 2))
    data = read_dataset(CustomDataset(root=str(tmp_path / "cvat"), val_fraction=0.5))
    assert len(data.train["images"]) + len(data.val["images"]) == len(items)  # ImageSets/Main/default.txt
    items = sets.write_labelme_voc(tmp_path / "labelme", sets.scenes(4, 2))
    data = read_dataset(CustomDataset(root=str(tmp_path / "labelme"), val_fraction=0.5))
    read = sorted(b for coco in (data.train, data.val) for _, b in boxes_of(coco))
    assert read == sorted(as_bbox(t.box) for i in items for t in i.things)  # fractional corners kept
    assert not any(a["iscrowd"] for a in data.val["annotations"])  # <difficult/>: not difficult
    xml = tmp_path / "labelme" / "Annotations" / "train_000.xml"
    xml.write_text(xml.read_text().replace(f"<width>{sets.WIDTH}</width>", "<width/>"))  # the image tells
    read_dataset(CustomDataset(root=str(tmp_path / "labelme"), val_fraction=0.5))
    xml.write_text(xml.read_text().replace("<width/>", f"<width>{sets.HEIGHT}</width>"))
    with pytest.raises(CustomDataError, match=rf"{xml}: <size> records {sets.HEIGHT} x {sets.HEIGHT}, but its image"):
        read_dataset(CustomDataset(root=str(tmp_path / "labelme"), val_fraction=0.5))


def test_a_coco_json_keeps_its_masks_and_maps_its_category_ids_to_the_class_order(tmp_path):
    root = tmp_path / "parts"
    items = write_coco(root, num_train=6, num_val=3)
    data = read_dataset(coco_dataset(root))
    assert data.classes == ("gadget", "widget")  # the JSON's category ids 3 and 7, in id order
    assert data.has_masks and data.mask_format == "polygon"
    written = [(t.name, as_bbox(t.box)) for i in items if i.split == "val" for t in i.things]
    assert boxes_of(data.val) == written
    assert all(Path(im["file_name"]).is_file() for im in data.train["images"] + data.val["images"])
    # a given list orders the classes: detectron2 takes category ids in increasing order as classes 0, 1, ...
    data = read_dataset(coco_dataset(root, classes=("widget", "gadget")))
    for split in (data.train, data.val):
        assert [c["name"] for c in sorted(split["categories"], key=lambda c: c["id"])] == ["widget", "gadget"]
    assert boxes_of(data.val) == written


def test_coco_categories_without_objects_are_left_out_unless_listed_and_sub_folders_are_found(tmp_path):
    """labelme2coco's `_background_` (id 0) and Roboflow's root category own no annotation."""
    root = tmp_path / "labelme"
    sets.write_labelme_coco(root, sets.scenes(4, 2))
    data = read_dataset(CustomDataset(root=str(root), val_fraction=0.5))
    assert (data.format, data.found_from) == ("coco", "annotations.json")
    assert data.classes == UNSORTED  # by category id: widget 1, gadget 2
    assert data.notes == ["left out of the classes, owning no object in any split: _background_ (custom.classes "
                          "lists the classes to keep)"]
    kept = read_dataset(CustomDataset(root=str(root), val_fraction=0.5, classes=("_background_", *UNSORTED)))
    assert kept.classes == ("_background_", *UNSORTED) and kept.notes == []
    # file names with sub-folders, relative to the JSON's folder: annotations.json names JPEGImages/<id>.jpg
    assert all("/JPEGImages/" in im["file_name"] for im in data.train["images"])


def test_coco_crowd_regions_train_no_object_and_are_not_boxes_to_check(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.data import transforms as T

    from densecl.transfer.catalog import register_datasets

    root = tmp_path / "parts"
    write_coco(root, num_train=3, num_val=2)
    train_file = root / "annotations" / "train.json"
    data = json.loads(train_file.read_text())
    crowd = dict(data["annotations"][0], id=99, iscrowd=1, bbox=[-5, -5, 500, 500])  # outside: not a box to check
    data["annotations"].append(crowd)
    train_file.write_text(json.dumps(data))
    prepare(coco_dataset(root), tmp_path / "data", "detection")
    register_datasets(["custom_det_train"], custom_root=str(tmp_path / "data"))
    record = next(r for r in DatasetCatalog.get("custom_det_train") if any(a["iscrowd"] for a in r["annotations"]))
    mapper = DatasetMapper(is_train=True, augmentations=[T.NoOpTransform()], image_format="RGB",
                           use_instance_mask=True)
    instances = mapper(record)["instances"]
    assert len(instances) == sum(not a["iscrowd"] for a in record["annotations"]) == len(record["annotations"]) - 1


def test_coco_rle_masks_are_read_as_bitmasks_and_partial_masks_are_refused(tmp_path):
    root = tmp_path / "parts"
    write_coco(root, num_train=4, num_val=2)
    train_file = root / "annotations" / "train.json"
    data = json.loads(train_file.read_text())
    data["annotations"][0]["segmentation"] = {"size": [sets.HEIGHT, sets.WIDTH], "counts": "PPYo1"}
    train_file.write_text(json.dumps(data))
    assert read_dataset(coco_dataset(root)).mask_format == "bitmask"
    data["annotations"][0]["segmentation"] = []
    train_file.write_text(json.dumps(data))
    with pytest.raises(CustomDataError, match=r"train\.json: annotation id 1: \d+ of \d+ objects have a segmentation"):
        read_dataset(coco_dataset(root))


def test_a_yolo_set_reads_boxes_and_polygons_in_its_own_class_order(tmp_path):
    root = tmp_path / "yolo"
    items = write_ultralytics(root, sets.scenes(4, 2, empty=1))
    data = read_dataset(CustomDataset(root=str(root)))
    assert (data.format, data.found_from, data.classes) == ("yolo", "data.yaml", UNSORTED)
    assert data.has_masks and len(data.train["images"]) == 5  # the image without a label file: no object
    for split, coco in (("train", data.train), ("val", data.val)):
        written = [(t.name, as_bbox(t.box)) for i in items if i.split == split for t in i.things]
        assert [(n, pytest.approx(b, abs=1e-3)) for n, b in boxes_of(coco)] == written
    segmentation = read_dataset(CustomDataset(root=str(root)), "segmentation")
    assert segmentation.classes == ("background", *UNSORTED)
    boxes = tmp_path / "boxes"
    write_ultralytics(boxes, sets.scenes(2, 1), polygons=False)
    assert not read_dataset(CustomDataset(root=str(boxes))).has_masks
    with pytest.raises(CustomDataError, match=r"train_000\.txt:1: a box; segmentation needs polygons"):
        read_dataset(CustomDataset(root=str(boxes)), "segmentation")


def test_splits_named_by_the_user_keep_the_sets_names_and_never_overlap(tmp_path):
    root = tmp_path / "yolo"
    write_ultralytics(root, sets.scenes(4, 2))
    named = read_dataset(CustomDataset(root=str(root), train="images/val", val="images/train"))  # swapped on purpose
    assert named.classes == UNSORTED  # names still from data.yaml
    assert [Path(im["file_name"]).parent.name for im in named.train["images"]] == ["val"] * 2
    voc, items = voc_set(tmp_path)
    data = read_dataset(CustomDataset(root=str(voc), train="", val="val"))  # every annotation but val's
    val = {i.stem for i in items if i.split == "val"}
    assert {Path(im["file_name"]).stem for im in data.val["images"]} == val
    assert {Path(im["file_name"]).stem for im in data.train["images"]} == {i.stem for i in items} - val


@pytest.mark.parametrize(
    ("line", "message"),
    [("2 0.5 0.5 0.2 0.2", r"class 2 is not among the 2 names of .*data\.yaml \(ids 0\.\.1\)"),
     ("0 0.5 1.2 0.2 0.2", r"coordinate 1\.2 lies outside \[0, 1\]"),
     ("0 0.5 0.5 0.2", r"'0 0\.5 0\.5 0\.2' is neither 'class cx cy w h' \(a box\) nor"),
     ("widget 0.5 0.5 0.2 0.2", r"'widget 0\.5 0\.5 0\.2 0\.2' is neither 'class cx cy w h'"),
     ("0 0.5 0.5 0.0 0.2", r"the box has zero area")],
)
def test_a_bad_yolo_line_is_refused_naming_its_file_and_line(tmp_path, line, message):
    root = tmp_path / "yolo"
    write_ultralytics(root, sets.scenes(2, 1), polygons=False)
    label = root / "labels" / "val" / "val_000.txt"
    label.write_text(label.read_text() + f"\n{line}\n")
    lines = len(label.read_text().splitlines())
    with pytest.raises(CustomDataError, match=rf"^{label}:{lines}: {message}"):
        read_dataset(CustomDataset(root=str(root)))


def test_colour_masks_are_converted_with_their_table_once_and_an_unknown_colour_is_named(tmp_path):
    root = tmp_path / "cvat"
    items = write_cvat_masks(root, sets.scenes(3, 1))
    stage = tmp_path / "stage" / "data"
    summary = prepare(CustomDataset(root=str(root), val_fraction=0.25), stage, "segmentation")
    assert (summary["format"], summary["classes"]) == ("masks", list(sets.MASK_COLOURS))  # the table's order
    records = json.loads((stage / "train.json").read_text()) + json.loads((stage / "val.json").read_text())
    by_stem = {i.stem: i for i in items}
    for record in records:
        converted = np.asarray(Image.open(record["sem_seg_file_name"]))
        expected = sets.label_map(by_stem[record["image_id"]], classes=tuple(sets.MASK_COLOURS), outline=False)
        assert Path(record["sem_seg_file_name"]).parent == stage / "labels" and np.array_equal(converted, expected)
    made = {p: p.stat().st_mtime_ns for p in (stage / "labels").iterdir()}
    prepare(CustomDataset(root=str(root), val_fraction=0.25), stage, "segmentation")  # a rerun: nothing made again
    assert {p: p.stat().st_mtime_ns for p in (stage / "labels").iterdir()} == made

    png = root / "SegmentationClass" / "train_002.png"
    pixels = np.asarray(Image.open(png)).copy()
    pixels[7, 11] = (1, 2, 3)
    Image.fromarray(pixels).save(png)
    with pytest.raises(CustomDataError, match=rf"^{png}: colour \[1, 2, 3\] \(e\.g\. at x=11, y=7\) is not in the "
                                              "colour table"):
        prepare(CustomDataset(root=str(root), val_fraction=0.25), tmp_path / "other" / "data", "segmentation")
    assert not (tmp_path / "other").exists()  # the labels converted before the bad one are gone too
    colours = [f"{n}:{','.join(map(str, c))}" for n, c in sets.MASK_COLOURS.items()] + ["stain:1,2,3"]
    data = read_dataset(CustomDataset(root=str(root), val_fraction=0.25, colors=tuple(colours)), "segmentation")
    assert data.classes == (*sets.MASK_COLOURS, "stain")  # custom.colors in place of labelmap.txt


def test_label_pngs_in_the_voc_palette_become_records_with_their_ignore_value(tmp_path):
    root = tmp_path / "cells"
    items = write_masks(root, num_train=5, num_val=2, ignore=254)
    data = read_dataset(masks_dataset(root, ignore_label=254))
    assert [r["image_id"] for r in data.train] == [i.stem for i in items if i.split == "train"]
    assert [r["image_id"] for r in data.val] == [i.stem for i in items if i.split == "val"]
    assert all(Path(r["sem_seg_file_name"]).parent.name == "SegmentationClass" for r in data.train)
    assert {r["ignore_label"] for r in data.train} == {254} and data.ignore_label == 254


@pytest.mark.parametrize("fmt", ["voc", "masks", "coco", "yolo"])
def test_a_seeded_fraction_splits_one_list_into_disjoint_train_and_val(tmp_path, fmt):
    root = tmp_path / "set"
    writers = {"voc": lambda: write_voc(root, 10, 0), "masks": lambda: write_masks(root, 10, 0),
               "coco": lambda: write_coco(root, 10, 1), "yolo": lambda: write_ultralytics(root, sets.scenes(10, 1))}
    writers[fmt]()
    extra = {"classes": MASK_CLASSES} if fmt == "masks" else {}
    if fmt in ("voc", "masks"):
        os.remove(next((root / "ImageSets").rglob("val.txt")))

    def split(seed):
        data = read_dataset(CustomDataset(root=str(root), val_fraction=0.3, split_seed=seed, **extra),
                            "segmentation" if fmt == "masks" else "detection")
        ids = lambda part: [Path(im["file_name"]).stem for im in (part if fmt == "masks" else part["images"])]  # noqa: E731
        return ids(data.train), ids(data.val)

    train, val = split(0)
    assert len(val) == 3 and len(train) == 7 and not set(train) & set(val)
    assert sorted(train + val) == [f"train_{k:03d}" for k in range(10)]
    assert split(0) == (train, val)
    assert any(split(seed)[1] != val for seed in (1, 2, 3))


# ----------------------------------------------------------------------------------------------- refusals
def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def first_xmax(root: Path, stem: str = "train_001") -> tuple[Path, str]:
    xml = root / "Annotations" / f"{stem}.xml"
    text = xml.read_text()
    return xml, text[text.index("<xmax>") : text.index("</xmax>") + len("</xmax>")]


def test_a_box_outside_its_image_is_refused_naming_the_xml(tmp_path):
    root, _ = voc_set(tmp_path)
    xml, xmax = first_xmax(root)
    edit(xml, xmax, f"<xmax>{sets.WIDTH + 1}</xmax>")
    with pytest.raises(CustomDataError, match=rf"{xml}: object 0 .* lies outside its {sets.WIDTH} x {sets.HEIGHT}"):
        read_dataset(CustomDataset(format="voc", root=str(root)))


def test_a_box_of_zero_area_is_refused_naming_the_xml(tmp_path):
    root, _ = voc_set(tmp_path)
    xml, xmax = first_xmax(root)
    text = xml.read_text()
    xmin = text[text.index("<xmin>") + 6 : text.index("</xmin>")]
    edit(xml, xmax, f"<xmax>{int(xmin) - 1}</xmax>")
    with pytest.raises(CustomDataError, match=rf"{xml}: object 0 .* has zero area"):
        read_dataset(CustomDataset(format="voc", root=str(root)))


def test_classes_missing_from_the_given_list_are_listed_with_their_counts(tmp_path):
    root, items = voc_set(tmp_path)
    widgets = sum(t.name == "widget" for i in items for t in i.things)
    with pytest.raises(CustomDataError) as err:
        read_dataset(CustomDataset(format="voc", root=str(root), classes=("gadget",)))
    message = str(err.value)
    assert f"'widget' x{widgets}" in message and "Annotations" in message
    assert "'gadget' x" not in message


def test_classes_whose_metric_names_would_collide_are_refused(tmp_path):
    root, _ = voc_set(tmp_path)
    with pytest.raises(CustomDataError, match=r"classes 'gadget/v2' and 'gadget_v2' would share the metric name"):
        read_dataset(CustomDataset(root=str(root), classes=("gadget", "widget", "gadget/v2", "gadget_v2")))


def test_a_mask_value_neither_a_class_nor_ignored_is_refused_naming_the_png(tmp_path):
    root = tmp_path / "cells"
    write_masks(root, num_train=3, num_val=1)
    png = root / "SegmentationClass" / "train_001.png"
    with Image.open(png) as label:
        values, palette = np.asarray(label).copy(), label.getpalette()
    values[0, 0] = 7
    bad = Image.fromarray(values, mode="P")
    bad.putpalette(palette)
    bad.save(png)
    with pytest.raises(CustomDataError, match=rf"{png}: pixel values \[7\] are neither a class"):
        read_dataset(masks_dataset(root))
    values[0, 0] = 255  # the ignore value is allowed
    Image.fromarray(values, mode="L").save(png)
    read_dataset(masks_dataset(root))
    with pytest.raises(CustomDataError, match=r"pixel values \[255\]"):
        read_dataset(masks_dataset(root, ignore_label=254))


def test_colour_masks_without_a_table_and_index_pngs_without_classes_are_refused(tmp_path):
    root = tmp_path / "cells"
    write_masks(root, num_train=2, num_val=1)
    png = root / "SegmentationClass" / "train_000.png"
    Image.open(png).convert("RGB").save(png)
    with pytest.raises(CustomDataError, match=rf"{png}: a RGB PNG; labels must hold class indices .* or give the "
                                              r"colour table"):
        read_dataset(masks_dataset(root))
    with pytest.raises(CustomDataError, match=r"SegmentationClass: label PNGs of class indices need custom\.classes"):
        read_dataset(CustomDataset(format="masks", root=str(root)))


def test_a_json_image_without_its_file_is_refused_naming_the_id(tmp_path):
    root = tmp_path / "parts"
    write_coco(root, num_train=3, num_val=2)
    (root / "images" / "val_001.jpg").unlink()
    with pytest.raises(CustomDataError, match=r"val\.json: image id 101 names .*val_001\.jpg, which does not exist"):
        read_dataset(coco_dataset(root))


def test_an_empty_split_is_refused_naming_its_list(tmp_path):
    root, _ = voc_set(tmp_path)
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n")
    with pytest.raises(CustomDataError, match=r"ImageSets/Main/val\.txt lists no images"):
        read_dataset(CustomDataset(format="voc", root=str(root)))


def test_a_folder_of_no_known_layout_is_refused_naming_what_was_looked_for(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(CustomDataError, match=r"photos: no labelled set found for detection; expected "
                                              r"Annotations/\*\.xml \(VOC\), data\.yaml"):
        read_dataset(CustomDataset(root=str(tmp_path / "photos")))


def test_a_refused_set_writes_nothing_into_the_stage_folder(tmp_path):
    root, _ = voc_set(tmp_path)
    xml, xmax = first_xmax(root, "val_002")
    edit(xml, xmax, "<xmax>500</xmax>")
    with pytest.raises(CustomDataError, match="val_002.xml"):
        prepare(CustomDataset(format="voc", root=str(root)), tmp_path / "stage" / "data")
    assert not (tmp_path / "stage").exists()


def test_the_data_set_line_names_the_format_found_and_counts_classes_in_words(tmp_path):
    root, _ = voc_set(tmp_path)
    summary = prepare(CustomDataset(root=str(root)), tmp_path / "a", "detection")
    assert describe(summary) == ["shelves (voc, found from Annotations/): 6 train and 3 val images, 2 classes: "
                                 "gadget, widget"]
    one = {**summary, "classes": ["widget"], "found_from": "", "notes": ["a note"]}
    assert describe(one) == ["shelves (voc): 6 train and 3 val images, 1 class: widget", "a note"]


# ---------------------------------------------------------------------------------------------- configs
def test_the_custom_preset_reads_its_set_and_its_schedule_follows_max_iter(tmp_path):
    root, _ = voc_set(tmp_path)
    section = {"preset": "custom", "custom": {"format": "voc", "root": str(root)}}
    full = VOCDetectionConfig.from_section(section, arch="resnet18", device="cpu", seed=0)
    short = VOCDetectionConfig.from_section({**section, "max_iter": 400}, arch="resnet18", device="cpu", seed=0)
    assert full.dataset_names() == ["custom_det_train", "custom_det_val"]
    assert full.custom == CustomDataset(format="voc", root=str(root))
    for key in ("steps", "warmup_iters", "precise_bn_iters", "eval_period", "checkpoint_period"):
        long_value, short_value = getattr(full, key), getattr(short, key)
        expected = tuple(round(v / 10) for v in long_value) if key == "steps" else round(long_value / 10)
        assert short_value == expected, key
    assert full.eval_period > 0
    full.check_data()


def test_val_fraction_and_the_format_are_plain_keys_of_every_custom_stage(tmp_path):
    from pipelines import schema

    root = tmp_path / "labelimg"
    sets.write_labelimg(root, sets.scenes(6, 2))
    overrides = ["downstream=custom", "model=random_init", *(f"downstream.{stage}.custom.{key}={value}"
                 for stage in ("det_voc", "det_coco", "seg_voc")
                 for key, value in (("val_fraction", 0.25), ("root", root), ("split_seed", 3)))]
    settings = schema.settings(schema.compose(overrides, return_hydra_config=False))
    for stage in ("det_voc", "det_coco", "seg_voc"):
        custom = settings.stage_config(stage).custom
        assert (custom.val_fraction, custom.split_seed, custom.format) == (0.25, 3, "auto"), stage
    settings.stage_config("det_voc").check_data()
    with pytest.raises(ConfigValueError, match=r"custom\.root=.* no labelled set found for segmentation"):
        settings.stage_config("seg_voc").check_data()  # boxes only: nothing to segment


def test_a_custom_set_in_the_wrong_format_for_its_stage_or_without_one_is_refused():
    args = dict(arch="resnet18", device="cpu", seed=0)
    with pytest.raises(ConfigValueError, match=r"custom\.format='masks' is invalid: this stage reads voc, coco, yolo"):
        COCODetectionConfig.from_section(
            {"preset": "custom", "custom": {"format": "masks", "root": "/x", "classes": ["a"]}}, **args)
    with pytest.raises(ConfigValueError, match=r"^custom=None is invalid"):
        SegmentationConfig.from_section({"preset": "custom"}, **args)
    with pytest.raises(ConfigValueError, match=r"^custom\.root=None is invalid"):
        SegmentationConfig.from_section({"preset": "custom", "custom": {"format": "masks", "classes": ["a"]}}, **args)
    with pytest.raises(ConfigValueError, match=r"^custom\.val='val' is invalid: null when val_fraction draws"):
        VOCDetectionConfig.from_section({"preset": "custom", "custom": {"root": "/x", "val": "val",
                                                                        "val_fraction": 0.2}}, **args)


def test_check_data_names_the_bad_file_under_the_custom_root_key(tmp_path):
    root, _ = voc_set(tmp_path)
    xml, xmax = first_xmax(root)
    edit(xml, xmax, "<xmax>0</xmax>")
    cfg = VOCDetectionConfig.from_section({"preset": "custom", "custom": {"format": "voc", "root": str(root)}},
                                          arch="resnet18", device="cpu", seed=0)
    with pytest.raises(ConfigValueError, match=rf"^custom\.root='{root}' is invalid: {xml}: object 0"):
        cfg.check_data()


def test_the_cpu_schedule_is_one_word_away_and_the_plan_says_what_it_shrinks(tmp_path):
    from pipelines import schema

    root = tmp_path / "labelimg"
    sets.write_labelimg(root, sets.scenes(6, 2))
    overrides = ["model=random_init", f"downstream.det_voc.custom.root={root}",
                 "downstream.det_voc.custom.val_fraction=0.25"]
    gpu, cpu = (schema.settings(schema.compose([f"downstream={group}", *overrides], return_hydra_config=False))
                .stage_config("det_voc") for group in ("custom", "custom_cpu"))
    assert gpu.summary()["vs_custom_preset"] == "none"
    shrunk = cpu.summary()["vs_custom_preset"]
    assert shrunk["max_iter"] == f"{cpu.max_iter} (custom: {gpu.max_iter})" and cpu.max_iter < gpu.max_iter / 10
    for key in ("ims_per_batch", "min_size_test", "roi_batch_size_per_image", "rpn_post_nms_topk_test"):
        assert getattr(cpu, key) < getattr(gpu, key) and key in shrunk, key
    assert "device" not in shrunk and "custom" not in shrunk


# ---------------------------------------------------------------------------------------- end to end
# Each stage as `python -m pipelines.run model=random_init downstream=custom stages=[STAGE] ...` runs it, shrunk:
# one CPU process, ResNet-18 at 80 px, a few iterations, few proposals; every box kept at test time, so that
# a barely trained head still reports a score for each class.
SHRUNK = ["max_iter=6", "ims_per_batch=2", "num_workers=0", "progress=false", "base_lr=0.005", "warmup_iters=1",
          "clip_grad_norm=10.0"]
SHRUNK_DETECTION = ["min_size_train=[80]", "max_size_train=128", "min_size_test=80", "max_size_test=128",
                    "rpn_pre_nms_topk_train=300", "rpn_post_nms_topk_train=100", "rpn_pre_nms_topk_test=100",
                    "rpn_post_nms_topk_test=20", "roi_batch_size_per_image=16", "detections_per_image=10",
                    "precise_bn_iters=1", "score_thresh_test=0.0"]
SHRUNK_SEGMENTATION = ["crop_size=64", "img_scale=[448,80]"]


def run_custom_stage(stage: str, tmp_path: Path, custom: dict, *extra: str) -> tuple[dict, Path]:
    from pipelines import schema
    from pipelines.stages import run_stages
    from pipelines.tracking import RunLogger

    shrunk = SHRUNK + (SHRUNK_SEGMENTATION if stage.startswith("seg") else SHRUNK_DETECTION)
    overrides = [
        "downstream=custom", "model=random_init", "backbone=resnet18", "tracking=disabled", f"stages=[{stage}]",
        f"paths.output_dir={tmp_path / 'outputs'}", "device=cpu",
        *(f"downstream.{stage}.custom.{k}={v}" for k, v in custom.items()),
        *(f"downstream.{stage}.{item}" for item in (*shrunk, *extra)),
    ]  # fmt: skip
    cfg = schema.compose(overrides, return_hydra_config=False)
    schema.validate(cfg, check_paths=True)
    job = tmp_path / "job"
    return run_stages(cfg, job, RunLogger())[stage], job / stage


def evaluated_files(stage_dir: Path) -> list[str]:
    """The files of the images COCOEvaluator scored (its results name image ids; the prepared val.json maps
    them to files)."""
    val = json.loads((stage_dir / "data" / "val.json").read_text())
    files = {im["id"]: im["file_name"] for im in val["images"]}
    results = json.loads((stage_dir / "inference" / "coco_instances_results.json").read_text())
    return sorted({files[r["image_id"]] for r in results})


@pytest.mark.slow
@pytest.mark.detectron2
@pytest.mark.usefixtures("one_thread")
def test_det_voc_on_a_labelimg_folder_reports_ap_and_per_class_ap_on_its_val_split(tmp_path):
    root = tmp_path / "shelves"
    sets.write_labelimg(root, sets.scenes(9, 3))
    metrics, stage_dir = run_custom_stage("det_voc", tmp_path, {"root": root, "val_fraction": 0.25})
    assert {"AP", "AP50", "AP75"} <= metrics.keys()
    assert {k for k in metrics if k.startswith("AP-")} == {f"AP-{c}" for c in CLASSES}
    info = json.loads((stage_dir / "data" / "dataset.json").read_text())
    assert (info["name"], info["format"], info["classes"], info["num_train"], info["num_val"]) == (
        "shelves", "voc", list(CLASSES), 9, 3)
    val = json.loads((stage_dir / "data" / "val.json").read_text())
    assert evaluated_files(stage_dir) == sorted(im["file_name"] for im in val["images"])


@pytest.mark.slow
@pytest.mark.detectron2
@pytest.mark.usefixtures("one_thread")
def test_det_coco_on_an_ultralytics_set_trains_masks_from_polygons_and_reports_box_and_mask_ap_per_class(tmp_path):
    from detectron2.config import CfgNode

    root = tmp_path / "parts"
    write_ultralytics(root, sets.scenes(8, 2, empty=1))
    metrics, stage_dir = run_custom_stage("det_coco", tmp_path, {"root": root, "name": "parts"})
    d2 = CfgNode.load_cfg((stage_dir / "config.yaml").read_text())
    assert d2.MODEL.MASK_ON and d2.INPUT.MASK_FORMAT == "polygon" and d2.MODEL.ROI_HEADS.NUM_CLASSES == 2
    for task in ("bbox", "segm"):
        assert {f"{task}/AP", f"{task}/AP50", f"{task}/AP75"} <= metrics.keys()
        assert {k for k in metrics if k.startswith(f"{task}/AP-")} == {f"{task}/AP-{c}" for c in UNSORTED}
    assert len(evaluated_files(stage_dir)) == 2


@pytest.mark.slow
@pytest.mark.detectron2
@pytest.mark.usefixtures("one_thread")
def test_seg_voc_on_label_pngs_trains_with_its_own_ignore_value_and_reports_per_class_iou(tmp_path):
    """ignore_label 254: trained as ignored (a label of 254 would be out of range for the loss otherwise)."""
    root = tmp_path / "cells"
    items = write_masks(root, num_train=6, num_val=3, ignore=254)
    custom = {"root": root, "classes": f"[{','.join(MASK_CLASSES)}]", "ignore_label": 254}
    metrics, stage_dir = run_custom_stage("seg_voc", tmp_path, custom)
    assert {"mIoU", "mIoU_trivial"} <= metrics.keys()
    in_val = {"background"} | {t.name for i in items if i.split == "val" for t in i.things}
    scored = {k.removeprefix("IoU-") for k in metrics if k.startswith("IoU-")}  # in the labels or predicted
    assert in_val <= scored <= set(MASK_CLASSES)
    info = json.loads((stage_dir / "data" / "dataset.json").read_text())
    assert (info["classes"], info["ignore_label"]) == (list(MASK_CLASSES), 254)


@pytest.mark.slow
@pytest.mark.detectron2
def test_the_pipeline_pretrains_on_the_sets_images_and_names_the_set_in_mlflow_and_the_report(tmp_path):
    """`python -m pipelines.run data=image_folder data.root=SET/JPEGImages downstream=custom ...`: DenseCL
    pre-trains on the labelled set's own images, det_voc fine-tunes from them; the terminal names the set, its
    format and classes and shows no pycocotools table; mlflow and the report name the set and its classes,
    and the per-class APs are metrics of the run."""
    import subprocess
    import sys

    from pipelines import report
    from pipelines.tracking import DATASET_TAG, Tracker

    root = tmp_path / "shelves"
    write_voc(root, num_train=8, num_val=4)
    out = tmp_path / "out"
    out.mkdir()
    pretrain = ["pretrain.iters=4", "pretrain.batch_size=4", "pretrain.queue_len=16", "pretrain.crop_size=64",
                "pretrain.figure.enabled=false", "data.image_size=96"]
    args = ["data=image_folder", f"data.root={root / 'JPEGImages'}", "downstream=custom",
            "stages=[pretrain,convert,det_voc]", f"downstream.det_voc.custom.root={root}", f"paths.output_dir={out}",
            *pretrain, *(f"downstream.det_voc.{item}" for item in (*SHRUNK, *SHRUNK_DETECTION))]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run([sys.executable, "-m", "pipelines.run", *args], cwd=out, env=env, capture_output=True,
                            text=True, timeout=900)
    terminal = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "data set shelves (voc, found from Annotations/): 8 train and 4 val images, 2 classes: gadget, widget" \
        in terminal
    assert "Average Precision" not in terminal and "Running per image evaluation" not in terminal
    (job,) = [p for p in (out / "runs" / "default").iterdir() if p.is_dir()]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in (job / "det_voc" / "log.txt").read_text()

    used = json.loads((job / "det_voc" / "stage_config.json").read_text())["weights"]
    assert Path(used) == job / "convert" / "backbone.pkl"
    tracker = Tracker(f"sqlite:///{out}/mlflow.db")
    experiment = tracker.client.get_experiment_by_name("default")
    (run,) = [r for r in tracker.client.search_runs([experiment.experiment_id]) if "det_voc/AP" in r.data.metrics]
    title = run.data.tags[f"{DATASET_TAG}det_voc"]
    assert title == "shelves: 8 train / 4 val images, 2 classes (gadget, widget)"
    assert {f"det_voc/AP-{c}" for c in CLASSES} <= run.data.metrics.keys()
    artifacts = [a.path for a in tracker.client.list_artifacts(run.info.run_id, "det_voc")]
    assert "det_voc/dataset.json" in artifacts
    table, _ = report.report([f"paths.output_dir={out}"], log_artifacts=False)
    assert f"det_voc ran on {title}" in table.markdown()


def test_the_title_mlflow_shows_counts_the_classes_in_words():
    from pipelines.stages import dataset_title

    one = {"name": "shelves", "num_train": 8, "num_val": 4, "classes": ["gadget"]}
    assert dataset_title(one) == "shelves: 8 train / 4 val images, 1 class (gadget)"
    assert dataset_title({**one, "classes": ["gadget", "widget"]}).endswith("2 classes (gadget, widget)")
