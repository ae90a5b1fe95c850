"""Every setting of a transfer stage, as dataclasses whose defaults are the paper's protocols, each class's
presets written out in full beside it (`PRESETS`), and the linear rescaling of a schedule. No torch and no
detectron2: the pipeline builds and checks these in the launching process, before any job starts. Each class
checks its own fields in `validate`, next to them; every list of choices is defined here once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from densecl.data.synthetic import CLASS_CUES, FORMAT_VERSION, OBJECT_DIAMETER_FRACTION
from densecl.method.settings import ARCHS
from densecl.transfer.custom import (
    AUTO,
    DETECTION_FORMATS,
    SEGMENTATION_FORMATS,
    CustomDataError,
    CustomDataset,
    read_dataset,
)
from densecl.transfer.layouts import KNOWN_DATASETS, check_dataset, count_images, is_custom
from densecl.transfer.protocol import Deviation, compare
from densecl.typed_settings import (
    ConfigValueError,
    check,
    check_positive,
    field_values,
    from_dict,
    neutral,
    plain,
    result,
    role_of,
    validate_sections,
)

DEVICES = ("auto", "cuda", "cpu")
AMP_MODES = ("none", "bf16")  # bf16 autocast around the training forward (GPU, or CPU with AVX512-BF16)
MASK_FORMATS = ("auto", "polygon", "bitmask")  # auto: bitmask for the synthetic set's RLE masks, else polygon
TEST_MODES = ("whole", "slide")
VOC_MIN_SIZES = tuple(range(480, 801, 32))
COCO_MIN_SIZES = tuple(range(640, 801, 32))
SEGMENTATION_DATASETS = {  # SegmentationConfig.dataset -> (train set, test set)
    "voc": ("voc_2012_sem_seg_train_aug", "voc_2012_sem_seg_val"),
    "cityscapes": ("cityscapes_fine_sem_seg_train", "cityscapes_fine_sem_seg_val"),
    "synthetic": ("synthetic_seg_train", "synthetic_seg_val"),
    "custom": ("custom_seg_train", "custom_seg_val"),  # the user's own set: `custom`
}
CUSTOM_MIN_SIZES = tuple(range(320, 513, 32))


@dataclass
class SyntheticSet:
    """The synthetic detection/segmentation set the `synthetic` presets train and evaluate on, written once
    into the cache and shared by every job that asks for the same one."""

    num_train: int = result(64)
    num_val: int = result(16)
    image_size: int = result(160)
    seed: int = result(0)  # fixed across training seeds, so that those measure training noise alone
    class_cue: str = result("texture")  # what tells classes apart besides shape: texture (as pre-training's), or colour
    object_size: tuple[float, float] = result(OBJECT_DIAMETER_FRACTION)  # object diameters, fractions of the side

    def root(self, cache_dir: str | Path) -> str:
        """Its folder in `cache_dir`; the generator's format version is in the name, so a newer generator
        never meets an older set's folder, and so is every option that is not its default."""
        name = f"synthetic-v{FORMAT_VERSION}-{self.num_train}x{self.num_val}-{self.image_size}px-seed{self.seed}"
        if self.class_cue != "texture":
            name += f"-{self.class_cue}"
        if tuple(self.object_size) != OBJECT_DIAMETER_FRACTION:
            name += "-objects{:g}-{:g}".format(*self.object_size)
        return str((Path(cache_dir) / name).absolute())

    def validate(self) -> None:
        check_positive(self, "num_train", "num_val", "image_size")
        check(self.class_cue in CLASS_CUES, "class_cue", self.class_cue, f"allowed: {', '.join(CLASS_CUES)}")
        low, high = self.object_size
        check(0 < low <= high <= 1, "object_size", list(self.object_size), "allowed: [low, high], 0 < low <= high <= 1")


