"""The pipeline's config: the library's dataclasses (densecl.config, the stage configs) plus the pipeline's
own sections, as one Hydra structured config, and the checks that run before any job starts.

Two layers catch a bad config before any work:
1. Types and names, at composition: every `conf/` file is merged into `PipelineConfig` (registered as
   `densecl_schema`, first in `conf/config.yaml`'s defaults), so an unknown key, a string where an int
   belongs or an unknown matching strategy fails while Hydra composes, naming the full key.
2. Values, by `validate(cfg)`: each section's own checks (next to its fields) and the rules between
   sections. `pipelines.callbacks` runs it on every job's config in the submitting process.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from densecl.classify import LinearClassifierConfig
from densecl.config import (
    ConfigValueError,
    ModelName,
    PretrainConfig,
    check,
    from_dict,
    missing_voc_files,
    validate_sections,
)
from densecl.probe import LinearProbeConfig
from densecl.resume import is_result_neutral
from densecl.transfer.configs import STAGE_CONFIGS, StageConfig, SyntheticSet

__all__ = ["ConfigValueError", "PipelineConfig", "compose", "job_dirname", "register", "settings", "validate"]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STAGES = ("pretrain", "convert", "det_voc", "det_coco", "seg_voc", "seg_cityscapes", "probe", "classify")
DOWNSTREAM_STAGES = ("det_voc", "det_coco", "seg_voc", "seg_cityscapes", "probe", "classify")
OPTIONAL_STAGES = ("classify",)  # run when listed in `stages`, not by default: they need the user's data
# Keys that name where and how a job runs, not what it computes: left out of job folder names, as are the
# keys that change no result (densecl.resume.RESULT_NEUTRAL).
NOT_IN_FOLDER_NAMES = ("experiment", "name", "stages", "verbose", "paths", "paths.*", "tracking", "tracking.*",
                       "report", "report.*")


StageSettings = StageConfig | LinearProbeConfig | LinearClassifierConfig  # what stage_config returns


@dataclass
class DownstreamConfig:
    """Each stage's section holds `preset` plus fields of its config class (densecl.transfer.configs,
    densecl.probe.LinearProbeConfig for `probe`), checked by `PipelineConfig.stage_config`."""

    synthetic: SyntheticSet | None = None  # the set the `synthetic` presets use, written once into the cache
    det_voc: dict[str, Any] = field(default_factory=dict)
    det_coco: dict[str, Any] = field(default_factory=dict)
    seg_voc: dict[str, Any] = field(default_factory=dict)
    seg_cityscapes: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    classify: dict[str, Any] = field(default_factory=dict)  # densecl.classify.LinearClassifierConfig

    def validate(self) -> None:
        """The synthetic set; each stage's section is checked when its config is built (`stage_config`)."""
        if self.synthetic is not None:
            validate_sections(self, ("synthetic",))


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # sqlite:///PATH or a tracking server http(s)://HOST:PORT
    experiment_name: str = "${name}"
    artifact_location: str | None = None  # where a new experiment stores artifacts (None: the server's)
    log_backbone: bool = True  # the exported backbone as an artifact
    retries: int = 8  # attempts while the store says "database is locked"
    retry_wait_s: float = 0.5  # first back-off, doubled per attempt

    def validate(self) -> None:
        check(not self.enabled or bool(self.uri), "uri", self.uri,
              "set a sqlite:///PATH or http(s)://HOST:PORT URI, or tracking=disabled")
        check(self.retries >= 1, "retries", self.retries, "allowed: an integer >= 1")


@dataclass
class PathsConfig:
    output_dir: str = "outputs"  # runs, sweeps, mlflow.db, artifacts and the cache live under it
    cache_dir: str = "${paths.output_dir}/cache"
    data_dir: str = "data"  # real data sets (imagenet/, coco/, VOC2007/, VOC2012/, cityscapes/)


@dataclass
class ReportConfig:
    metrics: list[str] = field(default_factory=list)  # empty: every final stage metric present
    seed_keys: list[str] = field(default_factory=lambda: ["seed"])  # averaged over, never a row
    extra_columns: list[str] = field(default_factory=list)  # params shown beside the swept values


