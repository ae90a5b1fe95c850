"""The segmentation stage keeps image and label together: the training mapper crops, flips and rescales them
jointly (checked on a coordinate-coded pair), padding is the ignore label and costs nothing in the loss, the
sliding-window test (Cityscapes' protocol) tiles and averages every pixel, and the pixel statistics are
pre-training's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from densecl.transfer.settings import SegmentationConfig

pytestmark = [pytest.mark.detectron2, pytest.mark.usefixtures("one_thread")]
H, W = 60, 80


def code(x, y):
    """The class label of image point (x, y): a function of position alone, never the ignore value 255."""
    return (x // 10) + 8 * (y // 10)


@pytest.fixture(scope="module")
def coded_pair(tmp_path_factory):
    """An image whose red channel is 3 x and green 4 y (lossless PNG), and its label map code(x, y)."""
    folder = tmp_path_factory.mktemp("coded")
    ys, xs = np.mgrid[0:H, 0:W]
    image = np.stack([3 * xs, 4 * ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    Image.fromarray(image).save(folder / "image.png")
    Image.fromarray(code(xs, ys).astype(np.uint8)).save(folder / "label.png")
    return {"file_name": str(folder / "image.png"), "sem_seg_file_name": str(folder / "label.png")}


@pytest.fixture(scope="module")
def d2cfg(tmp_path_factory):
    """The segmentation stage's detectron2 config on a tiny synthetic set (for the model and the mappers)."""
    from densecl.data.synthetic import write_synthetic_dataset
    from densecl.transfer.catalog import register_datasets
    from densecl.transfer.segmentation import SegmentationTrainer

    root = tmp_path_factory.mktemp("geometry") / "synthetic"
    write_synthetic_dataset(root, num_train=1, num_val=1, image_size=64)
    cfg = SegmentationConfig.preset("synthetic", synthetic_root=str(root), crop_size=32, img_scale=(W, H),
                                    ratio_range=(1.0, 1.0), cat_max_ratio=1.0, photometric=False, device="cpu",
                                    slide_stride=20)
    register_datasets(cfg.dataset_names(), synthetic_root=str(root))
    return SegmentationTrainer.build_d2_config(cfg, str(tmp_path_factory.mktemp("out")))


def mapped(d2cfg, record, seed, **fcn):
    from densecl.transfer.segmentation import SegTrainMapper

    cfg = d2cfg.clone()
    cfg.defrost()
    for key, value in fcn.items():
        setattr(cfg.MODEL.FCN, key, value)
    torch.manual_seed(seed)
    out = SegTrainMapper(cfg)(dict(record))
    return out["image"].numpy().astype(np.int64), out["sem_seg"].numpy()


def test_crop_and_flip_move_image_and_label_together(d2cfg, coded_pair):
    flipped = 0
    for seed in range(16):
        image, label = mapped(d2cfg, coded_pair, seed)
        assert image.shape == (3, 32, 32) and label.shape == (32, 32)
        x, y = image[0] // 3, image[1] // 4  # where each output pixel came from
        assert (label == code(x, y)).all(), seed
        flipped += bool(x[0, 0] > x[0, -1])
    assert 0 < flipped < 16  # both orientations drawn


def test_rescaling_moves_image_and_label_together(d2cfg, coded_pair):
    """At twice the size the image is interpolated and the label taken nearest: nearly every pixel still
    agrees (a label left unscaled, or scaled otherwise, would agree by chance only)."""
    for seed in range(4):
        image, label = mapped(d2cfg, coded_pair, seed, RATIO_RANGE=[2.0, 2.0])
        x, y = np.rint(image[0] / 3), np.rint(image[1] / 4)
        assert np.mean(label == code(x, y)) > 0.9, seed