@dataclass
class StageConfig:
    """The fields every transfer stage has."""

    arch: str = result("resnet50")
    data_root: str = result("", protocol=False)  # real data sets; "" = $DETECTRON2_DATASETS or ./datasets
    synthetic_root: str = result("", protocol=False)  # the synthetic set's folder: written there when it holds none
    synthetic: SyntheticSet = result(factory=SyntheticSet, protocol=False)  # what the synthetic set holds
    max_iter: int = result(1000)
    ims_per_batch: int = result(16)  # total over the GPUs
    base_lr: float = result(0.02)
    momentum: float = result(0.9)
    weight_decay: float = result(1e-4)
    steps: tuple[int, ...] = result(())  # iterations where the lr is multiplied by 0.1
    warmup_iters: int = result(100)
    warmup_factor: float = result(0.001)
    clip_grad_norm: float = result(0.0)  # 0 = no clipping
    # > 1: SyncBN; detectron2 starts a process per GPU. Not compared with the protocol: BN statistics cover the
    # total batch either way (SyncBN across GPUs, plain BN in one process), and ims_per_batch is compared
    num_gpus: int = result(1, protocol=False)
    device: str = neutral("auto")  # auto: CUDA when available
    seed: int = result(0, protocol=False)
    eval_period: int = neutral(0)  # evaluate every N iterations too; 0 = only at the end
    checkpoint_period: int = neutral(5000)
    log_period: int = neutral(20)
    progress: bool = neutral(True)  # a tqdm bar of the iterations
    num_workers: int = neutral(4)
    precise_bn: bool = result(True)
    precise_bn_iters: int = result(200)
    amp: str = result("none")  # one of AMP_MODES
    custom: CustomDataset | None = result(None, protocol=False)  # the user's labelled set, read by the `custom` preset
    strict_protocol: bool = result(False, protocol=False)  # a deviation from the protocol is an error, before any work

    # Each preset's values over the class defaults (the published protocol), written out in full: what the
    # pipeline's `preset` key names. A section's ims_per_batch and max_iter then rescale them (`scaled`,
    # `shortened`), its other keys replace them.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    # what the pipeline derives itself (from downstream.synthetic and paths.cache_dir): not keys of a section
    DERIVED: ClassVar[tuple[str, ...]] = ("synthetic_root", "synthetic")
    CUSTOM_FORMATS: ClassVar[tuple[str, ...]] = ()  # the custom set formats the stage reads
    CUSTOM_TASK: ClassVar[str] = ""  # what it reads from a custom set: "detection" or "segmentation"
    PROTOCOL_EFFECTS: ClassVar[dict[str, str]] = {}  # documented effects of a deviation, by key
    # values the published code runs besides the reference's, by key: no deviation (the official repository
    # has ResNet-101 configs and results: VOC det 61.3 AP, VOC seg 74.1 mIoU)
    PROTOCOL_ALTERNATIVES: ClassVar[dict[str, tuple]] = {"arch": ("resnet50", "resnet101")}
    @classmethod
    def preset(cls, name: str, **overrides: Any):
        """The preset `name` (one of PRESETS), with `overrides` replacing its fields."""
        check(name in cls.PRESETS, "preset", name, f"allowed: null (the paper's protocol), {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def scaled(self, ims_per_batch: int):
        """Same schedule at another batch size (the linear scaling rule): lr x k, every iteration count / k,
        for k = new batch / old batch."""
        k = ims_per_batch / self.ims_per_batch
        iters = lambda n: max(1, round(n / k)) if n > 0 else n  # noqa: E731
        return dataclasses.replace(
            self,
            ims_per_batch=ims_per_batch,
            base_lr=self.base_lr * k,
            max_iter=iters(self.max_iter),
            steps=tuple(iters(s) for s in self.steps),
            warmup_iters=iters(self.warmup_iters),
            eval_period=iters(self.eval_period),
            checkpoint_period=iters(self.checkpoint_period),
        )

    def shortened(self, max_iter: int):
        """The same schedule shape in max_iter iterations: steps, warm-up, PreciseBN and the checkpoint and
        evaluation periods scaled by max_iter / old."""
        f = max_iter / self.max_iter
        iters = lambda n: max(1, round(n * f)) if n > 0 else n  # noqa: E731
        steps = sorted({iters(s) for s in self.steps if iters(s) < max_iter})
        return dataclasses.replace(
            self,
            max_iter=max_iter,
            steps=tuple(steps),
            warmup_iters=min(iters(self.warmup_iters), max_iter),
            precise_bn_iters=iters(self.precise_bn_iters),
            eval_period=iters(self.eval_period),
            checkpoint_period=iters(self.checkpoint_period),
        )

    def validate(self) -> None:
        """Raise ConfigValueError naming the first bad field."""
        check(self.arch in ARCHS, "arch", self.arch, f"allowed: {', '.join(ARCHS)}")
        check(self.device in DEVICES, "device", self.device, f"allowed: {', '.join(DEVICES)}")
        check_positive(self, "max_iter", "ims_per_batch", "num_gpus")
        check(self.device != "cpu" or self.num_gpus == 1, "num_gpus", self.num_gpus,
              "several GPUs need CUDA: device=cuda or auto")
        check(self.amp in AMP_MODES, "amp", self.amp, f"allowed: {', '.join(AMP_MODES)}")
        check(self.ims_per_batch % self.num_gpus == 0, "ims_per_batch", self.ims_per_batch,
              f"must be divisible by num_gpus={self.num_gpus}")
        check(list(self.steps) == sorted(self.steps) and all(0 < s < self.max_iter for s in self.steps), "steps",
              self.steps, f"must be increasing and inside (0, max_iter={self.max_iter})")
        validate_sections(self, ("synthetic",))
        self.check_protocol()
        reads_custom = any(is_custom(n) for n in self.dataset_names())
        check(reads_custom == (self.custom is not None), "custom", self.custom,
              "the `custom` preset reads a set given here (format, root, ...); other presets read none")
        if self.custom is not None:
            validate_sections(self, ("custom",))
            check(self.custom.format in (AUTO, *self.CUSTOM_FORMATS), "custom.format", self.custom.format,
                  f"this stage reads {', '.join(self.CUSTOM_FORMATS)} (or {AUTO}: found from the folder)")

    def own_protocol(self) -> str | None:
        """'synthetic' or 'custom' when the stage runs on such a set: that preset is its own protocol."""
        names = self.dataset_names()
        if any(is_custom(n) for n in names):
            return "custom"
        if any(n.startswith("synthetic_") for n in names):
            return "synthetic"
        return None

    def protocol(self) -> StageConfig:
        """The published protocol this stage reproduces (the paper's runs: 8 GPUs, hence SyncBN)."""
        raise NotImplementedError

    def deviations(self) -> list[Deviation]:
        """Each setting that differs from the published protocol; none on a synthetic or custom set."""
        if self.own_protocol() is not None:
            return []
        return compare(self, self.protocol(), self.PROTOCOL_EFFECTS, self._derived_protocol_values(),
                       self.PROTOCOL_ALTERNATIVES)

    def _derived_protocol_values(self) -> dict:
        return {}

    def check_protocol(self) -> None:
        """With strict_protocol, a deviation is a ConfigValueError listing them all."""
        deviations = self.deviations() if self.strict_protocol else []
        check(not deviations, "strict_protocol", True,
              "the stage deviates from its published protocol: " + "; ".join(map(str, deviations)))

    def norm(self) -> str:
        """SyncBN across several GPUs (the protocol), plain BN in one process (what SyncBN reduces to)."""
        return "SyncBN" if self.num_gpus > 1 else "BN"

    def dataset_names(self) -> list[str]:
        raise NotImplementedError

    def input_sizes(self) -> dict[str, Any]:
        """The image sizes the stage trains and tests at, as a plan shows them."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """The resolved numbers a plan shows (pipelines.plan): learning rate, total batch, schedule, input sizes,
        and each data set with its image count."""
        return {
            "lr": self.base_lr,
            "total_batch": self.ims_per_batch,
            "norm": f"{self.norm()} over {self.num_gpus} GPU{'s' * (self.num_gpus > 1)}",
            "iterations": self.max_iter,
            "lr_steps": list(self.steps),
            "warmup_iterations": self.warmup_iters,
            **self.input_sizes(),
            "amp": self.amp,
            "data": {name: self._image_count(name) for name in self.dataset_names()},
            **({"vs_custom_preset": self._against_custom_preset()} if self.own_protocol() == "custom" else {}),
        }

    def _against_custom_preset(self) -> dict[str, str] | str:
        """What a run on the user's set changes from the `custom` preset in what it trains and how it is scored
        (the protocol's fields: a CPU-sized schedule shrinks them): {field: 'value (custom: preset's)'}."""
        reference = self.preset("custom", arch=self.arch)
        changed = {}
        for f in dataclasses.fields(self):
            value, preset = getattr(self, f.name), getattr(reference, f.name)
            if role_of(f).protocol and plain(value) != plain(preset):
                changed[f.name] = f"{_shown(value)} (custom: {_shown(preset)})"
        return changed or "none"

    def _image_count(self, name: str) -> str:
        if name.startswith("synthetic_"):
            count = self.synthetic.num_val if name.endswith("_val") else self.synthetic.num_train
            return f"{count} images"
        try:
            if is_custom(name):
                prepared = self._custom_set()
                return f"{prepared.num_images('val' if name.endswith('_val') else 'train')} images ({prepared.name})"
            return f"{count_images(name, self.data_root or None)} images"
        except (FileNotFoundError, CustomDataError) as err:
            return f"not readable: {err}"

    def check_data(self) -> None:
        """Every real data set the stage reads is in place (the synthetic set is written when the stage runs);
        else ConfigValueError on `data_root` naming the missing file or folder and the expected layout."""
        if self.custom is not None:
            try:
                self._custom_set()
            except CustomDataError as err:
                raise ConfigValueError("custom.root", self.custom.root, str(err)) from None
        for name in self.dataset_names():
            if name.startswith("synthetic_") or is_custom(name):
                continue
            try:
                _check_layout(name, self.data_root or None, self.synthetic_root or None)
            except FileNotFoundError as err:
                raise ConfigValueError("data_root", self.data_root, f"data set {name}: {err}") from None

    def _custom_set(self):
        """The user's set read and checked, once per process (`_read_custom`)."""
        return _read_custom(json.dumps(plain(self.custom), sort_keys=True), self.CUSTOM_TASK)

    @classmethod
    def from_section(cls, section: Mapping[str, Any], *, arch: str, device: str, seed: int,
                     synthetic: SyntheticSet | None = None, cache_dir: str | None = None) -> StageConfig:
        """The stage config a pipeline section describes, validated; errors' keys are relative to the section.

        `preset` names one of PRESETS (absent or None: the paper's protocol, the class defaults); a key set to
        None keeps the preset's value; `ims_per_batch` rescales the preset's schedule (`scaled`), `max_iter`
        squeezes it (`shortened`); every other key replaces the field. arch, device and seed are the pipeline's
        unless the section sets them. The synthetic preset reads (and the stage writes, once) the set that
        `synthetic` describes, under `cache_dir`."""
        values = {k: v for k, v in section.items() if v is not None}
        preset = values.pop("preset", None)
        fields = sorted(f.name for f in dataclasses.fields(cls))
        for key in sorted(values):
            check(key in fields, key, values[key], f"allowed keys: preset, {', '.join(fields)}")
        values = field_values(cls, values)
        context = {"arch": values.pop("arch", arch), "device": values.pop("device", device),
                   "seed": values.pop("seed", seed)}
        batch, iters = values.pop("ims_per_batch", None), values.pop("max_iter", None)
        check(batch is None or batch >= 1, "ims_per_batch", batch, "allowed: an integer >= 1")
        check(iters is None or iters >= 1, "max_iter", iters, "allowed: an integer >= 1")
        if preset == "synthetic":
            if synthetic is not None and not isinstance(synthetic, SyntheticSet):
                synthetic = from_dict(SyntheticSet, synthetic, "synthetic.")
            check(synthetic is not None, "preset", preset, "needs downstream.synthetic (the data set to write)")
            if cache_dir is None:
                raise TypeError("from_section: the synthetic preset needs cache_dir (where the set is written)")
            context.update(synthetic_root=synthetic.root(cache_dir), synthetic=synthetic)
        base = cls(**context) if preset is None else cls.preset(preset, **context)
        if batch is not None:
            base = base.scaled(batch)
        if iters is not None:
            base = base.shortened(iters)
        stage_cfg = dataclasses.replace(base, **values)
        stage_cfg.validate()
        return stage_cfg


# The launcher checks every job of a sweep, and the jobs mostly share their data sets: each set is read once
# per process (a failed check is not remembered, so a fixed folder is read again).
@functools.lru_cache(maxsize=64)
def _check_layout(name: str, data_root: str | None, synthetic_root: str | None) -> None:
    check_dataset(name, data_root, synthetic_root)


@functools.lru_cache(maxsize=16)
def _read_custom(dataset_json: str, task: str):
    """The user's set read and checked (densecl.transfer.custom.read_dataset), once per process for the plan's
    counts and the checks of a sweep's jobs."""
    return read_dataset(from_dict(CustomDataset, json.loads(dataset_json)), task)


def _shown(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


# ------------------------------------------------------------------------------------------- detection
@dataclass
class DetectionConfig(StageConfig):
    train_datasets: tuple[str, ...] = result(())  # names in densecl.transfer.layouts.KNOWN_DATASETS
    test_dataset: str = result("")
    min_size_train: tuple[int, ...] = result((800,))  # short side, one drawn per image
    max_size_train: int = result(1333)
    min_size_test: int = result(800)
    max_size_test: int = result(1333)
    rpn_pre_nms_topk_train: int = result(12000)
    rpn_post_nms_topk_train: int = result(2000)
    rpn_pre_nms_topk_test: int = result(6000)
    rpn_post_nms_topk_test: int = result(1000)
    roi_batch_size_per_image: int = result(512)
    detections_per_image: int = result(100)
    score_thresh_test: float = result(0.05)  # boxes scored below it are not reported

    CUSTOM_FORMATS: ClassVar[tuple[str, ...]] = DETECTION_FORMATS
    CUSTOM_TASK: ClassVar[str] = "detection"

    def dataset_names(self) -> list[str]:
        return [*self.train_datasets, self.test_dataset]

    def input_sizes(self) -> dict[str, Any]:
        return {"train_short_side": list(self.min_size_train), "train_long_side_max": self.max_size_train,
                "test_short_side": self.min_size_test, "test_long_side_max": self.max_size_test}

    def protocol(self) -> DetectionConfig:
        return type(self)(num_gpus=8)

    def validate(self) -> None:
        super().validate()
        check(bool(self.train_datasets) and all(n in KNOWN_DATASETS for n in self.train_datasets), "train_datasets",
              self.train_datasets, f"allowed: a list of {', '.join(KNOWN_DATASETS)}")
        check(self.test_dataset in KNOWN_DATASETS, "test_dataset", self.test_dataset,
              f"allowed: {', '.join(KNOWN_DATASETS)}")


@dataclass
class VOCDetectionConfig(DetectionConfig):
    """Faster R-CNN R50-C4 with MoCo's extra BN after res5, FREEZE_AT 0, PreciseBN: VOC07+12 trainval ->
    VOC07 test, short side 480-800 (test 800), 24k iterations at batch 16."""

    train_datasets: tuple[str, ...] = result(("voc_2007_trainval", "voc_2012_trainval"))
    test_dataset: str = result("voc_2007_test")
    min_size_train: tuple[int, ...] = result(VOC_MIN_SIZES)
    max_iter: int = result(24000)
    ims_per_batch: int = result(16)
    base_lr: float = result(0.02)
    steps: tuple[int, ...] = result((18000, 22000))
    warmup_iters: int = result(100)
    extra_norm: bool = result(True)  # a norm layer on the C4 box head's res5 output (MoCo's Res5ROIHeadsExtraNorm)

    PROTOCOL_EFFECTS: ClassVar[dict[str, str]] = {
        "ims_per_batch": "a total batch under 16 gave VOC AP 48-51 where the released model gives 56.5 at 16 "
        "(DenseCL#6); BN statistics (SyncBN's in the protocol) cover fewer images too",
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The user's own set: the protocol at batch 8 (the linear rule) squeezed into 4000 iterations, short side
        # 320-512 (test 512), evaluated 5 times.
        "custom": dict(
            train_datasets=("custom_det_train",), test_dataset="custom_det_val",
            min_size_train=CUSTOM_MIN_SIZES, max_size_train=853, min_size_test=512, max_size_test=853,
            ims_per_batch=8, base_lr=0.01, max_iter=4000, steps=(3000, 3667), warmup_iters=17, precise_bn_iters=17,
            eval_period=800, checkpoint_period=833,
        ),
        # A CPU-sized run on the synthetic set: ResNet-18 on 160 px scenes, fewer proposals and sampled boxes,
        # gradient clipping (random-init runs diverge without it), the protocol at batch 8 squeezed into 2000
        # iterations.
        "synthetic": dict(
            arch="resnet18", train_datasets=("synthetic_voc_train",), test_dataset="synthetic_voc_val",
            min_size_train=(128, 160, 192), max_size_train=320, min_size_test=160, max_size_test=320,
            rpn_post_nms_topk_train=500, rpn_post_nms_topk_test=300, roi_batch_size_per_image=128,
            ims_per_batch=8, base_lr=0.01, max_iter=2000, steps=(1500, 1833), warmup_iters=8, precise_bn_iters=20,
            clip_grad_norm=10.0, checkpoint_period=417, num_workers=2,
        ),
    }  # fmt: skip


@dataclass
class COCODetectionConfig(DetectionConfig):
    """Mask R-CNN R50-FPN 1x with a 4conv1fc box head and norm in backbone, FPN, box and mask heads:
    coco_2017_train -> coco_2017_val, short side 640-800, 90k iterations at batch 16."""

    train_datasets: tuple[str, ...] = result(("coco_2017_train",))
    test_dataset: str = result("coco_2017_val")
    min_size_train: tuple[int, ...] = result(COCO_MIN_SIZES)
    rpn_pre_nms_topk_train: int = result(2000)  # per FPN level
    rpn_post_nms_topk_train: int = result(1000)
    rpn_pre_nms_topk_test: int = result(1000)
    rpn_post_nms_topk_test: int = result(1000)
    max_iter: int = result(90000)
    ims_per_batch: int = result(16)
    base_lr: float = result(0.02)
    steps: tuple[int, ...] = result((60000, 80000))
    warmup_iters: int = result(1000)
    box_head_convs: int = result(4)
    box_head_fcs: int = result(1)
    mask_format: str = result("auto")  # one of MASK_FORMATS

    PROTOCOL_EFFECTS: ClassVar[dict[str, str]] = {
        "ims_per_batch": "BN statistics in the backbone, FPN, box and mask heads (SyncBN's in the protocol) cover "
        "fewer images",
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The user's own set: as VOC detection's custom preset, on this stage's schedule (batch 8, 4000
        # iterations).
        "custom": dict(
            train_datasets=("custom_det_train",), test_dataset="custom_det_val",
            min_size_train=CUSTOM_MIN_SIZES, max_size_train=853, min_size_test=512, max_size_test=853,
            ims_per_batch=8, base_lr=0.01, max_iter=4000, steps=(2667, 3556), warmup_iters=44, precise_bn_iters=4,
            eval_period=800, checkpoint_period=222,
        ),
        # A CPU-sized run on the synthetic set: as VOC detection's synthetic preset, with fewer proposals per
        # FPN level, on this stage's schedule (batch 8, 2000 iterations).
        "synthetic": dict(
            arch="resnet18", train_datasets=("synthetic_coco_train",), test_dataset="synthetic_coco_val",
            min_size_train=(128, 160, 192), max_size_train=320, min_size_test=160, max_size_test=320,
            rpn_pre_nms_topk_train=1000, rpn_post_nms_topk_train=500, rpn_post_nms_topk_test=300,
            roi_batch_size_per_image=128,
            ims_per_batch=8, base_lr=0.01, max_iter=2000, steps=(1333, 1778), warmup_iters=22, precise_bn_iters=20,
            clip_grad_norm=10.0, checkpoint_period=111, num_workers=2,
        ),
    }  # fmt: skip

    def validate(self) -> None:
        super().validate()
        check(self.mask_format in MASK_FORMATS, "mask_format", self.mask_format,
              f"allowed: {', '.join(MASK_FORMATS)}")


# ----------------------------------------------------------------------------------------- segmentation
@dataclass
class SegmentationConfig(StageConfig):
    """The DenseCL mmseg fork's FCN on a dilated ResNet (output stride 8). The defaults are the VOC protocol:
    VOC12 train_aug -> val, 21 classes, crop 512, 20k iterations at batch 16, whole-image test, poly lr from
    0.01 down to 1e-4, no warm-up."""

    dataset: str = result("voc")  # a key of SEGMENTATION_DATASETS: picks train_dataset / test_dataset when those are ""
    train_dataset: str = result("")
    test_dataset: str = result("")
    crop_size: int = result(512)
    img_scale: tuple[int, int] = result((2048, 512))  # (long, short) side, times a ratio from ratio_range in training
    ratio_range: tuple[float, float] = result((0.5, 2.0))
    cat_max_ratio: float = result(0.75)  # random crops retry (up to 10 times) while one class covers more than this
    photometric: bool = result(True)  # mmseg's PhotoMetricDistortion
    test_mode: str = result("whole")  # one of TEST_MODES: the whole image, or crop_size windows every slide_stride px
    slide_stride: int = result(513)
    align_corners: bool = result(False)
    head_channels: int = result(512)  # decode head on C5
    aux_channels: int = result(256)  # auxiliary head on C4 (training only)
    dropout: float = result(0.1)
    aux_weight: float = result(0.4)
    poly_power: float = result(0.9)
    min_lr: float = result(1e-4)
    max_iter: int = result(20000)
    ims_per_batch: int = result(16)
    base_lr: float = result(0.01)
    weight_decay: float = result(5e-4)
    warmup_iters: int = result(0)
    precise_bn: bool = result(False)  # mmseg keeps the training statistics

    CUSTOM_FORMATS: ClassVar[tuple[str, ...]] = SEGMENTATION_FORMATS
    CUSTOM_TASK: ClassVar[str] = "segmentation"
    PROTOCOL_EFFECTS: ClassVar[dict[str, str]] = {
        "ims_per_batch": "VOC segmentation on 2 GPUs (a smaller total batch) reproduced 62 mIoU against 69.4 "
        "(DenseCL#38)",
        "data sets": "VOC2012 without the SBD aug set reproduced 46.9 mIoU against 69.4 (DenseCL#19)",
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "voc": {},  # the class defaults
        # 19 classes, crop 769, 40k iterations at batch 8, sliding-window test, align_corners.
        "cityscapes": dict(
            dataset="cityscapes", crop_size=769, img_scale=(2049, 1025), test_mode="slide", slide_stride=513,
            align_corners=True, max_iter=40000, ims_per_batch=8,
        ),
        # The user's own set: the VOC protocol at batch 8 (the linear rule) squeezed into 4000 iterations, crop
        # 384 of images scaled to a 384 px short side (x 0.5-2), evaluated 5 times.
        "custom": dict(
            dataset="custom", crop_size=384, img_scale=(1536, 384),
            ims_per_batch=8, base_lr=0.005, max_iter=4000, precise_bn_iters=20, eval_period=800,
            checkpoint_period=1000,
        ),
        # A CPU-sized run on the synthetic set: ResNet-18, 160 px scenes, crop 128, batch 8 at the protocol's lr,
        # 2000 iterations, gradient clipping.
        "synthetic": dict(
            dataset="synthetic", arch="resnet18", crop_size=128, img_scale=(640, 160), max_iter=2000,
            ims_per_batch=8, num_workers=2, clip_grad_norm=10.0,
        ),
    }  # fmt: skip

    def protocol(self) -> SegmentationConfig:
        return self.preset("cityscapes" if self.dataset == "cityscapes" else "voc", num_gpus=4)

    def _derived_protocol_values(self) -> dict:
        # the data sets as names() resolves them ("" means the dataset's own), compared once
        return {"data sets": (self.names(), self.protocol().names()), "dataset": (None, None),
                "train_dataset": (None, None), "test_dataset": (None, None)}

    def names(self) -> tuple[str, str]:
        """(train set, test set)."""
        check(self.dataset in SEGMENTATION_DATASETS, "dataset", self.dataset,
              f"allowed: {', '.join(SEGMENTATION_DATASETS)}")
        train, test = SEGMENTATION_DATASETS[self.dataset]
        return self.train_dataset or train, self.test_dataset or test

    def dataset_names(self) -> list[str]:
        return list(self.names())

    def input_sizes(self) -> dict[str, Any]:
        return {"train_crop": self.crop_size, "scale_long_short": list(self.img_scale),
                "train_scale_ratio": list(self.ratio_range), "test_mode": self.test_mode}

    def validate(self) -> None:
        super().validate()
        self.names()
        for key in ("train_dataset", "test_dataset"):
            value = getattr(self, key)
            check(value == "" or value in KNOWN_DATASETS, key, value,
                  f"allowed: '' (the dataset's own) or one of {', '.join(KNOWN_DATASETS)}")
        check(self.test_mode in TEST_MODES, "test_mode", self.test_mode, f"allowed: {', '.join(TEST_MODES)}")
