"""Exports of annotation tools, each written as the tool writes it (tests/labelled_sets.py), through the stages
that read them: found from the folder, checked, prepared, registered with detectron2 and scored by the stage's
own evaluator on known predictions, without training. Every per-class AP and IoU is bound to the value those
predictions must give: one class found whole (AP 100), the other only in part (AP from its recall), on
non-square images with an object at the right and bottom edges and, where the format has them, difficult
objects and ignored pixels, with the tools' unsorted class ids."""

from __future__ import annotations

import json
from pathlib import Path

import labelled_sets as sets
import numpy as np
import pytest
import torch

from densecl.transfer.custom import CustomDataset, prepare
from densecl.transfer.settings import COCODetectionConfig, SegmentationConfig, VOCDetectionConfig

pytestmark = [pytest.mark.detectron2, pytest.mark.usefixtures("one_thread")]
RECALL_STEPS = np.linspace(0.0, 1.0, 101)  # COCO's AP: precision at 101 recall levels
PARTIAL = "gadget"  # the class predicted in part; the other is found whole


class Oracle(torch.nn.Module):
    """A stand-in model whose outputs are given per image (by file stem), in the original image's pixels."""

    def __init__(self, predict):
        super().__init__()
        self.predict = predict
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, inputs):
        return [self.predict(Path(x["file_name"]).stem, x["height"], x["width"]) for x in inputs]


def score(config_cls, custom: dict, folder: Path, oracle):
    """The stage's metrics on the val split for the outputs of `oracle(prepared folder)`, and the prepared set's
    summary and detectron2 config."""
    from detectron2.evaluation import inference_on_dataset

    from densecl.transfer.catalog import register_datasets
    from densecl.transfer.detection import COCODetectionTrainer, VOCDetectionTrainer
    from densecl.transfer.segmentation import SegmentationTrainer

    cfg = config_cls.preset("custom", custom=CustomDataset(**custom), device="cpu", arch="resnet18", num_workers=0)
    summary = prepare(cfg.custom, folder / "data", cfg.CUSTOM_TASK)
    register_datasets(cfg.dataset_names(), custom_root=str(folder / "data"))
    trainer = {VOCDetectionConfig: VOCDetectionTrainer, COCODetectionConfig: COCODetectionTrainer,
               SegmentationConfig: SegmentationTrainer}[config_cls]
    d2 = trainer.build_d2_config(cfg, str(folder / "out"))
    name = d2.DATASETS.TEST[0]
    evaluator = trainer.build_evaluator(d2, name, str(folder / "out" / "inference"))
    results = inference_on_dataset(Oracle(oracle(folder / "data")), trainer.build_test_loader(d2, name), evaluator)
    return trainer.summarize(results), summary, d2


def val_items(items, data: Path, key: str) -> list:
    """The written items the prepared val split holds, in file order (`key`: val.json's images or records)."""
    val = json.loads((data / "val.json").read_text())
    stems = sorted(Path(entry["file_name"]).stem for entry in (val["images"] if key == "images" else val))
    by_stem = {i.stem: i for i in items}
    return [by_stem[s] for s in stems]


# ----------------------------------------------------------------------------------------------- detection
def expected_ap(found: int, total: int) -> float:
    """COCO's AP of a class whose `found` of `total` scored objects are predicted exactly, nothing else: precision
    1 up to recall found / total, 0 after."""
    return 100.0 * np.count_nonzero(RECALL_STEPS <= found / total) / len(RECALL_STEPS)


def detection_oracle(val, names: dict[str, str], masks: bool):
    """Every scored object of each class exactly, except PARTIAL's: only every third of them. Difficult
    objects are not predicted: they are ignored when scoring (a reader that lost the flag lowers the recall).
    Returns (predict, {class: expected AP})."""
    from detectron2.structures import Boxes, Instances

    chosen, counts = {}, {}
    for item in val:
        for t in item.things:
            if t.difficult:
                continue
            k = counts.get(t.name, 0)
            counts[t.name] = k + 1
            if t.name != names[PARTIAL] or k % 3 == 0:
                chosen.setdefault(item.stem, []).append(t)
    found = {n: sum(t.name == n for ts in chosen.values() for t in ts) for n in counts}
    expected = {n: expected_ap(found[n], counts[n]) for n in counts}

    def predict(stem, height, width):
        from detectron2.data import MetadataCatalog

        classes = MetadataCatalog.get("custom_det_val").thing_classes
        things = chosen.get(stem, [])
        out = Instances((height, width))
        out.pred_boxes = Boxes(torch.tensor([t.box for t in things], dtype=torch.float32).reshape(-1, 4))
        out.scores = torch.linspace(0.9, 0.8, len(things))
        out.pred_classes = torch.tensor([classes.index(t.name) for t in things], dtype=torch.long)
        if masks:
            out.pred_masks = torch.from_numpy(np.stack([t.mask(width, height) for t in things])
                                              if things else np.zeros((0, height, width), dtype=bool))
        return {"instances": out}

    return predict, expected


