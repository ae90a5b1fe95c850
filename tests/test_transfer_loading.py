"""Pre-trained weights reach every detectron2 model: a stage run with learning rate 0 must end with the file's
tensors in its backbone (C4: the trunk and the box head's res5; FPN: the bottom-up trunk; FCN: the dilated trunk),
so a stage that skipped the load, or loaded into the wrong modules, fails here."""

from __future__ import annotations

import pytest
import torch

from densecl.transfer.settings import COCODetectionConfig, SegmentationConfig, VOCDetectionConfig
from tests.test_detection import TINY as DETECTION

pytestmark = [pytest.mark.detectron2, pytest.mark.usefixtures("one_thread")]
FROZEN = dict(base_lr=0.0, max_iter=1, warmup_iters=0)  # nothing moves the convolutions


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from densecl.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("load") / "synthetic"
    write_synthetic_dataset(root, num_train=4, num_val=2, image_size=96, seed=0)
    return root


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A ResNet-18 trunk whose every convolution is distinct from a fresh initialisation's."""
    from torchvision import models

    from densecl.weights.export import save_backbone

    torch.manual_seed(123)
    state = {k: v for k, v in models.resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    state = {k: v + 0.5 if k.endswith("conv1.weight") else v for k, v in state.items()}
    return save_backbone(state, tmp_path_factory.mktemp("weights") / "backbone.pth", "resnet18"), state


def final_weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]


def test_c4_detection_holds_the_trunk_and_res5_of_the_file(synthetic_root, backbone, tmp_path):
    from densecl.transfer.detection import run_voc_detection

    path, state = backbone
    cfg = VOCDetectionConfig.preset("synthetic", synthetic_root=str(synthetic_root), **{**DETECTION, **FROZEN})
    run_voc_detection(cfg, str(path), str(tmp_path / "voc"))
    model = final_weights(tmp_path / "voc")
    assert torch.equal(model["backbone.stem.conv1.weight"], state["conv1.weight"])
    assert torch.equal(model["backbone.res4.1.conv1.weight"], state["layer3.1.conv1.weight"])
    assert torch.equal(model["roi_heads.res5.0.conv1.weight"], state["layer4.0.conv1.weight"])  # res5 in the head


def test_fpn_detection_holds_the_trunk_of_the_file(synthetic_root, backbone, tmp_path):
    from densecl.transfer.detection import run_coco_detection

    path, state = backbone
    cfg = COCODetectionConfig.preset("synthetic", synthetic_root=str(synthetic_root), **{**DETECTION, **FROZEN})
    run_coco_detection(cfg, str(path), str(tmp_path / "coco"))
    model = final_weights(tmp_path / "coco")
    assert torch.equal(model["backbone.bottom_up.stem.conv1.weight"], state["conv1.weight"])
    assert torch.equal(model["backbone.bottom_up.res5.1.conv1.weight"], state["layer4.1.conv1.weight"])


def test_fcn_segmentation_holds_the_dilated_trunk_of_the_file(synthetic_root, backbone, tmp_path):
    from densecl.transfer.segmentation import run_semantic_segmentation

    path, state = backbone
    tiny = dict(ims_per_batch=2, crop_size=64, img_scale=(256, 64), num_workers=0, device="cpu")
    cfg = SegmentationConfig.preset("synthetic", synthetic_root=str(synthetic_root),
                                    **{**tiny, **FROZEN, "min_lr": 0.0})
    run_semantic_segmentation(cfg, str(path), str(tmp_path / "seg"))
    model = final_weights(tmp_path / "seg")
    assert torch.equal(model["backbone.stem.conv1.weight"], state["conv1.weight"])
    assert torch.equal(model["backbone.res5.0.conv1.weight"], state["layer4.0.conv1.weight"])  # dilated, same values
