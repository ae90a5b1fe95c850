"""Semantic segmentation transfer: the DenseCL mmseg fork's fcn_r50-d8 on detectron2's engine (config:
densecl.transfer.settings.SegmentationConfig).

Model, on a plain-stem ResNet as in the fork's "ResNetNormal": dilations (1, 1, 2, 4) and strides (1, 2, 1, 1),
i.e. output stride 8, with contract_dilation (the first block of a dilated stage uses half the dilation); in
BasicBlocks only the first 3x3 conv is dilated. Decode head on C5: two 3x3 convs, concat with the input, one
3x3 conv, dropout, 1x1 classifier. Auxiliary head on C4: one 3x3 conv, dropout, classifier. Cross-entropy
ignores label 255 and is averaged over all pixels (mmseg's default of that time).
Data (mmseg's pipeline): resize to img_scale x ratio (keeping the aspect ratio), random crop retried for a crop
where no class covers more than cat_max_ratio, flip, photometric distortion, every crop padded to crop_size
(0 after normalisation in the image, the ignore label in the labels).
Test: resize to img_scale, then the whole image or a sliding window; logits are resized back to the original
image for the metrics, accumulated in an int64 confusion matrix (detectron2 v0.6's SemSegEvaluator fails under
numpy 2).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    detection_utils,
)
from detectron2.evaluation import DatasetEvaluator
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, build_resnet_backbone
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from detectron2.structures import ImageList
from detectron2.utils import comm
from fvcore.common.param_scheduler import ParamScheduler
from PIL import Image
from torch import nn

from densecl.evaluation.metrics import confusion_matrix, segmentation_scores, trivial_miou
from densecl.transfer.catalog import class_names
from densecl.transfer.layouts import IGNORE_LABEL
from densecl.transfer.runner import TransferTrainer, base_d2_config, run_stage, safe_names
from densecl.transfer.settings import SegmentationConfig


# ------------------------------------------------------------------------------------------- metrics
def read_label(path: str) -> np.ndarray:
    """A label map as class indices: VOC palette PNGs give their indices, gray PNGs their values."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: label maps must be single-channel (palette or gray) PNGs, got mode {image.mode}")
        return np.asarray(image, dtype=np.int64)


class SemSegMetrics(DatasetEvaluator):
    """Accumulates a confusion matrix of argmax predictions against the label files (ignore 255)."""

    def __init__(self, dataset_name: str, distributed: bool = True):
        meta = MetadataCatalog.get(dataset_name)
        self.class_names = list(meta.stuff_classes)
        self.num_classes = len(self.class_names)
        self.ignore_label = meta.get("ignore_label", IGNORE_LABEL)
        self.distributed = distributed
        self.reset()

    def reset(self):
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            pred = out["sem_seg"].argmax(dim=0).cpu().numpy().astype(np.int64)
            gt = read_label(inp["sem_seg_file_name"])
            if gt.shape != pred.shape:
                raise ValueError(f"{inp['sem_seg_file_name']}: label {gt.shape} vs prediction {pred.shape}")
            try:
                self.confusion += confusion_matrix(pred, gt, self.num_classes, self.ignore_label)
            except ValueError as err:
                raise ValueError(f"{inp['sem_seg_file_name']}: {err}") from None

    def evaluate(self):
        confusion = self.confusion
        if self.distributed:
            comm.synchronize()
            gathered = comm.gather(confusion)
            if not comm.is_main_process():
                return {}
            confusion = np.sum(gathered, axis=0)
        scores = segmentation_scores(confusion, self.class_names)
        return {"sem_seg": {**scores, "mIoU_trivial": trivial_miou(confusion)}}


# ------------------------------------------------------------------------------------------- model
def pad_to(tensors: list[torch.Tensor], size: tuple[int, int], value: float) -> torch.Tensor:
    """The tensors (..., H, W) padded at the bottom and right with `value` to at least `size`, and to the
    largest of them, stacked."""
    height = max(size[0], *(t.shape[-2] for t in tensors))
    width = max(size[1], *(t.shape[-1] for t in tensors))
    return torch.stack([F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value) for t in tensors])


