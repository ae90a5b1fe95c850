"""The pipeline's config: the library's settings dataclasses plus the pipeline's own sections, as one Hydra
structured config, and the checks that run before any job starts.

Two layers catch a bad config before any work:
1. Types and names, at composition: every `conf/` file is merged into the schema (`pipeline_schema()`,
   registered as `densecl_schema`, first in `conf/config.yaml`'s defaults), so an unknown key, a string where
   an int belongs or an unknown matching strategy fails while Hydra composes, naming the full key. Each stage's
   `downstream.<stage>` section is typed by its settings class (`section_schema`), so each of its fields is
   settable under every preset.
2. Values, by `validate(cfg)`: each section's own checks (next to its fields) and the rules between
   sections. `pipelines.callbacks` runs it on every job's config in the submitting process.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import re
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from densecl.data.voc import missing_segmentation_parts
from densecl.method.settings import ModelName
from densecl.training.settings import PretrainConfig
from densecl.transfer.settings import SyntheticSet
from densecl.typed_settings import (
    ConfigValueError,
    changes_results,
    check,
    concrete_type,
    fields_along,
    from_dict,
    neutral,
    plain,
    result,
    validate_sections,
)
from pipelines.registry import STAGES

__all__ = ["ConfigValueError", "PipelineConfig", "compose", "job_dirname", "pipeline_schema", "register", "settings",
           "validate"]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class TrackingConfig:
    enabled: bool = neutral(True)
    uri: str | None = neutral(None)  # sqlite:///PATH or a tracking server http(s)://HOST:PORT
    experiment_name: str = neutral("${name}")
    artifact_location: str | None = neutral(None)  # where a new experiment stores artifacts (None: the server's)
    log_backbone: bool = neutral(True)  # the exported backbone as an artifact
    retries: int = neutral(8)  # attempts while the store says "database is locked"
    retry_wait_s: float = neutral(0.5)  # first back-off, doubled per attempt
    # how long a job's end (and a sweep's) waits for the store to take what waits in its journal; the rest is sent
    # by the job's next run or `python -m pipelines.sync FOLDER` (pipelines.journal)
    flush_timeout_s: float = neutral(60.0)

    def validate(self) -> None:
        check(not self.enabled or bool(self.uri), "uri", self.uri,
              "set a sqlite:///PATH or http(s)://HOST:PORT URI, or tracking=disabled")
        check(self.retries >= 1, "retries", self.retries, "allowed: an integer >= 1")


@dataclass
class PathsConfig:
    """Every path the pipeline writes or reads; relative ones are relative to the launching folder."""

    output_dir: str = neutral("outputs")  # runs/, multirun/, mlflow.db, mlartifacts/ and cache/ live under it
    cache_dir: str = neutral("${paths.output_dir}/cache")  # generated synthetic data sets, shared by all jobs
    data_dir: str = neutral("data")  # real data sets (imagenet/, coco/, VOC2007/, VOC2012/, cityscapes/)


@dataclass
class ReportConfig:
    metrics: list[str] = neutral(factory=list)  # empty: every final stage metric present
    seed_keys: list[str] = neutral(factory=lambda: ["seed"])  # averaged over, never a row
    extra_columns: list[str] = neutral(factory=list)  # params shown beside the swept values


@dataclass
class PipelineConfig(PretrainConfig):
    """The pre-training settings plus the stages to run, their sections, tracking, paths and the report. The
    `downstream` field is typed by `pipeline_schema()`, which builds it from the stage registry."""

    name: str = neutral("default")  # output folders and the mlflow experiment
    stages: list[str] = neutral(factory=STAGES.default_names)
    verbose: bool = neutral(False)  # detectron2's detailed log in the terminal too (always in each stage's log.txt)
    plan: bool = neutral(False)  # print every job's plan (pipelines.plan) and exit without running anything
    downstream: Any = result(None)  # each stage's section, and the synthetic set the `synthetic` presets use
    tracking: TrackingConfig = neutral(factory=TrackingConfig)
    paths: PathsConfig = neutral(factory=PathsConfig)
    report: ReportConfig = neutral(factory=ReportConfig)

    @property
    def pretraining(self) -> bool:
        return self.model.name != ModelName.random_init and "pretrain" in self.stages

    def pretrain_config(self) -> PretrainConfig:
        """The pre-training settings alone (what the engine takes and its checkpoints record)."""
        return PretrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PretrainConfig)})

    def validate(self, world_size: int = 1, check_paths: bool = True) -> None:
        """Raise ConfigValueError naming the first bad setting; `check_paths` also requires the data folders
        and files the chosen stages read to exist. The pre-training data count only when pre-training runs."""
        names = STAGES.names()
        for stage in self.stages:
            check(stage in names, "stages", list(self.stages), f"each stage must be one of {', '.join(names)}")
        check(len(set(self.stages)) == len(self.stages), "stages", list(self.stages), "a stage may be listed once")
        sections = (*(s for s in self.SECTIONS if s != "data" or self.pretraining), "tracking")
        validate_sections(self, sections, data={"check_paths": check_paths},
                          pretrain={"world_size": world_size, "check_paths": check_paths and self.pretraining})
        if self.downstream.synthetic is not None:
            try:
                self.downstream.synthetic.validate()
            except ConfigValueError as err:
                raise err.within("downstream.synthetic") from None
        weights = self.pretrain.weights
        if weights is not None:
            check("pretrain" not in self.stages, "stages", list(self.stages),
                  "pretrain.weights is set, so the pretrain stage must not run")
            check(self.model.name != ModelName.random_init, "pretrain.weights", weights,
                  "model=random_init starts from random weights: unset it")
            check(not check_paths or Path(weights).is_file(), "pretrain.weights", weights,
                  "allowed: an existing backbone or checkpoint file")
        for stage in self.stages:
            if STAGES[stage].settings is not None:
                self.stage_config(stage, check_paths)

    def stage_config(self, stage: str, check_paths: bool = False) -> Any:
        """The settings object of a stage with a `downstream.<stage>` section, resolved: its preset, the
        section's values (None: the preset's) and the pipeline's arch, device and seed where the section sets
        none; a transfer stage's synthetic set is `downstream.synthetic`, written under `paths.cache_dir`."""
        settings_cls = STAGES[stage].settings
        section = {k: v for k, v in plain(getattr(self.downstream, stage)).items() if v is not None}
        base = {"arch": self.backbone.arch, "device": self.device, "seed": self.seed}
        try:
            if hasattr(settings_cls, "from_section"):  # presets and schedule rescaling (densecl.transfer.settings)
                stage_cfg = settings_cls.from_section(section, **base, synthetic=self.downstream.synthetic,
                                                      cache_dir=self.paths.cache_dir)
            else:
                names = {f.name for f in dataclasses.fields(settings_cls)}
                stage_cfg = from_dict(settings_cls, {**{k: v for k, v in base.items() if k in names}, **section})
                stage_cfg.validate()
            if check_paths and hasattr(stage_cfg, "check_data"):
                stage_cfg.check_data()
            return stage_cfg
        except ConfigValueError as err:
            raise err.within(f"downstream.{stage}") from None


