"""Learnability: on a set whose answer is easy (one large plain square or disc, one fixed colour per class, on
a plain grey background) a short fine-tune from random init must reach a high score on held-out scenes.

"The evaluator gives 100 on ground truth" cannot see the training side: boxes or label maps misaligned by an
augmentation, a flip applied to the image but not to its labels, class ids off by one, the ignore value taken
for a class. Each of those keeps these runs near the trivial result; a correct stage fits the easy set in a
minute. Iterations and thresholds were set from measured runs (docs/benchmarks.md, "Segmentation: task or
defect"), with margin below them and far above what the planted bugs reached.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from densecl.data.synthetic import voc_palette
from densecl.transfer.settings import SegmentationConfig, VOCDetectionConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread is faster

EASY_CLASSES = ("square", "disc")
EASY_COLOURS = ((220, 40, 40), (40, 80, 220))  # one fixed colour per class
BACKGROUND = (150, 150, 150)
EASY_SIZE = 80  # px, square images
OBJECT_SIDE = (0.3, 0.6)  # of the image side


def write_easy_set(root: Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """One object per scene, in the layout the synthetic presets read (densecl.transfer.layouts): VOC
    JPEGImages, Annotations (1-based inclusive boxes), SegmentationClass (palette PNGs: 0 background, class
    c -> c + 1), ImageSets/{Main,Segmentation}/{train,val}.txt, and meta.json naming the classes. The object
    sits anywhere, so a left-right flip moves it: labels that miss the flip no longer cover it."""
    voc = root / "voc"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    palette = voc_palette().tobytes()
    for split, count in (("train", num_train), ("val", num_val)):
        names = [f"{split}_{i:04d}" for i in range(count)]
        for name in names:
            label = int(rng.integers(len(EASY_CLASSES)))
            side = int(rng.uniform(*OBJECT_SIDE) * EASY_SIZE)
            x0, y0 = (int(v) for v in rng.integers(0, EASY_SIZE - side + 1, 2))
            corners = (x0, y0, x0 + side - 1, y0 + side - 1)  # PIL: inclusive
            image = Image.new("RGB", (EASY_SIZE, EASY_SIZE), BACKGROUND)
            semantic = Image.new("P", (EASY_SIZE, EASY_SIZE), 0)
            for canvas, fill in ((image, EASY_COLOURS[label]), (semantic, label + 1)):
                draw = ImageDraw.Draw(canvas)
                (draw.rectangle if EASY_CLASSES[label] == "square" else draw.ellipse)(corners, fill=fill)
            noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (EASY_SIZE, EASY_SIZE, 3))  # mild noise
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
                voc / "JPEGImages" / f"{name}.jpg", quality=95, subsampling=0
            )
            semantic.putpalette(palette)
            semantic.save(voc / "SegmentationClass" / f"{name}.png")
            mask = np.asarray(semantic) > 0
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            box = {"xmin": cols[0] + 1, "ymin": rows[0] + 1, "xmax": cols[-1] + 1, "ymax": rows[-1] + 1}
            (voc / "Annotations" / f"{name}.xml").write_text(
                f"<annotation><filename>{name}.jpg</filename><size><width>{EASY_SIZE}</width>"
                f"<height>{EASY_SIZE}</height><depth>3</depth></size><object><name>{EASY_CLASSES[label]}</name>"
                "<pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult><bndbox>"
                + "".join(f"<{k}>{v}</{k}>" for k, v in box.items())
                + "</bndbox></object></annotation>"
            )
        for sub in ("Main", "Segmentation"):
            (voc / "ImageSets" / sub / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    (root / "meta.json").write_text(json.dumps({"class_names": list(EASY_CLASSES)}))
    return root


@pytest.fixture(scope="module")
def easy_root(tmp_path_factory):
    return write_easy_set(tmp_path_factory.mktemp("easy") / "set", num_train=32, num_val=16)


def test_easy_set_labels_match_its_images(easy_root):
    """The set itself: every label pixel has its class's colour, every background pixel the background's."""
    voc = easy_root / "voc"
    for name in (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split():
        image = np.asarray(Image.open(voc / "JPEGImages" / f"{name}.jpg"), np.float32)
        label = np.asarray(Image.open(voc / "SegmentationClass" / f"{name}.png"))
        colours = np.array([BACKGROUND, *EASY_COLOURS], np.float32)
        nearest = np.abs(image[:, :, None] - colours).sum(-1).argmin(-1)
        assert (nearest == label).mean() > 0.99  # JPEG blurs a few edge pixels
        assert set(np.unique(label)) == {0, int(label.max())} and label.max() in (1, 2)


@pytest.mark.slow
@pytest.mark.detectron2
def test_fcn_from_random_init_segments_the_easy_set(easy_root, tmp_path):
    from densecl.transfer.segmentation import run_semantic_segmentation

    cfg = SegmentationConfig.preset(
        "synthetic", synthetic_root=str(easy_root), max_iter=100, ims_per_batch=4, base_lr=0.04, crop_size=64,
        img_scale=(160, EASY_SIZE), num_workers=0, device="cpu", progress=False,
    )  # fmt: skip
    metrics = run_semantic_segmentation(cfg, None, str(tmp_path / "seg"))
    # measured mIoU 89.3 and 84.9 (training seeds 0, 1), every class >= 76; background everywhere gives
    # mIoU_trivial 28.2; label maps shifted by 12 px gave 51.8 (disc 25.3), image-only flips 68.1 (disc 53.4)
    assert metrics["mIoU"] >= 75, metrics
    assert min(metrics[f"IoU-{c}"] for c in ("background", *EASY_CLASSES)) >= 62, metrics
    assert metrics["mIoU"] - metrics["mIoU_trivial"] >= 45, metrics


@pytest.mark.slow
@pytest.mark.detectron2
def test_faster_rcnn_from_random_init_detects_the_easy_set(easy_root, tmp_path):
    from densecl.transfer.detection import run_voc_detection

    cfg = VOCDetectionConfig.preset(
        "synthetic", synthetic_root=str(easy_root), max_iter=120, ims_per_batch=2, base_lr=0.02, steps=(),
        warmup_iters=20, min_size_train=(EASY_SIZE,), max_size_train=2 * EASY_SIZE, min_size_test=EASY_SIZE,
        max_size_test=2 * EASY_SIZE, roi_batch_size_per_image=8, rpn_pre_nms_topk_train=300,
        rpn_post_nms_topk_train=100, rpn_pre_nms_topk_test=100, rpn_post_nms_topk_test=20,
        detections_per_image=10, num_workers=0, device="cpu", progress=False,
    )  # fmt: skip
    metrics = run_voc_detection(cfg, None, str(tmp_path / "det"))
    # measured AP50 63.7 and 61.5 (training seeds 0, 1); training boxes shifted right by 40% of their width
    # gave 11.9, class ids off by one (the two classes swapped) 4.2; nothing detected scores 0
    assert metrics["AP50"] >= 40, metrics
