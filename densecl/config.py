"""Every setting of a pre-training run, as dataclasses: the library's arguments and, section by section, the
pipeline's Hydra schema (`conf/` only sets values). Each section checks its own fields in `validate`, right
below them, and every list of choices is defined here once. No torch import: the pipeline composes and
checks configs before any job starts, without it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
MAX_REGIONS = 16


class Matching(StrEnum):
    """How each query cell finds its positive key cell (DenseCL Table 6; `backbone` is the paper's)."""

    backbone = "backbone"  # argmax of backbone-feature similarity
    projection = "projection"  # argmax of the projected dense vectors' similarity
    random = "random"  # a random key cell: a lower bound
    geometric = "geometric"  # the cell the crop geometry says shows the same image point


class ModelName(StrEnum):
    densecl = "densecl"
    mocov2 = "mocov2"  # DenseCL with λ = 0: exactly MoCo v2
    random_init = "random_init"  # no pre-training: downstream stages start from random weights


class DataKind(StrEnum):
    synthetic = "synthetic"  # generated scenes (densecl.synthetic): no download
    image_folder = "image_folder"  # any folder of images, searched recursively, labels unused


class AugmentOn(StrEnum):
    """Where the two-view augmentation runs (both give the same distributions: tests/test_gpu_augment.py)."""

    cpu = "cpu"  # PIL, one image at a time, in the data-loader workers (the official code's path)
    gpu = "gpu"  # batched on the training device (kornia); the workers only read files: JPEGs decode there too


class Amp(StrEnum):
    none = "none"
    bf16 = "bf16"  # on any device (oneDNN runs it about 2x faster than fp32 on a recent CPU)
    fp16 = "fp16"  # CUDA only, with a grad scaler


class LrSchedule(StrEnum):
    """When the cosine schedule moves: every iteration, or once per epoch as mmcv's CosineAnnealing does
    with by_epoch (the official configs)."""

    iteration = "iteration"
    epoch = "epoch"


class ConfigValueError(ValueError):
    """A setting that is well-typed but cannot run: names the key (dotted, from the config's root), the
    value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        shown = value.value if isinstance(value, Enum) else value
        super().__init__(f"{key}={shown!r} is invalid: {allowed}")

    def within(self, section: str) -> ConfigValueError:
        """The same error, its key prefixed by the section that holds it."""
        return ConfigValueError(f"{section}.{self.key}", self.value, self.allowed)


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigValueError(key, value, allowed)


def check_positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        check(value is None or value >= 1, name, value, "allowed: an integer >= 1")


def validate_sections(config: Any, names: tuple[str, ...], **kwargs: Any) -> None:
    """Each named section's `validate(**kwargs)`, its errors' keys prefixed with the section's name."""
    for name in names:
        try:
            getattr(config, name).validate(**kwargs.get(name, {}))
        except ConfigValueError as err:
            raise err.within(name) from None


# ---------------------------------------------------------------------------------------------- sections


@dataclass
class BackboneConfig:
    arch: str = "resnet50"

    def validate(self) -> None:
        check(self.arch in ARCHS, "arch", self.arch, f"allowed: {', '.join(ARCHS)}")


@dataclass
class ModelConfig:
    """DenseCL's own hyper-parameters."""

    name: ModelName = ModelName.densecl
    loss_lambda: float = 0.5  # L = (1 - λ) L_global + λ L_dense
    lambda_warmup_iters: int = 0  # λ = 0 for the first N iterations (Table 5's 1.0* row)
    num_regions: int | None = None  # S: the dense grid is pooled to S x S; None = the backbone's own grid
    feat_dim: int = 128
    temperature: float = 0.2
    momentum: float = 0.999  # of the key encoder

    def validate(self) -> None:
        check(0.0 <= self.loss_lambda <= 1.0, "loss_lambda", self.loss_lambda,
              "allowed: a value in [0, 1] (0 = MoCo v2)")
        check(self.name != ModelName.mocov2 or self.loss_lambda == 0.0, "loss_lambda", self.loss_lambda,
              "model=mocov2 is DenseCL with lambda = 0")
        check(self.lambda_warmup_iters >= 0, "lambda_warmup_iters", self.lambda_warmup_iters,
              "allowed: an integer >= 0")
        check(self.num_regions is None or 1 <= self.num_regions <= MAX_REGIONS, "num_regions", self.num_regions,
              f"allowed: null (native grid) or 1..{MAX_REGIONS}")
        check_positive(self, "feat_dim")
        check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "allowed: a value in [0, 1)")
        check(self.temperature > 0, "temperature", self.temperature, "allowed: a value > 0")


@dataclass
class MatchingConfig:
    name: Matching = Matching.backbone

    def validate(self) -> None:
        check(self.name in tuple(Matching), "name", self.name, f"allowed: {', '.join(Matching)}")


