"""The pipeline's config schema: typed dataclasses Hydra merges `conf/` into, plus the value checks.

Two layers catch a bad config before any job starts:
1. Types and names, at composition. Every `conf/` file is merged into `PipelineConfig` (registered as
   `densecl_schema`, first in `conf/config.yaml`'s defaults), so an unknown key, a string where an int
   belongs or an unknown matching strategy (an Enum) fails while Hydra composes, naming the full key.
2. Values, by `validate(cfg)`: ranges (S >= 1, lambda in [0, 1]), required data paths, stage names, the
   downstream dataclasses' field names. `pipelines.callbacks` runs it on every job's composed config in the
   submitting process (`on_run_start` / `on_multirun_start`), before a parent run exists or a job is launched.
Errors are `ConfigValueError("key=value: allowed ...")`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STAGES = ("pretrain", "convert", "det_voc", "det_coco", "seg_voc", "seg_cityscapes", "probe")
DOWNSTREAM_STAGES = ("det_voc", "det_coco", "seg_voc", "seg_cityscapes", "probe")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
MAX_REGIONS = 16  # densecl.model.MAX_REGIONS (tested equal; kept here so composing imports no torch)


class ConfigValueError(ValueError):
    """A composed config that is well-typed but holds a value the pipeline cannot run."""


class Matching(str, Enum):
    """How each query cell finds its positive key cell (DenseCL Table 6; `backbone` is the paper's)."""

    backbone = "backbone"
    projection = "projection"
    random = "random"
    geometric = "geometric"


class ModelName(str, Enum):
    densecl = "densecl"
    mocov2 = "mocov2"  # DenseCL with lambda = 0: exactly MoCo v2
    random_init = "random_init"  # no pre-training: downstream stages start from random weights


class DataKind(str, Enum):
    synthetic = "synthetic"
    image_folder = "image_folder"


class Amp(str, Enum):
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class ModelSchema:
    name: ModelName = ModelName.densecl
    loss_lambda: float = 0.5  # L = (1 - lambda) L_global + lambda L_dense
    lambda_warmup_iters: int = 0  # lambda = 0 for the first N iterations (paper: only for lambda = 1)
    num_regions: int | None = None  # S; None = the backbone's native grid (7 at 224 px)
    feat_dim: int = 128
    temperature: float = 0.2
    momentum: float = 0.999


@dataclass
class BackboneSchema:
    arch: str = "resnet50"


@dataclass
class MatchingSchema:
    name: Matching = Matching.backbone


@dataclass
class DataSchema:
    kind: DataKind = DataKind.synthetic
    root: str | None = None  # image_folder: a folder of images (searched recursively)
    num_images: int = 2048  # synthetic: number of scenes
    image_size: int = 160  # synthetic: scene side in pixels
    seed: int = 0  # synthetic: scene seed (fixed across training seeds: seeds measure training noise)


@dataclass
class FigureSchema:
    enabled: bool = True
    num_images: int = 4
    threshold: float = 0.9  # mutual nearest neighbours with cosine similarity above this (paper's figure)
    crop_size: int | None = None  # None = pretrain.crop_size


@dataclass
class PretrainSchema:
    """Schedule and runtime of pre-training; the method's own hyper-parameters live in `model`."""

    weights: str | None = None  # skip pre-training: downstream stages start from this backbone/checkpoint
    crop_size: int = 224
    batch_size: int = 32  # per process
    queue_len: int = 65536  # divisible by the global batch
    num_workers: int = 4
    base_lr: float = 0.03  # per 256 images, scaled linearly with the total batch
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9
    warmup_iters: int = 0
    iters: int | None = None  # exactly one of iters / epochs
    epochs: int | None = 200
    amp: Amp = Amp.none
    channels_last: bool = True
    sync_bn: bool = False
    shuffle_bn: bool = True
    bn_splits: int = 1  # BN groups per process: emulates the paper's per-GPU BN (and shuffle-BN) in one process
    corr_eval_crop: int | None = None  # correspondence accuracy on fixed view pairs at this crop (e.g. 160)
    corr_eval_pairs: int = 64
    corr_eval_every: int = 100  # a multiple of log_every
    deterministic: bool = False
    ckpt_every: int = 1000
    log_every: int = 10
    progress: bool = False
    figure: FigureSchema = field(default_factory=FigureSchema)


@dataclass
class SyntheticDownstreamData:
    """The synthetic detection/segmentation dataset the `synthetic` downstream preset writes to the cache."""

    num_train: int = 64
    num_val: int = 16
    image_size: int = 160
    seed: int = 0


@dataclass
class DownstreamSchema:
    """Each stage's section holds `preset` plus fields of its densecl.transfer config class (checked by
    `downstream_config`). `synthetic`: the data set the `synthetic` preset trains and evaluates on,
    written once into `paths.cache_dir`."""

    synthetic: SyntheticDownstreamData | None = None
    det_voc: dict[str, Any] = field(default_factory=dict)
    det_coco: dict[str, Any] = field(default_factory=dict)
    seg_voc: dict[str, Any] = field(default_factory=dict)
    seg_cityscapes: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)  # densecl.probe.LinearProbeConfig fields


