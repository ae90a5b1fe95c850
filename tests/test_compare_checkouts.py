"""benchmarks/compare_checkouts.py's comparisons, on fake stage outputs: identical folders pass, and each kind of
difference planted once is found (or, for a timing key, listed and not compared). The runs themselves take
minutes and are not run here."""

import copy
import importlib.util
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = load_script("compare_checkouts")

METRICS = {
    "pretrain": {"loss": 7.25, "lambda": 0.5, "images_per_sec": 41.5, "iterations": 120.0},
    "convert": {"num_tensors": 3.0},
    "det_voc": {"AP": 0.039, "AP50": 0.298, "AP75": 0.0},
    "seg_voc": {"mIoU": 12.5, "pACC": 80.25},
}
WEIGHTS = {
    "conv1.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
    "bn1.running_var": torch.tensor([1.0, 0.5]),
    "bn1.num_batches_tracked": torch.tensor(5),
}


def write_job(job: Path, metrics: dict, weights: dict, stages: tuple[str, ...]) -> None:
    """A job folder as the pipeline leaves it: metrics.json per stage, the backbone, checkpoint and .pkl."""
    for stage in stages:
        (job / stage).mkdir(parents=True)
        (job / stage / "metrics.json").write_text(json.dumps(metrics[stage]))
    torch.save({"state_dict": weights, "arch": "resnet18"}, job / "pretrain" / "backbone.pth")
    torch.save({"model": {f"encoder_q.{k}": v for k, v in weights.items()}, "config": {"layout": str(job)}},
               job / "pretrain" / "checkpoint.pt")
    if "convert" in stages:
        with (job / "convert" / "backbone.pkl").open("wb") as f:
            pickle.dump({"model": {f"res.{k}": v.numpy() for k, v in weights.items()}, "arch": "resnet18"}, f)


def write_outputs(workdir: Path, metrics: dict | None = None, weights: dict | None = None,
                  seeded_weights: dict | None = None) -> None:
    """Both runs of one checkout, laid out as compare_checkouts.run_checkout leaves them."""
    metrics, weights = metrics or METRICS, weights or WEIGHTS
    write_job(compare.default_job(workdir), metrics, weights, compare.DEFAULT_STAGES)
    seeded = workdir / "pretrain" / "runs" / compare.PRETRAIN_NAME / "model.num_regions=2,seed=3"
    write_job(seeded, metrics, seeded_weights or weights, ("pretrain",))


def different(rows) -> dict[str, str]:
    return {row.item: row.detail for row in rows if row.status == compare.DIFFERENT}


def test_identical_outputs_compare_equal_item_by_item(tmp_path):
    write_outputs(tmp_path / "a")
    write_outputs(tmp_path / "b")
    rows = compare.compare_runs(tmp_path / "a", tmp_path / "b")
    assert different(rows) == {}
    status = {row.item: row.status for row in rows}
    for stage, values in METRICS.items():  # every key of every stage was looked at
        for key in values:
            expected = compare.TIMING if key == "images_per_sec" else compare.SAME
            assert status[f"default {stage} {key}"] == expected
    for key in METRICS["pretrain"]:
        assert f"seeded pretrain {key}" in status
    weight_rows = ["default pretrain/backbone.pth", "default pretrain/checkpoint.pt", "default convert/backbone.pkl",
                   "seeded pretrain/backbone.pth", "seeded pretrain/checkpoint.pt"]
    assert [status[item] for item in weight_rows] == [compare.SAME] * 5
    details = {row.item: row.detail for row in rows}
    assert details["default convert/backbone.pkl"] == "3 tensors, bitwise"


def test_skip_default_compares_only_the_seeded_pretraining(tmp_path):
    write_outputs(tmp_path / "a")
    write_outputs(tmp_path / "b", metrics={**METRICS, "det_voc": {"AP": 0.5}})  # not looked at
    rows = compare.compare_runs(tmp_path / "a", tmp_path / "b", skip_default=True)
    assert different(rows) == {}
    assert rows and all(row.item.startswith("seeded ") for row in rows)


def test_a_metric_value_that_differs_is_reported(tmp_path):
    changed = copy.deepcopy(METRICS)
    changed["det_voc"]["AP50"] = 0.298 + 1e-12  # the last bits of a float are enough
    write_outputs(tmp_path / "a")
    write_outputs(tmp_path / "b", metrics=changed)
    rows = compare.compare_runs(tmp_path / "a", tmp_path / "b")
    assert different(rows) == {"default det_voc AP50": f"A 0.298, B {0.298 + 1e-12!r}"}


def test_a_missing_metric_key_is_reported(tmp_path):
    changed = copy.deepcopy(METRICS)
    del changed["seg_voc"]["pACC"]
    write_outputs(tmp_path / "a")
    write_outputs(tmp_path / "b", metrics=changed)
    rows = compare.compare_runs(tmp_path / "a", tmp_path / "b")
    assert different(rows) == {"default seg_voc pACC": "missing in B"}


