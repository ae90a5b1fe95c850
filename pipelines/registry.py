"""The pipeline's stages, one record each, in the order they run: the one table the schema (a `downstream.<stage>`
section per stage with settings), the runner, the console, the report, the docs and the tests read.

Adding a stage is one record here plus its runner: a function `(job, stage name) -> {metric: value}` that works
in `job.stage_dir(name)` (pipelines.stages has the built-in ones). Runners are named by import path, so that
composing and checking a config never imports torch or detectron2; a test may give the function itself.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from densecl.evaluation.settings import LinearClassifierConfig, LinearProbeConfig
from densecl.transfer.settings import COCODetectionConfig, SegmentationConfig, VOCDetectionConfig


@dataclass(frozen=True)
class Stage:
    name: str
    runner: str | Callable[..., dict[str, float]]  # "module:function", or the function
    settings: type | None = None  # the dataclass of `downstream.<name>`; None: the stage has no section there
    headline: tuple[str, ...] = ()  # the figures it is judged by, in the order shown
    # what a trivial predictor scores, shown beside the headline: a metric the stage reports, or a constant
    baseline: str | float | None = None
    baseline_label: str = "trivial"
    needs_weights: bool = True  # starts from the pre-trained backbone (random weights under model=random_init)
    with_random_init: bool = True  # runs for model=random_init too (nothing to pre-train or convert there)
    optional: bool = False  # runs only when listed in `stages` (it needs the user's data)
    all_processes: bool = False  # runs on every process of the job (else on global rank 0 only)
    # what a plan shows of a stage without a section ("module:function" or the function, `(pipeline settings,
    # world size) -> {key: value}`); a stage with one shows its settings' summary()
    describe: str | Callable[..., dict[str, Any]] | None = None

    def run(self, job: Any) -> dict[str, float]:
        return _resolve(self.runner)(job, self.name)

    def description(self, settings: Any, world_size: int) -> dict[str, Any]:
        return {} if self.describe is None else _resolve(self.describe)(settings, world_size)

    def trivial(self, metrics: dict[str, float]) -> float | None:
        """The trivial baseline of these metrics (None: the stage has none, or did not report it)."""
        if isinstance(self.baseline, str):
            return metrics.get(self.baseline)
        return self.baseline


def _resolve(function: str | Callable) -> Callable:
    if isinstance(function, str):
        module, _, name = function.partition(":")
        function = getattr(importlib.import_module(module), name)
    return function


class StageRegistry:
    """The stages by name, in pipeline order."""

    def __init__(self, stages: list[Stage]):
        self._stages = {stage.name: stage for stage in stages}
        self.version = 0  # bumped on every change: the schema built from the table is rebuilt then

    def __getitem__(self, name: str) -> Stage:
        return self._stages[name]

    def __contains__(self, name: object) -> bool:
        return name in self._stages

    def __iter__(self) -> Iterator[Stage]:
        return iter(self._stages.values())

    def names(self) -> list[str]:
        return list(self._stages)

    def default_names(self) -> list[str]:
        """What `stages` lists when a config does not say: every stage but the optional ones."""
        return [s.name for s in self if not s.optional]

    def with_settings(self) -> list[Stage]:
        """The stages with a `downstream.<name>` section."""
        return [s for s in self if s.settings is not None]

    @contextlib.contextmanager
    def added(self, stage: Stage, before: str | None = None) -> Iterator[Stage]:
        """`stage` in the table (before the stage `before`, else last) while the context lasts."""
        if stage.name in self._stages:
            raise ValueError(f"a stage named {stage.name!r} is already registered")
        saved = dict(self._stages)
        order = list(saved.values())
        order.insert(list(saved).index(before) if before is not None else len(order), stage)
        self._stages = {s.name: s for s in order}
        self.version += 1
        try:
            yield stage
        finally:
            self._stages = saved
            self.version += 1


STAGES = StageRegistry([
    Stage("pretrain", "pipelines.stages:run_pretrain", headline=("loss", "corr_acc_eval"), needs_weights=False,
          with_random_init=False, all_processes=True, describe="pipelines.plan:pretraining_summary"),
    Stage("convert", "pipelines.stages:run_convert", headline=("num_tensors",), with_random_init=False,
          describe="pipelines.plan:conversion_summary"),
    Stage("det_voc", "pipelines.stages:run_det_voc", VOCDetectionConfig, ("AP", "AP50"), baseline=0.0),
    Stage("det_coco", "pipelines.stages:run_det_coco", COCODetectionConfig, ("bbox/AP", "segm/AP"), baseline=0.0),
    Stage("seg_voc", "pipelines.stages:run_segmentation", SegmentationConfig, ("mIoU",), baseline="mIoU_trivial"),
    Stage("seg_cityscapes", "pipelines.stages:run_segmentation", SegmentationConfig, ("mIoU",),
          baseline="mIoU_trivial"),
    Stage("probe", "pipelines.stages:run_probe", LinearProbeConfig, ("mIoU",), baseline="mIoU_trivial"),
    Stage("classify", "pipelines.stages:run_classify", LinearClassifierConfig, ("top1",), baseline="top1_chance",
          baseline_label="chance", optional=True),
])  # fmt: skip