@dataclass
class TrackingSchema:
    enabled: bool = True
    uri: str | None = None  # sqlite:///PATH (default) or a tracking server http(s)://HOST:PORT
    experiment_name: str = "${name}"
    artifact_location: str | None = None  # where a new experiment stores artifacts (None: the server's)
    log_backbone: bool = True  # log the exported backbone as an artifact
    retries: int = 8  # attempts for "database is locked"
    retry_wait_s: float = 0.5  # first back-off, doubled per attempt


@dataclass
class PathsSchema:
    output_dir: str = "outputs"  # runs, sweeps, mlflow.db, artifacts and the cache live under it
    cache_dir: str = "${paths.output_dir}/cache"
    data_dir: str = "data"  # real datasets (imagenet/, coco/, VOCdevkit/, cityscapes/)


@dataclass
class ReportSchema:
    metrics: list[str] = field(default_factory=list)  # empty: every final stage metric present
    seed_keys: list[str] = field(default_factory=lambda: ["seed"])  # averaged over, never a row
    extra_columns: list[str] = field(default_factory=list)  # params shown beside the swept values


@dataclass
class PipelineConfig:
    name: str = "default"  # experiment name: output folders and mlflow experiment
    seed: int = 0
    device: str = "auto"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    model: ModelSchema = field(default_factory=ModelSchema)
    backbone: BackboneSchema = field(default_factory=BackboneSchema)
    matching: MatchingSchema = field(default_factory=MatchingSchema)
    data: DataSchema = field(default_factory=DataSchema)
    pretrain: PretrainSchema = field(default_factory=PretrainSchema)
    downstream: DownstreamSchema = field(default_factory=DownstreamSchema)
    tracking: TrackingSchema = field(default_factory=TrackingSchema)
    paths: PathsSchema = field(default_factory=PathsSchema)
    report: ReportSchema = field(default_factory=ReportSchema)


# ---------------------------------------------------------------------------------------------------------
# Value checks


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigValueError(f"{key}={value!r} is invalid: {allowed}")


def validate(cfg: DictConfig, check_paths: bool = True) -> None:
    """Raise ConfigValueError naming the key and the allowed values for the first bad value in `cfg`.

    `check_paths` also requires the data folders the chosen stages read to exist.
    """
    model, pre = cfg.model, cfg.pretrain
    stages = list(cfg.stages)
    for stage in stages:
        if stage not in STAGES:
            _fail("stages", stages, f"each stage must be one of {', '.join(STAGES)}")
    if len(set(stages)) != len(stages):
        _fail("stages", stages, "a stage may be listed once")
    if cfg.backbone.arch not in ARCHS:
        _fail("backbone.arch", cfg.backbone.arch, f"allowed: {', '.join(ARCHS)}")
    if not 0.0 <= model.loss_lambda <= 1.0:
        _fail("model.loss_lambda", model.loss_lambda, "allowed: a value in [0, 1] (0 = MoCo v2)")
    if model.name == ModelName.mocov2 and model.loss_lambda != 0.0:
        _fail("model.loss_lambda", model.loss_lambda, "model=mocov2 is DenseCL with lambda = 0")
    if model.lambda_warmup_iters < 0:
        _fail("model.lambda_warmup_iters", model.lambda_warmup_iters, "allowed: an integer >= 0")
    if model.num_regions is not None and not 1 <= model.num_regions <= MAX_REGIONS:
        _fail("model.num_regions", model.num_regions, f"allowed: null (native grid) or 1..{MAX_REGIONS}")

    if (pre.iters is None) == (pre.epochs is None):
        _fail(
            "pretrain.iters", pre.iters, f"set exactly one of pretrain.iters / pretrain.epochs ({pre.epochs})"
        )
    for key in ("iters", "epochs", "crop_size", "batch_size", "queue_len", "ckpt_every", "log_every"):
        value = pre[key]
        if value is not None and value < 1:
            _fail(f"pretrain.{key}", value, "allowed: an integer >= 1")
    if pre.queue_len % pre.batch_size != 0:
        _fail(
            "pretrain.queue_len", pre.queue_len, f"must be divisible by pretrain.batch_size={pre.batch_size}"
        )
    if not -1.0 <= pre.figure.threshold <= 1.0:
        _fail("pretrain.figure.threshold", pre.figure.threshold, "allowed: a cosine similarity in [-1, 1]")

    pretraining = model.name != ModelName.random_init and "pretrain" in stages
    if pretraining:
        _validate_data(cfg.data, check_paths)
        try:  # the engine's own checks, as a backstop for what the config-level ones above do not cover
            pretrain_config(cfg).validate()
        except ValueError as err:
            raise ConfigValueError(f"pretrain: {err}") from None
    if pre.weights is not None:
        if "pretrain" in stages:
            _fail("stages", stages, "pretrain.weights is set, so the pretrain stage must not run")
        if model.name == ModelName.random_init:
            _fail("pretrain.weights", pre.weights, "model=random_init starts from random weights: unset it")
        if check_paths and not Path(pre.weights).is_file():
            _fail("pretrain.weights", pre.weights, "allowed: an existing backbone or checkpoint file")

    downstream = [s for s in stages if s in DOWNSTREAM_STAGES]
    for stage in downstream:
        downstream_config(cfg, stage, check_paths=check_paths)  # raises on a bad key, value or data path

    if cfg.tracking.enabled and not cfg.tracking.uri:
        _fail(
            "tracking.uri",
            cfg.tracking.uri,
            "set a sqlite:///PATH or http(s)://HOST:PORT URI, or tracking=disabled",
        )
    if cfg.tracking.retries < 1:
        _fail("tracking.retries", cfg.tracking.retries, "allowed: an integer >= 1")


