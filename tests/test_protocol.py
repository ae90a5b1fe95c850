"""The protocol guard (densecl.transfer.protocol): the paper presets deviate in nothing, every protocol field a
user changes is listed (with its documented effect where there is one), what the published code also runs
(one GPU at the total batch, ResNet-101) is no deviation, strict_protocol refuses before any work, the
synthetic and custom presets are their own protocols, and mlflow and the report carry the result."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from densecl.transfer.settings import COCODetectionConfig, SegmentationConfig, StageConfig, VOCDetectionConfig
from densecl.typed_settings import ConfigValueError, role_of
from pipelines import report, schema

PAPER_STAGES = ("det_voc", "det_coco", "seg_voc", "seg_cityscapes")


def stage_configs(*overrides: str) -> dict:
    cfg = schema.compose(["model=random_init", *overrides], return_hydra_config=False)
    settings = schema.settings(cfg)
    return {stage: settings.stage_config(stage) for stage in PAPER_STAGES}


def test_the_paper_presets_deviate_in_nothing():
    for stage, cfg in stage_configs("downstream=paper", "backbone=resnet50").items():
        assert cfg.own_protocol() is None, stage
        assert cfg.deviations() == [], (stage, [str(d) for d in cfg.deviations()])


@pytest.mark.parametrize("group", ["first_run", "synthetic"])
def test_the_synthetic_presets_are_their_own_protocol(group):
    for stage, cfg in stage_configs(f"downstream={group}").items():
        assert cfg.own_protocol() == "synthetic" and cfg.deviations() == [], stage


VOC = VOCDetectionConfig(num_gpus=8)
COCO = COCODetectionConfig(num_gpus=8)
SEG_VOC = SegmentationConfig.preset("voc", num_gpus=4)
SEG_CITYSCAPES = SegmentationConfig.preset("cityscapes", num_gpus=4)


@pytest.mark.parametrize(
    ("base", "changes", "keys", "effect"),
    [
        (VOC, {"ims_per_batch": 8}, ["ims_per_batch"], "DenseCL#6"),  # total batch
        (VOC, {"base_lr": 0.03}, ["base_lr"], ""),  # lr after scaling
        (VOC, {"max_iter": 12000, "steps": (9000, 11000)}, ["max_iter", "steps"], ""),  # iterations and steps
        (VOC, {"num_gpus": 2, "ims_per_batch": 8}, ["ims_per_batch"], "BN statistics"),  # SyncBN over 8 images
        (COCO, {"num_gpus": 1, "ims_per_batch": 8}, ["ims_per_batch"], "FPN, box and mask heads"),
        (VOC, {"extra_norm": False}, ["extra_norm"], ""),  # the extra BN after res5 (C4)
        (VOC, {"min_size_train": (800,), "min_size_test": 600}, ["min_size_train", "min_size_test"], ""),  # sizes
        (VOC, {"precise_bn": False}, ["precise_bn"], ""),
        (COCO, {"box_head_convs": 0, "box_head_fcs": 2}, ["box_head_convs", "box_head_fcs"], ""),
        (SEG_VOC, {"crop_size": 320}, ["crop_size"], ""),  # crops
        (SEG_VOC, {"ims_per_batch": 8}, ["ims_per_batch"], "DenseCL#38"),
        (SEG_VOC, {"train_dataset": "voc_2012_sem_seg_val"}, ["data sets"], "DenseCL#19"),
        (SEG_CITYSCAPES, {"test_mode": "whole", "align_corners": False}, ["test_mode", "align_corners"], ""),
        (SEG_VOC, {"arch": "resnet18", "amp": "bf16"}, ["arch", "amp"], ""),
    ],
)
def test_each_deviation_is_listed_with_its_known_effect(base, changes, keys, effect):
    cfg = dataclasses.replace(base, **changes)
    deviations = cfg.deviations()
    assert [d.key for d in deviations] == keys
    first = deviations[0]
    if first.key in changes:
        assert (first.value, first.protocol) == (changes[first.key], getattr(base, first.key))
    assert effect in first.effect and bool(first.effect) == bool(effect)


@pytest.mark.parametrize("base", [VOC, COCO, SEG_VOC, SEG_CITYSCAPES], ids=["voc", "coco", "seg_voc", "cityscapes"])
def test_one_gpu_at_the_total_batch_and_resnet101_are_the_protocol(base):
    """BN statistics over the whole batch in one process are SyncBN's over the same batch on several; the
    official code has ResNet-101 configs (VOC det 61.3 AP, VOC seg 74.1 mIoU)."""
    assert dataclasses.replace(base, num_gpus=1).deviations() == []
    assert dataclasses.replace(base, arch="resnet101").deviations() == []
    assert [d.key for d in dataclasses.replace(base, arch="resnet18").deviations()] == ["arch"]


def changed(value, name: str):
    """Another value of a protocol field, of its type (deviations() compares without validating)."""
    if name == "arch":
        return "resnet18"  # resnet101 is the protocol too
    if name in ("dataset", "train_dataset", "test_dataset") and isinstance(value, str):
        return {"dataset": "voc" if value == "cityscapes" else "cityscapes", "train_dataset": "voc_2012_sem_seg_val",
                "test_dataset": "voc_2012_sem_seg_train_aug"}[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, tuple):
        return (*value, value[-1]) if value else (1,)
    return f"other-{value}"


@pytest.mark.parametrize("base", [VOC, COCO, SEG_VOC, SEG_CITYSCAPES], ids=["voc", "coco", "seg_voc", "cityscapes"])
def test_every_protocol_field_changed_alone_is_the_one_deviation_listed(base):
    fields = [f for f in dataclasses.fields(base) if role_of(f).protocol]
    for f in fields:
        cfg = dataclasses.replace(base, **{f.name: changed(getattr(base, f.name), f.name)})
        keys = [d.key for d in cfg.deviations()]
        if isinstance(base, SegmentationConfig) and f.name == "dataset":
            continue  # it picks the protocol compared with (VOC's or Cityscapes'), whose own values then deviate
        derived = isinstance(base, SegmentationConfig) and f.name in ("train_dataset", "test_dataset")
        assert keys == ["data sets" if derived else f.name], f.name
    # and none of a stage's own fields is left out of the protocol: those outside are StageConfig's
    outside = {f.name for f in dataclasses.fields(base) if not role_of(f).protocol}
    assert outside == {f.name for f in dataclasses.fields(StageConfig) if not role_of(f).protocol}
    assert len(fields) + len(outside) == len(dataclasses.fields(base))


def test_settings_that_change_no_result_are_not_deviations():
    cfg = dataclasses.replace(VOC, device="cpu", num_workers=0, eval_period=100, checkpoint_period=7, seed=3,
                              data_root="/elsewhere", num_gpus=4, progress=False)
    assert cfg.deviations() == []


def test_strict_protocol_refuses_a_deviating_stage_before_any_work():
    sections = {"min_size_test": 600, "strict_protocol": True}
    with pytest.raises(ConfigValueError, match=r"^strict_protocol=True is invalid: .*min_size_test=600 \(protocol: "
                                               r"800\)"):
        VOCDetectionConfig.from_section(sections, arch="resnet50", device="auto", seed=0)
    VOCDetectionConfig.from_section({**sections, "min_size_test": 800}, arch="resnet50", device="auto", seed=0)
    VOCDetectionConfig.from_section({**sections, "min_size_test": 800, "num_gpus": 1}, arch="resnet101",
                                    device="auto", seed=0)
    cfg = schema.compose(["model=random_init", "downstream=paper", "backbone=resnet18", "stages=[det_voc]",
                          "++downstream.det_voc.strict_protocol=true"], return_hydra_config=False)
    with pytest.raises(ConfigValueError, match=r"^downstream\.det_voc\.strict_protocol=True .*arch=resnet18"):
        schema.validate(cfg, check_paths=False)


def test_strict_protocol_accepts_the_synthetic_presets():
    cfg = schema.compose(["model=random_init", "++downstream.det_voc.strict_protocol=true"],
                         return_hydra_config=False)
    schema.validate(cfg, check_paths=False)


def test_the_report_shows_each_stages_protocol_per_row():
    rows = []
    for matching in ("backbone", "geometric"):
        for seed in (0, 1):
            rows.append({"tags.override.matching": matching, "tags.override.seed": str(seed), "params.seed": str(seed),
                         "metrics.det_voc/AP": float(np.random.default_rng(seed).normal(50, 1)),
                         "tags.densecl.protocol.det_voc": "deviates" if matching == "geometric" and seed else "paper"})
    table = report.build_table(pd.DataFrame(rows), ["matching", "seed"], ["seed"])
    assert table.labels == ["det_voc protocol"]
    assert list(table.summary["det_voc protocol"]) == ["paper", "deviates/paper"]
    assert table.markdown().splitlines()[0] == "| matching | n | det_voc protocol | det_voc/AP |"


class RecordingRunLogger:
    def __init__(self):
        self.tags_logged, self.params_logged = {}, {}

    def tags(self, tags):
        self.tags_logged.update(tags)

    def params(self, params):
        self.params_logged.update(params)


def test_a_stage_lists_its_deviations_at_its_start_and_records_them(tmp_path, caplog):
    from pipelines.stages import Job, _record_protocol

    overrides = ["downstream=paper", "backbone=resnet18", "downstream.det_voc.num_gpus=1",
                 "downstream.det_voc.ims_per_batch=16", "downstream.det_voc.min_size_test=600"]
    cfg = schema.settings(schema.compose(["model=random_init", *overrides], return_hydra_config=False))
    tracking = RecordingRunLogger()
    with caplog.at_level("WARNING", logger="pipelines.stages"):
        _record_protocol(Job(cfg, tmp_path, tracking), "det_voc", cfg.stage_config("det_voc"))
    assert tracking.tags_logged == {"densecl.protocol.det_voc": "deviates"}
    assert tracking.params_logged == {"protocol_deviations.det_voc": "arch=resnet18 (resnet50); min_size_test=600 "
                                                                     "(800)"}
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["stage det_voc deviates from its published protocol: arch=resnet18 (protocol: resnet50)",
                        "stage det_voc deviates from its published protocol: min_size_test=600 (protocol: 800)"]

    tracking = RecordingRunLogger()
    default = schema.settings(schema.compose(["model=random_init"], return_hydra_config=False))
    _record_protocol(Job(default, tmp_path, tracking), "seg_voc", default.stage_config("seg_voc"))
    assert tracking.tags_logged == {"densecl.protocol.seg_voc": "synthetic"} and tracking.params_logged == {}


def test_eval_released_runs_the_paper_protocols_on_the_given_weights_without_pretraining(tmp_path):
    from pipelines.stages import Job, planned_stages, transfer_weights

    cfg = schema.compose(["+experiment=eval_released", "pretrain.weights=/ckpt/densecl_r50.pth"],
                         return_hydra_config=False)
    schema.validate(cfg, check_paths=False)
    settings = schema.settings(cfg)
    assert planned_stages(settings) == list(PAPER_STAGES)
    for stage in PAPER_STAGES:
        assert settings.stage_config(stage).deviations() == [], stage
    assert str(transfer_weights(Job(settings, tmp_path, None))) == "/ckpt/densecl_r50.pth"


@pytest.mark.detectron2
@pytest.mark.parametrize("cfg", [VOC, COCO, SEG_VOC, SEG_CITYSCAPES], ids=["voc", "coco", "seg_voc", "cityscapes"])
def test_what_no_setting_changes_matches_the_protocol_in_the_built_detectron2_config(cfg, tmp_path):
    from densecl.transfer.protocol import fixed_deviations
    from densecl.transfer.runner import base_d2_config

    d2 = base_d2_config(dataclasses.replace(cfg, device="cpu", num_gpus=1), str(tmp_path))
    assert fixed_deviations(d2) == []
    d2.MODEL.PIXEL_MEAN, d2.MODEL.PIXEL_STD = [103.530, 116.280, 123.675], [1.0, 1.0, 1.0]  # caffe2 weights
    d2.MODEL.BACKBONE.FREEZE_AT = 2
    assert [d.key for d in fixed_deviations(d2)] == ["MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "MODEL.BACKBONE.FREEZE_AT"]