def dilate_resnet(backbone, dilations: dict[str, int], contract_dilation: bool = True) -> None:
    """Turn stride into dilation in the given detectron2 ResNet stages, in place (output stride 8 for
    {"res4": 2, "res5": 4}). The first block of a stage gets half the dilation when contract_dilation."""
    for name, dilation in dilations.items():
        stage = getattr(backbone, name)
        for i, block in enumerate(stage):
            d = dilation // 2 if (i == 0 and contract_dilation and dilation > 1) else dilation
            if isinstance(block, BottleneckBlock):
                spatial = block.conv2 if block.conv2.kernel_size == (3, 3) else None
            elif isinstance(block, BasicBlock):
                spatial = block.conv1
            else:
                raise TypeError(f"{name}.{i}: cannot dilate a {type(block).__name__}")
            if spatial is None:
                raise ValueError(f"{name}.{i}: no 3x3 conv found to dilate")
            for conv in (block.conv1, block.conv2, getattr(block, "conv3", None), block.shortcut):
                if conv is not None:
                    conv.stride = (1, 1)
            spatial.dilation = (d, d)
            spatial.padding = (d, d)
            block.stride = 1
    stride = 4
    for name in ("res2", "res3", "res4", "res5"):
        if name != "res2" and name not in dilations:
            stride *= 2
        if name in backbone._out_feature_strides:
            backbone._out_feature_strides[name] = stride


class FCNHead(nn.Module):
    """mmseg's FCNHead: num_convs 3x3 conv-norm-relu, optional concat with the input + one more conv,
    dropout, 1x1 classifier."""

    def __init__(self, in_channels, channels, num_convs, concat_input, dropout, num_classes, norm):
        super().__init__()

        def conv(cin):
            return Conv2d(cin, channels, 3, padding=1, bias=False, norm=get_norm(norm, channels), activation=F.relu)

        self.convs = nn.Sequential(*[conv(in_channels if i == 0 else channels) for i in range(num_convs)])
        self.conv_cat = conv(in_channels + channels) if concat_input else None
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.conv_seg:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x):
        y = self.convs(x)
        if self.conv_cat is not None:
            y = self.conv_cat(torch.cat([x, y], dim=1))
        return self.conv_seg(self.dropout(y))


@META_ARCH_REGISTRY.register()
class DenseCLFCN(nn.Module):
    """Dilated ResNet + FCN decode head on C5 + auxiliary FCN head on C4 (training only)."""

    def __init__(self, cfg):
        super().__init__()
        f = cfg.MODEL.FCN
        self.backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
        dilate_resnet(self.backbone, {"res4": 2, "res5": 4})
        shapes = self.backbone.output_shape()
        norm, classes = cfg.MODEL.RESNETS.NORM, f.NUM_CLASSES
        self.decode_head = FCNHead(shapes["res5"].channels, f.HEAD_CHANNELS, 2, True, f.DROPOUT, classes, norm)
        self.auxiliary_head = FCNHead(shapes["res4"].channels, f.AUX_CHANNELS, 1, False, f.DROPOUT, classes, norm)
        self.aux_weight = f.AUX_WEIGHT
        self.align_corners = f.ALIGN_CORNERS
        self.test_mode, self.crop, self.stride = f.TEST_MODE, f.CROP_SIZE, f.SLIDE_STRIDE
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    @property
    def device(self):
        return self.pixel_mean.device

    def _resize(self, x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, batched_inputs):
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        if not self.training:
            return self.inference(ImageList.from_tensors(images, 0, pad_value=0.0).tensor, batched_inputs)
        # every crop padded to crop_size (mmseg's Pad(size=crop_size) after Normalize: 0 in the image, the ignore
        # label in the labels): padded pixels cost nothing in the loss, but enter BN's statistics as mmseg's do
        crop = (self.crop, self.crop)
        images = pad_to(images, crop, 0.0)
        labels = pad_to([x["sem_seg"].to(self.device) for x in batched_inputs], crop, IGNORE_LABEL).long()
        features = self.backbone(images)
        size = labels.shape[-2:]
        main = self._resize(self.decode_head(features["res5"]), size)
        aux = self._resize(self.auxiliary_head(features["res4"]), size)
        # mean over all pixels, ignored ones included as zeros (mmseg's CrossEntropyLoss of that time)
        ce = lambda logits: F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, reduction="none").mean()  # noqa: E731
        return {"loss_sem_seg": ce(main), "loss_aux": self.aux_weight * ce(aux)}

    def _logits(self, image):
        return self._resize(self.decode_head(self.backbone(image)["res5"]), image.shape[-2:])

    def _slide(self, image):
        _, _, h, w = image.shape
        crop, stride = self.crop, self.stride
        rows = max(h - crop + stride - 1, 0) // stride + 1
        cols = max(w - crop + stride - 1, 0) // stride + 1
        total, count = None, image.new_zeros((1, 1, h, w))
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                logits = self._logits(image[:, :, y1:y2, x1:x2])
                if total is None:
                    total = image.new_zeros((1, logits.shape[1], h, w))
                total[:, :, y1:y2, x1:x2] += logits
                count[:, :, y1:y2, x1:x2] += 1
        return total / count

    def inference(self, images, batched_inputs):
        results = []
        for image, inp in zip(images, batched_inputs):
            h, w = inp["image"].shape[-2:]
            image = image[None, :, :h, :w]
            logits = self._slide(image) if self.test_mode == "slide" else self._logits(image)
            height, width = inp.get("height", h), inp.get("width", w)
            results.append({"sem_seg": self._resize(logits, (height, width))[0]})
        return results