SPLIT = {"val_fraction": 0.4}  # layouts without a validation split
DETECTION_EXPORTS = {  # writer, items, the custom keys a user sets, the format found
    "labelImg": (sets.write_labelimg, (9, 3), SPLIT, "voc"),
    "labelme2voc": (sets.write_labelme_voc, (9, 3), SPLIT, "voc"),
    "cvat_voc": (sets.write_cvat_voc, (9, 3), SPLIT, "voc"),
    "cvat_yolo": (sets.write_cvat_yolo, (9, 3), SPLIT, "yolo"),
    "label_studio_yolo": (sets.write_label_studio_yolo, (9, 3), SPLIT, "yolo"),
    "label_studio_coco": (sets.write_label_studio_coco, (9, 3), SPLIT, "coco"),
    "roboflow_coco": (sets.write_roboflow_coco, (6, 4), {}, "coco"),
    "roboflow_yolo": (sets.write_roboflow_yolo, (6, 4), {}, "yolo"),
    "ultralytics": (sets.write_ultralytics, (6, 4), {}, "yolo"),
    "labelme2coco": (sets.write_labelme_coco, (9, 3), SPLIT, "coco"),
    "voc_with_lists": (lambda root, items: sets.write_voc(root, 6, 4), (6, 4), {}, "voc"),
    "coco_with_crowds": (lambda root, items: sets.write_coco(root, 6, 4), (6, 4), {}, "coco"),
}
WITH_MASKS = ("roboflow_coco", "roboflow_yolo", "ultralytics", "labelme2coco", "coco_with_crowds")
WITH_DIFFICULT = ("labelImg", "cvat_voc", "voc_with_lists", "coco_with_crowds")
SAFE_NAMES = {"red widget": "red widget", "gadget/v2": "gadget_v2", "widget": "widget", "gadget": "gadget"}
STAGES = [(stage, layout) for stage in ("det_voc", "det_coco") for layout in DETECTION_EXPORTS]


@pytest.mark.parametrize(("stage", "layout"), STAGES, ids=[f"{s}-{layout}" for s, layout in STAGES])
def test_each_export_scores_its_per_class_ap_on_known_predictions(tmp_path, stage, layout):
    writer, counts, keys, fmt = DETECTION_EXPORTS[layout]
    root = tmp_path / "set"
    items = writer(root, sets.scenes(*counts, empty=int(layout == "ultralytics")))
    names = sets.ROBOFLOW_NAMES if layout == "roboflow_coco" else {"widget": "widget", "gadget": "gadget"}
    masks = stage == "det_coco" and layout in WITH_MASKS
    expected = {}

    def oracle(data):
        predict, values = detection_oracle(val_items(items, data, "images"), names, masks)
        expected.update(values)
        return predict

    config = VOCDetectionConfig if stage == "det_voc" else COCODetectionConfig
    metrics, summary, d2 = score(config, {"root": str(root), **keys}, tmp_path, oracle)
    assert (summary["format"], summary["found_from"] != "") == (fmt, True)
    assert sorted(summary["classes"]) == sorted(names.values())  # no category without objects among them
    assert d2.MODEL.ROI_HEADS.NUM_CLASSES == 2 and (stage == "det_coco" and d2.MODEL.MASK_ON) == masks
    assert expected[names[PARTIAL]] < 100 and expected[names["widget"]] == 100  # two values, told apart
    for task in ("bbox", "segm") if masks else ("bbox",):
        prefix = f"{task}/" if stage == "det_coco" else ""
        per_class = {k.removeprefix(f"{prefix}AP-"): v for k, v in metrics.items() if k.startswith(f"{prefix}AP-")}
        assert per_class == pytest.approx({SAFE_NAMES[n]: ap for n, ap in expected.items()}, abs=1e-6), task
        assert metrics[f"{prefix}AP"] == pytest.approx(np.mean(list(expected.values())), abs=1e-6), task
    if layout in WITH_DIFFICULT:  # ignored when scoring: not predicted, and the class is still found whole
        assert any(t.difficult for i in val_items(items, tmp_path / "data", "images") for t in i.things)


# --------------------------------------------------------------------------------------------- segmentation
def segmentation_oracle(val, classes: tuple[str, ...], truth, ignore: int):
    """The true label map of each val image, except: every other PARTIAL object predicted as background, and
    every ignored pixel predicted as the first class after background (costly unless it is ignored). Returns
    (predict, {class: expected IoU}) with the IoUs counted here from the two maps, ignored pixels left out."""
    predicted, seen = {}, 0
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for item in val:
        labels = truth(item)
        guess = labels.copy()
        for t in item.things:
            if t.name == PARTIAL and not t.difficult:
                if seen % 2 == 1:
                    guess[t.mask() & (labels == classes.index(PARTIAL))] = 0
                seen += 1
        guess[labels == ignore] = 1
        scored = labels != ignore
        np.add.at(confusion, (labels[scored], guess[scored]), 1)
        predicted[item.stem] = guess
    hits = np.diag(confusion)
    expected = {c: 100.0 * hits[k] / (confusion[k].sum() + confusion[:, k].sum() - hits[k])
                for k, c in enumerate(classes)}

    def predict(stem, height, width):
        guess = torch.from_numpy(predicted[stem].astype(np.int64))
        return {"sem_seg": torch.nn.functional.one_hot(guess, len(classes)).permute(2, 0, 1).float()}

    return predict, expected


