"""Transfer stage configs from pipeline sections, and the reuse of a stage's output folder: done, resumed or
refused (densecl.resume), with fields added since a folder was written counting as their defaults."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from densecl.transfer.settings import (
    COCODetectionConfig,
    SegmentationConfig,
    SyntheticSet,
    VOCDetectionConfig,
)
from densecl.typed_settings import ConfigValueError, plain
from pipelines.registry import STAGES

# ------------------------------------------------------------------------------------------ from_section
# Expected values derived by running the code of an earlier layout (presets computed by formula, not written out)
# on the same sections: each class's defaults, and per case the fields that differ from them. The synthetic set a
# config describes (`synthetic`) is checked separately.
SYNTHETIC = SyntheticSet(num_train=96, num_val=32, image_size=160, seed=0)  # conf/downstream/synthetic.yaml
ADDED_SINCE = {"progress": True, "custom": None, "strict_protocol": False}  # fields added since, at their defaults
ADDED_SINCE_DETECTION = {"score_thresh_test": 0.05}


def added_since(cls_name: str) -> dict:
    return {**ADDED_SINCE, **(ADDED_SINCE_DETECTION if "Detection" in cls_name else {})}


BASE_DEFAULTS = {
    "VOCDetectionConfig": {
        "arch": "resnet50", "data_root": "", "synthetic_root": "",
        "max_iter": 24000, "ims_per_batch": 16, "base_lr": 0.02, "momentum": 0.9,
        "weight_decay": 0.0001, "steps": (18000, 22000), "warmup_iters": 100, "warmup_factor": 0.001,
        "clip_grad_norm": 0.0, "num_gpus": 1, "device": "auto", "seed": 0, "eval_period": 0,
        "checkpoint_period": 5000, "log_period": 20, "num_workers": 4, "precise_bn": True, "precise_bn_iters": 200,
        "amp": "none", "train_datasets": ("voc_2007_trainval", "voc_2012_trainval"), "test_dataset": "voc_2007_test",
        "min_size_train": (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800), "max_size_train": 1333,
        "min_size_test": 800, "max_size_test": 1333, "rpn_pre_nms_topk_train": 12000, "rpn_post_nms_topk_train": 2000,
        "rpn_pre_nms_topk_test": 6000, "rpn_post_nms_topk_test": 1000, "roi_batch_size_per_image": 512,
        "detections_per_image": 100, "extra_norm": True,
    },
    "COCODetectionConfig": {
        "arch": "resnet50", "data_root": "", "synthetic_root": "",
        "max_iter": 90000, "ims_per_batch": 16, "base_lr": 0.02, "momentum": 0.9,
        "weight_decay": 0.0001, "steps": (60000, 80000), "warmup_iters": 1000, "warmup_factor": 0.001,
        "clip_grad_norm": 0.0, "num_gpus": 1, "device": "auto", "seed": 0, "eval_period": 0,
        "checkpoint_period": 5000, "log_period": 20, "num_workers": 4, "precise_bn": True, "precise_bn_iters": 200,
        "amp": "none", "train_datasets": ("coco_2017_train",), "test_dataset": "coco_2017_val",
        "min_size_train": (640, 672, 704, 736, 768, 800), "max_size_train": 1333, "min_size_test": 800,
        "max_size_test": 1333, "rpn_pre_nms_topk_train": 2000, "rpn_post_nms_topk_train": 1000,
        "rpn_pre_nms_topk_test": 1000, "rpn_post_nms_topk_test": 1000, "roi_batch_size_per_image": 512,
        "detections_per_image": 100, "box_head_convs": 4, "box_head_fcs": 1, "mask_format": "auto",
    },
    "SegmentationConfig": {
        "arch": "resnet50", "data_root": "", "synthetic_root": "",
        "max_iter": 20000, "ims_per_batch": 16, "base_lr": 0.01, "momentum": 0.9,
        "weight_decay": 0.0005, "steps": (), "warmup_iters": 0, "warmup_factor": 0.001, "clip_grad_norm": 0.0,
        "num_gpus": 1, "device": "auto", "seed": 0, "eval_period": 0, "checkpoint_period": 5000, "log_period": 20,
        "num_workers": 4, "precise_bn": False, "precise_bn_iters": 200, "amp": "none", "dataset": "voc",
        "train_dataset": "", "test_dataset": "", "crop_size": 512, "img_scale": (2048, 512),
        "ratio_range": (0.5, 2.0), "cat_max_ratio": 0.75, "photometric": True, "test_mode": "whole",
        "slide_stride": 513, "align_corners": False, "head_channels": 512, "aux_channels": 256, "dropout": 0.1,
        "aux_weight": 0.4, "poly_power": 0.9, "min_lr": 0.0001,
    },
}  # fmt: skip
DETECTION_SECTION = {  # conf/downstream/synthetic.yaml's det_voc and det_coco
    "preset": "synthetic", "ims_per_batch": 4, "max_iter": 120, "roi_batch_size_per_image": 32,
    "rpn_post_nms_topk_test": 100, "precise_bn_iters": 10, "num_workers": 0,
}  # fmt: skip
SYNTHETIC_ROOT = "/cache/synthetic-v2-96x32-160px-seed0"
CASES = [  # stage, section, the pipeline's (arch, device, seed), the config class, fields that differ from its defaults
    ("det_voc", DETECTION_SECTION, ("resnet18", "auto", 0), "VOCDetectionConfig", {
        "arch": "resnet18", "synthetic_root": SYNTHETIC_ROOT, "max_iter": 120,
        "ims_per_batch": 4, "base_lr": 0.005, "steps": (90, 110), "warmup_iters": 1, "clip_grad_norm": 10.0,
        "checkpoint_period": 25, "num_workers": 0, "precise_bn_iters": 10, "train_datasets": ("synthetic_voc_train",),
        "test_dataset": "synthetic_voc_val", "min_size_train": (128, 160, 192), "max_size_train": 320,
        "min_size_test": 160, "max_size_test": 320, "rpn_post_nms_topk_train": 500, "rpn_post_nms_topk_test": 100,
        "roi_batch_size_per_image": 32,
    }),
    ("det_coco", DETECTION_SECTION, ("resnet18", "auto", 0), "COCODetectionConfig", {
        "arch": "resnet18", "synthetic_root": SYNTHETIC_ROOT, "max_iter": 120,
        "ims_per_batch": 4, "base_lr": 0.005, "steps": (80, 107), "warmup_iters": 1, "clip_grad_norm": 10.0,
        "checkpoint_period": 7, "num_workers": 0, "precise_bn_iters": 10, "train_datasets": ("synthetic_coco_train",),
        "test_dataset": "synthetic_coco_val", "min_size_train": (128, 160, 192), "max_size_train": 320,
        "min_size_test": 160, "max_size_test": 320, "rpn_pre_nms_topk_train": 1000, "rpn_post_nms_topk_train": 500,
        "rpn_post_nms_topk_test": 100, "roi_batch_size_per_image": 32,
    }),
    ("seg_voc", {"preset": "synthetic", "ims_per_batch": 4, "max_iter": 120, "base_lr": 0.04, "num_workers": 0},
     ("resnet18", "auto", 0), "SegmentationConfig", {
        "arch": "resnet18", "synthetic_root": SYNTHETIC_ROOT, "max_iter": 120,
        "ims_per_batch": 4, "base_lr": 0.04, "clip_grad_norm": 10.0, "checkpoint_period": 300, "num_workers": 0,
        "dataset": "synthetic", "crop_size": 128, "img_scale": (640, 160), "precise_bn_iters": 6,
    }),
    ("seg_cityscapes", {"preset": "synthetic", "ims_per_batch": 4, "max_iter": 120, "num_workers": 0,
                        "test_mode": "slide", "slide_stride": 96, "align_corners": True},
     ("resnet18", "auto", 0), "SegmentationConfig", {
        "arch": "resnet18", "synthetic_root": SYNTHETIC_ROOT, "max_iter": 120,
        "ims_per_batch": 4, "base_lr": 0.005, "clip_grad_norm": 10.0, "checkpoint_period": 300, "num_workers": 0,
        "dataset": "synthetic", "crop_size": 128, "img_scale": (640, 160), "test_mode": "slide", "slide_stride": 96,
        "align_corners": True, "precise_bn_iters": 6,
    }),
    # conf/downstream/paper.yaml's sections
    ("det_voc", {"data_root": "/data", "num_gpus": 8}, ("resnet50", "auto", 0), "VOCDetectionConfig", {
        "data_root": "/data", "num_gpus": 8,
    }),
    ("det_coco", {"data_root": "/data", "num_gpus": 8}, ("resnet50", "auto", 0), "COCODetectionConfig", {
        "data_root": "/data", "num_gpus": 8,
    }),
    ("seg_voc", {"preset": "voc", "data_root": "/data", "num_gpus": 8}, ("resnet50", "auto", 0),
     "SegmentationConfig", {"data_root": "/data", "num_gpus": 8}),
    ("seg_cityscapes", {"preset": "cityscapes", "data_root": "/data", "num_gpus": 8}, ("resnet50", "auto", 0),
     "SegmentationConfig", {
        "data_root": "/data", "max_iter": 40000, "ims_per_batch": 8, "num_gpus": 8, "dataset": "cityscapes",
        "crop_size": 769, "img_scale": (2049, 1025), "test_mode": "slide", "align_corners": True,
    }),
    # scaled only; shortened only; the section's arch/seed/device over the pipeline's, lists as tuples; no preset
    ("det_voc", {"preset": "synthetic", "ims_per_batch": 2}, ("resnet18", "auto", 3), "VOCDetectionConfig", {
        "arch": "resnet18", "synthetic_root": SYNTHETIC_ROOT, "max_iter": 8000,
        "ims_per_batch": 2, "base_lr": 0.0025, "steps": (6000, 7332), "warmup_iters": 32, "clip_grad_norm": 10.0,
        "seed": 3, "checkpoint_period": 1668, "num_workers": 2, "precise_bn_iters": 20,
        "train_datasets": ("synthetic_voc_train",), "test_dataset": "synthetic_voc_val",
        "min_size_train": (128, 160, 192), "max_size_train": 320, "min_size_test": 160, "max_size_test": 320,
        "rpn_post_nms_topk_train": 500, "rpn_post_nms_topk_test": 300, "roi_batch_size_per_image": 128,
    }),
    ("seg_cityscapes", {"preset": "synthetic", "max_iter": 50}, ("resnet18", "cuda", 0), "SegmentationConfig", {
        "arch": "resnet18", "synthetic_root": SYNTHETIC_ROOT, "max_iter": 50,
        "ims_per_batch": 8, "clip_grad_norm": 10.0, "device": "cuda", "checkpoint_period": 125, "num_workers": 2,
        "dataset": "synthetic", "crop_size": 128, "img_scale": (640, 160), "precise_bn_iters": 5,
    }),
    ("det_coco", {"preset": "synthetic", "arch": "resnet34", "seed": 5, "device": "cpu", "min_size_train": [96],
                  "steps": [10, 20], "max_iter": 100},
     ("resnet18", "auto", 1), "COCODetectionConfig", {
        "arch": "resnet34", "synthetic_root": SYNTHETIC_ROOT, "max_iter": 100,
        "ims_per_batch": 8, "base_lr": 0.01, "steps": (10, 20), "warmup_iters": 1, "clip_grad_norm": 10.0,
        "device": "cpu", "seed": 5, "checkpoint_period": 6, "num_workers": 2, "precise_bn_iters": 1,
        "train_datasets": ("synthetic_coco_train",), "test_dataset": "synthetic_coco_val", "min_size_train": (96,),
        "max_size_train": 320, "min_size_test": 160, "max_size_test": 320, "rpn_pre_nms_topk_train": 1000,
        "rpn_post_nms_topk_train": 500, "rpn_post_nms_topk_test": 300, "roi_batch_size_per_image": 128,
    }),
    ("det_voc", {"ims_per_batch": 8, "max_iter": 1000}, ("resnet50", "auto", 0), "VOCDetectionConfig", {
        "max_iter": 1000, "ims_per_batch": 8, "base_lr": 0.01, "steps": (750, 917), "warmup_iters": 4,
        "checkpoint_period": 208, "precise_bn_iters": 4,
    }),
]  # fmt: skip


def _from_section(stage: str, section: dict, arch="resnet18", device="auto", seed=0, **kwargs):
    kwargs = {"synthetic": SYNTHETIC, "cache_dir": "/cache", **kwargs}
    return STAGES[stage].settings.from_section(section, arch=arch, device=device, seed=seed, **kwargs)


def _fields(cfg) -> dict:
    """The config's fields but the synthetic set it describes (checked on its own)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in plain(cfg).items() if k != "synthetic"}


