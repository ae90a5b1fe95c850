"""The pipeline's stages, run in a job's folder in the order of the stage registry (pipelines.registry):
pretrain -> convert -> det_voc -> det_coco -> seg_voc -> seg_cityscapes -> probe -> classify, those that
`cfg.stages` names. This module holds their runners.

Each stage works in `<job folder>/<stage>/`. When it finishes it writes `metrics.json` and then the marker
`DONE.json` (metrics, duration, the settings its result depends on: `stage_settings`). Run again, a stage
follows densecl.resume's rule: done with the same settings, it is skipped; done with settings that change
results, the job stops; unfinished, it starts again in its folder, where the engine (and each transfer
stage) resumes from its own checkpoint.

Weights flow: pretrain writes `pretrain/backbone.pth` (torchvision names); `pretrain.weights=PATH` replaces
it with the user's file; model=random_init has none (downstream stages start from random weights).
convert writes `convert/backbone.pkl` (detectron2 names), which the downstream stages prefer when present.
Pre-training uses every process of the job; the other stages run on global rank 0 only.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from densecl.data.sources import first_images
from densecl.evaluation.classify import run_classification
from densecl.evaluation.correspondence_figure import correspondence_figure
from densecl.evaluation.probe import run_linear_probe
from densecl.files import write_atomic, write_json
from densecl.method.settings import ModelName
from densecl.resume import Reuse, reuse
from densecl.training.pretrain import load_trained_model, pretrain
from densecl.transfer import protocol
from densecl.transfer.custom import DATASET_FILE, PREPARED_FOLDER
from densecl.transfer.custom_common import class_count
from densecl.transfer.settings import StageConfig
from densecl.typed_settings import changes_results
from densecl.weights.detectron2 import convert_to_detectron2, read_converted
from pipelines import schema
from pipelines.console import detailed_logs_to_file_only, headline
from pipelines.launching import is_global_rank_zero
from pipelines.preemption import GracefulStop
from pipelines.registry import STAGES
from pipelines.schema import PipelineConfig, pipeline_schema
from pipelines.tracking import DATASET_TAG, PROTOCOL_PARAM, PROTOCOL_TAG, RunLogger, as_params

log = logging.getLogger(__name__)

DONE = "DONE.json"
METRICS = "metrics.json"
FIGURE = "correspondence.png"
CONVERTED = "backbone.pkl"


class StageError(RuntimeError):
    """A stage cannot run as configured (missing inputs); the message says what to change."""


@dataclass
class Job:
    cfg: PipelineConfig
    dir: Path
    tracking: RunLogger

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    def done(self, stage: str) -> dict | None:
        return read_done(self.stage_dir(stage))


def read_done(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / DONE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def stage_settings(cfg: DictConfig, stage: str) -> dict[str, str]:
    """The config keys a stage's result depends on, flattened as text (`pretrain.base_lr`: "0.03"), as saved
    in its DONE.json: those that change no result left out. A downstream stage depends on the pre-training
    too, except from random init."""
    sections = ["seed", "backbone", "model"]
    if cfg.model.name != ModelName.random_init:
        sections += ["matching", "data", "pretrain"]
    if STAGES[stage].settings is not None:
        sections.append(f"downstream.{stage}")
        if cfg.downstream[stage].get("preset") == "synthetic":
            sections.append("downstream.synthetic")
    tree = {}
    for key in sections:
        value = OmegaConf.select(cfg, key)
        is_section = OmegaConf.is_config(value)
        tree[key] = OmegaConf.to_container(value, resolve=True, enum_to_str=True) if is_section else value
    schema_cls = pipeline_schema()
    return {k: v for k, v in as_params(tree).items() if changes_results(schema_cls, k)}


def planned_stages(cfg: PipelineConfig | DictConfig) -> list[str]:
    """The stages this job runs, in pipeline order (random init has nothing to pre-train or convert)."""
    random_init = cfg.model.name == ModelName.random_init
    return [s.name for s in STAGES if s.name in cfg.stages and (s.with_random_init or not random_init)]


def run_stages(cfg: DictConfig, job_dir: Path, tracking: RunLogger) -> dict[str, dict[str, float]]:
    """Run (or skip, when done) every planned stage; returns each stage's final metrics."""
    job = Job(schema.settings(cfg), Path(job_dir), tracking)
    results: dict[str, dict[str, float]] = {}
    rank_zero = is_global_rank_zero()
    for stage in planned_stages(job.cfg):
        if not STAGES[stage].all_processes and not rank_zero:
            continue
        done, settings = job.done(stage), stage_settings(cfg, stage)
        saved = None if done is None else done.get("settings")
        decision = reuse(job.stage_dir(stage), saved, settings, finished=done is not None, schema=pipeline_schema())
        if decision is Reuse.DONE:
            log.info("stage %s: already done: %s", stage, headline(stage, done["metrics"]))
            tracking.final_metrics(stage, done["metrics"], only_missing=True)
            results[stage] = done["metrics"]
            continue
        log.info("stage %s: running", stage)
        job.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        metrics = STAGES[stage].run(job)
        seconds = time.perf_counter() - start
        if rank_zero:
            write_json(job.stage_dir(stage) / METRICS, metrics)
            tracking.final_metrics(stage, {**metrics, "seconds": seconds})
            tracking.artifact(job.stage_dir(stage) / METRICS, stage)
            write_json(
                job.stage_dir(stage) / DONE,
                {"metrics": metrics, "seconds": seconds, "finished": time.time(), "settings": settings},
            )
        log.info("stage %s: done in %.0f s: %s", stage, seconds, headline(stage, metrics))
        results[stage] = metrics
    return results


