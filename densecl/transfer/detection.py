"""Object detection transfer (the paper's protocol, MoCo's detectron2 recipe): VOC Faster R-CNN C4, COCO Mask R-CNN FPN.

API:
    run_voc_detection(cfg: VOCDetectionConfig, weights: str | None, output_dir: str) -> dict[str, float]
        keys AP, AP50, AP75 (PascalVOCDetectionEvaluator; VOC07 11-point AP for year-2007 test sets).
    run_coco_detection(cfg: COCODetectionConfig, weights: str | None, output_dir: str) -> dict[str, float]
        keys bbox/AP, bbox/AP50, bbox/AP75, bbox/APs, bbox/APm, bbox/APl, segm/... and per-class
        bbox/AP-<class>, segm/AP-<class> (COCOEvaluator through pycocotools).
    weights: None (random init), a file densecl.export.load_backbone_weights accepts (converted inside), or
    a detectron2 .pkl. Output folder, resume and metrics.json: see densecl.transfer.engine.

Configs (flat dataclasses; defaults = the paper's protocol; all StageConfig fields of engine.py too):
    DetectionConfig fields: train_datasets (tuple), test_dataset, min_size_train (tuple), max_size_train,
        min_size_test, max_size_test, rpn_pre_nms_topk_train, rpn_post_nms_topk_train,
        rpn_pre_nms_topk_test, rpn_post_nms_topk_test, roi_batch_size_per_image, detections_per_image.
    VOCDetectionConfig: Faster R-CNN R50-C4 with the extra BN after res5 (extra_norm), FREEZE_AT 0,
        SyncBN with several GPUs (BN on one), PreciseBN; train voc_2007_trainval + voc_2012_trainval, test
        voc_2007_test, short side 480-800 (step 32), test 800; 24k iterations, batch 16, lr 0.02, steps
        18k/22k, warm-up 100. `VOCDetectionConfig.synthetic(root, **overrides)`: a small run on the
        synthetic set (ResNet-18, 160 px).
    COCODetectionConfig: Mask R-CNN R50-FPN 1x with a 4conv1fc box head (box_head_convs, box_head_fcs) and
        norm in backbone, FPN, box and mask heads; mask_format ("auto": bitmask for the synthetic set's RLE
        masks, polygon for COCO); coco_2017_train -> coco_2017_val, 90k iterations, steps
        60k/80k, short side 640-800. `COCODetectionConfig.synthetic(root, **overrides)` likewise.
    Smaller schedules: cfg.scaled(ims_per_batch) (linear scaling rule), cfg.shortened(max_iter).
ResNet-18/34 backbones work in both; the C4 box head then uses a BasicBlock res5 (512 channels).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass

from densecl.transfer.engine import StageConfig, base_d2_config, flatten_results, run_stage, transfer_trainer_class

logger = logging.getLogger(__name__)

VOC_MIN_SIZES = tuple(range(480, 801, 32))
COCO_MIN_SIZES = tuple(range(640, 801, 32))


@dataclass
class DetectionConfig(StageConfig):
    train_datasets: tuple[str, ...] = ()
    test_dataset: str = ""
    min_size_train: tuple[int, ...] = (800,)
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    rpn_pre_nms_topk_train: int = 12000
    rpn_post_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 6000
    rpn_post_nms_topk_test: int = 1000
    roi_batch_size_per_image: int = 512
    detections_per_image: int = 100

    def dataset_names(self) -> list[str]:
        return [*self.train_datasets, self.test_dataset]


@dataclass
class VOCDetectionConfig(DetectionConfig):
    train_datasets: tuple[str, ...] = ("voc_2007_trainval", "voc_2012_trainval")
    test_dataset: str = "voc_2007_test"
    min_size_train: tuple[int, ...] = VOC_MIN_SIZES
    max_iter: int = 24000
    ims_per_batch: int = 16
    base_lr: float = 0.02
    steps: tuple[int, ...] = (18000, 22000)
    warmup_iters: int = 100
    extra_norm: bool = True

    @classmethod
    def synthetic(cls, root: str, **overrides) -> VOCDetectionConfig:
        """A CPU-sized run on the synthetic set: the protocol's shape at batch 8 and 160 px images."""
        return _synthetic_preset(cls, root, "synthetic_voc", overrides)


@dataclass
class COCODetectionConfig(DetectionConfig):
    train_datasets: tuple[str, ...] = ("coco_2017_train",)
    test_dataset: str = "coco_2017_val"
    min_size_train: tuple[int, ...] = COCO_MIN_SIZES
    rpn_pre_nms_topk_train: int = 2000  # per FPN level
    rpn_post_nms_topk_train: int = 1000
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_test: int = 1000
    max_iter: int = 90000
    ims_per_batch: int = 16
    base_lr: float = 0.02
    steps: tuple[int, ...] = (60000, 80000)
    warmup_iters: int = 1000
    box_head_convs: int = 4
    box_head_fcs: int = 1
    mask_format: str = "auto"  # "polygon" (COCO's files), "bitmask" (RLE: the synthetic set), auto = by set

    @classmethod
    def synthetic(cls, root: str, **overrides) -> COCODetectionConfig:
        """A CPU-sized run on the synthetic set (ResNet-18, batch 8, 160 px)."""
        return _synthetic_preset(cls, root, "synthetic_coco", overrides, rpn_pre_nms_topk_train=1000)


