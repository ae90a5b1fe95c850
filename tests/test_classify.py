"""The classification sanity check (densecl.evaluation.classify): a linear classifier on frozen global features of an
image folder separates classes the features tell apart, scores on a seeded held-out split or a val folder,
refuses folders that do not match, and runs as an optional pipeline stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densecl.evaluation.classify import classify, split_indices
from densecl.evaluation.settings import LinearClassifierConfig
from pipelines import schema

COLOURS = {"blue": (40, 60, 200), "red": (200, 50, 40), "green": (40, 170, 60)}


def image_folder(root: Path, per_class: int, seed: int = 0, classes=("blue", "red")) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            pixels = rng.normal(COLOURS[name], 30, (48, 56, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k}.png")
    return root


def config(root: Path, **kwargs) -> LinearClassifierConfig:
    return LinearClassifierConfig(root=str(root), input_size=64, epochs=30, batch_size=16, device="cpu", **kwargs)


def test_split_indices_are_seeded_disjoint_and_complete():
    train, val = split_indices(10, 0.3, seed=0)
    assert len(val) == 3 and sorted(train + val) == list(range(10)) and not set(train) & set(val)
    assert split_indices(10, 0.3, seed=0) == (train, val)
    assert any(split_indices(10, 0.3, seed=s)[1] != val for s in (1, 2, 3))
    with pytest.raises(ValueError, match="cannot be split"):
        split_indices(1, 0.5, seed=0)


@pytest.mark.usefixtures("one_thread")
def test_colour_classes_are_separated_on_frozen_random_features(tmp_path):
    root = image_folder(tmp_path / "colours", per_class=10, classes=("blue", "red", "green"))
    metrics = classify(config(root, val_fraction=0.3), weights=None)
    assert metrics["num_classes"] == 3 and metrics["top1"] >= 88 and metrics["top1_chance"] < 60


@pytest.mark.usefixtures("one_thread")
def test_a_val_folder_is_scored_and_must_hold_the_same_classes(tmp_path):
    train = image_folder(tmp_path / "train", per_class=8)
    val = image_folder(tmp_path / "val", per_class=4, seed=1)
    metrics = classify(config(train, val_root=str(val)), weights=None)
    assert metrics["top1"] == 100.0 and metrics["top1_chance"] == 50.0
    image_folder(tmp_path / "val", per_class=2, seed=2, classes=("green",))
    with pytest.raises(ValueError, match=r"val: classes \['blue', 'green', 'red'\] differ"):
        classify(config(train, val_root=str(val)), weights=None)


def test_a_folder_without_class_folders_is_refused_naming_it(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'flat'}: not a folder of class sub-folders"):
        classify(config(tmp_path / "flat"), weights=None)


def test_classify_is_an_optional_stage_of_the_pipeline(tmp_path):
    from pipelines.stages import RunLogger, planned_stages, run_stages

    assert "classify" not in schema.settings(schema.compose([], return_hydra_config=False)).stages
    root = image_folder(tmp_path / "colours", per_class=6)
    overrides = ["model=random_init", "stages=[classify]", "tracking=disabled", f"paths.output_dir={tmp_path}",
                 f"++downstream.classify.root={root}", "++downstream.classify.input_size=64",
                 "++downstream.classify.epochs=10", "++downstream.classify.device=cpu"]
    cfg = schema.compose(overrides, return_hydra_config=False)
    schema.validate(cfg, check_paths=True)
    assert planned_stages(schema.settings(cfg)) == ["classify"]
    metrics = run_stages(cfg, tmp_path / "job", RunLogger())["classify"]
    assert (tmp_path / "job" / "classify" / "DONE.json").is_file() and metrics["num_classes"] == 2
    missing = schema.compose([*overrides[:-4], f"++downstream.classify.root={tmp_path / 'nowhere'}"],
                             return_hydra_config=False)
    with pytest.raises(schema.ConfigValueError, match=r"downstream\.classify\.root=.*nowhere"):
        schema.validate(missing, check_paths=True)
