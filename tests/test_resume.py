"""The one rule for reusing a folder's work (densecl.resume), on its own; each stage's use of it is tested with
the stage (engine, probe, transfer, pipeline)."""

import pytest

from densecl.config import Matching
from densecl.resume import RESULT_NEUTRAL, Reuse, SettingsChangedError, changed_settings, reuse

SETTINGS = {"model": {"loss_lambda": 0.5, "name": "densecl"}, "pretrain": {"iters": 10, "num_workers": 4}, "seed": 0}


def test_nothing_saved_is_new_and_saved_work_resumes_or_is_done(tmp_path):
    assert reuse(tmp_path, None, SETTINGS, finished=False) is Reuse.NEW
    assert reuse(tmp_path, SETTINGS, SETTINGS, finished=False) is Reuse.RESUME
    assert reuse(tmp_path, SETTINGS, SETTINGS, finished=True) is Reuse.DONE
    # finished before settings were recorded: nothing to compare, and nothing to redo
    assert reuse(tmp_path, None, SETTINGS, finished=True) is Reuse.DONE


def test_a_setting_that_changes_results_is_refused_naming_each_key(tmp_path):
    current = {**SETTINGS, "seed": 2, "model": {"loss_lambda": 0.0, "name": "densecl"}}
    with pytest.raises(SettingsChangedError) as err:
        reuse(tmp_path, SETTINGS, current, finished=True)
    assert err.value.changes == [("model.loss_lambda", 0.5, 0.0), ("seed", 0, 2)]
    message = str(err.value)
    assert str(tmp_path) in message and "model.loss_lambda: 0.5 then, 0.0 now; seed: 0 then, 2 now" in message
    assert "another name=" in message


@pytest.mark.parametrize("key", sorted(RESULT_NEUTRAL))
def test_settings_that_change_no_result_may_change_at_any_depth(key):
    saved = {"pretrain": {key: 1, "iters": 10}, "downstream": {"det_voc": {key: 1}}, key: 1}
    current = {"pretrain": {key: 2, "iters": 10}, "downstream": {"det_voc": {key: 2}}, key: 2}
    assert changed_settings(saved, current) == []
    assert changed_settings(saved, {**current, "pretrain": {key: 2, "iters": 11}}) == [("pretrain.iters", 10, 11)]


def test_values_compare_as_saved_to_json():
    """A folder's record is JSON: tuples come back as lists and enums as their values; neither is a change."""
    saved = {"steps": [90, 110], "matching": "backbone"}
    assert changed_settings(saved, {"steps": (90, 110), "matching": Matching.backbone}) == []
    assert changed_settings(saved, {"steps": (90, 100), "matching": Matching.random}) == [
        ("matching", "backbone", Matching.random), ("steps", [90, 110], (90, 100))
    ]


def test_a_key_only_one_side_holds_is_not_compared():
    """Callers fill a saved record's missing fields with their defaults first; what is left unmatched is a key
    the current config no longer has, or one the record never had."""
    assert changed_settings({"a": 1, "old": 3}, {"a": 1, "new": 4}) == []