# -------------------------------------------------------------------------------------------- data
def _rescale_size(h: int, w: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmseg's keep-ratio resize: the largest size with long side <= max(scale) and short <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if array.ndim == 2:
        return np.asarray(Image.fromarray(array.astype(np.int32)).resize(size[::-1], resample)).astype(np.int64)
    return np.asarray(Image.fromarray(array).resize(size[::-1], resample))


def _photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: brightness, contrast (before or after), saturation, hue; each p=0.5."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img = img + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img = img * rng.uniform(0.5, 1.5)
    hsv = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
    if rng.random() < 0.5:
        hsv[..., 1] = hsv[..., 1] * rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) * 256 / 180) % 256  # cv2's hue is 0-180, PIL's 0-255
    img = np.asarray(Image.fromarray(np.clip(hsv, 0, 255).astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and rng.random() < 0.5:
        img = img * rng.uniform(0.5, 1.5)
    return np.clip(img, 0, 255).astype(np.uint8)


class SegTrainMapper:
    """Dataset dict -> {"image": uint8 CHW RGB, "sem_seg": int64 HW} with mmseg's training augmentation."""

    def __init__(self, cfg):
        f = cfg.MODEL.FCN
        self.crop = f.CROP_SIZE
        self.img_scale = tuple(f.IMG_SCALE)
        self.ratio_range = tuple(f.RATIO_RANGE)
        self.cat_max_ratio = f.CAT_MAX_RATIO
        self.photometric = f.PHOTOMETRIC

    def __call__(self, record: dict) -> dict:
        rng = np.random.default_rng(torch.randint(0, 2**31, ()).item())  # seeded per worker by detectron2
        image = detection_utils.read_image(record["file_name"], format="RGB")
        label = read_label(record["sem_seg_file_name"])
        ignore = record.get("ignore_label", IGNORE_LABEL)  # a custom set's own ignore value trains as 255
        if ignore != IGNORE_LABEL:
            label = np.where(label == ignore, IGNORE_LABEL, label)
        if image.shape[:2] != label.shape:
            raise ValueError(f"{record['file_name']} is {image.shape[:2]} but its label {label.shape}")
        ratio = rng.uniform(*self.ratio_range)
        size = _rescale_size(*label.shape, (self.img_scale[0] * ratio, self.img_scale[1] * ratio))
        image, label = _resize(image, size, nearest=False), _resize(label, size, nearest=True)
        image, label = self._crop(image, label, rng)
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = _photometric(np.ascontiguousarray(image), rng)
        return {
            **record,
            "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "sem_seg": torch.as_tensor(np.ascontiguousarray(label)),
        }

    def _crop(self, image, label, rng):
        h, w = label.shape
        for _ in range(10):
            y = int(rng.integers(0, max(h - self.crop, 0) + 1))
            x = int(rng.integers(0, max(w - self.crop, 0) + 1))
            crop_label = label[y : y + self.crop, x : x + self.crop]
            if self.cat_max_ratio >= 1:
                break
            _, counts = np.unique(crop_label[crop_label != IGNORE_LABEL], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return image[y : y + self.crop, x : x + self.crop], crop_label


class SegTestMapper:
    """Dataset dict -> the image resized to img_scale (keep ratio); height/width keep the original size."""

    def __init__(self, cfg):
        self.img_scale = tuple(cfg.MODEL.FCN.IMG_SCALE)

    def __call__(self, record: dict) -> dict:
        image = detection_utils.read_image(record["file_name"], format="RGB")
        h, w = image.shape[:2]
        image = _resize(image, _rescale_size(h, w, self.img_scale), nearest=False)
        return {
            **record,
            "height": h,
            "width": w,
            "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
        }


# ------------------------------------------------------------------------------------- schedule, trainer
class PolyLR(ParamScheduler):
    """mmseg's poly schedule as a multiplier of the base lr: lr = (base - min) * (1 - t / T) ** power + min."""

    def __init__(self, floor: float, power: float):
        self.floor, self.power = floor, power  # floor = min lr / base lr

    def __call__(self, where: float) -> float:
        return (1 - self.floor) * (1 - where) ** self.power + self.floor


def poly_lr_scheduler(cfg, optimizer) -> LRMultiplier:
    """PolyLR every iteration, after detectron2's warm-up when SOLVER.WARMUP_ITERS > 0."""
    f = cfg.MODEL.FCN
    base = cfg.SOLVER.BASE_LR
    schedule = PolyLR(f.MIN_LR / base if base > 0 else 0.0, f.POLY_POWER)  # a zero base lr stays zero
    if cfg.SOLVER.WARMUP_ITERS > 0:
        length = min(cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER, 1.0)
        schedule = WarmupParamScheduler(schedule, cfg.SOLVER.WARMUP_FACTOR, length, cfg.SOLVER.WARMUP_METHOD)
    return LRMultiplier(optimizer, multiplier=schedule, max_iter=cfg.SOLVER.MAX_ITER)


class SegmentationTrainer(TransferTrainer):
    """Metrics mIoU, fwIoU, mAcc, pAcc (percent) and IoU-<class>."""

    @classmethod
    def build_d2_config(cls, cfg: SegmentationConfig, output_dir: str):
        c = base_d2_config(cfg, output_dir)
        train, test = cfg.names()
        c.DATASETS.TRAIN, c.DATASETS.TEST = (train,), (test,)
        c.MODEL.META_ARCHITECTURE = DenseCLFCN.__name__
        c.MODEL.RESNETS.OUT_FEATURES = ["res4", "res5"]
        c.SOLVER.WEIGHT_DECAY_NORM = cfg.weight_decay  # mmseg decays every parameter
        c.SOLVER.STEPS = ()
        c.DATALOADER.ASPECT_RATIO_GROUPING = False
        c.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
        c.MODEL.FCN = CfgNode(
            {
                "NUM_CLASSES": len(class_names(test)),
                "HEAD_CHANNELS": cfg.head_channels,
                "AUX_CHANNELS": cfg.aux_channels,
                "DROPOUT": cfg.dropout,
                "AUX_WEIGHT": cfg.aux_weight,
                "ALIGN_CORNERS": cfg.align_corners,
                "TEST_MODE": cfg.test_mode,
                "CROP_SIZE": cfg.crop_size,
                "SLIDE_STRIDE": cfg.slide_stride,
                "IMG_SCALE": list(cfg.img_scale),
                "RATIO_RANGE": list(cfg.ratio_range),
                "CAT_MAX_RATIO": cfg.cat_max_ratio,
                "PHOTOMETRIC": cfg.photometric,
                "POLY_POWER": cfg.poly_power,
                "MIN_LR": cfg.min_lr,
            }
        )
        return c

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=SegTrainMapper(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=SegTestMapper(cfg))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return SemSegMetrics(dataset_name)

    @classmethod
    def summarize(cls, results: dict) -> dict[str, float]:
        return {k: float(v) for k, v in safe_names(results["sem_seg"]).items()}

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return poly_lr_scheduler(cfg, optimizer)


def run_semantic_segmentation(cfg: SegmentationConfig, weights: str | None, output_dir: str) -> dict[str, float]:
    """Fine-tune the FCN on VOC, Cityscapes or the synthetic set; return mIoU, fwIoU, mAcc, pAcc (+ per class).
    weights as in densecl.transfer.detection.run_voc_detection."""
    if not isinstance(cfg, SegmentationConfig):
        raise TypeError(f"run_semantic_segmentation needs a SegmentationConfig, got {type(cfg).__name__}")
    return run_stage(SegmentationTrainer, cfg, weights, output_dir)