@functools.cache
def section_schema(settings_cls: type) -> type:
    """The `downstream.<stage>` section of a stage whose settings are `settings_cls`: `preset` (when the class
    has presets) and every field the pipeline does not derive itself, each None until set; None keeps the
    preset's value (or the class default). A field keeps its declared role."""
    hints = typing.get_type_hints(settings_cls)
    derived = getattr(settings_cls, "DERIVED", ())
    made = [("preset", str | None, result(None))] if getattr(settings_cls, "PRESETS", None) else []
    for f in dataclasses.fields(settings_cls):
        if f.name not in derived:
            made.append((f.name, hints[f.name] | None, dataclasses.field(default=None, metadata=f.metadata)))
    return _made(f"{settings_cls.__name__}Section", made)


@functools.cache
def _pipeline_schema(version: int) -> type[PipelineConfig]:
    made = [("synthetic", SyntheticSet | None, result(None))]  # what the `synthetic` presets write, once, in the cache
    for stage in STAGES.with_settings():
        section = section_schema(stage.settings)
        made.append((stage.name, section, result(factory=section)))
    suffix = str(version) if version else ""
    downstream = _made(f"DownstreamConfig{suffix}", made)
    field = ("downstream", downstream, result(factory=downstream))
    return _made(f"PipelineSchema{suffix}", [field], bases=(PipelineConfig,))


def _made(name: str, fields: list, bases: tuple[type, ...] = ()) -> type:
    """A dataclass made from `fields`, kept in this module under `name`: Hydra configs typed by it pickle (the
    submitit launchers send each job its config), as long as the importing process makes it too (the built-in
    stages' schema is made on import)."""
    cls = dataclasses.make_dataclass(name, fields, bases=bases)
    cls.__module__ = __name__
    globals()[name] = cls
    return cls


def pipeline_schema() -> type[PipelineConfig]:
    """`PipelineConfig` with `downstream` typed: a section per stage of the registry (pipelines.registry), made
    again whenever the registry changes."""
    return _pipeline_schema(STAGES.version)


def settings(cfg: DictConfig) -> PipelineConfig:
    """The composed config as `PipelineConfig` (Hydra's own node left out), its relative data folder made
    absolute: a job may run from another folder."""
    values = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }
    obj = from_dict(pipeline_schema(), values)
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
    return str(voc) if not missing_segmentation_parts(voc) else "scenes"


def validate(cfg: DictConfig, check_paths: bool = True) -> None:
    settings(cfg).validate(check_paths=check_paths)


class UnknownKeyError(ValueError):
    """An override of a key that no section of the config has."""


def check_override_keys(overrides: Sequence[str]) -> None:
    """Refuse an override of a key no section has, naming the keys that section does have and the closest one
    (Hydra's own message suggests a `+`, which the schema refuses later): a misspelt key of a stage's section
    fails here, before anything is composed. Config groups (`+experiment=NAME`, `downstream=paper`) and
    Hydra's own keys are Hydra's to check."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key.startswith("hydra") or "@" in key or override.is_delete() or (CONF_DIR / key).is_dir():
            continue
        cls, path = pipeline_schema(), []
        for part in key.split("."):
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
                break  # inside a value (a list, a dict): Hydra checks it
            names = [f.name for f in dataclasses.fields(cls)]
            section = ".".join(path) or "the config"
            if part not in names:
                close = difflib.get_close_matches(part, names, n=1)
                hint = f"did you mean {'.'.join([*path, close[0]])}? " if close else ""
                raise UnknownKeyError(f"{key}: {section} has no key {part!r}; {hint}its keys: {', '.join(names)}")
            path.append(part)
            cls = concrete_type(typing.get_type_hints(cls)[part])


# ---------------------------------------------------------------------------------------------------------
# Job folders


def in_folder_name(key: str) -> bool:
    """Whether a job folder's name shows an override of `key`: a setting that changes results. Not a key of
    no setting (Hydra's `experiment` group), nor one that only says where and how a job runs."""
    return fields_along(pipeline_schema(), key) is not None and changes_results(pipeline_schema(), key)


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
    ConfigStore.instance().store(name="densecl_schema", node=pipeline_schema())
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


pipeline_schema()  # the built-in stages' schema, so that configs typed by it unpickle in a job