def test_padding_is_the_ignore_label_and_costs_nothing(d2cfg):
    """Two samples of different sizes are padded to one batch: the labels with 255, which the loss leaves out
    (every pixel ignored: a loss of exactly 0; a label padded with 0, background, would cost)."""
    from detectron2.modeling import build_model

    model = build_model(d2cfg).train()
    batch = [{"image": torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8), "sem_seg": torch.full((32, 32), 255)},
             {"image": torch.randint(0, 255, (3, 24, 28), dtype=torch.uint8), "sem_seg": torch.full((24, 28), 255)}]
    losses = model(batch)
    assert losses["loss_sem_seg"].item() == 0.0 and losses["loss_aux"].item() == 0.0
    batch[1]["sem_seg"] = torch.zeros(24, 28, dtype=torch.long)  # the small sample labelled: only it costs
    assert model(batch)["loss_sem_seg"].item() > 0.0


def test_a_sets_own_ignore_value_trains_as_the_ignored_label(d2cfg, coded_pair, tmp_path):
    """A custom set's ignore_label (254 here) reaches the loss as the one value it ignores, 255."""
    label = np.asarray(Image.open(coded_pair["sem_seg_file_name"])).copy()
    label[:, :50] = 254  # every 32-pixel crop of the 80-pixel width holds some
    Image.fromarray(label).save(tmp_path / "label.png")
    record = {**coded_pair, "sem_seg_file_name": str(tmp_path / "label.png"), "ignore_label": 254}
    image, mapped_label = mapped(d2cfg, record, seed=0, RATIO_RANGE=[1.0, 1.0])
    x = image[0] // 3  # the column each output pixel came from
    assert (x < 50).any() and (mapped_label[x < 50] == 255).all()
    assert (mapped_label[x >= 50] == code(x, image[1] // 4)[x >= 50]).all()


def test_every_crop_is_padded_to_crop_size_as_mmseg_pads_it(d2cfg):
    """mmseg's Pad(size=crop_size) after Normalize: a crop smaller than crop_size (an image smaller than the
    crop) reaches the backbone at crop_size, padded with 0 (the mean pixel), so that BN's statistics are
    over the same pixels as mmseg's; its labels are padded with the ignore value."""
    from detectron2.modeling import build_model

    model = build_model(d2cfg).train()
    seen = []
    model.backbone.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    batch = [{"image": torch.randint(0, 255, (3, 24, 28), dtype=torch.uint8), "sem_seg": torch.full((24, 28), 255)},
             {"image": torch.randint(0, 255, (3, 20, 30), dtype=torch.uint8), "sem_seg": torch.full((20, 30), 255)}]
    losses = model(batch)
    (images,) = seen
    assert images.shape == (2, 3, 32, 32)  # crop_size, not the batch's largest (24 x 30)
    assert images[0, :, 24:].abs().max() == 0 and images[0, :, :, 28:].abs().max() == 0
    assert images[1, :, 20:].abs().max() == 0 and images[1, :, :, 30:].abs().max() == 0
    assert images[0, :, :24, :28].abs().max() > 0
    assert losses["loss_sem_seg"].item() == 0.0  # padded labels are ignored


def test_sliding_windows_cover_every_pixel_and_average_where_they_overlap(d2cfg):
    """With a head that returns its window as logits, the slide of an image larger than the window (crop 32,
    stride 20, as the Cityscapes protocol slides 769-pixel windows every 513) must give the image back."""
    from detectron2.modeling import build_model

    model = build_model(d2cfg).eval()
    assert model.test_mode == "whole"
    model.test_mode = "slide"  # Cityscapes' test
    model._logits = lambda window: window * 1.0
    image = torch.rand(1, 3, 70, 53)
    torch.testing.assert_close(model._slide(image), image)
    out = model.inference(image, [{"image": image[0], "height": 70, "width": 53}])[0]["sem_seg"]
    torch.testing.assert_close(out, image[0])


def test_the_pixel_statistics_are_pre_trainings():
    from densecl.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from densecl.transfer.runner import PIXEL_MEAN, PIXEL_STD

    assert PIXEL_MEAN == pytest.approx([255 * m for m in IMAGENET_MEAN], abs=1e-3)
    assert PIXEL_STD == pytest.approx([255 * s for s in IMAGENET_STD], abs=1e-3)
