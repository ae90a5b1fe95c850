"""Synthetic scenes: deterministic, self-consistent annotations, dense-friendly layout, VOC/COCO export."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from densecl.data.synthetic import (
    CLASS_NAMES,
    CLASS_TEXTURES,
    UNTEXTURED_FILLS,
    VAL_INDEX_OFFSET,
    generate_scene,
    voc_palette,
    write_synthetic_dataset,
)


def test_class_names_are_distinct_and_several():
    assert 6 <= len(CLASS_NAMES) <= 8 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)


def test_same_seed_and_index_give_identical_scenes_and_others_differ():
    first, second = generate_scene(3, 7, 96), generate_scene(3, 7, 96)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    for field in ("boxes", "labels", "masks", "semantic"):
        assert np.array_equal(getattr(first, field), getattr(second, field)), field
    for other in (generate_scene(3, 8, 96), generate_scene(4, 7, 96)):
        assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))


def test_generation_ignores_global_random_state():
    np.random.seed(0)
    first = np.asarray(generate_scene(0, 1, 64).image)
    np.random.seed(1)
    np.random.random(10)
    assert np.array_equal(first, np.asarray(generate_scene(0, 1, 64).image))


@pytest.mark.parametrize("index", range(8))
def test_annotations_are_consistent(index):
    size = 128
    scene = generate_scene(0, index, size)
    n = len(scene.labels)
    assert scene.image.mode == "RGB" and scene.image.size == (size, size)
    assert scene.boxes.shape == (n, 4) and scene.boxes.dtype == np.float32
    assert scene.labels.dtype == np.int64 and ((scene.labels >= 0) & (scene.labels < len(CLASS_NAMES))).all()
    assert scene.masks.shape == (n, size, size) and scene.masks.dtype == np.bool_
    assert scene.semantic.shape == (size, size) and scene.semantic.dtype == np.uint8
    assert n >= 1
    # Visible masks do not overlap, and the semantic map is exactly their union labelled class + 1.
    assert (scene.masks.sum(0) <= 1).all()
    expected_semantic = np.zeros((size, size), dtype=np.uint8)
    for mask, label in zip(scene.masks, scene.labels):
        expected_semantic[mask] = label + 1
    assert np.array_equal(scene.semantic, expected_semantic)
    for mask, box in zip(scene.masks, scene.boxes):
        assert mask.sum() >= 20
        rows, cols = np.nonzero(mask)
        assert tuple(box) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def test_scenes_hold_several_small_objects_of_several_classes():
    scenes = [generate_scene(1, i, 160) for i in range(30)]
    classes_per_scene = [len(set(s.labels.tolist())) for s in scenes]
    assert np.mean(classes_per_scene) >= 2.5
    sides = np.concatenate([np.maximum(s.boxes[:, 2] - s.boxes[:, 0], s.boxes[:, 3] - s.boxes[:, 1]) for s in scenes])
    assert np.median(sides) < 0.35 * 160
    all_labels = np.concatenate([s.labels for s in scenes])
    assert set(all_labels.tolist()) == set(range(len(CLASS_NAMES)))


def test_colour_does_not_identify_the_class():
    # The mean colour of an instance should not predict its class: compare per-class mean colours.
    colours = {c: [] for c in range(len(CLASS_NAMES))}
    for i in range(40):
        scene = generate_scene(2, i, 96)
        pixels = np.asarray(scene.image, dtype=np.float32)
        for mask, label in zip(scene.masks, scene.labels):
            colours[int(label)].append(pixels[mask].mean(0))
    class_means = np.stack([np.mean(v, 0) for v in colours.values() if len(v) >= 5])
    spread_within = np.mean([np.std(v, 0).mean() for v in colours.values() if len(v) >= 5])
    assert np.ptp(class_means, axis=0).max() < spread_within


def test_each_class_has_its_own_texture_family_and_distractors_have_none():
    families = list(CLASS_TEXTURES.values())
    for a in range(len(families)):  # same pattern only at non-overlapping scales
        for b in range(a + 1, len(families)):
            (pattern_a, (lo_a, hi_a)), (pattern_b, (lo_b, hi_b)) = families[a], families[b]
            assert pattern_a != pattern_b or hi_a < lo_b or hi_b < lo_a, (families[a], families[b])
    assert not {pattern for pattern, _ in families} & set(UNTEXTURED_FILLS)


def test_objects_are_textured_so_their_pixels_vary_more_than_a_solid_fill():
    stds = []
    for i in range(10):
        scene = generate_scene(3, i, 160)
        pixels = np.asarray(scene.image, dtype=np.float32)
        stds += [pixels[mask].std(0).max() for mask in scene.masks if mask.sum() >= 100]
    assert np.median(stds) > 20.0  # a solid fill varies only by the sensor noise (std 3)


def test_occlusion_happens():
    overlapping = 0
    for i in range(20):
        scene = generate_scene(0, i, 160)
        boxes = scene.boxes
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                if min(boxes[a, 2], boxes[b, 2]) > max(boxes[a, 0], boxes[b, 0]) and \
                        min(boxes[a, 3], boxes[b, 3]) > max(boxes[a, 1], boxes[b, 1]):
                    overlapping += 1
    assert overlapping >= 10


def test_voc_palette_matches_known_entries():
    palette = voc_palette()
    assert palette.shape == (256, 3)
    assert palette[0].tolist() == [0, 0, 0] and palette[1].tolist() == [128, 0, 0]
    assert palette[2].tolist() == [0, 128, 0] and palette[15].tolist() == [192, 128, 128]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "set"
    return write_synthetic_dataset(root, num_train=4, num_val=2, image_size=96, seed=5)


def test_written_voc_layout_matches_the_generator(tiny_set):
    voc = tiny_set.voc_dir
    assert tiny_set.image_dir == voc / "JPEGImages"
    assert tiny_set.class_names == CLASS_NAMES and (tiny_set.num_train, tiny_set.num_val) == (4, 2)
    main = voc / "ImageSets" / "Main"
    train_ids = (main / "train.txt").read_text().split()
    val_ids = (main / "val.txt").read_text().split()
    assert train_ids == [f"train_{j:06d}" for j in range(4)] and val_ids == ["val_000000", "val_000001"]
    assert (main / "trainval.txt").read_text().split() == train_ids + val_ids
    assert (main / "test.txt").read_text().split() == val_ids
    for split in ("train", "val", "trainval"):
        assert (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text() == (main / f"{split}.txt").read_text()

    for name, index in [("train_000003", 3), ("val_000001", VAL_INDEX_OFFSET + 1)]:
        scene = generate_scene(5, index, 96)
        image = Image.open(voc / "JPEGImages" / f"{name}.jpg")
        assert image.format == "JPEG" and image.size == (96, 96)
        error = np.abs(np.asarray(image, dtype=np.float32) - np.asarray(scene.image, dtype=np.float32)).mean()
        assert error < 5.0

        tree = ET.parse(voc / "Annotations" / f"{name}.xml").getroot()
        assert tree.findtext("filename") == f"{name}.jpg"
        assert (tree.findtext("size/width"), tree.findtext("size/height")) == ("96", "96")
        objects = tree.findall("object")
        assert [o.findtext("name") for o in objects] == [CLASS_NAMES[c] for c in scene.labels]
        for obj, box in zip(objects, scene.boxes):
            assert obj.findtext("difficult") == "0" and obj.findtext("truncated") == "0"
            xml_box = [int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            assert xml_box == [int(box[0]) + 1, int(box[1]) + 1, int(box[2]), int(box[3])]

        semantic = Image.open(voc / "SegmentationClass" / f"{name}.png")
        assert semantic.mode == "P" and semantic.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        assert np.array_equal(np.asarray(semantic), scene.semantic)
        instances = np.asarray(Image.open(voc / "SegmentationObject" / f"{name}.png"))
        for k, mask in enumerate(scene.masks):
            assert np.array_equal(instances == k + 1, mask)
        assert np.array_equal(instances == 0, ~scene.masks.any(0))


def test_written_coco_json_loads_and_its_masks_match(tiny_set):
    from pycocotools.coco import COCO

    for json_path, num_images in ((tiny_set.coco_train_json, 4), (tiny_set.coco_val_json, 2)):
        coco = COCO(str(json_path))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
        assert coco.getCatIds() == list(range(1, len(CLASS_NAMES) + 1))
        image_ids = sorted(coco.getImgIds())
        assert len(image_ids) == num_images
        for image_info in coco.loadImgs(image_ids):
            assert (tiny_set.image_dir / image_info["file_name"]).is_file()
            instances = np.asarray(Image.open(tiny_set.voc_dir / "SegmentationObject" /
                                              image_info["file_name"].replace(".jpg", ".png")))
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_info["id"]))
            assert len(annotations) == instances.max()
            for k, annotation in enumerate(annotations):
                mask = coco.annToMask(annotation).astype(bool)
                assert np.array_equal(mask, instances == k + 1)
                assert annotation["area"] == mask.sum() and annotation["iscrowd"] == 0
                x, y, w, h = annotation["bbox"]
                rows, cols = np.nonzero(mask)
                assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    train_ids = {i["id"] for i in json.loads(tiny_set.coco_train_json.read_text())["images"]}
    val_ids = {i["id"] for i in json.loads(tiny_set.coco_val_json.read_text())["images"]}
    assert not train_ids & val_ids


def test_rerun_is_a_noop_and_other_parameters_are_refused(tiny_set):
    probe = tiny_set.image_dir / "train_000000.jpg"
    before = probe.stat().st_mtime_ns
    again = write_synthetic_dataset(tiny_set.root, num_train=4, num_val=2, image_size=96, seed=5)
    assert again == tiny_set and probe.stat().st_mtime_ns == before
    meta = json.loads((tiny_set.root / "meta.json").read_text())
    assert meta["num_train"] == 4 and meta["seed"] == 5 and meta["class_names"] == list(CLASS_NAMES)
    with pytest.raises(ValueError) as refused:
        write_synthetic_dataset(tiny_set.root, num_train=4, num_val=2, image_size=96, seed=6)
    message = str(refused.value)
    assert str(tiny_set.root) in message and "'seed': 5" in message and "'seed': 6" in message
    assert probe.stat().st_mtime_ns == before


def test_non_empty_folder_without_meta_is_refused_and_failed_writes_leave_nothing(tmp_path, monkeypatch):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="occupied"):
        write_synthetic_dataset(occupied, num_train=1, num_val=1, image_size=64)
    assert (occupied / "precious.txt").read_text() == "keep me"

    import densecl.data.synthetic as synthetic

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write_split", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic_dataset(tmp_path / "fresh", num_train=1, num_val=1, image_size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


def test_the_colour_cue_paints_each_class_its_own_colour_on_larger_objects():
    """The default run's easier downstream set: one fixed colour per class (plus the sensor noise), objects of
    the diameters asked for; the default style is untouched by the options."""
    from densecl.data.synthetic import CLASS_COLOURS

    scenes = [generate_scene(0, i, 160, "colour", (0.2, 0.45)) for i in range(20)]
    pixels = {c: [] for c in range(len(CLASS_NAMES))}
    for scene in scenes:
        image = np.asarray(scene.image, dtype=np.float64)
        for c in range(len(CLASS_NAMES)):
            pixels[c].append(image[scene.semantic == c + 1])
    for c, found in pixels.items():
        found = np.concatenate(found)
        error = np.abs(found.mean(0) - CLASS_COLOURS[c]).max()  # the sensor noise, clipped at 255
        assert len(found) > 100 and error < 2.0, CLASS_NAMES[c]
    textured = [generate_scene(0, i, 160) for i in range(20)]
    mean_area = lambda ss: np.mean([m.sum() for s in ss for m in s.masks])  # noqa: E731
    assert mean_area(scenes) > 2 * mean_area(textured)
    with pytest.raises(ValueError, match="class_cue='smell'"):
        generate_scene(0, 0, 160, "smell")


def test_a_set_records_only_the_options_that_are_not_the_defaults(tmp_path):
    """So that sets written before the options existed are reused as they are, and each style has its own
    folder in the cache."""
    from densecl.transfer.settings import SyntheticSet

    write_synthetic_dataset(tmp_path / "plain", num_train=1, num_val=1, image_size=64)
    write_synthetic_dataset(tmp_path / "easy", num_train=1, num_val=1, image_size=64, class_cue="colour",
                            object_size=(0.2, 0.45))
    assert not {"class_cue", "object_size"} & set(json.loads((tmp_path / "plain" / "meta.json").read_text()))
    easy = json.loads((tmp_path / "easy" / "meta.json").read_text())
    assert (easy["class_cue"], easy["object_size"]) == ("colour", [0.2, 0.45])
    assert SyntheticSet(96, 32).root("/c") == "/c/synthetic-v2-96x32-160px-seed0"
    assert SyntheticSet(96, 32, class_cue="colour", object_size=(0.2, 0.45)).root("/c") == (
        "/c/synthetic-v2-96x32-160px-seed0-colour-objects0.2-0.45"
    )
