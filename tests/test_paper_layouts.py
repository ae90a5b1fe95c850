"""The paper protocols' data paths end to end: tiny folders in the real data sets' layouts (VOC07+12
detection, COCO instances with polygon masks, VOC12 train_aug segmentation, Cityscapes fine trainIds), each
run through the pipeline (`downstream=paper`, shrunk by overrides, random init) for a few iterations and
then the protocol's evaluator; spies record what the loaders and evaluators read."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densecl.data.voc import VOC_CLASSES
from densecl.transfer.layouts import CITYSCAPES_CLASSES, resolve_dataset

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny convolutions: one thread is faster
    pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/submitit_:UserWarning"),
]

IGNORE = 255
BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")
# Overrides every stage gets: one process on the CPU, a few iterations at batch 2, no loader workers.
COMMON = ["max_iter=2", "ims_per_batch=2", "num_gpus=1", "device=cpu", "num_workers=0", "progress=false"]
DETECTION = [  # ResNet-18 at ~100 px with few proposals; warm-up and clipping keep random heads finite
    "base_lr=0.005", "warmup_iters=1", "clip_grad_norm=10.0", "min_size_train=[96]", "max_size_train=128",
    "min_size_test=96", "max_size_test=128", "rpn_pre_nms_topk_train=300", "rpn_post_nms_topk_train=100",
    "rpn_pre_nms_topk_test=100", "rpn_post_nms_topk_test=20", "roi_batch_size_per_image=16",
    "detections_per_image=10", "precise_bn_iters=1",
]  # fmt: skip


# --------------------------------------------------------------------------------------------- writers
def voc_palette() -> list[int]:
    """The VOC colour map (VOCdevkit's labelcolormap / mmseg's PALETTE), 256 RGB triples flattened."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def _image(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _lines(path: Path, ids) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def _label_map(height: int, width: int, classes: list[int], seed: int) -> np.ndarray:
    """Vertical bands of the given classes, a 255 border as VOC's object outlines, and a 255 blob."""
    label = np.zeros((height, width), dtype=np.uint8)
    for k, c in enumerate(classes):
        label[:, k * width // len(classes) : (k + 1) * width // len(classes)] = c
    label[:2], label[-2:], label[:, :2], label[:, -2:] = IGNORE, IGNORE, IGNORE, IGNORE
    y, x = np.random.default_rng(seed).integers(4, min(height, width) // 2, 2)
    label[y : y + 3, x : x + 5] = IGNORE
    return label


def write_voc_detection(root: Path) -> dict[str, list[str]]:
    """VOC2007 (trainval, test) and VOC2012 (trainval) in VOCdevkit's layout; returns ids per set."""
    sets = {
        "voc_2007_trainval": ("VOC2007", "trainval", ["000005", "000007", "000009"]),
        "voc_2007_test": ("VOC2007", "test", ["000001", "000004", "000006"]),
        "voc_2012_trainval": ("VOC2012", "trainval", ["2008_000002", "2008_000003"]),
    }
    n = 0
    for folder, split, ids in sets.values():
        voc = root / folder
        _lines(voc / "ImageSets" / "Main" / f"{split}.txt", ids)
        for i in ids:
            n += 1
            width, height = 96 + 8 * (n % 3), 80 + 8 * (n % 2)
            _image(voc / "JPEGImages" / f"{i}.jpg", width, height, n)
            ann = ET.Element("annotation")
            ET.SubElement(ann, "folder").text = folder
            ET.SubElement(ann, "filename").text = f"{i}.jpg"
            size = ET.SubElement(ann, "size")
            for tag, value in (("width", width), ("height", height), ("depth", 3)):
                ET.SubElement(size, tag).text = str(value)
            ET.SubElement(ann, "segmented").text = "0"
            for k in range(2):
                obj = ET.SubElement(ann, "object")
                ET.SubElement(obj, "name").text = VOC_CLASSES[(3 * n + 7 * k) % 20]
                ET.SubElement(obj, "pose").text = "Unspecified"
                ET.SubElement(obj, "truncated").text = "0"
                ET.SubElement(obj, "difficult").text = str(int(k == 1 and n % 2 == 0))
                box = ET.SubElement(obj, "bndbox")
                x1, y1 = 1 + 10 * k + n, 1 + 8 * k  # 1-based, inclusive pixel coordinates
                for tag, value in (("xmin", x1), ("ymin", y1), ("xmax", x1 + 40), ("ymax", min(y1 + 50, height))):
                    ET.SubElement(box, tag).text = str(value)
            (voc / "Annotations").mkdir(parents=True, exist_ok=True)
            ET.ElementTree(ann).write(voc / "Annotations" / f"{i}.xml")
    return {name: ids for name, (_, _, ids) in sets.items()}


def write_coco(root: Path) -> dict[str, dict]:
    """coco/annotations/instances_{train,val}2017.json (every one of the 80 categories listed, a few used,
    polygon segmentations, a crowd RLE in train) and coco/{train,val}2017/*.jpg; returns each split's JSON."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    categories = [{"supercategory": "thing", "id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    used = [1, 18, 44, 90]  # person, dog, bottle, toothbrush: COCO's ids have gaps up to 90
    jsons, ann_id = {}, 1
    for split, image_ids in (("train", [9, 25, 30, 34]), ("val", [139, 285, 632])):
        images, annotations = [], []
        for n, image_id in enumerate(image_ids):
            width, height = 112 + 8 * (n % 2), 96
            name = f"{image_id:012d}.jpg"
            _image(root / "coco" / f"{split}2017" / name, width, height, image_id)
            images.append({"license": 1, "file_name": name, "coco_url": "", "height": height, "width": width,
                           "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": image_id})  # fmt: skip
            for k in range(2):
                x, y, w, h = 8.0 + 30 * k, 10.0 + 5 * n, 36.0, 40.0
                polygon = [x, y, x + w, y, x + w, y + h / 2, x + w / 2, y + h, x, y + h]  # a pentagon
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": used[(n + 2 * k) % len(used)],
                    "segmentation": [polygon], "area": w * h * 7 / 8, "bbox": [x, y, w, h], "iscrowd": 0,
                })  # fmt: skip
                ann_id += 1
        if split == "train":  # a crowd region, stored as uncompressed RLE as in COCO
            h, w = images[0]["height"], images[0]["width"]
            annotations.append({
                "id": ann_id, "image_id": image_ids[0], "category_id": 1, "iscrowd": 1, "area": 200.0,
                "segmentation": {"counts": [h * 80, 10 * h, h * (w - 90)], "size": [h, w]},
                "bbox": [80.0, 0.0, 10.0, float(h)],
            })  # fmt: skip
            ann_id += 1
        jsons[split] = {
            "info": {"description": "tiny COCO-layout set", "version": "1.0", "year": 2017},
            "licenses": [{"url": "", "id": 1, "name": "test"}],
            "images": images, "annotations": annotations, "categories": categories,
        }  # fmt: skip
        path = root / "coco" / "annotations" / f"instances_{split}2017.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(jsons[split]))
    return jsons


def _palette_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label)
    image.putpalette(voc_palette())  # an "L" image with a palette becomes a "P" one
    image.save(path)


def _gray_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(path)  # mode "L", as mmseg's tools/convert_datasets/voc_aug.py writes them


def write_voc_segmentation(root: Path) -> dict:
    """VOC2012 with SegmentationClass (palette PNGs: VOC's train + val), SegmentationClassAug (gray PNGs:
    SBD, which also covers a VOC train image, with other labels) and ImageSets/Segmentation/{train,aug,val}.txt
    as mmseg's voc_aug.py leaves them. Returns the ids, each id's label and the label file each image must be
    read with."""
    voc = root / "VOC2012"
    train, aug, val = ["2007_000032", "2007_000039"], ["2008_000008", "2008_000015"], ["2007_000033", "2007_000042"]
    labels: dict[str, np.ndarray] = {}
    for n, i in enumerate(train + aug + val):
        height, width = 72 + 8 * (n % 2), 96
        _image(voc / "JPEGImages" / f"{i}.jpg", width, height, 100 + n)
        labels[i] = _label_map(height, width, [0, 1 + (5 * n) % 20, 1 + (5 * n + 3) % 20], n)
        if i in aug:
            _gray_png(voc / "SegmentationClassAug" / f"{i}.png", labels[i])
        else:
            _palette_png(voc / "SegmentationClass" / f"{i}.png", labels[i])
    # SBD labelled VOC's train image too, differently: training must read VOC's own label (mmseg's train.txt set)
    sbd = labels[train[0]].copy()
    sbd[(sbd != 0) & (sbd != IGNORE)] = 20
    _gray_png(voc / "SegmentationClassAug" / f"{train[0]}.png", sbd)
    lists = voc / "ImageSets" / "Segmentation"
    _lines(lists / "train.txt", train)
    _lines(lists / "aug.txt", aug)
    _lines(lists / "val.txt", val)
    label_files = {  # image -> the label file it must be read with
        str(voc / "JPEGImages" / f"{i}.jpg"): str(voc / f"SegmentationClass{'Aug' if i in aug else ''}" / f"{i}.png")
        for i in train + aug + val
    }
    return {"voc": voc, "train": train, "aug": aug, "val": val, "labels": labels, "label_files": label_files}


def write_cityscapes(root: Path) -> dict:
    """cityscapes/leftImg8bit/{train,val}/CITY/*_leftImg8bit.png and gtFine/.../*_gtFine_labelTrainIds.png
    (gray, trainIds 0-18, 255 = ignore); returns each split's images, each image's label file and each label
    file's trainIds."""
    written = {"images": {"train": [], "val": []}, "label_files": {}, "labels": {}}
    n = 0
    for split, cities in (("train", {"aachen": 2, "bochum": 1}), ("val", {"frankfurt": 1, "lindau": 1})):
        for city, count in cities.items():
            for k in range(count):
                n += 1
                stem = f"{city}_{k:06d}_000019"
                image = root / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
                _image(image, 128, 64, 200 + n)
                label = _label_map(64, 128, [0, 2, 8, 10, 11 + n % 8, 13 + n % 6], n)
                gt = root / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"
                _gray_png(gt, label)
                written["images"][split].append(str(image))
                written["label_files"][str(image)] = str(gt)
                written["labels"][str(gt)] = label
    return written


# ------------------------------------------------------------------------------------------------ spies
class Spy:
    """Records, in this process, the data sets each loader was built from, what each test-time evaluator
    was fed, and every label file the segmentation code read."""

    def __init__(self, monkeypatch):
        import detectron2.data.build as d2_build

        import densecl.transfer.runner as engine
        import densecl.transfer.segmentation as segmentation

        self.loaded: list[tuple[tuple[str, ...], list[dict]]] = []
        self.evaluators: list = []
        self.evaluated_ids: list[list] = []
        self.labels_read: list[tuple[str, np.ndarray]] = []

        get_dicts, inference, read_label = (
            d2_build.get_detection_dataset_dicts, engine.inference_on_dataset, segmentation.read_label,
        )  # fmt: skip

        def get_detection_dataset_dicts(names, *args, **kwargs):
            dicts = get_dicts(names, *args, **kwargs)
            self.loaded.append(((names,) if isinstance(names, str) else tuple(names), dicts))
            return dicts

        def inference_on_dataset(model, loader, evaluator):
            ids, process = [], evaluator.process

            def recording_process(inputs, outputs):
                ids.extend(inp["image_id"] for inp in inputs)
                return process(inputs, outputs)

            evaluator.process = recording_process
            self.evaluators.append(evaluator)
            self.evaluated_ids.append(ids)
            return inference(model, loader, evaluator)

        def recording_read_label(path):
            label = read_label(path)
            self.labels_read.append((str(path), label))
            return label

        monkeypatch.setattr(d2_build, "get_detection_dataset_dicts", get_detection_dataset_dicts)
        monkeypatch.setattr(engine, "inference_on_dataset", inference_on_dataset)
        monkeypatch.setattr(segmentation, "read_label", recording_read_label)

    def file_names(self, names: tuple[str, ...]) -> list[list[str]]:
        """The file names of each loader built from exactly these data sets."""
        return [sorted(d["file_name"] for d in dicts) for got, dicts in self.loaded if got == names]


def run_paper_stage(stage: str, data_dir: Path, tmp_path: Path, *section: str) -> tuple[dict, Path]:
    """The stage as `python -m pipelines.run downstream=paper model=random_init stages=[STAGE]` runs it, with
    COMMON + `section` as `++downstream.STAGE.KEY=VALUE` overrides: composed, validated with the data paths,
    then run by the pipeline's stage runner; returns its metrics and folder."""
    from pipelines import schema
    from pipelines.stages import run_stages
    from pipelines.tracking import RunLogger

    overrides = [
        "downstream=paper", "model=random_init", "backbone=resnet18", "tracking=disabled", f"stages=[{stage}]",
        f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path / 'outputs'}", "device=cpu",
        *(f"++downstream.{stage}.{item}" for item in (*COMMON, *section)),
    ]  # fmt: skip
    cfg = schema.compose(overrides, return_hydra_config=False)
    schema.validate(cfg, check_paths=True)  # what the launching process checks before any job starts
    job = tmp_path / "job"
    results = run_stages(cfg, job, RunLogger())
    return results[stage], job / stage


def _d2_config(stage_dir: Path):
    from detectron2.config import CfgNode

    return CfgNode.load_cfg((stage_dir / "config.yaml").read_text())


def _score_every_box(monkeypatch, trainer_cls) -> None:
    """Random heads score every class below the protocol's 0.05 test threshold after a few iterations, and an
    evaluator given no detections scores nothing: keep every box (detections_per_image still caps them)."""
    build = trainer_cls.build_d2_config.__func__

    def build_d2_config(cls, cfg, output_dir):
        c = build(cls, cfg, output_dir)
        c.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
        return c

    monkeypatch.setattr(trainer_cls, "build_d2_config", classmethod(build_d2_config))


def _class_counts(labels, num_classes: int) -> np.ndarray:
    pixels = np.concatenate([label.ravel() for label in labels]).astype(np.int64)
    return np.bincount(pixels[pixels != IGNORE], minlength=num_classes)


def iou_classes(metrics: dict) -> set[str]:
    return {k.removeprefix("IoU-") for k in metrics if k.startswith("IoU-")}


def scored_classes(confusion: np.ndarray, names) -> set[str]:
    """The classes IoU is defined for: in the ground truth or the prediction."""
    return {names[c] for c in np.flatnonzero(confusion.sum(axis=0) + confusion.sum(axis=1))}


# ------------------------------------------------------------------------------------------------ tests
def test_voc_train_aug_takes_train_labels_from_segmentation_class(tmp_path):
    """mmseg's pascal_voc12_aug: train.txt ids with SegmentationClass labels, then aug.txt ids with
    SegmentationClassAug labels, even where SBD (SegmentationClassAug) has a label for a train.txt id."""
    written = write_voc_segmentation(tmp_path)
    voc = written["voc"]
    modes = {Image.open(p).mode for p in (voc / "SegmentationClass").iterdir()}
    assert modes == {"P"} and {Image.open(p).mode for p in (voc / "SegmentationClassAug").iterdir()} == {"L"}
    records = resolve_dataset("voc_2012_sem_seg_train_aug", str(tmp_path))["records"]
    assert [r["image_id"] for r in records] == written["train"] + written["aug"]
    folders = {r["image_id"]: Path(r["sem_seg_file_name"]).parent.name for r in records}
    assert folders == {
        **dict.fromkeys(written["train"], "SegmentationClass"), **dict.fromkeys(written["aug"], "SegmentationClassAug"),
    }  # fmt: skip
    val = resolve_dataset("voc_2012_sem_seg_val", str(tmp_path))["records"]
    assert {Path(r["sem_seg_file_name"]).parent.name for r in val} == {"SegmentationClass"}

    # Without aug.txt, a train_aug.txt list: still VOC's labels for the ids of train.txt, SBD's for the rest
    (voc / "ImageSets" / "Segmentation" / "aug.txt").rename(voc / "ImageSets" / "Segmentation" / "train_aug.txt")
    _lines(voc / "ImageSets" / "Segmentation" / "train_aug.txt", written["aug"] + written["train"])
    records = resolve_dataset("voc_2012_sem_seg_train_aug", str(tmp_path))["records"]
    assert {r["image_id"]: Path(r["sem_seg_file_name"]).parent.name for r in records} == folders


@pytest.mark.slow
@pytest.mark.detectron2
def test_voc07_12_detection_trains_on_both_trainvals_and_scores_voc07_test(tmp_path, monkeypatch):
    from densecl.transfer.detection import VOCDetectionTrainer

    ids = write_voc_detection(tmp_path / "data")
    spy = Spy(monkeypatch)
    _score_every_box(monkeypatch, VOCDetectionTrainer)
    metrics, stage_dir = run_paper_stage("det_voc", tmp_path / "data", tmp_path, *DETECTION)

    # the evaluator: PascalVOCDetectionEvaluator on VOC2007's test images, with the VOC07 11-point metric
    (evaluator,), (seen,) = spy.evaluators, spy.evaluated_ids
    assert type(evaluator).__name__ == "PascalVOCDetectionEvaluator" and evaluator._is_2007
    assert sorted(seen) == sorted(ids["voc_2007_test"])
    assert Path(evaluator._anno_file_template).parent == tmp_path / "data" / "VOC2007" / "Annotations"
    assert evaluator._class_names == list(VOC_CLASSES)
    assert set(metrics) == {"AP", "AP50", "AP75"}
    d2 = _d2_config(stage_dir)
    assert d2.MODEL.ROI_HEADS.NUM_CLASSES == 20 and d2.MODEL.RESNETS.DEPTH == 18
    assert tuple(d2.DATASETS.TRAIN) == ("voc_2007_trainval", "voc_2012_trainval")
    # training saw every trainval image of both years, with the boxes of their XML (0-based x1, y1)
    train_loaders = spy.file_names(("voc_2007_trainval", "voc_2012_trainval"))
    expected = sorted(
        str(tmp_path / "data" / ("VOC2007" if name.startswith("voc_2007") else "VOC2012") / "JPEGImages" / f"{i}.jpg")
        for name in ("voc_2007_trainval", "voc_2012_trainval")
        for i in ids[name]
    )
    assert train_loaders and all(files == expected for files in train_loaders)
    dicts = next(dicts for names, dicts in spy.loaded if names == ("voc_2007_trainval", "voc_2012_trainval"))
    for record in dicts:
        year = "VOC2007" if record["image_id"] in ids["voc_2007_trainval"] else "VOC2012"
        objects = ET.parse(tmp_path / "data" / year / "Annotations" / f"{record['image_id']}.xml").findall("object")
        in_xml = [
            (VOC_CLASSES.index(o.find("name").text), *(float(o.find(f"bndbox/{t}").text) for t in BOX_TAGS))
            for o in objects
        ]
        x1y1_one_based = [
            (a["category_id"], a["bbox"][0] + 1, a["bbox"][1] + 1, *a["bbox"][2:]) for a in record["annotations"]
        ]
        assert x1y1_one_based == in_xml, record["image_id"]


@pytest.mark.slow
@pytest.mark.detectron2
def test_coco_mask_rcnn_trains_on_polygons_and_scores_boxes_and_masks(tmp_path, monkeypatch):
    import torch

    from densecl.transfer.detection import COCODetectionTrainer

    jsons = write_coco(tmp_path / "data")
    spy = Spy(monkeypatch)
    _score_every_box(monkeypatch, COCODetectionTrainer)
    metrics, stage_dir = run_paper_stage("det_coco", tmp_path / "data", tmp_path, *DETECTION)

    d2 = _d2_config(stage_dir)
    assert d2.MODEL.ROI_HEADS.NUM_CLASSES == 80 and d2.MODEL.MASK_ON and d2.INPUT.MASK_FORMAT == "polygon"
    assert d2.MODEL.ROI_BOX_HEAD.NUM_CONV == 4 and d2.MODEL.ROI_BOX_HEAD.NUM_FC == 1
    for task in ("bbox", "segm"):
        assert {f"{task}/AP", f"{task}/AP50", f"{task}/AP75"} <= set(metrics), sorted(metrics)
    # per-class AP is defined exactly for the categories with ground truth in val2017, named by COCO's ids
    names = {c["id"]: c["name"] for c in jsons["val"]["categories"]}
    in_val = {names[a["category_id"]] for a in jsons["val"]["annotations"]}
    for task in ("bbox", "segm"):
        assert {k.removeprefix(f"{task}/AP-") for k in metrics if k.startswith(f"{task}/AP-")} == in_val
    # training read train2017's images, each with its polygons (the crowd region kept as RLE)
    train_dicts = [dicts for got, dicts in spy.loaded if got == ("coco_2017_train",)]
    assert train_dicts
    for dicts in train_dicts:
        assert sorted(d["image_id"] for d in dicts) == sorted(im["id"] for im in jsons["train"]["images"])
        polygons = [a["segmentation"] for d in dicts for a in d["annotations"] if not a["iscrowd"]]
        assert len(polygons) == sum(1 for a in jsons["train"]["annotations"] if not a["iscrowd"])
        assert all(isinstance(p, list) and len(p[0]) == 10 for p in polygons)
        assert [type(a["segmentation"]) for d in dicts for a in d["annotations"] if a["iscrowd"]] == [dict]
    # the evaluator: COCOEvaluator on every val2017 image, each one's predictions saved
    (evaluator,), (seen,) = spy.evaluators, spy.evaluated_ids
    from detectron2.evaluation import COCOEvaluator

    assert isinstance(evaluator, COCOEvaluator)  # its pycocotools printout sent to the stage log
    val_ids = sorted(im["id"] for im in jsons["val"]["images"])
    assert sorted(seen) == val_ids
    saved = torch.load(stage_dir / "inference" / "instances_predictions.pth", weights_only=False)
    assert sorted(p["image_id"] for p in saved) == val_ids


@pytest.mark.slow
@pytest.mark.detectron2
def test_voc12_segmentation_reads_palette_and_gray_labels_from_the_right_folders(tmp_path, monkeypatch):
    written = write_voc_segmentation(tmp_path / "data")
    labels = written["labels"]
    spy = Spy(monkeypatch)
    metrics, stage_dir = run_paper_stage(
        "seg_voc", tmp_path / "data", tmp_path, "crop_size=64", "img_scale=[128,64]", "ratio_range=[0.75,1.25]"
    )

    assert {"mIoU", "fwIoU", "mAcc", "pAcc"} <= set(metrics)
    assert _d2_config(stage_dir).MODEL.FCN.NUM_CLASSES == 21
    # the loaders paired each train_aug and val image with its label file (train.txt's from SegmentationClass)
    assert {d["file_name"]: d["sem_seg_file_name"] for _, dicts in spy.loaded for d in dicts} == written["label_files"]
    # every label file read gave the class indices written, palette or gray: 2 iterations at batch 2 are one
    # epoch over the 4 train_aug images (detectron2's TrainingSampler), then evaluation reads the val labels
    assert {path for path, _ in spy.labels_read} == set(written["label_files"].values())
    for path, label in spy.labels_read:
        assert np.array_equal(label, labels[Path(path).stem]), path
    # the evaluator: every val image, its ground-truth pixels per class as written, IoU named by VOC class
    (evaluator,), (seen,) = spy.evaluators, spy.evaluated_ids
    assert sorted(seen) == sorted(written["val"])
    gt = _class_counts([labels[i] for i in written["val"]], 21)
    assert np.array_equal(evaluator.confusion.sum(axis=1), gt)
    assert iou_classes(metrics) == scored_classes(evaluator.confusion, ("background", *VOC_CLASSES))


@pytest.mark.slow
@pytest.mark.detectron2
def test_cityscapes_fine_train_ids_with_the_slide_test(tmp_path, monkeypatch):
    written = write_cityscapes(tmp_path / "data")
    images, label_files = written["images"], written["label_files"]
    spy = Spy(monkeypatch)
    metrics, stage_dir = run_paper_stage(
        "seg_cityscapes", tmp_path / "data", tmp_path,
        "crop_size=48", "slide_stride=32", "img_scale=[128,64]", "ratio_range=[0.75,1.25]",
    )  # fmt: skip

    fcn = _d2_config(stage_dir).MODEL.FCN
    assert fcn.NUM_CLASSES == 19 and fcn.TEST_MODE == "slide" and fcn.ALIGN_CORNERS
    assert (fcn.CROP_SIZE, fcn.SLIDE_STRIDE) == (48, 32)  # 128 x 64 images: 2 x 4 windows each
    train_loaders = spy.file_names(("cityscapes_fine_sem_seg_train",))
    assert train_loaders and all(files == sorted(images["train"]) for files in train_loaders)
    # each image paired with its own labelTrainIds file; each label read gave the trainIds written
    assert {d["file_name"]: d["sem_seg_file_name"] for _, dicts in spy.loaded for d in dicts} == label_files
    for path, label in spy.labels_read:
        assert np.array_equal(label, written["labels"][path]), path
    read, val_labels = {path for path, _ in spy.labels_read}, {label_files[i] for i in images["val"]}
    assert val_labels <= read and read - val_labels  # evaluation read every val label, training some train ones
    (evaluator,), (seen,) = spy.evaluators, spy.evaluated_ids
    assert sorted(seen) == sorted(Path(image).stem for image in images["val"])
    gt = _class_counts([written["labels"][label] for label in val_labels], 19)
    assert np.array_equal(evaluator.confusion.sum(axis=1), gt)
    assert iou_classes(metrics) == scored_classes(evaluator.confusion, CITYSCAPES_CLASSES)