# The CPU-sized shape both synthetic presets share: ResNet-18 on 160 px scenes, fewer proposals and sampled
# boxes, gradient clipping (random-init runs diverge without it), batch 8 and 2000 iterations.
SYNTHETIC_PRESET = dict(
    arch="resnet18",
    min_size_train=(128, 160, 192),
    max_size_train=320,
    min_size_test=160,
    max_size_test=320,
    rpn_post_nms_topk_train=500,
    rpn_post_nms_topk_test=300,
    roi_batch_size_per_image=128,
    precise_bn_iters=20,
    num_workers=2,
    clip_grad_norm=10.0,
)


def _synthetic_preset(cls, root: str, prefix: str, overrides: dict, **specific):
    base = cls(
        **SYNTHETIC_PRESET,
        **specific,
        synthetic_root=str(root),
        train_datasets=(f"{prefix}_train",),
        test_dataset=f"{prefix}_val",
    )
    return dataclasses.replace(base.scaled(8).shortened(2000), **overrides)


# ------------------------------------------------------------------------------------------- models
@functools.cache
def register_roi_heads() -> None:
    """Register the C4 box heads (once): any-depth res5, and MoCo's variant with a BN after it."""
    from detectron2.layers import get_norm
    from detectron2.modeling import ROI_HEADS_REGISTRY
    from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
    from detectron2.modeling.roi_heads import Res5ROIHeads
    from torch import nn

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
    from densecl.transfer.data import class_names

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
    return c


@functools.cache
def voc_trainer():
    """The VOC stage's trainer class (built on first use: detectron2 is imported here, not at import)."""
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    register_roi_heads()

    class VOCDetectionTrainer(transfer_trainer_class()):
        @classmethod
        def build_d2_config(cls, cfg: VOCDetectionConfig, output_dir: str):
            c = _detection_d2_config(cfg, output_dir, "PascalVOC-Detection/faster_rcnn_R_50_C4.yaml")
            c.MODEL.ROI_HEADS.NAME = "Res5ROIHeadsExtraNorm" if cfg.extra_norm else "AnyDepthRes5ROIHeads"
            return c

        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return PascalVOCDetectionEvaluator(dataset_name)

        @classmethod
        def summarize(cls, results: dict) -> dict[str, float]:
            return {k: float(results["bbox"][k]) for k in ("AP", "AP50", "AP75")}

    return VOCDetectionTrainer


@functools.cache
def coco_trainer():
    """The COCO stage's trainer class (built on first use)."""
    from detectron2.evaluation import COCOEvaluator

    class COCODetectionTrainer(transfer_trainer_class()):
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
            c.INPUT.MASK_FORMAT = (
                cfg.mask_format if cfg.mask_format != "auto" else "bitmask" if synthetic else "polygon"
            )
            return c

        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            # use_fast_impl=False: the fast COCOeval is C++ in detectron2._C; pycocotools gives the same numbers.
            return COCOEvaluator(
                dataset_name, tasks=("bbox", "segm"), distributed=True, output_dir=output_folder, use_fast_impl=False
            )

        @classmethod
        def summarize(cls, results: dict) -> dict[str, float]:
            """Flat bbox/... and segm/... metrics; NaN ones (no ground truth in that size range) are left out."""
            flat = flatten_results(results)
            undefined = sorted(k for k, v in flat.items() if math.isnan(v))
            if undefined:
                logger.info("metrics undefined on this set (no ground truth of that kind), not reported: %s", undefined)
            return {k: v for k, v in flat.items() if not math.isnan(v)}

    return COCODetectionTrainer


def run_voc_detection(cfg: VOCDetectionConfig, weights: str | None, output_dir: str) -> dict[str, float]:
    """Fine-tune Faster R-CNN C4 on VOC (or the synthetic VOC set) and return AP, AP50, AP75."""
    if not isinstance(cfg, VOCDetectionConfig):
        raise TypeError(f"run_voc_detection needs a VOCDetectionConfig, got {type(cfg).__name__}")
    return run_stage("densecl.transfer.detection:voc_trainer", cfg, weights, output_dir)


def run_coco_detection(cfg: COCODetectionConfig, weights: str | None, output_dir: str) -> dict[str, float]:
    """Fine-tune Mask R-CNN FPN on COCO (or the synthetic COCO set); return bbox/... and segm/... metrics."""
    if not isinstance(cfg, COCODetectionConfig):
        raise TypeError(f"run_coco_detection needs a COCODetectionConfig, got {type(cfg).__name__}")
    return run_stage("densecl.transfer.detection:coco_trainer", cfg, weights, output_dir)