# ------------------------------------------------------------------------------------------ weights


def backbone_weights(job: Job) -> Path | None:
    """The torchvision-named backbone the downstream stages start from (None: random init)."""
    cfg = job.cfg
    if cfg.model.name == ModelName.random_init:
        return None
    if cfg.pretrain.weights:
        return Path(cfg.pretrain.weights).absolute()
    done = job.done("pretrain")
    path = job.stage_dir("pretrain") / "backbone.pth"
    if done is None or not path.is_file():
        raise StageError(
            f"no pre-trained backbone in {job.stage_dir('pretrain')}: run the pretrain stage in this job "
            f"(add 'pretrain' to stages) or start from your own weights with pretrain.weights=PATH"
        )
    return path


def transfer_weights(job: Job) -> Path | None:
    """What a detectron2 stage starts from: the converted .pkl when the convert stage ran, else the
    backbone itself (the transfer code converts it into its own folder)."""
    if job.cfg.model.name == ModelName.random_init:
        return None
    converted = job.stage_dir("convert") / CONVERTED
    if job.done("convert") is not None and converted.is_file():
        return converted
    return backbone_weights(job)


# ------------------------------------------------------------------------------------------- stages


def run_pretrain(job: Job, stage: str) -> dict[str, float]:
    out = job.stage_dir(stage)
    curve = job.tracking.curve("pretrain/")
    with GracefulStop() as stop:
        result = pretrain(job.cfg.pretrain_config(), out, on_step=curve, should_stop=stop.requested)
    curve.flush()
    if not result.completed:
        job.tracking.status("KILLED")  # preempted: the requeued job marks its run RUNNING again
        job.tracking.flush(job.cfg.tracking.flush_timeout_s if job.cfg.tracking.enabled else 0)
        stop.hand_over()  # requeue (under submitit), never returns
        raise StageError("pre-training stopped early without a preemption signal")
    metrics = {k: float(v) for k, v in result.metrics.items()}
    metrics["iterations"] = float(result.iterations)
    if is_global_rank_zero():
        if job.cfg.pretrain.figure.enabled:
            metrics.update(_correspondence_figure(job, result.checkpoint_path, out / FIGURE))
            job.tracking.artifact(out / FIGURE, "pretrain")
            job.tracking.image(out / FIGURE, "pretrain/correspondence")
        if job.cfg.tracking.log_backbone:
            job.tracking.artifact(result.backbone_path, "pretrain")
    return metrics


