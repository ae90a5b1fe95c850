"""`plan=true`: what a run or a sweep would do, printed before anything runs, so that a sweep's effective settings
are seen before it spends GPU-hours.

For every job: its folder, and for each stage it would run, the settings it resolves to (learning rate, total
batch, iterations and lr steps, input sizes, each data set with its image count: the stage settings'
`summary()`), its protocol status with each deviation, and whether it is new, resumes (from which iteration) or
is done, with the iterations left to run. Nothing is trained, no folder is made and no mlflow store is
touched. The same resolved settings are recorded as `plan.<stage>.<key>` params on each job's mlflow run
(pipelines.callbacks).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from densecl.data.settings import DataKind
from densecl.resume import SettingsChangedError, reuse
from densecl.training.checkpoint import CHECKPOINT_NAME
from densecl.transfer import protocol
from densecl.typed_settings import flatten
from pipelines import schema
from pipelines.registry import STAGES
from pipelines.schema import PipelineConfig
from pipelines.stages import planned_stages, read_done, stage_settings
from pipelines.tracking import as_params

DETECTRON2_CHECKPOINT = "last_checkpoint"  # detectron2's record of a stage's newest checkpoint


@dataclass
class StagePlan:
    stage: str
    status: str  # new, resumes at iteration N, done, or why it would refuse
    iterations_to_run: int | None  # None: the stage has no iterations (convert)
    settings: dict[str, Any] = field(default_factory=dict)  # what it resolves to
    protocol: str | None = None  # paper, deviates, or the preset that is its own protocol
    deviations: list[str] = field(default_factory=list)


def launcher_world_size(config: DictConfig) -> int:
    """Processes per job under the configured launcher (submitit: nodes x tasks per node; basic: one)."""
    launcher = config.hydra.launcher if "hydra" in config else {}
    return int(launcher.get("nodes") or 1) * int(launcher.get("tasks_per_node") or 1)


def plan_job(cfg: DictConfig, job_dir: Path, world_size: int = 1) -> list[StagePlan]:
    """The plan of one job whose composed config is `cfg` and whose folder is `job_dir`."""
    settings = schema.settings(cfg)
    plans = []
    for stage in planned_stages(settings):
        resolved, stage_cfg = stage_summary(settings, stage, world_size)
        iterations = resolved.get("iterations")
        status, to_run = stage_status(cfg, job_dir / stage, stage, iterations)
        plan = StagePlan(stage, status, to_run, resolved)
        if hasattr(stage_cfg, "deviations"):
            deviations = stage_cfg.deviations()
            plan.protocol = protocol.status(deviations, stage_cfg.own_protocol())
            plan.deviations = [str(d) for d in deviations]
        plans.append(plan)
    return plans


def stage_summary(settings: PipelineConfig, stage: str, world_size: int) -> tuple[dict[str, Any], Any]:
    """(the resolved settings a plan shows, the stage's settings object or None)."""
    record = STAGES[stage]
    if record.settings is None:
        return record.description(settings, world_size), None
    stage_cfg = settings.stage_config(stage)
    summary = stage_cfg.summary() if hasattr(stage_cfg, "summary") else as_params(vars(stage_cfg))
    return summary, stage_cfg


def pretraining_summary(settings: PipelineConfig, world_size: int) -> dict[str, Any]:
    data = settings.data
    images = data.num_images if data.kind == DataKind.synthetic else count_image_files(data.root)
    return settings.pretrain_config().summary(images, world_size)


def conversion_summary(settings: PipelineConfig, world_size: int) -> dict[str, Any]:
    source = settings.pretrain.weights or "the pre-trained backbone (pretrain/backbone.pth)"
    return {"weights": f"{source} -> detectron2's names (convert/backbone.pkl)"}


@functools.lru_cache(maxsize=8)
def count_image_files(root: str) -> int:
    """Image files under `root` by their suffix, headers unread (the engine's folder scan reads them)."""
    from densecl.data.sources import IMAGE_EXTENSIONS

    return sum(1 for _, _, files in os.walk(root) for name in files if name.lower().endswith(IMAGE_EXTENSIONS))


def stage_status(cfg: DictConfig, folder: Path, stage: str, iterations: int | None) -> tuple[str, int | None]:
    """(new / resumes at iteration N / done / refused, the iterations left to run)."""
    done = read_done(folder)
    if done is not None:
        try:
            reuse(folder, done.get("settings"), stage_settings(cfg, stage), finished=True,
                  schema=schema.pipeline_schema())
        except SettingsChangedError as err:
            changes = "; ".join(f"{key}: {old!r} then, {new!r} now" for key, old, new in err.changes)
            return f"refused: done with other settings ({changes}): run under another name=", 0
        return "done", 0
    start = iterations_done(folder, iterations)
    if start:
        return f"resumes at iteration {start}", None if iterations is None else iterations - start
    return "new", iterations


def iterations_done(folder: Path, iterations: int | None) -> int:
    """The iterations an unfinished stage's checkpoint holds (0: none)."""
    if (folder / CHECKPOINT_NAME).is_file():  # the pre-training engine's
        import torch

        return int(torch.load(folder / CHECKPOINT_NAME, map_location="cpu", mmap=True, weights_only=True)["step"])
    if (folder / DETECTRON2_CHECKPOINT).is_file():
        name = (folder / DETECTRON2_CHECKPOINT).read_text().strip()
        if name == "model_final.pth":
            return iterations or 0
        digits = "".join(c for c in Path(name).stem if c.isdigit())
        return int(digits) + 1 if digits else 0
    return 0


def format_job(name: str, job_dir: Path, plans: list[StagePlan]) -> str:
    lines = [f"job {name}: {job_dir}"]
    for plan in plans:
        to_run = "" if plan.iterations_to_run is None else f", {plan.iterations_to_run} iterations to run"
        lines.append(f"  {plan.stage}: {plan.status}{to_run}")
        if plan.protocol is not None:
            lines.append(f"    {'protocol':<22}{plan.protocol}")
            lines += [f"    {'':<22}- {deviation}" for deviation in plan.deviations]
        for key, value in plan.settings.items():
            items = [f"{k}: {v}" for k, v in value.items()] if isinstance(value, dict) else [value]
            lines += [f"    {key if i == 0 else '':<22}{item}" for i, item in enumerate(items)]
    return "\n".join(lines)


def params(plans: list[StagePlan]) -> dict[str, str]:
    """The resolved settings as mlflow params: plan.<stage>.<key>."""
    return as_params({"plan": {p.stage: {**flatten(p.settings), **({"protocol": p.protocol} if p.protocol else {})}
                                for p in plans}})
