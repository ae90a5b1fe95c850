"""Object detection transfer, the paper's protocol on MoCo's detectron2 recipe: VOC Faster R-CNN C4 with an
extra BN after res5, COCO Mask R-CNN FPN with a 4conv1fc box head. ResNet-18/34 backbones work in both; the
C4 box head then uses a BasicBlock res5 (512 channels). Configs: densecl.transfer.settings.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

from densecl.transfer.catalog import class_names
from densecl.transfer.layouts import is_custom
from densecl.transfer.runner import TransferTrainer, base_d2_config, flat_metrics, run_stage, safe_names
from densecl.transfer.settings import COCODetectionConfig, DetectionConfig, VOCDetectionConfig

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- models
@ROI_HEADS_REGISTRY.register()
class AnyDepthRes5ROIHeads(Res5ROIHeads):
    """Res5ROIHeads whose res5 matches the backbone: BasicBlocks (512 channels) for ResNet-18/34."""

    @classmethod
    def _build_res5_block(cls, cfg):
        depth = cfg.MODEL.RESNETS.DEPTH
        if depth not in (18, 34):
            return super()._build_res5_block(cfg)
        out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
        num_blocks = {18: 2, 34: 3}[depth]
        blocks = ResNet.make_stage(
            BasicBlock,
            num_blocks,
            stride_per_block=[2] + [1] * (num_blocks - 1),
            in_channels=out_channels // 2,
            out_channels=out_channels,
            norm=cfg.MODEL.RESNETS.NORM,
        )
        return blocks, out_channels


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(AnyDepthRes5ROIHeads):
    """MoCo's C4 head for fine-tuning with BN: one more norm layer on the res5 output."""

    @classmethod
    def _build_res5_block(cls, cfg):
        blocks, out_channels = super()._build_res5_block(cfg)
        seq = nn.Sequential(*blocks) if isinstance(blocks, (list, tuple)) else blocks
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels


def _detection_d2_config(cfg: DetectionConfig, output_dir: str, zoo_config: str):
    c = base_d2_config(cfg, output_dir, zoo_config)
    c.DATASETS.TRAIN = tuple(cfg.train_datasets)
    c.DATASETS.TEST = (cfg.test_dataset,)
    c.MODEL.ROI_HEADS.NUM_CLASSES = len(class_names(cfg.test_dataset))
    c.INPUT.MIN_SIZE_TRAIN = tuple(cfg.min_size_train)
    c.INPUT.MAX_SIZE_TRAIN = cfg.max_size_train
    c.INPUT.MIN_SIZE_TEST = cfg.min_size_test
    c.INPUT.MAX_SIZE_TEST = cfg.max_size_test
    c.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.rpn_pre_nms_topk_train
    c.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.rpn_post_nms_topk_train
    c.MODEL.RPN.PRE_NMS_TOPK_TEST = cfg.rpn_pre_nms_topk_test
    c.MODEL.RPN.POST_NMS_TOPK_TEST = cfg.rpn_post_nms_topk_test
    c.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = cfg.roi_batch_size_per_image
    c.TEST.DETECTIONS_PER_IMAGE = cfg.detections_per_image
    c.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.score_thresh_test
    return c


# ----------------------------------------------------------------------------------------- trainers
class StageLogCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator whose pycocotools printout (its progress lines and the 12-line summary table, printed to
    stdout) goes to this module's log, i.e. the stage's log.txt, with the rest of detectron2's output; the
    terminal keeps the stage's headline line."""

    def evaluate(self, img_ids=None):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            results = super().evaluate(img_ids)
        for line in printed.getvalue().splitlines():
            if line.strip():
                logger.info("pycocotools: %s", line.rstrip())
        return results


def _coco_evaluator(dataset_name: str, output_folder: str | None, masks: bool):
    """COCO's evaluator, per class too, on boxes (and masks): COCO and the user's own sets
    (densecl.transfer.custom writes them as COCO JSONs). use_fast_impl=False: the fast COCOeval is C++ in
    detectron2._C; pycocotools gives the same numbers."""
    tasks = ("bbox", "segm") if masks else ("bbox",)
    return StageLogCOCOEvaluator(dataset_name, tasks=tasks, distributed=True, output_dir=output_folder,
                                 use_fast_impl=False)