@dataclass
class DataConfig:
    """The unlabelled images pre-training reads."""

    kind: DataKind = DataKind.synthetic
    root: str | None = None  # image_folder
    num_images: int = 2048  # synthetic: number of scenes
    image_size: int = 160  # synthetic: scene side in pixels
    seed: int = 0  # synthetic: fixed across training seeds, so that those measure training noise alone
    augment_on: AugmentOn = AugmentOn.cpu
    # synthetic: generate the scenes once into one uint8 array in this folder, shared by every run and job that
    # asks for the same scenes (the same pixels as generating them on the fly); None = generate on the fly
    cache_dir: str | None = None

    def validate(self, check_paths: bool = False) -> None:
        check(self.kind in tuple(DataKind), "kind", self.kind, f"allowed: {', '.join(DataKind)}")
        check(self.augment_on in tuple(AugmentOn), "augment_on", self.augment_on,
              f"allowed: {', '.join(AugmentOn)}")
        if self.kind == DataKind.image_folder:
            check(bool(self.root), "root", None, "data kind image_folder needs data.root=/path/to/images")
            if check_paths:
                check(Path(self.root).is_dir(), "root", self.root,
                      "allowed: an existing folder of images (it does not exist)")
        else:
            check_positive(self, "num_images", "image_size")


@dataclass
class FigureConfig:
    """The correspondence figure drawn after pre-training (densecl.visualize): a by-product."""

    enabled: bool = True
    num_images: int = 4
    threshold: float = 0.9  # mutual nearest neighbours above this cosine similarity (the paper's figure)
    crop_size: int | None = None  # None = pretrain.crop_size

    def validate(self) -> None:
        check(-1.0 <= self.threshold <= 1.0, "threshold", self.threshold, "allowed: a cosine similarity in [-1, 1]")
        check_positive(self, "num_images", "crop_size")


EVAL_VOC_FILES = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/train.txt",
                  "ImageSets/Segmentation/val.txt")  # what a VOC2012 folder needs to serve as the signals' set


def missing_voc_files(root: str | Path) -> list[str]:
    """The parts of a VOC2012 segmentation folder that `root` lacks (none: it can be the signals' set)."""
    return [name for name in EVAL_VOC_FILES if not (Path(root) / name).exists()]


@dataclass
class TrainingConfig:
    """The `pretrain` section: schedule, optimiser and runtime. The method's hyper-parameters are `model`'s."""

    weights: str | None = None  # no pre-training: downstream stages start from this backbone or checkpoint
    crop_size: int = 224
    batch_size: int = 32  # per process
    queue_len: int = 65536  # both queues; divisible by the global batch (keys are enqueued a batch at a time)
    num_workers: int = 4
    base_lr: float = 0.03  # per 256 images, scaled linearly with the total batch
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9
    warmup_iters: int = 0  # linear lr warm-up
    iters: int | None = None  # exactly one of iters / epochs
    epochs: int | None = 200
    lr_schedule: LrSchedule = LrSchedule.iteration  # cosine to 0, stepped per iteration or per epoch
    amp: Amp = Amp.none
    compile: bool = False  # torch.compile the step's encoders (the first steps are slower while it compiles)
    channels_last: bool = True  # on GPU, and on CPU under bf16 (no gain for fp32 on CPU)
    sync_bn: bool = False  # GPU only
    shuffle_bn: bool = True
    bn_splits: int = 1  # BN groups per process (densecl.split_bn): the paper's per-GPU BN in one process
    corr_eval_crop: int | None = None  # correspondence accuracy on fixed view pairs at this crop (e.g. 160)
    corr_eval_pairs: int = 64
    corr_eval_every: int = 100  # iterations; a multiple of log_every (also at 0 and at the end)
    # feature-quality signals (densecl.quality: dense probe and k-NN on a small labelled set), also at 0 and at
    # the end: every N iterations, None = 4 times over the schedule (densecl.quality.QUALITY_EVALS), 0 = off
    eval_every: int | None = None
    # the labelled set: "scenes" (built in) or a VOC2012 folder (JPEGImages, SegmentationClass,
    # ImageSets/Segmentation/{train,val}.txt); the pipeline's "auto" takes {paths.data_dir}/VOC2012 when it is there
    eval_data: str = "scenes"
    eval_num_train: int = 64  # labelled images the probe and k-NN fit on (the first of VOC's train.txt)
    eval_num_val: int = 32  # and score on (the first of VOC's val.txt)
    eval_size: int = 96  # their side in pixels, as the backbone sees them
    deterministic: bool = False
    ckpt_every: int = 1000
    log_every: int = 10
    progress: bool = True  # a tqdm bar
    figure: FigureConfig = field(default_factory=FigureConfig)

    def validate(self, world_size: int = 1, check_paths: bool = False) -> None:
        check((self.iters is None) != (self.epochs is None), "iters", self.iters,
              f"set exactly one of pretrain.iters / pretrain.epochs ({self.epochs})")
        check_positive(self, "iters", "epochs", "crop_size", "batch_size", "queue_len", "ckpt_every", "log_every",
                       "bn_splits")
        check(self.warmup_iters >= 0, "warmup_iters", self.warmup_iters, "allowed: an integer >= 0")
        check(self.num_workers >= 0, "num_workers", self.num_workers, "allowed: an integer >= 0")
        check(self.lr_schedule != LrSchedule.epoch or self.epochs is not None, "lr_schedule", self.lr_schedule,
              "a per-epoch schedule needs the length in pretrain.epochs")
        check(self.amp in tuple(Amp), "amp", self.amp, f"allowed: {', '.join(Amp)}")
        global_batch = self.batch_size * world_size
        check(self.queue_len % global_batch == 0, "queue_len", self.queue_len,
              f"must be divisible by the global batch {global_batch} "
              f"(pretrain.batch_size={self.batch_size} x {world_size} processes)")
        check(self.batch_size % self.bn_splits == 0, "bn_splits", self.bn_splits,
              f"must divide pretrain.batch_size={self.batch_size} into equal BN groups")
        check(self.bn_splits == 1 or not self.sync_bn, "bn_splits", self.bn_splits,
              "with pretrain.sync_bn=true: choose split BN or SyncBN, not both")
        check(self.eval_every is None or self.eval_every >= 0, "eval_every", self.eval_every,
              "allowed: null (a few times over the schedule), 0 (off) or an integer >= 1")
        check(self.eval_data != "auto" and bool(self.eval_data), "eval_data", self.eval_data,
              "allowed: scenes, or a VOC2012 folder (auto is the pipeline's: it resolves to one of them)")
        if check_paths and self.eval_every != 0 and self.eval_data != "scenes":
            missing = missing_voc_files(self.eval_data)
            check(not missing, "eval_data", self.eval_data,
                  f"a VOC2012 folder must hold {', '.join(EVAL_VOC_FILES)}; missing: {', '.join(missing)}")
        check_positive(self, "eval_num_train", "eval_num_val")
        check(self.eval_size >= 32, "eval_size", self.eval_size, "allowed: an integer >= 32")
        if self.corr_eval_crop is not None:
            check(self.corr_eval_crop >= 32, "corr_eval_crop", self.corr_eval_crop, "allowed: a crop >= 32 px")
            check_positive(self, "corr_eval_pairs", "corr_eval_every")
            check(self.corr_eval_every % self.log_every == 0, "corr_eval_every", self.corr_eval_every,
                  f"must be a multiple of pretrain.log_every={self.log_every}")
        validate_sections(self, ("figure",))


