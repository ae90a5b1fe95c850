"""Pre-training's settings: schedule, optimiser and runtime (`pretrain`), and `PretrainConfig`, every section one
pre-training run depends on, which a checkpoint records. No torch: the pipeline composes and checks them before
any job starts.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from densecl.data.settings import DataConfig
from densecl.data.voc import SEGMENTATION_PARTS, missing_segmentation_parts
from densecl.method.settings import BackboneConfig, MatchingConfig, ModelConfig
from densecl.typed_settings import check, check_positive, from_dict, neutral, plain, result, validate_sections


class Amp(StrEnum):
    none = "none"
    bf16 = "bf16"  # on any device (oneDNN runs it about 2x faster than fp32 on a recent CPU)
    fp16 = "fp16"  # CUDA only, with a grad scaler


class LrSchedule(StrEnum):
    """When the cosine schedule moves: every iteration, or once per epoch as mmcv's CosineAnnealing does
    with by_epoch (the official configs)."""

    iteration = "iteration"
    epoch = "epoch"


LR_REFERENCE_BATCH = 256


@dataclass
class FigureConfig:
    """The correspondence figure drawn after pre-training (densecl.evaluation.correspondence_figure): a by-product."""

    enabled: bool = neutral(True)
    num_images: int = neutral(4)
    threshold: float = neutral(0.9)  # mutual nearest neighbours above this cosine similarity (the paper's figure)
    crop_size: int | None = neutral(None)  # None = pretrain.crop_size

    def validate(self) -> None:
        check(-1.0 <= self.threshold <= 1.0, "threshold", self.threshold, "allowed: a cosine similarity in [-1, 1]")
        check_positive(self, "num_images", "crop_size")


@dataclass
class TrainingConfig:
    """The `pretrain` section: schedule, optimiser and runtime. The method's hyper-parameters are `model`'s."""

    weights: str | None = result(None)  # no pre-training: downstream stages start from this backbone/checkpoint
    crop_size: int = result(224)
    batch_size: int = result(32)  # per process
    queue_len: int = result(65536)  # both queues; divisible by the global batch (keys enqueue a batch at a time)
    num_workers: int = neutral(4)
    base_lr: float = result(0.03)  # per 256 images, scaled linearly with the total batch
    weight_decay: float = result(1e-4)
    sgd_momentum: float = result(0.9)
    warmup_iters: int = result(0)  # linear lr warm-up
    iters: int | None = result(None)  # exactly one of iters / epochs
    epochs: int | None = result(200)
    lr_schedule: LrSchedule = result(LrSchedule.iteration)  # cosine to 0, stepped per iteration or per epoch
    amp: Amp = result(Amp.none)
    compile: bool = neutral(False)  # torch.compile the step's encoders (the first steps are slower: it compiles)
    channels_last: bool = result(True)  # on GPU, and on CPU under bf16 (no gain for fp32 on CPU)
    sync_bn: bool = result(False)  # GPU only
    shuffle_bn: bool = result(True)
    bn_splits: int = result(1)  # BN groups per process (densecl.method.split_bn): per-GPU BN in one process
    corr_eval_crop: int | None = result(None)  # correspondence accuracy on fixed view pairs at this crop (e.g. 160)
    corr_eval_pairs: int = result(64)
    corr_eval_every: int = result(100)  # iterations; a multiple of log_every (also at 0 and at the end)
    # feature-quality signals (densecl.evaluation.quality: dense probe and k-NN on a small labelled set), also at
    # 0 and at the end: every N iterations, None = 4 times over the schedule (quality.QUALITY_EVALS), 0 = off
    eval_every: int | None = result(None)
    # the labelled set: "scenes" (built in) or a VOC2012 folder (JPEGImages, SegmentationClass,
    # ImageSets/Segmentation/{train,val}.txt); the pipeline's "auto" takes {paths.data_dir}/VOC2012 when it is there
    eval_data: str = result("scenes")
    eval_num_train: int = result(64)  # labelled images the probe and k-NN fit on (the first of VOC's train.txt)
    eval_num_val: int = result(32)  # and score on (the first of VOC's val.txt)
    eval_size: int = result(96)  # their side in pixels, as the backbone sees them
    deterministic: bool = result(False)
    ckpt_every: int = neutral(1000)
    log_every: int = neutral(10)
    progress: bool = neutral(True)  # a tqdm bar
    figure: FigureConfig = neutral(factory=FigureConfig)

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
            missing = missing_segmentation_parts(self.eval_data)
            check(not missing, "eval_data", self.eval_data,
                  f"a VOC2012 folder must hold {', '.join(SEGMENTATION_PARTS)}; missing: {', '.join(missing)}")
        check_positive(self, "eval_num_train", "eval_num_val")
        check(self.eval_size >= 32, "eval_size", self.eval_size, "allowed: an integer >= 32")
        if self.corr_eval_crop is not None:
            check(self.corr_eval_crop >= 32, "corr_eval_crop", self.corr_eval_crop, "allowed: a crop >= 32 px")
            check_positive(self, "corr_eval_pairs", "corr_eval_every")
            check(self.corr_eval_every % self.log_every == 0, "corr_eval_every", self.corr_eval_every,
                  f"must be a multiple of pretrain.log_every={self.log_every}")
        validate_sections(self, ("figure",))

    def scaled_lr(self, world_size: int) -> float:
        """`base_lr` is per 256 images; the total batch scales it linearly."""
        return self.base_lr * self.batch_size * world_size / LR_REFERENCE_BATCH


@dataclass
class PretrainConfig:
    """Everything one pre-training run depends on, in the sections of the pipeline's config."""

    backbone: BackboneConfig = result(factory=BackboneConfig)
    model: ModelConfig = result(factory=ModelConfig)
    matching: MatchingConfig = result(factory=MatchingConfig)
    data: DataConfig = result(factory=DataConfig)
    pretrain: TrainingConfig = result(factory=TrainingConfig)
    seed: int = result(0)
    device: str = neutral("auto")  # auto: CUDA when available

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("backbone", "model", "matching", "data", "pretrain")

    def validate(self, world_size: int = 1, check_paths: bool = False) -> None:
        """Raise ConfigValueError naming the first bad setting."""
        validate_sections(
            self, self.SECTIONS, data={"check_paths": check_paths},
            pretrain={"world_size": world_size, "check_paths": check_paths},
        )

    def schedule(self, num_images: int, world_size: int = 1) -> tuple[int, int]:
        """(steps per epoch, total steps); an epoch drops the tail that does not fill a global batch."""
        global_batch = self.pretrain.batch_size * world_size
        steps_per_epoch = num_images // global_batch
        if steps_per_epoch == 0:
            raise ValueError(
                f"the data set has {num_images} images, fewer than one global batch of {global_batch}: "
                f"lower pretrain.batch_size or add images"
            )
        epochs = self.pretrain.epochs
        return steps_per_epoch, self.pretrain.iters if epochs is None else epochs * steps_per_epoch

    def summary(self, num_images: int, world_size: int = 1) -> dict[str, Any]:
        """The resolved numbers a plan shows (pipelines.plan): learning rate, total batch, schedule, data."""
        train = self.pretrain
        total = train.batch_size * world_size
        steps_per_epoch, iterations = self.schedule(num_images, world_size)
        return {
            "method": f"{self.model.name} (lambda {self.model.loss_lambda}, matching {self.matching.name})",
            "lr": self.pretrain.scaled_lr(world_size),
            "total_batch": f"{total} ({train.batch_size} x {world_size} process{'es' * (world_size > 1)})",
            "iterations": iterations,
            "epochs": round(iterations / steps_per_epoch, 2),
            "warmup_iterations": train.warmup_iters,
            "crop": train.crop_size,
            "queue": train.queue_len,
            "amp": train.amp,
            "data": f"{self.data.kind}: {num_images} images",
        }

    def to_dict(self) -> dict[str, Any]:
        """The pre-training settings as plain values (enums as strings), this class's fields only: what a
        checkpoint records."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(PretrainConfig)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PretrainConfig:
        """From `to_dict`'s output (a checkpoint's record); fields added since at their defaults."""
        return from_dict(cls, values)