MASK_CLASSES = ("background", *sets.CLASSES)
YOLO_CLASSES = ("background", *sets.UNSORTED)
SEGMENTATION_EXPORTS = {  # writer, the custom keys a user sets, the classes, the label map the test expects
    "voc_palette": (lambda root, items: sets.write_masks(root, 6, 4), {"classes": list(MASK_CLASSES)}, MASK_CLASSES,
                    lambda item: sets.label_map(item), 255),
    "voc_palette_ignore_254": (lambda root, items: sets.write_masks(root, 6, 4, ignore=254),
                               {"classes": list(MASK_CLASSES), "ignore_label": 254}, MASK_CLASSES,
                               lambda item: sets.label_map(item, ignore=254), 254),
    "cvat_masks": (sets.write_cvat_masks, SPLIT, tuple(sets.MASK_COLOURS),
                   lambda item: sets.label_map(item, classes=tuple(sets.MASK_COLOURS), outline=False), 255),
    "roboflow_yolo": (sets.write_roboflow_yolo, {}, YOLO_CLASSES,
                      lambda item: sets.label_map(item, classes=YOLO_CLASSES, outline=False), 255),
    "ultralytics": (sets.write_ultralytics, {}, YOLO_CLASSES,
                    lambda item: sets.label_map(item, classes=YOLO_CLASSES, outline=False), 255),
}


@pytest.mark.parametrize("layout", list(SEGMENTATION_EXPORTS))
def test_each_export_scores_its_per_class_iou_on_known_predictions(tmp_path, layout):
    writer, keys, classes, truth, ignore = SEGMENTATION_EXPORTS[layout]
    root = tmp_path / "set"
    items = writer(root, sets.scenes(9, 3) if keys is SPLIT else sets.scenes(6, 4, empty=int(layout == "ultralytics")))
    expected = {}

    def oracle(data):
        predict, values = segmentation_oracle(val_items(items, data, "records"), classes, truth, ignore)
        expected.update(values)
        return predict

    metrics, summary, _ = score(SegmentationConfig, {"root": str(root), **keys}, tmp_path, oracle)
    assert tuple(summary["classes"]) == classes and summary["ignore_label"] == ignore
    per_class = {k.removeprefix("IoU-"): v for k, v in metrics.items() if k.startswith("IoU-")}
    assert per_class == pytest.approx(expected, abs=1e-6)
    assert expected[PARTIAL] < 99 and expected["widget"] == 100  # two values, told apart
    assert metrics["mIoU"] == pytest.approx(np.mean(list(expected.values())), abs=1e-6)


def test_cocos_summary_table_goes_to_the_stage_log_not_the_terminal(tmp_path, capfd, caplog):
    root = tmp_path / "set"
    items = sets.write_roboflow_coco(root, sets.scenes(4, 2))

    def oracle(data):
        return detection_oracle(val_items(items, data, "images"), sets.ROBOFLOW_NAMES, masks=True)[0]

    with caplog.at_level("INFO", logger="densecl.transfer.detection"):
        score(COCODetectionConfig, {"root": str(root)}, tmp_path, oracle)
    printed = capfd.readouterr()
    assert "Average Precision" not in printed.out + printed.err
    logged = [r.getMessage() for r in caplog.records if r.name == "densecl.transfer.detection"]
    assert sum("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in m for m in logged) == 2  # bbox, segm


@pytest.mark.parametrize("kept_from_terminal", [False, True])
def test_the_stage_log_gets_the_transfer_modules_messages_once(tmp_path, kept_from_terminal):
    """pipelines keeps densecl.transfer's details out of the terminal (they stop propagating); the stage's
    log.txt still gets each of them, once, as it does when they propagate."""
    import logging

    from densecl.transfer import runner

    detail = logging.getLogger("densecl.transfer")
    before = detail.propagate
    detail.propagate = not kept_from_terminal
    handler, levels = runner._attach_file_log(str(tmp_path))
    try:
        logging.getLogger("densecl.transfer.detection").info("pycocotools: a summary line")
        logging.getLogger("densecl.data").info("data set shelves")
    finally:
        for name in levels:
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).setLevel(levels[name])
        handler.close()
        detail.propagate = before
    text = (tmp_path / "log.txt").read_text()
    assert text.count("pycocotools: a summary line") == 1 and text.count("data set shelves") == 1