@dataclass
class PretrainConfig:
    """Everything one pre-training run depends on, in the sections of the pipeline's config."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainingConfig = field(default_factory=TrainingConfig)
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("backbone", "model", "matching", "data", "pretrain")

    def validate(self, world_size: int = 1, check_paths: bool = False) -> None:
        """Raise ConfigValueError naming the first bad setting."""
        validate_sections(
            self, self.SECTIONS, data={"check_paths": check_paths},
            pretrain={"world_size": world_size, "check_paths": check_paths},
        )

    def to_dict(self) -> dict[str, Any]:
        """The pre-training settings as plain values (enums as strings), this class's fields only: what a
        checkpoint records."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(PretrainConfig)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PretrainConfig:
        """From `to_dict`'s output, or from a checkpoint written before the settings had sections."""
        if "arch" in values:
            values = _sections_from_flat(values)
        return from_dict(cls, values)


# Checkpoints written before the settings had sections kept one flat dict: where its keys live now (the
# rest are `pretrain`'s).
_FLAT_KEYS = {
    "arch": ("backbone", "arch"),
    "matching": ("matching", "name"),
    **{k: ("model", k) for k in ("feat_dim", "num_regions", "loss_lambda", "lambda_warmup_iters", "temperature",
                                  "momentum")},
    **{k: ("", k) for k in ("seed", "device", "data")},
}


def _sections_from_flat(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"": {}}
    for key, value in flat.items():
        section, name = _FLAT_KEYS.get(key, ("pretrain", key))
        out.setdefault(section, {})[name] = value
    return {**out.pop(""), **out}


# ------------------------------------------------------------------------------------ dict conversions


def plain(value: Any) -> Any:
    """Dataclasses as dicts, enums as their values, tuples as lists: what JSON, torch's weights-only loader
    and a comparison with a saved copy all accept."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def from_dict(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass `cls` from plain values: nested sections, enums and tuples rebuilt, missing
    fields at their defaults (a folder saved before a field existed ran as its default), an unknown key an
    error that lists the known ones."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigValueError(f"{prefix}{unknown[0]}", values[unknown[0]], f"unknown key; known: {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        kind = _concrete_type(hints[name])
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = from_dict(kind, value, f"{prefix}{name}.")
        elif isinstance(kind, type) and issubclass(kind, Enum) and value is not None:
            try:
                value = kind(value)
            except ValueError:
                raise ConfigValueError(f"{prefix}{name}", value, f"allowed: {', '.join(kind)}") from None
        elif kind is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _concrete_type(hint: Any) -> Any:
    """`X | None` -> X; `tuple[int, ...]` -> tuple; anything else as it is."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _concrete_type(args[0]) if len(args) == 1 else hint
    return origin or hint


def flatten(tree: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": 2} -> {"a.b": 1, "c": 2}; an empty mapping stays a leaf."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, sep, name + sep))
        else:
            flat[name] = value
    return flat