def test_class_defaults_are_the_protocols():
    for cls in (VOCDetectionConfig, COCODetectionConfig, SegmentationConfig):
        assert _fields(cls()) == {**BASE_DEFAULTS[cls.__name__], **added_since(cls.__name__)}, cls.__name__
        assert cls().synthetic == SyntheticSet()


@pytest.mark.parametrize(("stage", "section", "pipeline", "cls_name", "changed"), CASES)
def test_sections_resolve_to_the_values_of_the_formula_presets(stage, section, pipeline, cls_name, changed):
    arch, device, seed = pipeline
    given = copy.deepcopy(section)
    cfg = _from_section(stage, section, arch, device, seed)
    assert section == given  # the section itself is left as it was
    assert type(cfg).__name__ == cls_name
    assert _fields(cfg) == {**BASE_DEFAULTS[cls_name], **added_since(cls_name), **changed}
    assert all(isinstance(getattr(cfg, k), tuple) for k, v in changed.items() if isinstance(v, tuple))
    assert cfg.synthetic == (SYNTHETIC if section.get("preset") == "synthetic" else SyntheticSet())


def test_a_key_left_none_keeps_the_presets_value():
    """A pipeline section holds every field, None until set (pipelines.schema.section_schema)."""
    section = dict.fromkeys(f.name for f in dataclasses.fields(VOCDetectionConfig))
    assert _from_section("det_voc", {**section, "preset": "synthetic"}) == _from_section("det_voc",
                                                                                         {"preset": "synthetic"})


