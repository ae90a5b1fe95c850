"""The one rule for reusing a folder's work (densecl.resume), on its own; each stage's use of it is tested with
the stage (engine, probe, transfer, pipeline)."""

from dataclasses import dataclass

import pytest

from densecl.method.settings import Matching
from densecl.resume import Reuse, SettingsChangedError, changed_settings, reuse
from densecl.training.settings import PretrainConfig
from densecl.typed_settings import neutral, result

SETTINGS = {"model": {"loss_lambda": 0.5, "name": "densecl"}, "pretrain": {"iters": 10, "num_workers": 4}, "seed": 0}


def test_nothing_saved_is_new_and_saved_work_resumes_or_is_done(tmp_path):
    assert reuse(tmp_path, None, SETTINGS, finished=False, schema=PretrainConfig) is Reuse.NEW
    assert reuse(tmp_path, SETTINGS, SETTINGS, finished=False, schema=PretrainConfig) is Reuse.RESUME
    assert reuse(tmp_path, SETTINGS, SETTINGS, finished=True, schema=PretrainConfig) is Reuse.DONE
    # finished before settings were recorded: nothing to compare, and nothing to redo
    assert reuse(tmp_path, None, SETTINGS, finished=True, schema=PretrainConfig) is Reuse.DONE


def test_a_setting_that_changes_results_is_refused_naming_each_key(tmp_path):
    current = {**SETTINGS, "seed": 2, "model": {"loss_lambda": 0.0, "name": "densecl"}}
    with pytest.raises(SettingsChangedError) as err:
        reuse(tmp_path, SETTINGS, current, finished=True, schema=PretrainConfig)
    assert err.value.changes == [("model.loss_lambda", 0.5, 0.0), ("seed", 0, 2)]
    message = str(err.value)
    assert str(tmp_path) in message and "model.loss_lambda: 0.5 then, 0.0 now; seed: 0 then, 2 now" in message
    assert "another name=" in message


@dataclass
class Inner:
    kept: int = result(0)
    free: int = neutral(0)


@dataclass
class Outer:
    inner: Inner = result(factory=Inner)
    shown: Inner = neutral(factory=Inner)  # a neutral section: every key in it changes no result
    top: int = result(0)


def test_the_declared_role_decides_at_every_depth():
    saved = {"inner": {"kept": 1, "free": 1}, "shown": {"kept": 1, "free": 1}, "top": 1}
    free = {"inner": {"kept": 1, "free": 2}, "shown": {"kept": 2, "free": 2}, "top": 1}
    assert changed_settings(saved, free, Outer) == []
    changed = {"inner": {"kept": 2, "free": 2}, "shown": {"kept": 2, "free": 2}, "top": 3}
    assert changed_settings(saved, changed, Outer) == [("inner.kept", 1, 2), ("top", 1, 3)]


def test_keys_the_schema_does_not_have_always_compare():
    """A record's other keys (a transfer stage's starting weights) and keys of no field are compared: an unknown
    key is never taken for one that changes nothing."""
    saved = {"config": {"top": 1, "shown": {"free": 1}}, "weights": "a.pth", "unknown": 1}
    current = {"config": {"top": 1, "shown": {"free": 2}}, "weights": "b.pth", "unknown": 2}
    assert changed_settings(saved, current, Outer, within="config.") == [
        ("unknown", 1, 2), ("weights", "a.pth", "b.pth")
    ]


def test_the_pretraining_settings_that_change_no_result():
    """What a rerun of a pre-training may change freely: where and how fast it runs and what it shows."""
    saved = {"device": "cpu", "pretrain": {"num_workers": 1, "progress": True, "log_every": 10, "ckpt_every": 5,
                                           "compile": False, "figure": {"threshold": 0.9}, "iters": 10},
             "data": {"cache_dir": None}}  # fmt: skip
    current = {"device": "cuda", "pretrain": {"num_workers": 8, "progress": False, "log_every": 20, "ckpt_every": 9,
                                              "compile": True, "figure": {"threshold": 0.5}, "iters": 10},
               "data": {"cache_dir": "/cache"}}  # fmt: skip
    assert changed_settings(saved, current, PretrainConfig) == []
    current["pretrain"]["iters"] = 11
    assert changed_settings(saved, current, PretrainConfig) == [("pretrain.iters", 10, 11)]


def test_values_compare_as_saved_to_json():
    """A folder's record is JSON: tuples come back as lists and enums as their values; neither is a change."""
    saved = {"steps": [90, 110], "matching": "backbone"}
    assert changed_settings(saved, {"steps": (90, 110), "matching": Matching.backbone}, Outer) == []
    assert changed_settings(saved, {"steps": (90, 100), "matching": Matching.random}, Outer) == [
        ("matching", "backbone", Matching.random), ("steps", [90, 110], (90, 100))
    ]


def test_a_key_only_one_side_holds_is_not_compared():
    """Callers fill a saved record's missing fields with their defaults first; what is left unmatched is a key
    the current config no longer has, or one the record never had."""
    assert changed_settings({"a": 1, "old": 3}, {"a": 1, "new": 4}, Outer) == []
