"""Data sets for the transfer stages: missing files are errors naming the path, before any training."""

from __future__ import annotations

import pytest

from densecl.transfer.layouts import DatasetLayoutError, check_dataset, dataset_kind, resolve_dataset
from densecl.transfer.settings import SegmentationConfig, VOCDetectionConfig
from densecl.typed_settings import ConfigValueError


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from densecl.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic_dataset(root, num_train=4, num_val=2, image_size=64, seed=0)
    return root


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("voc_2007_test", "VOC2007"),
        ("voc_2012_trainval", "VOC2012"),
        ("coco_2017_val", "instances_val2017.json"),
        ("voc_2012_sem_seg_train_aug", "VOC2012"),
        ("cityscapes_fine_sem_seg_val", "leftImg8bit"),
    ],
)
def test_missing_real_data_names_the_path(tmp_path, name, missing):
    with pytest.raises(DatasetLayoutError, match=missing) as info:
        check_dataset(name, data_root=str(tmp_path))
    assert str(tmp_path) in str(info.value) and "expected layout" in str(info.value)


def test_missing_file_inside_a_voc_folder(tmp_path):
    voc = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    (voc / "ImageSets/Main/test.txt").write_text("000001\n")
    with pytest.raises(DatasetLayoutError, match=r"Annotations/000001.xml"):
        check_dataset("voc_2007_test", data_root=str(tmp_path))


def test_synthetic_sets_check_and_kinds(synthetic_root, tmp_path):
    for name in ("synthetic_voc_train", "synthetic_coco_val", "synthetic_seg_train"):
        check_dataset(name, synthetic_root=str(synthetic_root))
    assert [dataset_kind(n) for n in ("synthetic_voc_val", "coco_2017_train", "synthetic_seg_val")] == [
        "voc", "coco", "sem_seg",
    ]  # fmt: skip
    with pytest.raises(DatasetLayoutError, match="meta.json"):
        check_dataset("synthetic_voc_val", synthetic_root=str(tmp_path / "nowhere"))
    with pytest.raises(KeyError, match="unknown data set"):
        dataset_kind("voc_2099_test")


@pytest.mark.detectron2
def test_stage_fails_on_missing_data_before_training(tmp_path):
    from densecl.transfer.detection import run_voc_detection

    cfg = VOCDetectionConfig(data_root=str(tmp_path / "datasets"), device="cpu")
    with pytest.raises(DatasetLayoutError, match=str(tmp_path / "datasets" / "VOC2007")):
        run_voc_detection(cfg, None, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "stage_config.json").exists()


@pytest.mark.detectron2
def test_register_synthetic_sets(synthetic_root):
    from detectron2.data import DatasetCatalog

    from densecl.data.synthetic import CLASS_NAMES
    from densecl.transfer.catalog import class_names, register_datasets

    names = ["synthetic_voc_train", "synthetic_coco_val", "synthetic_seg_val"]
    register_datasets(names, synthetic_root=str(synthetic_root))
    register_datasets(names, synthetic_root=str(synthetic_root))  # re-registering is allowed
    assert len(DatasetCatalog.get("synthetic_voc_train")) == 4
    coco = DatasetCatalog.get("synthetic_coco_val")
    assert len(coco) == 2 and all(d["annotations"] for d in coco)
    seg = DatasetCatalog.get("synthetic_seg_val")
    assert len(seg) == 2 and seg[0]["sem_seg_file_name"].endswith(".png")
    assert class_names("synthetic_voc_train") == list(CLASS_NAMES)
    assert class_names("synthetic_coco_val") == list(CLASS_NAMES)
    assert class_names("synthetic_seg_val") == ["background", *CLASS_NAMES]


def test_check_data_names_the_missing_folder_and_skips_the_synthetic_set(tmp_path):
    """What the pipeline runs while composing: a ConfigValueError on data_root, with check_dataset's message."""
    cfg = VOCDetectionConfig(data_root=str(tmp_path / "datasets"))
    with pytest.raises(ConfigValueError, match="expected layout") as info:
        cfg.check_data()
    assert info.value.key == "data_root" and str(tmp_path / "datasets" / "VOC2007") in str(info.value)
    not_yet = SegmentationConfig.preset("synthetic", synthetic_root=str(tmp_path / "not-written-yet"))
    not_yet.check_data()  # the synthetic set is written when the stage runs


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_voc_aug_and_cityscapes_layouts(tmp_path):
    voc = tmp_path / "VOC2012"
    for i in ("a", "b", "c"):
        _touch(voc / "JPEGImages" / f"{i}.jpg")
    _touch(voc / "SegmentationClass" / "a.png")  # a VOC train image: label in SegmentationClass
    _touch(voc / "SegmentationClass" / "c.png")
    _touch(voc / "SegmentationClassAug" / "b.png")  # an SBD image: label in SegmentationClassAug
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("a\n")
    (lists / "aug.txt").write_text("b\na\n")
    (lists / "val.txt").write_text("c\n")
    train = resolve_dataset("voc_2012_sem_seg_train_aug", str(tmp_path), None)
    assert [r["image_id"] for r in train["records"]] == ["a", "b"] and len(train["classes"]) == 21
    assert train["records"][1]["sem_seg_file_name"].endswith("SegmentationClassAug/b.png")
    check_dataset("voc_2012_sem_seg_val", data_root=str(tmp_path))
    (lists / "aug.txt").write_text("b\nd\n")
    with pytest.raises(DatasetLayoutError, match="d.jpg"):
        check_dataset("voc_2012_sem_seg_train_aug", data_root=str(tmp_path))

    city = tmp_path / "cityscapes"
    _touch(city / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png")
    (city / "gtFine" / "val" / "lindau").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="lindau_000000_000019_gtFine_labelTrainIds.png"):
        check_dataset("cityscapes_fine_sem_seg_val", data_root=str(tmp_path))
    _touch(city / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png")
    assert len(resolve_dataset("cityscapes_fine_sem_seg_val", str(tmp_path), None)["classes"]) == 19