# The presets written out in full follow the linear rule they claim: the protocol's schedule at batch 8, squeezed.
RULES = [(VOCDetectionConfig, "synthetic", 8, 2000), (VOCDetectionConfig, "custom", 8, 4000),
         (COCODetectionConfig, "synthetic", 8, 2000), (COCODetectionConfig, "custom", 8, 4000),
         (SegmentationConfig, "custom", 8, 4000)]  # fmt: skip
SCHEDULE = ("ims_per_batch", "base_lr", "max_iter", "steps", "warmup_iters", "eval_period", "checkpoint_period")


@pytest.mark.parametrize(("cls", "name", "batch", "iterations"), RULES)
def test_presets_written_out_follow_the_linear_rule(cls, name, batch, iterations):
    preset = cls.preset(name)
    rule = cls().scaled(batch).shortened(iterations)
    expected = {k: getattr(rule, k) for k in SCHEDULE}
    if name == "custom":  # evaluated 5 times over its schedule
        expected["eval_period"] = iterations // 5
    assert {k: getattr(preset, k) for k in SCHEDULE} == expected
    # PreciseBN: squeezed with the schedule, but the synthetic presets keep 20 iterations
    assert preset.precise_bn_iters == (20 if name == "synthetic" else rule.precise_bn_iters)


