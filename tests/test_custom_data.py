"""The user's own labelled data (densecl.transfer.custom): a VOC folder, a COCO JSON and label PNGs with their
own classes are read into what the stages register, split as asked, and every kind of bad input is refused
before training with an error naming its file; the `custom` preset's schedule follows max_iter."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from labelled_sets import CLASSES, write_coco, write_masks, write_voc
from PIL import Image

from densecl.transfer.custom import CustomDataError, CustomDataset, prepare, read_dataset
from densecl.transfer.settings import COCODetectionConfig, SegmentationConfig, VOCDetectionConfig
from densecl.typed_settings import ConfigValueError

MASK_CLASSES = ("background", *CLASSES)


def voc_set(tmp_path: Path, **kwargs) -> tuple[Path, dict]:
    root = tmp_path / "shelves"
    return root, write_voc(root, num_train=6, num_val=3, **kwargs)


def masks_dataset(root: Path, **kwargs) -> CustomDataset:
    values = dict(format="masks", root=str(root), classes=MASK_CLASSES, train="ImageSets/Segmentation/train.txt",
                  val="ImageSets/Segmentation/val.txt")
    return CustomDataset(**{**values, **kwargs})


def coco_dataset(root: Path, **kwargs) -> CustomDataset:
    values = dict(format="coco", root=str(root), images="images", train="annotations/train.json",
                  val="annotations/val.json")
    return CustomDataset(**{**values, **kwargs})


# ------------------------------------------------------------------------------------------------ reading
def test_a_voc_folder_becomes_coco_instances_with_its_own_classes_and_zero_based_boxes(tmp_path):
    root, splits = voc_set(tmp_path)
    data = read_dataset(CustomDataset(format="voc", root=str(root)))
    assert data.classes == ("gadget", "widget")  # from the annotations, sorted
    assert data.name == "shelves"
    for split, coco in (("train", data.train), ("val", data.val)):
        assert [Path(im["file_name"]).stem for im in coco["images"]] == [i for i, _ in splits[split]]
        written = [(name, box) for _, objects in splits[split] for name, box in objects]
        names = {c["id"]: c["name"] for c in coco["categories"]}
        read = [(names[a["category_id"]], a["bbox"]) for a in coco["annotations"]]
        assert read == [(n, [x0, y0, x1 - x0, y1 - y0]) for n, (x0, y0, x1, y1) in written]


def test_a_given_class_list_sets_the_class_order(tmp_path):
    root, _ = voc_set(tmp_path)
    data = read_dataset(CustomDataset(format="voc", root=str(root), classes=("widget", "gadget", "sprocket")))
    assert data.classes == ("widget", "gadget", "sprocket")
    assert data.train["categories"] == [{"id": 1, "name": "widget"}, {"id": 2, "name": "gadget"},
                                        {"id": 3, "name": "sprocket"}]
    first = xml_object_names(root / "Annotations" / f"{Path(data.train['images'][0]['file_name']).stem}.xml")
    assert data.train["annotations"][0]["category_id"] == ("widget", "gadget").index(first[0]) + 1


def xml_object_names(xml: Path) -> list[str]:
    return [o.findtext("name") for o in ET.parse(xml).findall("object")]


def test_a_coco_json_keeps_its_masks_and_maps_its_category_ids_to_the_class_order(tmp_path):
    root = tmp_path / "parts"
    splits = write_coco(root, num_train=6, num_val=3)
    data = read_dataset(coco_dataset(root))
    assert data.classes == ("gadget", "widget")  # the JSON's category ids 3 and 7, in id order
    assert data.has_masks and data.mask_format == "polygon"
    names = {c["id"]: c["name"] for c in data.val["categories"]}
    written = [name for _, objects in splits["val"] for name, _ in objects]
    assert [names[a["category_id"]] for a in data.val["annotations"]] == written
    assert all(Path(im["file_name"]).is_file() for im in data.train["images"] + data.val["images"])
    # a given list orders the classes: detectron2 takes category ids in increasing order as classes 0, 1, ...
    data = read_dataset(coco_dataset(root, classes=("widget", "gadget")))
    for split in (data.train, data.val):
        assert [c["name"] for c in sorted(split["categories"], key=lambda c: c["id"])] == ["widget", "gadget"]
    names = {c["id"]: c["name"] for c in data.val["categories"]}
    assert [names[a["category_id"]] for a in data.val["annotations"]] == written


def test_coco_rle_masks_are_read_as_bitmasks_and_partial_masks_are_refused(tmp_path):
    root = tmp_path / "parts"
    write_coco(root, num_train=4, num_val=2)
    train_file = root / "annotations" / "train.json"
    data = json.loads(train_file.read_text())
    data["annotations"][0]["segmentation"] = {"size": [96, 96], "counts": "PPYo1"}
    train_file.write_text(json.dumps(data))
    assert read_dataset(coco_dataset(root)).mask_format == "bitmask"
    data["annotations"][0]["segmentation"] = []
    train_file.write_text(json.dumps(data))
    with pytest.raises(CustomDataError, match=r"train\.json: \d+ of \d+ objects have a segmentation"):
        read_dataset(coco_dataset(root))


def test_label_pngs_in_the_voc_palette_become_records_with_the_ignore_value(tmp_path):
    root = tmp_path / "cells"
    splits = write_masks(root, num_train=5, num_val=2)
    data = read_dataset(masks_dataset(root))
    assert [r["image_id"] for r in data.train] == [i for i, _ in splits["train"]]
    assert [r["image_id"] for r in data.val] == [i for i, _ in splits["val"]]
    assert all(Path(r["sem_seg_file_name"]).parent.name == "SegmentationClass" for r in data.train)
    assert {r["ignore_label"] for r in data.train} == {255}


@pytest.mark.parametrize("fmt", ["voc", "masks"])
def test_a_seeded_fraction_splits_one_list_into_disjoint_train_and_val(tmp_path, fmt):
    root = tmp_path / "set"
    (write_voc if fmt == "voc" else write_masks)(root, num_train=10, num_val=0)
    kwargs = {"val": None, "val_fraction": 0.3}
    ds = (lambda **k: CustomDataset(format="voc", root=str(root), **k)) if fmt == "voc" else (
        lambda **k: masks_dataset(root, **k))

    def split(seed):
        data = read_dataset(ds(**kwargs, split_seed=seed))
        ids = lambda part: [Path(im["file_name"]).stem if fmt == "voc" else im["image_id"]  # noqa: E731
                            for im in (part["images"] if fmt == "voc" else part)]
        return ids(data.train), ids(data.val)

    train, val = split(0)
    assert len(val) == 3 and len(train) == 7 and not set(train) & set(val)
    assert sorted(train + val) == [f"train_{k:03d}" for k in range(10)]
    assert split(0) == (train, val)
    assert any(split(seed)[1] != val for seed in (1, 2, 3))


# ----------------------------------------------------------------------------------------------- refusals
def edit_xml(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def first_box(root: Path, image_id: str = "train_000") -> tuple[Path, str]:
    xml = root / "Annotations" / f"{image_id}.xml"
    text = xml.read_text()
    return xml, text[text.index("<xmax>") : text.index("</xmax>") + len("</xmax>")]


def test_a_box_outside_its_image_is_refused_naming_the_xml(tmp_path):
    root, _ = voc_set(tmp_path)
    xml, xmax = first_box(root)
    edit_xml(xml, xmax, "<xmax>97</xmax>")
    with pytest.raises(CustomDataError, match=rf"{xml}: object 0 .* lies outside its 96 x 96 image"):
        read_dataset(CustomDataset(format="voc", root=str(root)))


def test_a_box_of_zero_area_is_refused_naming_the_xml(tmp_path):
    root, _ = voc_set(tmp_path)
    xml, _ = first_box(root)
    text = xml.read_text()
    xmin = text[text.index("<xmin>") + 6 : text.index("</xmin>")]
    edit_xml(xml, first_box(root)[1], f"<xmax>{int(xmin) - 1}</xmax>")
    with pytest.raises(CustomDataError, match=rf"{xml}: object 0 .* has zero area"):
        read_dataset(CustomDataset(format="voc", root=str(root)))


def test_classes_missing_from_the_given_list_are_listed_with_their_counts(tmp_path):
    root, splits = voc_set(tmp_path)
    counts = {n: sum(name == n for items in splits.values() for _, objects in items for name, _ in objects)
              for n in CLASSES}
    with pytest.raises(CustomDataError) as err:
        read_dataset(CustomDataset(format="voc", root=str(root), classes=("gadget",)))
    message = str(err.value)
    assert f"'widget' x{counts['widget']}" in message and "Annotations" in message
    assert "'gadget' x" not in message


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


def test_colour_coded_masks_are_refused(tmp_path):
    root = tmp_path / "cells"
    write_masks(root, num_train=2, num_val=1)
    png = root / "SegmentationClass" / "train_000.png"
    Image.open(png).convert("RGB").save(png)
    with pytest.raises(CustomDataError, match=rf"{png}: a RGB PNG; labels must hold class indices"):
        read_dataset(masks_dataset(root))


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


def test_a_refused_set_writes_nothing_into_the_stage_folder(tmp_path):
    root, _ = voc_set(tmp_path)
    xml, xmax = first_box(root, "val_002")
    edit_xml(xml, xmax, "<xmax>500</xmax>")
    with pytest.raises(CustomDataError, match="val_002.xml"):
        prepare(CustomDataset(format="voc", root=str(root)), tmp_path / "stage" / "data")
    assert not (tmp_path / "stage").exists()


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


def test_a_custom_set_in_the_wrong_format_for_its_stage_or_without_one_is_refused(tmp_path):
    args = dict(arch="resnet18", device="cpu", seed=0)
    with pytest.raises(ConfigValueError, match=r"custom\.format='masks' is invalid: this stage reads voc, coco"):
        COCODetectionConfig.from_section(
            {"preset": "custom", "custom": {"format": "masks", "root": "/x", "classes": ["a"]}}, **args)
    with pytest.raises(ConfigValueError, match=r"^custom=None is invalid"):
        SegmentationConfig.from_section({"preset": "custom"}, **args)
    with pytest.raises(ConfigValueError, match=r"^custom\.root=None is invalid"):
        SegmentationConfig.from_section({"preset": "custom", "custom": {"format": "masks", "classes": ["a"]}}, **args)
    with pytest.raises(ConfigValueError, match=r"custom\.classes=None is invalid: masks: the class names"):
        SegmentationConfig.from_section({"preset": "custom", "custom": {"format": "masks", "root": "/x"}}, **args)


def test_check_data_names_the_bad_file_under_the_custom_root_key(tmp_path):
    root, _ = voc_set(tmp_path)
    xml, xmax = first_box(root)
    edit_xml(xml, xmax, "<xmax>0</xmax>")
    cfg = VOCDetectionConfig.from_section({"preset": "custom", "custom": {"format": "voc", "root": str(root)}},
                                          arch="resnet18", device="cpu", seed=0)
    with pytest.raises(ConfigValueError, match=rf"^custom\.root='{root}' is invalid: {xml}: object 0"):
        cfg.check_data()


# ---------------------------------------------------------------------------------------- end to end
# Each stage as `python -m pipelines.run model=random_init downstream=custom stages=[STAGE] ...` runs it, shrunk:
# one CPU process, ResNet-18 at 96 px, a few iterations, few proposals; every box kept at test time, so that
# a barely trained head still reports a score for each class.
SHRUNK = ["max_iter=6", "ims_per_batch=2", "num_workers=0", "progress=false", "base_lr=0.005", "warmup_iters=1",
          "clip_grad_norm=10.0"]
SHRUNK_DETECTION = ["min_size_train=[96]", "max_size_train=128", "min_size_test=96", "max_size_test=128",
                    "rpn_pre_nms_topk_train=300", "rpn_post_nms_topk_train=100", "rpn_pre_nms_topk_test=100",
                    "rpn_post_nms_topk_test=20", "roi_batch_size_per_image=16", "detections_per_image=10",
                    "precise_bn_iters=1", "score_thresh_test=0.0"]
SHRUNK_SEGMENTATION = ["crop_size=64", "img_scale=[384,96]"]


def run_custom_stage(stage: str, tmp_path: Path, custom: dict, *extra: str) -> tuple[dict, Path]:
    from pipelines import schema
    from pipelines.stages import run_stages
    from pipelines.tracking import RunLogger

    shrunk = SHRUNK + (SHRUNK_SEGMENTATION if stage.startswith("seg") else SHRUNK_DETECTION)
    overrides = [
        "downstream=custom", "model=random_init", "backbone=resnet18", "tracking=disabled", f"stages=[{stage}]",
        f"paths.output_dir={tmp_path / 'outputs'}", "device=cpu",
        *(f"++downstream.{stage}.custom.{k}={v}" for k, v in custom.items()),
        *(f"++downstream.{stage}.{item}" for item in (*shrunk, *extra)),
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
def test_det_voc_on_a_voc_folder_reports_ap_and_per_class_ap_on_its_val_split(tmp_path):
    root = tmp_path / "shelves"
    splits = write_voc(root, num_train=8, num_val=4)
    metrics, stage_dir = run_custom_stage("det_voc", tmp_path, {"root": root})
    assert {"AP", "AP50", "AP75"} <= metrics.keys()
    assert {k for k in metrics if k.startswith("AP-")} == {f"AP-{c}" for c in CLASSES}
    assert evaluated_files(stage_dir) == sorted(str((root / "JPEGImages" / f"{i}.jpg").absolute())
                                                for i, _ in splits["val"])
    info = json.loads((stage_dir / "data" / "dataset.json").read_text())
    assert (info["name"], info["classes"], info["num_train"], info["num_val"]) == ("shelves", list(CLASSES), 8, 4)


@pytest.mark.slow
@pytest.mark.detectron2
@pytest.mark.usefixtures("one_thread")
def test_det_coco_on_a_coco_json_trains_masks_and_reports_box_and_mask_ap_per_class(tmp_path):
    from detectron2.config import CfgNode

    root = tmp_path / "parts"
    write_coco(root, num_train=8, num_val=4)
    custom = {"root": root, "name": "parts", "val": "null", "val_fraction": 0.25}  # one JSON, split by a fraction
    custom["train"] = "annotations/train.json"
    metrics, stage_dir = run_custom_stage("det_coco", tmp_path, custom)
    d2 = CfgNode.load_cfg((stage_dir / "config.yaml").read_text())
    assert d2.MODEL.MASK_ON and d2.INPUT.MASK_FORMAT == "polygon" and d2.MODEL.ROI_HEADS.NUM_CLASSES == 2
    for task in ("bbox", "segm"):
        assert {f"{task}/AP", f"{task}/AP50", f"{task}/AP75"} <= metrics.keys()
        assert {k for k in metrics if k.startswith(f"{task}/AP-")} == {f"{task}/AP-{c}" for c in CLASSES}
    assert len(evaluated_files(stage_dir)) == 2  # a quarter of the 8 train images


@pytest.mark.slow
@pytest.mark.detectron2
@pytest.mark.usefixtures("one_thread")
def test_seg_voc_on_label_pngs_reports_miou_and_per_class_iou(tmp_path):
    root = tmp_path / "cells"
    splits = write_masks(root, num_train=6, num_val=3)
    metrics, stage_dir = run_custom_stage("seg_voc", tmp_path, {"root": root, "classes": list(MASK_CLASSES)})
    assert {"mIoU", "mIoU_trivial"} <= metrics.keys()
    in_val = {"background"} | {name for _, objects in splits["val"] for name, _ in objects}
    scored = {k.removeprefix("IoU-") for k in metrics if k.startswith("IoU-")}  # in the labels or predicted
    assert in_val <= scored <= set(MASK_CLASSES)
    assert json.loads((stage_dir / "data" / "dataset.json").read_text())["classes"] == list(MASK_CLASSES)


@pytest.mark.slow
@pytest.mark.detectron2
def test_the_pipeline_pretrains_on_the_sets_images_and_names_the_set_in_mlflow_and_the_report(tmp_path):
    """`python -m pipelines.run data=image_folder data.root=SET/JPEGImages downstream=custom ...`: DenseCL
    pre-trains on the labelled set's own images, det_voc fine-tunes from them; mlflow and the report name the
    set and its classes, and the per-class APs are metrics of the run."""
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
            *pretrain, *(f"++downstream.det_voc.{item}" for item in (*SHRUNK, *SHRUNK_DETECTION))]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run([sys.executable, "-m", "pipelines.run", *args], cwd=out, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "data set shelves: 8 train and 4 val images, 2 classes: gadget, widget" in result.stdout + result.stderr

    (job,) = [p for p in (out / "runs" / "default").iterdir() if p.is_dir()]
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