def test_a_missing_stage_is_reported(tmp_path):
    write_outputs(tmp_path / "a")
    write_outputs(tmp_path / "b")
    (compare.default_job(tmp_path / "a") / "seg_voc" / "metrics.json").unlink()
    rows = compare.compare_runs(tmp_path / "a", tmp_path / "b")
    assert different(rows) == {"default seg_voc": "no metrics.json in A"}


def test_a_timing_key_that_differs_is_listed_not_compared(tmp_path):
    changed = copy.deepcopy(METRICS)
    changed["pretrain"]["images_per_sec"] = 12.0
    write_outputs(tmp_path / "a")
    write_outputs(tmp_path / "b", metrics=changed)
    rows = compare.compare_runs(tmp_path / "a", tmp_path / "b")
    assert different(rows) == {}
    timing = {row.item: row.detail for row in rows if row.status == compare.TIMING}
    assert timing == {"default pretrain images_per_sec": "A 41.5, B 12.0",
                      "seeded pretrain images_per_sec": "A 41.5, B 12.0"}


@pytest.mark.parametrize("key", ["images_per_sec", "seconds", "data_per_sec"])
def test_timing_keys_are_recognised(key):
    assert compare.is_timing_key(key)
    assert not compare.is_timing_key(f"{key}_mean") and not compare.is_timing_key("loss")


def test_a_tensor_that_differs_in_one_element_is_reported(tmp_path):
    changed = {k: v.clone() for k, v in WEIGHTS.items()}
    changed["conv1.weight"][1, 2] = torch.nextafter(changed["conv1.weight"][1, 2], torch.tensor(1.0))  # one ulp
    write_outputs(tmp_path / "a")
    write_outputs(tmp_path / "b", seeded_weights=changed)
    rows = compare.compare_runs(tmp_path / "a", tmp_path / "b")
    diffs = different(rows)
    assert set(diffs) == {"seeded pretrain/backbone.pth", "seeded pretrain/checkpoint.pt"}
    assert diffs["seeded pretrain/backbone.pth"].startswith("conv1.weight: 1/6 elements differ")
    assert diffs["seeded pretrain/checkpoint.pt"].startswith("encoder_q.conv1.weight: 1/6 elements differ")


def test_compare_tensors_finds_keys_dtypes_and_single_elements():
    a = {"w": torch.zeros(3), "b": torch.ones(2)}
    assert compare.compare_tensors(a, {k: v.clone() for k, v in a.items()}, "x").status == compare.SAME
    cases = {
        "only in B: extra": {**a, "extra": torch.zeros(1)},
        "only in A: b": {"w": torch.zeros(3)},
        "w: torch.float32[3] vs torch.float64[3]": {**a, "w": torch.zeros(3, dtype=torch.float64)},
        "w: 1/3 elements differ": {**a, "w": torch.tensor([0.0, -0.0, 0.0])},  # == but not the same bits
    }
    for start, b in cases.items():
        row = compare.compare_tensors(a, b, "x")
        assert row.status == compare.DIFFERENT and row.detail.startswith(start), (start, row)


def test_compare_tensors_on_numpy_arrays():
    a = {"w": np.arange(4, dtype=np.float32), "nan": np.array([np.nan], dtype=np.float32)}
    assert compare.compare_tensors(a, copy.deepcopy(a), "x").status == compare.SAME  # NaN equals its own bits
    b = copy.deepcopy(a)
    b["w"][3] = 3.5
    row = compare.compare_tensors(a, b, "x")
    assert row.status == compare.DIFFERENT and row.detail == "w: 1/4 elements differ, max |A-B| 0.5"


def test_the_checkpoint_config_is_not_compared(tmp_path):
    write_outputs(tmp_path / "a")
    write_outputs(tmp_path / "b")  # write_job stores a "config" naming its own folder: A's and B's differ
    configs = [torch.load(compare.pretrain_job(tmp_path / side) / "pretrain" / "checkpoint.pt",
                          weights_only=True)["config"] for side in "ab"]
    assert configs[0] != configs[1]
    assert different(compare.compare_runs(tmp_path / "a", tmp_path / "b", skip_default=True)) == {}


def test_a_missing_seeded_job_is_reported(tmp_path):
    write_outputs(tmp_path / "a")
    write_outputs(tmp_path / "b")
    (compare.pretrain_job(tmp_path / "b") / "pretrain" / "backbone.pth").unlink()
    rows = compare.compare_runs(tmp_path / "a", tmp_path / "b", skip_default=True)
    assert different(rows) == {"seeded pretrain": "no single */pretrain/backbone.pth in B"}


def test_checkout_env_puts_the_checkout_first_and_drops_the_mlflow_run(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = compare.checkout_env(tmp_path)
    assert "MLFLOW_RUN_ID" not in env
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/elsewhere"]


def test_two_seeded_job_folders_are_not_guessed_between(tmp_path):
    write_outputs(tmp_path / "a")
    write_outputs(tmp_path / "b")
    job = compare.pretrain_job(tmp_path / "b")
    write_job(job.parent / "seed=4", METRICS, WEIGHTS, ("pretrain",))  # a stray earlier run next to it
    rows = compare.compare_runs(tmp_path / "a", tmp_path / "b", skip_default=True)
    assert different(rows) == {"seeded pretrain": "no single */pretrain/backbone.pth in B"}