def _validate_data(data: DictConfig, check_paths: bool) -> None:
    if data.kind == DataKind.image_folder:
        if OmegaConf.is_missing(data, "root") or not data.root:
            _fail("data.root", None, "data kind image_folder needs data.root=/path/to/images")
        if check_paths and not Path(data.root).is_dir():
            _fail("data.root", data.root, "allowed: an existing folder of images (it does not exist)")
    else:
        for key in ("num_images", "image_size"):
            if data[key] < 1:
                _fail(f"data.{key}", data[key], "allowed: an integer >= 1")


def pretrain_config(cfg: DictConfig):
    """The engine's PretrainConfig from the composed config."""
    from densecl.engine import DataConfig, PretrainConfig

    model, pre, data = cfg.model, cfg.pretrain, cfg.data
    return PretrainConfig(
        arch=cfg.backbone.arch,
        feat_dim=model.feat_dim,
        num_regions=model.num_regions,
        matching=str(cfg.matching.name.value),
        loss_lambda=float(model.loss_lambda),
        lambda_warmup_iters=model.lambda_warmup_iters,
        temperature=model.temperature,
        momentum=model.momentum,
        queue_len=pre.queue_len,
        data=DataConfig(
            kind=str(data.kind.value),
            root=str(Path(data.root).absolute()) if data.root else None,
            num_images=data.num_images,
            image_size=data.image_size,
            seed=data.seed,
        ),
        crop_size=pre.crop_size,
        batch_size=pre.batch_size,
        num_workers=pre.num_workers,
        base_lr=pre.base_lr,
        weight_decay=pre.weight_decay,
        sgd_momentum=pre.sgd_momentum,
        warmup_iters=pre.warmup_iters,
        iters=pre.iters,
        epochs=pre.epochs,
        amp=str(pre.amp.value),
        channels_last=pre.channels_last,
        sync_bn=pre.sync_bn,
        shuffle_bn=pre.shuffle_bn,
        bn_splits=pre.bn_splits,
        corr_eval_crop=pre.corr_eval_crop,
        corr_eval_pairs=pre.corr_eval_pairs,
        corr_eval_every=pre.corr_eval_every,
        seed=cfg.seed,
        deterministic=pre.deterministic,
        ckpt_every=pre.ckpt_every,
        log_every=pre.log_every,
        device=cfg.device,
        progress=pre.progress,
    )


PRESETS = {"synthetic", "voc", "cityscapes"}  # classmethods of the densecl.transfer config classes


def synthetic_root(cfg: DictConfig) -> Path:
    """Where the `downstream.synthetic` data set lives in the cache (written once, shared by all jobs); the
    generator's format version is in the name, so a newer generator never meets an older set's folder."""
    from densecl.synthetic import FORMAT_VERSION

    syn = cfg.downstream.synthetic
    name = f"synthetic-v{FORMAT_VERSION}-{syn.num_train}x{syn.num_val}-{syn.image_size}px-seed{syn.seed}"
    return (Path(cfg.paths.cache_dir) / name).absolute()


