"""The pipeline's stages, run in a job's folder: pretrain -> convert -> det_voc -> det_coco -> seg_voc ->
seg_cityscapes -> probe (those `cfg.stages` names, always in this order).

Each stage works in `<job folder>/<stage>/`. When it finishes it writes `metrics.json` and then the marker
`DONE.json` (metrics, duration, the settings its result depends on); a stage whose marker exists is skipped,
so a rerun redoes nothing. A marker whose settings differ from the current config stops the job instead
(`stage_settings`): its figures would be reported under settings they were not made with. An interrupted
stage has no marker and starts again in the same folder, where the engine (and each transfer stage) resumes
from its own checkpoint.

Weights flow: pretrain writes `pretrain/backbone.pth` (torchvision names); `pretrain.weights=PATH` replaces
it with the user's file; model=random_init has none (downstream stages start from random weights).
convert writes `convert/backbone.pkl` (detectron2 names), which the downstream stages prefer when present.
Pre-training uses every process of the job; the other stages run on global rank 0 only.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from densecl.files import write_json
from pipelines import schema
from pipelines.launching import is_global_rank_zero
from pipelines.tracking import RunLogger, flatten

log = logging.getLogger(__name__)

DONE = "DONE.json"
METRICS = "metrics.json"
FIGURE = "correspondence.png"
CONVERTED = "backbone.pkl"


class StageError(RuntimeError):
    """A stage cannot run as configured (missing inputs); the message says what to change."""


@dataclass
class Job:
    cfg: DictConfig
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


@functools.cache
def unchecked_settings() -> tuple[str, ...]:
    """Patterns of the keys that change no result: those conf/hydra/densecl.yaml leaves out of folder names
    (`pretrain.num_workers`, `downstream.*.log_period`, ...). A rerun may change them freely."""
    hydra_cfg = OmegaConf.load(schema.CONF_DIR / "hydra" / "densecl.yaml")
    return tuple(hydra_cfg.job.config.override_dirname.exclude_keys)


def stage_settings(cfg: DictConfig, stage: str) -> dict[str, str]:
    """The config keys a stage's result depends on, flattened (`pretrain.base_lr`: "0.03"), as saved in its
    DONE.json. A downstream stage depends on the pre-training too, except from random init."""
    sections = ["seed", "backbone", "model"]
    if cfg.model.name != schema.ModelName.random_init:
        sections += ["matching", "data", "pretrain"]
    if stage in schema.DOWNSTREAM_STAGES:
        sections.append(f"downstream.{stage}")
        if cfg.downstream[stage].get("preset") == "synthetic":
            sections.append("downstream.synthetic")
    tree = {}
    for key in sections:
        value = OmegaConf.select(cfg, key)
        is_section = OmegaConf.is_config(value)
        tree[key] = OmegaConf.to_container(value, resolve=True, enum_to_str=True) if is_section else value
    flat = flatten(tree)
    return {k: v for k, v in flat.items() if not any(fnmatch.fnmatchcase(k, p) for p in unchecked_settings())}


def check_done_settings(stage: str, stage_dir: Path, done: dict, current: dict[str, str]) -> None:
    """Refuse to skip a finished stage whose saved settings differ from the current ones.

    Only keys both hold are compared: a key added to the config since the stage ran took its default then
    (the convention for new options), and a marker written before settings were saved has none to compare.
    """
    saved = done.get("settings") or {}
    changed = [(k, saved[k], current[k]) for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]
    if changed:
        shown = "; ".join(f"{k}: {old} when it ran, {new} now" for k, old, new in changed[:8])
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise StageError(
            f"stage {stage} in {stage_dir} finished with other settings: {shown}{more}. Its results would be "
            f"reported under settings they were not made with. Run under another name= (a new folder), or "
            f"move {stage_dir} away to redo the stage here"
        )


def planned_stages(cfg: DictConfig) -> list[str]:
    """The stages this job runs, in pipeline order (random init has nothing to pre-train or convert)."""
    chosen = set(cfg.stages)
    if cfg.model.name == schema.ModelName.random_init:
        chosen -= {"pretrain", "convert"}
    return [s for s in schema.STAGES if s in chosen]


def run_stages(cfg: DictConfig, job_dir: Path, tracking: RunLogger) -> dict[str, dict[str, float]]:
    """Run (or skip, when done) every planned stage; returns each stage's final metrics."""
    job = Job(cfg, Path(job_dir), tracking)
    results: dict[str, dict[str, float]] = {}
    rank_zero = is_global_rank_zero()
    for stage in planned_stages(cfg):
        if stage != "pretrain" and not rank_zero:
            continue
        done = job.done(stage)
        settings = stage_settings(cfg, stage)
        if done is not None:
            check_done_settings(stage, job.stage_dir(stage), done, settings)
            log.info("stage %s: already done in %s, skipping", stage, job.stage_dir(stage))
            tracking.final_metrics(stage, done["metrics"], only_missing=True)
            results[stage] = done["metrics"]
            continue
        log.info("stage %s: running in %s", stage, job.stage_dir(stage))
        job.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        metrics = STAGE_FUNCTIONS[stage](job)
        seconds = time.perf_counter() - start
        if rank_zero:
            write_json(job.stage_dir(stage) / METRICS, metrics)
            tracking.final_metrics(stage, {**metrics, "seconds": seconds})
            tracking.artifact(job.stage_dir(stage) / METRICS, stage)
            write_json(
                job.stage_dir(stage) / DONE,
                {"metrics": metrics, "seconds": seconds, "finished": time.time(), "settings": settings},
            )
        log.info("stage %s: done in %.0f s: %s", stage, seconds, _fmt(metrics))
        results[stage] = metrics
    return results


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