def _correspondence_figure(job: Job, checkpoint: Path, path: Path) -> dict[str, float]:
    """The paper-style correspondence figure of the trained model; returns its summary numbers."""
    fig_cfg = job.cfg.pretrain.figure
    try:
        model, pcfg = load_trained_model(checkpoint)
        images = first_images(job.cfg.data, fig_cfg.num_images)
        figure, summary = correspondence_figure(
            model,
            images,
            crop_size=fig_cfg.crop_size or pcfg.pretrain.crop_size,
            threshold=fig_cfg.threshold,
            seed=job.cfg.seed,
            title=f"{job.cfg.name}: {job.dir.name}",
        )
        write_atomic(path, figure.savefig)
    except Exception as err:  # the figure is a by-product: never fail the trained stage for it
        log.warning("correspondence figure failed: %s", err, exc_info=True)
        return {}
    return {f"figure_{k}": v for k, v in summary.items() if math.isfinite(v)}  # no JSON NaN


def run_convert(job: Job, stage: str) -> dict[str, float]:
    dst = convert_to_detectron2(backbone_weights(job), job.stage_dir(stage) / CONVERTED)
    return {"num_tensors": float(len(read_converted(dst)["model"]))}


def run_det_voc(job: Job, stage: str) -> dict[str, float]:
    return run_transfer(job, stage, "densecl.transfer.detection", "run_voc_detection")


def run_det_coco(job: Job, stage: str) -> dict[str, float]:
    return run_transfer(job, stage, "densecl.transfer.detection", "run_coco_detection")


def run_segmentation(job: Job, stage: str) -> dict[str, float]:
    return run_transfer(job, stage, "densecl.transfer.segmentation", "run_semantic_segmentation")


def run_transfer(job: Job, stage: str, module: str, function: str) -> dict[str, float]:
    """A detectron2 stage: `module.function(stage config, weights, folder)`. detectron2 is imported here, when a
    job first needs it, so that composing, checking and launching never load it."""
    weights = None if (path := transfer_weights(job)) is None else str(path)
    stage_cfg = job.cfg.stage_config(stage)
    _record_protocol(job, stage, stage_cfg)
    with detailed_logs_to_file_only(not job.cfg.verbose):  # detectron2's import warns too
        runner = getattr(importlib.import_module(module), function)
        metrics = runner(stage_cfg, weights, str(job.stage_dir(stage)))
    _track_custom_dataset(job, stage, stage_cfg)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


MLFLOW_PARAM_LENGTH = 6000


def _record_protocol(job: Job, stage: str, stage_cfg: StageConfig) -> None:
    """The stage's deviations from its published protocol, each listed once at its start with its known
    effect, and recorded: a tag (paper, deviates, or synthetic/custom: their own protocols) and a param."""
    deviations = stage_cfg.deviations()
    for deviation in deviations:
        log.warning("stage %s deviates from its published protocol: %s", stage, deviation)
    job.tracking.tags({f"{PROTOCOL_TAG}{stage}": protocol.status(deviations, stage_cfg.own_protocol())})
    if deviations:
        job.tracking.params({f"{PROTOCOL_PARAM}{stage}": protocol.summary(deviations)[:MLFLOW_PARAM_LENGTH]})


def _track_custom_dataset(job: Job, stage: str, stage_cfg: StageConfig) -> None:
    """A stage on the user's own set names it and its classes in mlflow (a tag the report shows) and keeps
    its dataset.json (classes, image and object counts) as an artifact."""
    path = job.stage_dir(stage) / PREPARED_FOLDER / DATASET_FILE
    if stage_cfg.custom is None or not path.is_file():
        return
    info = json.loads(path.read_text())
    job.tracking.tags({f"{DATASET_TAG}{stage}": dataset_title(info)})
    job.tracking.artifact(path, stage)


def dataset_title(info: dict) -> str:
    """'shelves: 24 train / 8 val images, 2 classes (gadget, widget)'."""
    classes = info["classes"]
    return (f"{info['name']}: {info['num_train']} train / {info['num_val']} val images, {class_count(len(classes))} "
            f"({', '.join(classes)})")


def run_probe(job: Job, stage: str) -> dict[str, float]:
    """The frozen-backbone dense linear probe on the synthetic scenes (torchvision-named weights)."""
    metrics = run_linear_probe(job.cfg.stage_config(stage), backbone_weights(job), job.stage_dir(stage))
    return {k: float(v) for k, v in metrics.items()}


def run_classify(job: Job, stage: str) -> dict[str, float]:
    """The linear classifier on frozen global features of the user's labelled image folder."""
    return run_classification(job.cfg.stage_config(stage), backbone_weights(job), job.stage_dir(stage))
