"""Detection transfer: evaluator sanity and tiny VOC (Faster R-CNN C4) / COCO (Mask R-CNN FPN) runs on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from densecl.transfer.settings import COCODetectionConfig, VOCDetectionConfig
from densecl.typed_settings import ConfigValueError

# A few iterations at 96 px with ResNet-18: warm-up and gradient clipping keep random heads finite.
TINY = dict(
    max_iter=3, ims_per_batch=2, base_lr=0.005, steps=(), warmup_iters=2, min_size_train=(96,), max_size_train=128,
    min_size_test=96, max_size_test=128, roi_batch_size_per_image=16, rpn_pre_nms_topk_train=300,
    rpn_post_nms_topk_train=100, rpn_pre_nms_topk_test=100, rpn_post_nms_topk_test=20, detections_per_image=10,
    num_workers=0, precise_bn_iters=1, device="cpu",
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread is faster


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from densecl.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("det") / "synthetic"
    write_synthetic_dataset(root, num_train=6, num_val=3, image_size=96, seed=0)
    return root


def _export_random_backbone(path, arch="resnet18", densecl_checkpoint=False):
    from torchvision import models

    from densecl.weights.export import save_backbone

    state = {k: v for k, v in getattr(models, arch)(weights=None).state_dict().items() if not k.startswith("fc.")}
    if densecl_checkpoint:  # the training checkpoint layout: query backbone under encoder_q.backbone.
        torch.save({"model": {f"encoder_q.backbone.{k}": v for k, v in state.items()}, "config": {"arch": arch}}, path)
        return path
    return save_backbone(state, path, arch)


def _losses_finite(output_dir) -> list[dict]:
    lines = [json.loads(line) for line in (output_dir / "train_log.json").read_text().splitlines() if line.strip()]
    losses = [v for line in lines for k, v in line.items() if k.startswith("loss") or k == "total_loss"]
    assert losses and all(math.isfinite(v) for v in losses)
    return lines


def test_configs_default_to_the_protocol_and_scale():
    voc = VOCDetectionConfig()
    assert (voc.max_iter, voc.ims_per_batch, voc.base_lr, voc.steps, voc.warmup_iters) == (
        24000, 16, 0.02, (18000, 22000), 100,
    )  # fmt: skip
    assert voc.train_datasets == ("voc_2007_trainval", "voc_2012_trainval") and voc.test_dataset == "voc_2007_test"
    assert voc.min_size_train[0] == 480 and voc.min_size_train[-1] == 800 and voc.extra_norm
    small = voc.scaled(4)
    assert small.base_lr == pytest.approx(0.005) and small.max_iter == 96000 and small.steps == (72000, 88000)
    short = voc.shortened(240)
    assert short.steps == (180, 220) and short.warmup_iters == 1
    coco = COCODetectionConfig()
    assert (coco.max_iter, coco.steps, coco.box_head_convs, coco.box_head_fcs) == (90000, (60000, 80000), 4, 1)
    with pytest.raises(ConfigValueError, match="steps=") as err:
        VOCDetectionConfig(max_iter=100).validate()
    assert err.value.key == "steps"


@pytest.mark.detectron2
def test_evaluators_give_100_for_ground_truth(synthetic_root, tmp_path):
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BitMasks, Boxes, BoxMode, Instances
    from pycocotools import mask as mask_utils

    from densecl.transfer.catalog import register_datasets
    from densecl.transfer.detection import COCODetectionTrainer, VOCDetectionTrainer

    register_datasets(["synthetic_voc_val", "synthetic_coco_val"], synthetic_root=str(synthetic_root))

    def as_predictions(record, masks: bool):
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record["annotations"]]
        inst = Instances((record["height"], record["width"]))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]])
        if masks:
            decoded = [mask_utils.decode(a["segmentation"]) for a in record["annotations"]]
            inst.pred_masks = BitMasks(torch.tensor(decoded, dtype=torch.bool)).tensor
        return {"instances": inst}

    voc = VOCDetectionTrainer.build_evaluator(None, "synthetic_voc_val")
    voc.reset()
    for record in DatasetCatalog.get("synthetic_voc_val"):
        voc.process([record], [as_predictions(record, masks=False)])
    ap = voc.evaluate()["bbox"]
    assert ap["AP50"] == pytest.approx(100.0) and ap["AP"] == pytest.approx(100.0)

    coco = COCODetectionTrainer.build_evaluator(None, "synthetic_coco_val", str(tmp_path))
    coco._distributed = False
    coco.reset()
    for record in DatasetCatalog.get("synthetic_coco_val"):
        coco.process([record], [as_predictions(record, masks=True)])
    results = coco.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0) and results["segm"]["AP"] == pytest.approx(100.0)


@pytest.mark.slow
@pytest.mark.detectron2
def test_tiny_voc_run_from_exported_weights_and_rerun(synthetic_root, tmp_path):
    from densecl.transfer.detection import run_voc_detection

    weights = _export_random_backbone(tmp_path / "backbone.pth")
    cfg = VOCDetectionConfig.preset("synthetic", synthetic_root=str(synthetic_root), **TINY)
    out = tmp_path / "voc"
    metrics = run_voc_detection(cfg, str(weights), str(out))
    assert set(metrics) == {"AP", "AP50", "AP75"}
    assert metrics["AP50"] >= metrics["AP"]  # AP averages IoU thresholds 0.5-0.95; 0.5 is the loosest
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert _losses_finite(out)[-1]["iteration"] == cfg.max_iter - 1
    model = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    # ResNet-18 C4: a BasicBlock res5 (512 channels) in the box head, then MoCo's extra BN.
    assert model["roi_heads.res5.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert "roi_heads.res5.norm.running_var" in model and "backbone.res4.1.conv2.weight" in model
    assert run_voc_detection(cfg, str(weights), str(out)) == metrics  # finished: returns metrics.json


@pytest.mark.slow
@pytest.mark.detectron2
def test_tiny_coco_run_from_densecl_checkpoint(synthetic_root, tmp_path):
    from densecl.transfer.detection import run_coco_detection

    weights = _export_random_backbone(tmp_path / "checkpoint.pth", densecl_checkpoint=True)
    cfg = COCODetectionConfig.preset("synthetic", synthetic_root=str(synthetic_root), **TINY)
    out = tmp_path / "coco"
    metrics = run_coco_detection(cfg, str(weights), str(out))
    for task in ("bbox", "segm"):  # boxes and masks both evaluated; AP averages IoU 0.5-0.95, AP50 the loosest
        assert {f"{task}/AP", f"{task}/AP50", f"{task}/AP75"} <= set(metrics)
        assert metrics[f"{task}/AP50"] >= metrics[f"{task}/AP"]
    assert all(math.isfinite(v) for v in metrics.values())
    _losses_finite(out)
    assert (out / "model_final.pth").is_file() and (out / "pretrained_backbone.pkl").is_file()


@pytest.mark.detectron2
def test_no_detection_at_all_scores_zero_ap_while_a_size_range_without_ground_truth_stays_undefined():
    from densecl.transfer.detection import COCODetectionTrainer, VOCDetectionTrainer

    nan = float("nan")
    nothing = {"bbox": dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"), nan)}
    some = {"bbox": {"AP": 12.5, "AP50": 30.0, "AP75": 8.0, "APs": nan, "APm": 4.0, "APl": 20.0, "AP-widget": 9.0}}
    assert COCODetectionTrainer.summarize(nothing) == {"bbox/AP": 0.0, "bbox/AP50": 0.0, "bbox/AP75": 0.0}
    assert VOCDetectionTrainer.summarize(nothing) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    assert COCODetectionTrainer.summarize(some) == {f"bbox/{k}": v for k, v in some["bbox"].items() if k != "APs"}