@dataclass
class PipelineConfig(PretrainConfig):
    """The pre-training settings plus the stages to run, their sections, tracking, paths and the report."""

    name: str = "default"  # output folders and the mlflow experiment
    stages: list[str] = field(default_factory=lambda: [s for s in STAGES if s not in OPTIONAL_STAGES])
    verbose: bool = False  # detectron2's detailed log in the terminal too (it always goes to each stage's log.txt)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def pretraining(self) -> bool:
        return self.model.name != ModelName.random_init and "pretrain" in self.stages

    def pretrain_config(self) -> PretrainConfig:
        """The pre-training settings alone (what the engine takes and its checkpoints record)."""
        return PretrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PretrainConfig)})

    def validate(self, world_size: int = 1, check_paths: bool = True) -> None:
        """Raise ConfigValueError naming the first bad setting; `check_paths` also requires the data folders
        and files the chosen stages read to exist. The pre-training data count only when pre-training runs."""
        for stage in self.stages:
            check(stage in STAGES, "stages", list(self.stages), f"each stage must be one of {', '.join(STAGES)}")
        check(len(set(self.stages)) == len(self.stages), "stages", list(self.stages), "a stage may be listed once")
        sections = (*(s for s in self.SECTIONS if s != "data" or self.pretraining), "downstream", "tracking")
        validate_sections(self, sections, data={"check_paths": check_paths},
                          pretrain={"world_size": world_size, "check_paths": check_paths and self.pretraining})
        weights = self.pretrain.weights
        if weights is not None:
            check("pretrain" not in self.stages, "stages", list(self.stages),
                  "pretrain.weights is set, so the pretrain stage must not run")
            check(self.model.name != ModelName.random_init, "pretrain.weights", weights,
                  "model=random_init starts from random weights: unset it")
            check(not check_paths or Path(weights).is_file(), "pretrain.weights", weights,
                  "allowed: an existing backbone or checkpoint file")
        for stage in self.stages:
            if stage in DOWNSTREAM_STAGES:
                self.stage_config(stage, check_paths)

    def stage_config(self, stage: str, check_paths: bool = False) -> StageSettings:
        """The config object of a downstream stage, from its `downstream.<stage>` section; arch, device and
        seed follow the pipeline's unless the section sets them."""
        section = dict(getattr(self.downstream, stage))
        base = {"arch": self.backbone.arch, "device": self.device, "seed": self.seed}
        try:
            if stage == "probe":
                stage_cfg = from_dict(LinearProbeConfig, {**base, **section})
                stage_cfg.validate()
                return stage_cfg
            if stage == "classify":
                stage_cfg = from_dict(LinearClassifierConfig, {**base, **section})
                stage_cfg.validate()
                if check_paths:
                    stage_cfg.check_data()
                return stage_cfg
            stage_cfg = STAGE_CONFIGS[stage].from_section(
                section, **base, synthetic=self.downstream.synthetic, cache_dir=self.paths.cache_dir
            )
            if check_paths:
                stage_cfg.check_data()
            return stage_cfg
        except ConfigValueError as err:
            raise err.within(f"downstream.{stage}") from None


def settings(cfg: DictConfig) -> PipelineConfig:
    """The composed config as `PipelineConfig` (Hydra's own node left out), its relative data folder made
    absolute: a job may run from another folder."""
    values = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }
    obj = from_dict(PipelineConfig, values)
    data = obj.data
    data.root, data.cache_dir = (str(Path(path).absolute()) if path else path for path in (data.root, data.cache_dir))
    if obj.pretrain.eval_data == "auto":
        obj.pretrain.eval_data = auto_eval_data(obj.paths.data_dir)
    elif obj.pretrain.eval_data != "scenes":
        obj.pretrain.eval_data = str(Path(obj.pretrain.eval_data).absolute())
    return obj


def auto_eval_data(data_dir: str) -> str:
    """The feature-quality signals' labelled set for `pretrain.eval_data=auto`: VOC segmentation when the data
    folder holds it (DATA_DIR/VOC2012, the seg_voc stage's), else the built-in scenes."""
    voc = Path(data_dir).absolute() / "VOC2012"
    return str(voc) if not missing_voc_files(voc) else "scenes"


def validate(cfg: DictConfig, check_paths: bool = True) -> None:
    settings(cfg).validate(check_paths=check_paths)


# ---------------------------------------------------------------------------------------------------------
# Job folders


def in_folder_name(key: str) -> bool:
    return not is_result_neutral(key) and not any(fnmatch.fnmatchcase(key, p) for p in NOT_IN_FOLDER_NAMES)


def job_dirname(overrides: Sequence[str], max_len: int = 120) -> str:
    """A job's folder name from its overrides only, so that a rerun or a requeued job finds its work.

    `key=value` of every override `in_folder_name`, sorted by key, joined by ','; the key without its
    `+`/`++` prefix, so `++a=1` and `a=1` share a folder. Made safe as one path component: '/' becomes '%';
    no overrides is 'base'; longer than `max_len`, a prefix plus a hash of the whole.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    items = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if not in_folder_name(key):
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
    """Register the schema and the resolvers `conf/` uses (idempotent); call before Hydra composes. Submitit
    jobs get them from the launching process with Hydra's state."""
    ConfigStore.instance().store(name="densecl_schema", node=PipelineConfig)
    # conf/hydra/launcher/submitit_{slurm,local}.yaml shadow the plugin's configs on purpose (to switch
    # requeue on under the plugin's names); Hydra still types them with the plugin's schema, and warns.
    warnings.filterwarnings(
        "ignore",
        message=r"\s*'hydra/launcher/submitit_(slurm|local)' is validated against ConfigStore schema",
    )
    OmegaConf.register_new_resolver("densecl.job_dir", job_dirname, replace=True)
    OmegaConf.register_new_resolver("densecl.warmup_if_pure_dense", warmup_if_pure_dense, replace=True)


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = True) -> DictConfig:
    """`conf/config.yaml` with `overrides`, as `python -m pipelines.run` composes it (for the report and tests)."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