# ------------------------------------------------------------------------------------------ weights


def backbone_weights(job: Job) -> Path | None:
    """The torchvision-named backbone the downstream stages start from (None: random init)."""
    cfg = job.cfg
    if cfg.model.name == schema.ModelName.random_init:
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
    if job.cfg.model.name == schema.ModelName.random_init:
        return None
    converted = job.stage_dir("convert") / CONVERTED
    if job.done("convert") is not None and converted.is_file():
        return converted
    return backbone_weights(job)


# ------------------------------------------------------------------------------------------- stages


def run_pretrain(job: Job) -> dict[str, float]:
    from densecl.engine import pretrain
    from pipelines.preemption import GracefulStop

    out = job.stage_dir("pretrain")
    curve = job.tracking.curve("pretrain/")
    with GracefulStop() as stop:
        result = pretrain(schema.pretrain_config(job.cfg), out, on_step=curve, should_stop=stop.requested)
    curve.flush()
    if not result.completed:
        stop.hand_over()  # requeue (under submitit), never returns
        raise StageError("pre-training stopped early without a preemption signal")
    metrics = {k: float(v) for k, v in result.metrics.items()}
    metrics["iterations"] = float(result.iterations)
    if is_global_rank_zero():
        if job.cfg.pretrain.figure.enabled:
            metrics.update(_correspondence_figure(job, result.checkpoint_path, out / FIGURE))
            job.tracking.artifact(out / FIGURE, "pretrain")
        if job.cfg.tracking.log_backbone:
            job.tracking.artifact(result.backbone_path, "pretrain")
    return metrics


def _figure_images(cfg: DictConfig, count: int) -> list:
    """The first `count` pre-training images (synthetic scenes, or files found walking the folder)."""
    data = cfg.data
    if data.kind == schema.DataKind.synthetic:
        from densecl.synthetic import generate_scene

        return [
            generate_scene(data.seed, i, data.image_size).image for i in range(min(count, data.num_images))
        ]
    from densecl.datasets import IMAGE_EXTENSIONS, load_rgb_image

    images = []
    for folder, subfolders, files in os.walk(data.root):  # lazily: ImageNet has a million files
        subfolders.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                images.append(load_rgb_image(os.path.join(folder, name)))
            except Exception as err:  # a broken file is not worth losing the figure over
                log.warning("figure: skipping %s (%s)", name, err)
            if len(images) == count:
                return images
    return images