def test_synthetic_root_names_the_set(tmp_path):
    assert SYNTHETIC.root("/cache") == SYNTHETIC_ROOT
    assert SyntheticSet(8, 4, 96, 2).root(tmp_path) == str(tmp_path / "synthetic-v2-8x4-96px-seed2")


@pytest.mark.parametrize(
    ("stage", "section", "key", "allowed"),
    [
        ("det_voc", {"max_iters": 5}, "max_iters", "allowed keys: preset, amp, arch, base_lr"),
        ("det_voc", {"preset": "voc"}, "preset", "allowed: null (the paper's protocol), custom, synthetic"),
        ("seg_voc", {"preset": "tiny"}, "preset", "allowed: null (the paper's protocol), voc, cityscapes, custom"),
        ("det_voc", {"ims_per_batch": 0}, "ims_per_batch", "an integer >= 1"),
        ("det_voc", {"preset": "synthetic", "steps": [1500, 900]}, "steps", "must be increasing"),
        ("seg_cityscapes", {"preset": "cityscapes", "test_mode": "tiled"}, "test_mode", "whole, slide"),
        ("det_voc", {"test_dataset": "voc_2007_tset"}, "test_dataset", "voc_2007_test"),
        ("det_voc", {"device": "cpu", "num_gpus": 8}, "num_gpus", "several GPUs need CUDA"),
    ],
)
def test_bad_sections_name_the_key_relative_to_the_section(stage, section, key, allowed):
    with pytest.raises(ConfigValueError) as err:
        _from_section(stage, section)
    assert err.value.key == key and allowed in str(err.value)


