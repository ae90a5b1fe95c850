"""Segmentation transfer: metrics, the dilated FCN, evaluator sanity and a tiny resumable run on CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from densecl.transfer.settings import SegmentationConfig
from densecl.typed_settings import ConfigValueError

TINY = dict(
    max_iter=4, ims_per_batch=2, crop_size=64, img_scale=(256, 64), warmup_iters=1, num_workers=0,
    checkpoint_period=2, eval_period=2, device="cpu",
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread is faster


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from densecl.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("seg") / "synthetic"
    write_synthetic_dataset(root, num_train=4, num_val=2, image_size=64, seed=0)
    return root


def test_metrics_from_a_confusion_matrix():
    from densecl.evaluation.metrics import segmentation_scores

    perfect = segmentation_scores(np.diag([5, 3, 0]), ["a", "b", "c"])
    assert perfect["mIoU"] == perfect["mAcc"] == perfect["pAcc"] == perfect["fwIoU"] == 100.0
    assert "IoU-c" not in perfect  # absent from ground truth and prediction: undefined, not 0
    confusion = np.array([[3, 1], [0, 4]])  # gt rows, prediction columns
    m = segmentation_scores(confusion)
    assert m["pAcc"] == pytest.approx(100 * 7 / 8)
    assert m["mAcc"] == pytest.approx(100 * (3 / 4 + 1) / 2)
    assert m["mIoU"] == pytest.approx(100 * (3 / 4 + 4 / 5) / 2)
    assert m["fwIoU"] == pytest.approx(100 * (0.5 * 3 / 4 + 0.5 * 4 / 5))


def test_presets_follow_the_protocol():
    voc, city = SegmentationConfig.preset("voc"), SegmentationConfig.preset("cityscapes")
    assert voc.names() == ("voc_2012_sem_seg_train_aug", "voc_2012_sem_seg_val")
    assert (voc.crop_size, voc.max_iter, voc.base_lr, voc.weight_decay, voc.poly_power, voc.aux_weight) == (
        512, 20000, 0.01, 5e-4, 0.9, 0.4,
    )  # fmt: skip
    assert (city.crop_size, city.max_iter, city.test_mode, city.slide_stride) == (769, 40000, "slide", 513)
    assert city.names() == ("cityscapes_fine_sem_seg_train", "cityscapes_fine_sem_seg_val")
    with pytest.raises(ConfigValueError, match="dataset=") as err:
        SegmentationConfig(dataset="ade20k").validate()
    assert err.value.key == "dataset"


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.detectron2
def test_dilated_backbone_has_output_stride_8(depth):
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from densecl.transfer.segmentation import dilate_resnet

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = depth, 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1, cfg.MODEL.RESNETS.NORM = False, "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4", "res5"]
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    keys = set(backbone.state_dict())
    dilate_resnet(backbone, {"res4": 2, "res5": 4})
    assert set(backbone.state_dict()) == keys  # same parameters: converted weights still load
    out = backbone(torch.zeros(1, 3, 64, 96))
    assert out["res4"].shape[-2:] == out["res5"].shape[-2:] == (8, 12)
    assert backbone.output_shape()["res5"].stride == 8
    first, second = (backbone.res5[0], backbone.res5[1])
    spatial = "conv2" if depth >= 50 else "conv1"
    assert getattr(first, spatial).dilation == (2, 2) and getattr(second, spatial).dilation == (4, 4)


@pytest.mark.detectron2
def test_evaluator_gives_100_for_ground_truth(synthetic_root):
    from detectron2.data import DatasetCatalog

    from densecl.transfer.catalog import register_datasets
    from densecl.transfer.segmentation import SemSegMetrics, read_label

    register_datasets(["synthetic_seg_val"], synthetic_root=str(synthetic_root))
    evaluator = SemSegMetrics("synthetic_seg_val", distributed=False)
    evaluator.reset()
    for record in DatasetCatalog.get("synthetic_seg_val"):
        label = torch.as_tensor(read_label(record["sem_seg_file_name"]))
        logits = torch.nn.functional.one_hot(label, evaluator.num_classes).permute(2, 0, 1).float()
        evaluator.process([record], [{"sem_seg": logits}])
    metrics = evaluator.evaluate()["sem_seg"]
    assert metrics["mIoU"] == metrics["pAcc"] == metrics["mAcc"] == pytest.approx(100.0)


@pytest.mark.slow
@pytest.mark.detectron2
def test_tiny_run_resumes_from_its_last_checkpoint(synthetic_root, tmp_path):
    from torchvision import models

    from densecl.transfer.segmentation import run_semantic_segmentation
    from densecl.weights.export import save_backbone

    state = {k: v for k, v in models.resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    weights = save_backbone(state, tmp_path / "backbone.pth", "resnet18")
    cfg = SegmentationConfig.preset("synthetic", synthetic_root=str(synthetic_root), **TINY)
    out = tmp_path / "seg"
    first = run_semantic_segmentation(cfg, str(weights), str(out))
    assert {"mIoU", "fwIoU", "mAcc", "pAcc"} <= set(first)
    # the floor beside it: the most frequent class of the val labels everywhere, counted from the files
    from PIL import Image

    voc = synthetic_root / "voc"
    labels = np.concatenate([
        np.asarray(Image.open(voc / "SegmentationClass" / f"{name}.png")).ravel()
        for name in (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    ])  # fmt: skip
    counts = np.bincount(labels[labels != 255])
    assert first["mIoU_trivial"] == pytest.approx(100 * counts.max() / counts.sum() / np.count_nonzero(counts))
    log = [json.loads(line) for line in (out / "train_log.json").read_text().splitlines()]
    assert any("eval/mIoU" in line for line in log)  # eval_period=2: evaluated during training too

    # Simulate a run interrupted after iteration 2: it must continue from model_0000001.pth.
    (out / "metrics.json").unlink()
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000001.pth")
    (out / "train_log.json").unlink()
    second = run_semantic_segmentation(cfg, str(weights), str(out))
    iterations = [json.loads(line)["iteration"] for line in (out / "train_log.json").read_text().splitlines()]
    assert min(iterations) >= 2 and max(iterations) == cfg.max_iter - 1
    losses = [json.loads(line)["total_loss"] for line in (out / "train_log.json").read_text().splitlines()]
    assert all(math.isfinite(v) for v in losses)
    assert set(second) == set(first) and (out / "model_final.pth").is_file()
    assert "resuming from" in (out / "log.txt").read_text()


@pytest.mark.detectron2
def test_bf16_autocasts_the_training_forward_only():
    from densecl.transfer.runner import autocast_training_forward

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    keys = list(model.state_dict())
    autocast_training_forward(model, "cpu")
    x = torch.randn(2, 3, 8, 8)
    assert model.train()(x).dtype == torch.bfloat16
    assert model.eval()(x).dtype == torch.float32  # evaluation stays fp32
    assert list(model.state_dict()) == keys and model[0].weight.dtype == torch.float32


@pytest.mark.detectron2
def test_tiny_bf16_run_trains_and_evaluates(synthetic_root, tmp_path):
    from densecl.transfer.segmentation import run_semantic_segmentation

    cfg = SegmentationConfig.preset("synthetic", synthetic_root=str(synthetic_root),
                                    **{**TINY, "eval_period": 0, "amp": "bf16"})
    metrics = run_semantic_segmentation(cfg, None, str(tmp_path / "seg"))
    per_class = [v for k, v in metrics.items() if k.startswith("IoU-")]  # the mean is over the classes scored
    assert per_class and metrics["mIoU"] == pytest.approx(sum(per_class) / len(per_class))
    losses = [json.loads(line)["total_loss"] for line in (tmp_path / "seg" / "train_log.json").read_text().splitlines()]
    assert losses and all(math.isfinite(v) for v in losses)
    with pytest.raises(ConfigValueError, match="amp='fp16'"):
        SegmentationConfig.preset("synthetic", synthetic_root=str(synthetic_root), **{**TINY, "amp": "fp16"}).validate()
