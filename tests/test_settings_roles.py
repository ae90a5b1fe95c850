"""Every setting declares its role on its field (densecl.typed_settings: `result` or `neutral`, and whether it
belongs to a published protocol); resume, the protocol guard and job folder names read nothing else. A field
declared without a role fails here, and conf/ restates no default."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from densecl.evaluation.settings import LinearClassifierConfig, LinearProbeConfig
from densecl.training.settings import PretrainConfig
from densecl.transfer.custom import CustomDataset
from densecl.transfer.settings import (
    COCODetectionConfig,
    SegmentationConfig,
    StageConfig,
    SyntheticSet,
    VOCDetectionConfig,
)
from densecl.typed_settings import concrete_type, result, role_of, unclassified_fields
from pipelines.registry import STAGES
from pipelines.schema import pipeline_schema

CONF = Path(__file__).resolve().parent.parent / "conf"
SETTINGS = [pipeline_schema(), PretrainConfig, VOCDetectionConfig, COCODetectionConfig, SegmentationConfig,
            LinearProbeConfig, LinearClassifierConfig, CustomDataset, SyntheticSet,
            *(stage.settings for stage in STAGES.with_settings())]  # fmt: skip


@pytest.mark.parametrize("schema", SETTINGS, ids=lambda cls: cls.__name__)
def test_every_setting_declares_its_role(schema):
    assert unclassified_fields(schema) == []


@dataclass
class Inner:
    kept: int = result(0)
    bare: int = 0


@dataclass
class Outer:
    inner: Inner = result(factory=Inner)
    plain: Inner = field(default_factory=Inner)


def test_a_field_declared_without_a_role_is_found_at_any_depth():
    assert unclassified_fields(Outer) == ["inner.bare", "plain", "plain.bare"]


def test_a_subclass_that_changes_a_default_keeps_the_role():
    """Redefining a field in a subclass (a protocol's own default) without `result(...)` would drop its role."""
    for cls in (VOCDetectionConfig, COCODetectionConfig, SegmentationConfig):
        assert unclassified_fields(cls) == []
        assert role_of(next(f for f in dataclasses.fields(cls) if f.name == "max_iter")).protocol


def test_the_protocol_compares_what_is_trained_and_how_it_is_scored():
    """The fields outside every published protocol: where and how fast a stage runs, where its data are, its
    seed, the user's own set, and num_gpus (BN statistics cover the total batch either way: ims_per_batch is
    compared)."""
    outside = {f.name for f in dataclasses.fields(StageConfig) if not role_of(f).protocol}
    assert outside == {"device", "seed", "num_workers", "progress", "log_period", "checkpoint_period",
                       "eval_period", "data_root", "synthetic_root", "synthetic", "num_gpus", "custom",
                       "strict_protocol"}  # fmt: skip


# --------------------------------------------------------------------------------- conf/ restates no default
GROUPS = ("backbone", "model", "matching", "data", "downstream", "paths", "tracking")


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    found = []
    for key, value in tree.items():
        if key == "defaults":
            continue
        if isinstance(value, dict) and value:
            found += _leaves(value, f"{prefix}{key}.")
        else:
            found.append((f"{prefix}{key}", value))
    return found


def _default(schema: type, key: str) -> Any:
    """The schema's default at a dotted key; below a section whose default is None, its class's defaults."""
    cls, value = schema, None
    for part in key.split("."):
        f = {f.name: f for f in dataclasses.fields(cls)}[part]
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        cls = concrete_type(typing.get_type_hints(cls)[part])
    return value


def _yaml_files() -> list[tuple[str, Path]]:
    files = [("", CONF / "config.yaml")]
    files += [(f"{group}.", path) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
    return files


@pytest.mark.parametrize(("prefix", "path"), _yaml_files(), ids=lambda v: str(v).rsplit("conf/", 1)[-1])
def test_conf_holds_only_values_that_differ_from_the_defaults(prefix, path):
    """A value equal to its dataclass default would pin it: changing the default would change nothing."""
    tree = yaml.safe_load(path.read_text()) or {}
    if prefix == "":
        tree = {k: v for k, v in tree.items() if k != "hydra"}
    schema = pipeline_schema()
    restated = []
    for key, value in _leaves(tree, prefix):
        default = _default(schema, key)
        default = list(default) if isinstance(default, tuple) else getattr(default, "value", default)
        if value == default:
            restated.append(f"{key}: {value!r}")
    assert restated == []