def downstream_config(cfg: DictConfig, stage: str, check_paths: bool = False):
    """The densecl.transfer dataclass instance of a downstream stage, from `downstream.<stage>`.

    `preset` names a classmethod of the config class (synthetic, voc, cityscapes; none: the paper's
    defaults). `ims_per_batch` rescales the preset's schedule by the linear rule (`scaled`), `max_iter`
    squeezes it (`shortened`); every other key replaces the field as given. arch, device and seed follow
    the pipeline's unless set here. Raises ConfigValueError naming a bad key and the allowed ones; with
    `check_paths`, also when a real data set the stage reads is missing.
    """
    cls = _downstream_class(stage)
    section = OmegaConf.to_container(cfg.downstream[stage], resolve=True)
    preset = section.pop("preset", None)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        key = unknown[0]
        _fail(f"downstream.{stage}.{key}", section[key], f"allowed keys: preset, {', '.join(sorted(names))}")
    if preset is not None and (preset not in PRESETS or not hasattr(cls, preset)):
        allowed = ", ".join(p for p in sorted(PRESETS) if hasattr(cls, p))
        _fail(f"downstream.{stage}.preset", preset, f"allowed: null (the paper's protocol), {allowed}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
    pipeline = {"arch": cfg.backbone.arch, "device": cfg.device, "seed": cfg.seed}
    base_args = {k: values.pop(k, v) for k, v in pipeline.items()}
    batch, iters = values.pop("ims_per_batch", None), values.pop("max_iter", None)
    try:
        if preset == "synthetic":
            if cfg.downstream.synthetic is None:
                _fail(
                    f"downstream.{stage}.preset", preset, "needs downstream.synthetic (the data set to write)"
                )
            base = cls.synthetic(str(synthetic_root(cfg)), **base_args)
        elif preset is not None:
            base = getattr(cls, preset)(**base_args)
        else:
            base = cls(**base_args)
        if batch is not None:
            base = base.scaled(batch)
        if iters is not None:
            base = base.shortened(iters)
        stage_cfg = dataclasses.replace(base, **values)
        stage_cfg.validate()
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigValueError):
            raise
        raise ConfigValueError(f"downstream.{stage}: {err}") from err
    if check_paths and preset != "synthetic" and hasattr(stage_cfg, "dataset_names"):
        from densecl.transfer.data import check_dataset

        for name in stage_cfg.dataset_names():
            try:
                check_dataset(name, stage_cfg.data_root or None, stage_cfg.synthetic_root or None)
            except FileNotFoundError as err:
                raise ConfigValueError(f"downstream.{stage}: data set {name}: {err}") from None
    return stage_cfg


def _downstream_class(stage: str):
    from densecl.probe import LinearProbeConfig
    from densecl.transfer import detection, segmentation

    return {
        "probe": LinearProbeConfig,
        "det_voc": detection.VOCDetectionConfig,
        "det_coco": detection.COCODetectionConfig,
        "seg_voc": segmentation.SegmentationConfig,
        "seg_cityscapes": segmentation.SegmentationConfig,
    }[stage]


# ---------------------------------------------------------------------------------------------------------
# Job folders


def job_dirname(overrides: Sequence[str], exclude: Sequence[str] = (), max_len: int = 120) -> str:
    """A job's folder name from its overrides only (so a rerun or a requeued job finds its work).

    `key=value` of every override whose key matches no `exclude` pattern (fnmatch: `tracking.*`), sorted by
    key, joined by ','; the key without its `+`/`++` prefix, so `++a=1` and `a=1` share a folder. Made safe
    as one path component: '/' becomes '%'; no overrides is 'base'; longer than `max_len`, a prefix plus a
    hash of the whole.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    items = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in exclude):
            continue
        items.append(f"~{key}" if override.is_delete() else f"{key}={override.get_value_element_as_str()}")
    name = ",".join(sorted(items)).replace("/", "%") or "base"
    name = re.sub(r"[\x00-\x1f]", "_", name)
    if name in (".", ".."):
        name = name.replace(".", "_")
    if len(name) > max_len:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = f"{name[: max_len - 13]}-{digest}"
    return name


def warmup_if_pure_dense(loss_lambda: float, iters: int) -> int:
    """Table 5's 1.0* row: lambda warm-up only when the loss is purely dense (lambda = 1)."""
    return int(iters) if float(loss_lambda) >= 1.0 else 0


def register() -> None:
    """Register the schema and the resolvers (idempotent; done on import)."""
    ConfigStore.instance().store(name="densecl_schema", node=PipelineConfig)
    # conf/hydra/launcher/submitit_{slurm,local}.yaml shadow the plugin's configs on purpose (to switch
    # requeue on under the plugin's names); Hydra still types them with the plugin's schema, and warns.
    warnings.filterwarnings(
        "ignore",
        message=r"\s*'hydra/launcher/submitit_(slurm|local)' is validated against ConfigStore schema",
    )
    OmegaConf.register_new_resolver("densecl.job_dir", job_dirname, replace=True)
    OmegaConf.register_new_resolver("densecl.warmup_if_pure_dense", warmup_if_pure_dense, replace=True)


register()