def test_the_synthetic_preset_needs_the_set():
    with pytest.raises(ConfigValueError, match="downstream.synthetic") as err:
        _from_section("seg_voc", {"preset": "synthetic"}, synthetic=None)
    assert err.value.key == "preset"
    cfg = _from_section("seg_voc", {"preset": "synthetic"}, synthetic={"num_train": 8, "num_val": 4})
    assert (cfg.synthetic.num_train, cfg.synthetic.num_val, cfg.synthetic.image_size) == (8, 4, 160)


# ------------------------------------------------------------------------------------------- synthetic set
@pytest.mark.detectron2
def test_the_synthetic_set_is_written_once_with_its_own_seed(tmp_path):
    from densecl.transfer import runner as engine

    scenes = SyntheticSet(num_train=2, num_val=1, image_size=64, seed=3)
    cfg = _from_section("seg_voc", {"preset": "synthetic"}, seed=7, synthetic=scenes, cache_dir=str(tmp_path))
    assert (cfg.seed, cfg.synthetic.seed) == (7, 3)
    engine._ensure_synthetic(cfg, cfg.dataset_names())
    meta_file = tmp_path / "synthetic-v2-2x1-64px-seed3" / "meta.json"
    written = {p: p.stat().st_mtime_ns for p in meta_file.parent.rglob("*")}
    engine._ensure_synthetic(cfg, cfg.dataset_names())  # a second stage on the same set: reused as it is
    assert {p: p.stat().st_mtime_ns for p in meta_file.parent.rglob("*")} == written
    meta = json.loads(meta_file.read_text())
    assert (meta["seed"], meta["num_train"], meta["num_val"], meta["image_size"]) == (3, 2, 1, 64)


# ------------------------------------------------------------------------------------------------- reuse
def synthetic_seg(data, **overrides) -> SegmentationConfig:
    return SegmentationConfig.preset("synthetic", synthetic_root=str(data), device="cpu", **overrides)


