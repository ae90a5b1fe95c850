"""Resuming a run folder written before an option existed: the missing option counts as its default."""

import json

import pytest

from densecl.engine import PretrainConfig
from densecl.saved_config import changed_settings, field_defaults, with_defaults
from densecl.transfer.engine import StageConfig, _check_resumable
from densecl.transfer.segmentation import SegmentationConfig


def test_field_defaults_are_what_asdict_writes():
    assert field_defaults(StageConfig) == StageConfig().to_dict()
    defaults = field_defaults(PretrainConfig)
    assert defaults["bn_splits"] == 1 and defaults["data"]["kind"] == PretrainConfig().data.kind


def test_saved_values_win_over_defaults():
    assert with_defaults({"bn_splits": 4}, PretrainConfig)["bn_splits"] == 4
    assert with_defaults({}, PretrainConfig)["corr_eval_crop"] is None


def test_changed_settings_lists_differences_in_key_order_and_skips_ignored_keys():
    current = {**field_defaults(PretrainConfig), "seed": 3, "log_every": 7, "bn_splits": 2}
    saved = {key: value for key, value in field_defaults(PretrainConfig).items() if key != "bn_splits"}
    assert changed_settings(saved, current, PretrainConfig, {"log_every"}) == [("bn_splits", 1, 2), ("seed", 0, 3)]
    assert changed_settings(saved, field_defaults(PretrainConfig), PretrainConfig) == []


def write_stage_config(folder, config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stage_config.json").write_text(json.dumps({"config": config, "weights": None}))


def test_transfer_folder_without_a_later_field_resumes(tmp_path):
    cfg = SegmentationConfig.synthetic(str(tmp_path / "data"))
    old = cfg.to_dict()
    del old["amp"]  # written before `amp` existed: it ran in fp32, the default
    write_stage_config(tmp_path, old)
    _check_resumable(tmp_path, cfg.to_dict(), None, type(cfg))
    cfg.amp = "bf16"
    with pytest.raises(ValueError, match="amp: 'none' -> 'bf16'"):
        _check_resumable(tmp_path, cfg.to_dict(), None, type(cfg))