def _zero_without_detections(results: dict) -> dict:
    """COCOEvaluator gives NaN for every metric of a task when the model detected nothing: AP, AP50 and AP75
    are then 0 (nothing found), not undefined."""
    out = dict(results)
    for task, metrics in results.items():
        if metrics and all(math.isnan(v) for v in metrics.values()):
            logger.warning("%s: no detection on the test set; AP, AP50 and AP75 are 0", task)
            out[task] = {**metrics, "AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    return out


def _defined(flat: dict[str, float]) -> dict[str, float]:
    """NaN metrics (no ground truth in that size range) left out, and said so in the log."""
    undefined = sorted(k for k, v in flat.items() if math.isnan(v))
    if undefined:
        logger.info("metrics undefined on this set (no ground truth of that kind), not reported: %s", undefined)
    return {k: v for k, v in flat.items() if not math.isnan(v)}


class VOCDetectionTrainer(TransferTrainer):
    """Metrics AP, AP50, AP75 (PascalVOCDetectionEvaluator: VOC07 11-point AP for year-2007 test sets); on a
    custom set COCO's AP, AP50, AP75, APs/m/l and AP-<class>."""

    @classmethod
    def build_d2_config(cls, cfg: VOCDetectionConfig, output_dir: str):
        c = _detection_d2_config(cfg, output_dir, "PascalVOC-Detection/faster_rcnn_R_50_C4.yaml")
        c.MODEL.ROI_HEADS.NAME = Res5ROIHeadsExtraNorm.__name__ if cfg.extra_norm else AnyDepthRes5ROIHeads.__name__
        return c

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if is_custom(dataset_name):
            return _coco_evaluator(dataset_name, output_folder, masks=False)  # the C4 model has no mask head
        return PascalVOCDetectionEvaluator(dataset_name)

    @classmethod
    def summarize(cls, results: dict) -> dict[str, float]:
        return _defined({k: float(v) for k, v in safe_names(_zero_without_detections(results)["bbox"]).items()})


class COCODetectionTrainer(TransferTrainer):
    """Metrics bbox/AP, bbox/AP50, ... segm/... and per class bbox/AP-<class>, segm/AP-<class> (COCOEvaluator
    through pycocotools)."""

    @classmethod
    def build_d2_config(cls, cfg: COCODetectionConfig, output_dir: str):
        c = _detection_d2_config(cfg, output_dir, "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
        norm = cfg.norm()
        c.MODEL.FPN.NORM = norm
        c.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        c.MODEL.ROI_BOX_HEAD.NUM_CONV = cfg.box_head_convs
        c.MODEL.ROI_BOX_HEAD.NUM_FC = cfg.box_head_fcs
        c.MODEL.ROI_BOX_HEAD.NORM = norm
        c.MODEL.ROI_MASK_HEAD.NORM = norm
        c.MODEL.MASK_ON = True
        synthetic = any(n.startswith("synthetic_") for n in cfg.train_datasets)
        auto = "bitmask" if synthetic else "polygon"
        if cfg.custom is not None:  # boxes only when the set has no masks; RLE masks need bitmasks
            meta = MetadataCatalog.get(cfg.test_dataset)
            c.MODEL.MASK_ON, auto = meta.has_masks, meta.mask_format
        c.INPUT.MASK_FORMAT = cfg.mask_format if cfg.mask_format != "auto" else auto
        return c

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # masks unless the set has none (a custom set of boxes; build_d2_config then turns the mask head off)
        masks = MetadataCatalog.get(dataset_name).get("has_masks", True)
        return _coco_evaluator(dataset_name, output_folder, masks)

    @classmethod
    def summarize(cls, results: dict) -> dict[str, float]:
        """Flat bbox/... and segm/... metrics; NaN ones (no ground truth in that size range) are left out."""
        return _defined(flat_metrics(_zero_without_detections(results)))


# ------------------------------------------------------------------------------------------- stages
def run_voc_detection(cfg: VOCDetectionConfig, weights: str | None, output_dir: str) -> dict[str, float]:
    """Fine-tune Faster R-CNN C4 on VOC (or the synthetic VOC set) and return AP, AP50, AP75.

    weights: None (random init), a file densecl.weights.published.load_backbone_weights accepts (converted inside), or a
    detectron2 .pkl. Output folder, resume and metrics.json: densecl.transfer.runner."""
    if not isinstance(cfg, VOCDetectionConfig):
        raise TypeError(f"run_voc_detection needs a VOCDetectionConfig, got {type(cfg).__name__}")
    return run_stage(VOCDetectionTrainer, cfg, weights, output_dir)


def run_coco_detection(cfg: COCODetectionConfig, weights: str | None, output_dir: str) -> dict[str, float]:
    """Fine-tune Mask R-CNN FPN on COCO (or the synthetic COCO set); return bbox/... and segm/... metrics.
    weights as in run_voc_detection."""
    if not isinstance(cfg, COCODetectionConfig):
        raise TypeError(f"run_coco_detection needs a COCODetectionConfig, got {type(cfg).__name__}")
    return run_stage(COCODetectionTrainer, cfg, weights, output_dir)