def _write_folder(folder, config: dict, weights=None, finished=False, metrics=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stage_config.json").write_text(json.dumps({"config": config, "weights": weights}))
    if finished:
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "model_final.pth").write_bytes(b"")


@pytest.mark.detectron2
def test_transfer_folder_without_a_later_field_resumes_and_a_changed_amp_is_refused(tmp_path):
    from densecl.resume import Reuse, SettingsChangedError
    from densecl.transfer.runner import stage_reuse

    cfg = synthetic_seg(tmp_path / "data")
    old = plain(cfg)
    del old["amp"], old["synthetic"]["seed"]  # written before these existed: it ran as their defaults
    _write_folder(tmp_path / "out", old)
    assert stage_reuse(cfg, None, tmp_path / "out") is Reuse.RESUME
    bf16 = synthetic_seg(tmp_path / "data", amp="bf16")
    with pytest.raises(SettingsChangedError, match="config.amp: 'none' then, 'bf16' now"):
        stage_reuse(bf16, None, tmp_path / "out")
    assert stage_reuse(cfg, None, tmp_path / "elsewhere") is Reuse.NEW


@pytest.mark.detectron2
def test_a_finished_folder_returns_its_metrics_and_refuses_other_settings(tmp_path):
    from densecl.resume import SettingsChangedError
    from densecl.transfer.segmentation import run_semantic_segmentation

    data = tmp_path / "data"  # never written: a finished stage neither trains nor writes the set
    cfg = synthetic_seg(data)
    old = plain(cfg)
    del old["amp"]
    metrics = {"mIoU": 12.5, "pAcc": 80.0}
    _write_folder(tmp_path / "out", old, weights="/w/backbone.pth", finished=True, metrics=metrics)
    out = str(tmp_path / "out")
    assert run_semantic_segmentation(cfg, "/w/backbone.pth", out) == metrics
    faster = synthetic_seg(data, num_workers=0, log_period=1, eval_period=5)
    assert run_semantic_segmentation(faster, "/w/backbone.pth", out) == metrics  # result-neutral fields
    with pytest.raises(SettingsChangedError, match="amp"):
        run_semantic_segmentation(synthetic_seg(data, amp="bf16"), "/w/backbone.pth", out)
    with pytest.raises(SettingsChangedError, match="weights: '/w/backbone.pth' then, None now"):
        run_semantic_segmentation(cfg, None, out)
    with pytest.raises(SettingsChangedError, match="config.max_iter"):
        run_semantic_segmentation(synthetic_seg(data, max_iter=7), "/w/backbone.pth", out)
    assert not data.exists()


def test_validate_names_the_field():
    with pytest.raises(ConfigValueError) as err:
        VOCDetectionConfig(arch="vgg16").validate()
    assert err.value.key == "arch" and "resnet50" in str(err.value)
    with pytest.raises(ConfigValueError) as err:
        VOCDetectionConfig(ims_per_batch=6, num_gpus=4, device="cuda").validate()
    assert err.value.key == "ims_per_batch" and "num_gpus=4" in str(err.value)


@pytest.mark.detectron2
def test_trainer_classes_travel_to_detectron2_launch_by_reference():
    """detectron2's launch pickles its arguments into spawned processes: module-level classes, by name."""
    import pickle

    from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY

    from densecl.transfer.detection import COCODetectionTrainer, Res5ROIHeadsExtraNorm, VOCDetectionTrainer
    from densecl.transfer.runner import _worker
    from densecl.transfer.segmentation import DenseCLFCN, SegmentationTrainer

    for obj in (VOCDetectionTrainer, COCODetectionTrainer, SegmentationTrainer, _worker):
        assert pickle.loads(pickle.dumps(obj)) is obj
    assert ROI_HEADS_REGISTRY.get("Res5ROIHeadsExtraNorm") is Res5ROIHeadsExtraNorm
    assert META_ARCH_REGISTRY.get("DenseCLFCN") is DenseCLFCN