def _correspondence_figure(job: Job, checkpoint: Path, path: Path) -> dict[str, float]:
    """The paper-style correspondence figure of the trained model; returns its summary numbers."""
    from densecl.engine import load_trained_model
    from densecl.visualize import correspondence_figure

    fig_cfg = job.cfg.pretrain.figure
    try:
        model, pcfg = load_trained_model(checkpoint)
        images = _figure_images(job.cfg, fig_cfg.num_images)
        figure, summary = correspondence_figure(
            model,
            images,
            crop_size=fig_cfg.crop_size or pcfg.crop_size,
            threshold=fig_cfg.threshold,
            seed=job.cfg.seed,
            title=f"{job.cfg.name}: {job.dir.name}",
        )
        figure.savefig(path)
    except Exception as err:  # the figure is a by-product: never fail the trained stage for it
        log.warning("correspondence figure failed: %s", err, exc_info=True)
        return {}
    return {f"figure_{k}": v for k, v in summary.items() if math.isfinite(v)}  # no JSON NaN


def run_convert(job: Job) -> dict[str, float]:
    from densecl.transfer.convert import convert_to_detectron2, read_converted

    source = backbone_weights(job)
    dst = convert_to_detectron2(source, job.stage_dir("convert") / CONVERTED)
    return {"num_tensors": float(len(read_converted(dst)["model"]))}


def synthetic_dataset(cfg: DictConfig):
    """Write (once) the synthetic detection/segmentation set of `downstream.synthetic` into the cache;
    concurrent jobs are safe (the writer builds aside and renames)."""
    from densecl.synthetic import write_synthetic_dataset

    syn = cfg.downstream.synthetic
    return write_synthetic_dataset(
        schema.synthetic_root(cfg), syn.num_train, syn.num_val, image_size=syn.image_size, seed=syn.seed
    )


def _transfer(stage: str, runner: Callable[[Any, Any, str], dict]) -> Callable[[Job], dict[str, float]]:
    def run(job: Job) -> dict[str, float]:
        stage_cfg = schema.downstream_config(job.cfg, stage)
        if job.cfg.downstream[stage].get("preset") == "synthetic":
            synthetic_dataset(job.cfg)
        weights = transfer_weights(job)
        metrics = runner(stage_cfg, str(weights) if weights is not None else None, str(job.stage_dir(stage)))
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    run.__name__ = f"run_{stage}"
    return run


def _voc_detection(cfg, weights, out):
    from densecl.transfer.detection import run_voc_detection

    return run_voc_detection(cfg, weights, out)


def _coco_detection(cfg, weights, out):
    from densecl.transfer.detection import run_coco_detection

    return run_coco_detection(cfg, weights, out)


def _segmentation(cfg, weights, out):
    from densecl.transfer.segmentation import run_semantic_segmentation

    return run_semantic_segmentation(cfg, weights, out)


def run_probe(job: Job) -> dict[str, float]:
    """The frozen-backbone dense linear probe on the synthetic scenes (torchvision-named weights)."""
    from densecl.probe import run_linear_probe

    metrics = run_linear_probe(
        schema.downstream_config(job.cfg, "probe"), backbone_weights(job), job.stage_dir("probe")
    )
    return {k: float(v) for k, v in metrics.items()}


STAGE_FUNCTIONS: dict[str, Callable[[Job], dict[str, float]]] = {
    "pretrain": run_pretrain,
    "convert": run_convert,
    "det_voc": _transfer("det_voc", _voc_detection),
    "det_coco": _transfer("det_coco", _coco_detection),
    "seg_voc": _transfer("seg_voc", _segmentation),
    "seg_cityscapes": _transfer("seg_cityscapes", _segmentation),
    "probe": run_probe,
}
