"""Converter: detectron2's ResNet with converted weights computes exactly torchvision's features."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch
from torchvision import models

from densecl.weights.detectron2 import convert_to_detectron2, infer_arch, read_converted, to_detectron2_keys
from densecl.weights.export import save_backbone


def _randomised(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = getattr(models, arch)(weights=None)
    for module in net.modules():  # non-trivial BN statistics, so a swapped mean/var would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def test_configs_and_conversion_import_without_detectron2():
    """The pipeline composes and checks stage configs and data layouts without detectron2 or torch, and its
    convert stage runs without detectron2; the stage modules import detectron2 at the top."""
    code = (
        "import sys\n"
        "import densecl.transfer, densecl.transfer.settings, densecl.transfer.layouts\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'detectron2'})\n"
        "assert not heavy, f'imported {heavy}'\n"
        "import densecl.weights.detectron2\n"
        "assert 'detectron2' not in sys.modules, 'convert imported detectron2'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_infer_arch_and_keys():
    for arch in ("resnet18", "resnet34", "resnet50"):
        state = getattr(models, arch)(weights=None).state_dict()
        assert infer_arch(state) == arch
    converted, arch = to_detectron2_keys(models.resnet18(weights=None).state_dict())
    assert arch == "resnet18"
    assert "stem.conv1.weight" in converted and "stem.conv1.norm.running_var" in converted
    assert "res2.0.conv2.norm.bias" in converted and "res3.0.shortcut.norm.weight" in converted
    assert "res5.1.conv2.weight" in converted and not any("fc" in k or "bn" in k for k in converted)


def test_missing_key_and_wrong_shape_are_errors(tmp_path):
    state = {k: v for k, v in models.resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    broken = dict(state)
    del broken["layer3.1.bn2.running_mean"]
    with pytest.raises(ValueError, match="layer3.1.bn2.running_mean"):
        to_detectron2_keys(broken)
    broken = dict(state)
    broken["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    with pytest.raises(ValueError, match=r"layer2.0.conv1.weight: \(128, 64, 1, 1\)"):
        to_detectron2_keys(broken)
    with pytest.raises(ValueError, match=r"\.pkl"):
        convert_to_detectron2(tmp_path / "x.pth", tmp_path / "x.pth.out")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.detectron2
def test_round_trip_matches_torchvision(tmp_path, arch):
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from densecl.transfer.pretrained import load_pretrained

    net = _randomised(arch)
    src = save_backbone(
        {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, tmp_path / "backbone.pth", arch
    )
    dst = convert_to_detectron2(src, tmp_path / "backbone.pkl")
    data = read_converted(dst)
    assert data["matching_heuristics"] is True and data["arch"] == arch
    with open(dst, "rb") as f:
        assert all(type(v).__module__ == "numpy" for v in pickle.load(f)["model"].values())

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = int(arch[len("resnet") :])
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if cfg.MODEL.RESNETS.DEPTH < 50 else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    load_pretrained(backbone, dst, arch)
    backbone.eval()

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
        got = backbone(x)["res5"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.detectron2
def test_partial_load_is_an_error(tmp_path):
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from densecl.transfer.pretrained import load_pretrained

    net = _randomised("resnet18")
    src = save_backbone(
        {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, tmp_path / "backbone.pth", "resnet18"
    )
    dst = convert_to_detectron2(src, tmp_path / "backbone.pkl")
    data = read_converted(dst)
    del data["model"]["res4.1.conv2.weight"]
    with open(tmp_path / "partial.pkl", "wb") as f:
        pickle.dump(data, f)
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 18, 64
    cfg.MODEL.RESNETS.NORM, cfg.MODEL.RESNETS.OUT_FEATURES = "BN", ["res5"]
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    with pytest.raises(ValueError, match="res4.1.conv2.weight"):
        load_pretrained(backbone, tmp_path / "partial.pkl", "resnet18")
    with pytest.raises(ValueError, match="resnet50"):
        load_pretrained(backbone, dst, "resnet50")


def test_torchvision_imagenet_checkpoint_converts(tmp_path):
    torch.save(models.resnet34(weights=None).state_dict(), tmp_path / "resnet34-imagenet.pth")  # with fc
    data = read_converted(convert_to_detectron2(tmp_path / "resnet34-imagenet.pth", tmp_path / "r34.pkl"))
    assert data["arch"] == "resnet34" and "res4.5.conv2.norm.running_mean" in data["model"]
    assert not any(k.startswith("fc") for k in data["model"])
