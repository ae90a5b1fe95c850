"""The checkpoint layouts people download all load as torchvision-named backbone weights: each layout is written
here from one torchvision ResNet's state dict, and must give back exactly its tensors (fc dropped)."""

import pickle
from pathlib import Path

import pytest
import torch
from torchvision import models

from densecl.method.settings import BackboneConfig
from densecl.training.settings import PretrainConfig
from densecl.weights.detectron2 import convert_to_detectron2, read_converted, to_detectron2_keys
from densecl.weights.published import detectron2_name, load_backbone_weights, torchvision_name


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return models.resnet18(weights=None).state_dict()


def trunk(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def noise_like(state):
    return {k: torch.randn_like(v.float()) for k, v in state.items()}


def layouts(resnet):
    """Each layout as its files hold it, with the other parts those files carry (heads, key encoders, queues)."""
    other = noise_like(resnet)  # a key encoder: must not be taken for the backbone
    return {
        "densecl_training_checkpoint": ({
            "model": {**{f"encoder_q.backbone.{k}": v for k, v in trunk(resnet).items()},
                      **{f"encoder_k.backbone.{k}": v for k, v in trunk(other).items()},
                      "encoder_q.global_head.mlp.0.weight": torch.zeros(2, 2), "queue_global": torch.zeros(4, 8)},
            "config": PretrainConfig(backbone=BackboneConfig(arch="resnet18")).to_dict(),
        }, "resnet18"),
        "moco_release": ({
            "epoch": 200, "arch": "resnet18",
            "state_dict": {**{f"module.encoder_q.{k}": v for k, v in trunk(resnet).items()},
                           "module.encoder_q.fc.0.weight": torch.zeros(2, 2),
                           **{f"module.encoder_k.{k}": v for k, v in trunk(other).items()},
                           "module.queue": torch.zeros(4, 8), "module.queue_ptr": torch.zeros(1)},
        }, "resnet18"),
        "openselfsup_densecl": ({
            "meta": {"epoch": 800, "iter": 369600},
            "state_dict": {"queue": torch.zeros(4, 8), "queue2": torch.zeros(4, 8),
                           **{f"encoder_q.0.{k}": v for k, v in trunk(resnet).items()},
                           "encoder_q.1.mlp.0.weight": torch.zeros(2, 2),
                           **{f"encoder_k.0.{k}": v for k, v in trunk(other).items()}},
        }, None),
        "mmselfsup": ({
            "meta": {"epoch": 200},
            "state_dict": {**{f"backbone.{k}": v for k, v in trunk(resnet).items()},
                           "neck.mlp.0.weight": torch.zeros(2, 2), "head.weight": torch.zeros(2)},
        }, None),
        "official_densecl_release": ({"state_dict": trunk(resnet)}, None),
        "torchvision": (dict(resnet), None),
        "distributed_data_parallel": ({f"module.{k}": v for k, v in resnet.items()}, None),
    }


@pytest.mark.parametrize("layout", ["densecl_training_checkpoint", "moco_release", "openselfsup_densecl",
                                    "mmselfsup", "official_densecl_release", "torchvision",
                                    "distributed_data_parallel"])
def test_each_downloaded_layout_gives_back_the_backbone(resnet, tmp_path, layout):
    payload, arch = layouts(resnet)[layout]
    torch.save(payload, tmp_path / "weights.pth")
    weights, found_arch = load_backbone_weights(tmp_path / "weights.pth")
    assert weights.keys() == trunk(resnet).keys() and found_arch == arch
    assert all(torch.equal(weights[k], v) for k, v in trunk(resnet).items())
    net = models.resnet18(weights=None)
    assert net.load_state_dict(weights, strict=False).missing_keys == ["fc.weight", "fc.bias"]  # only fc


def test_a_detectron2_pickle_gives_back_the_backbone(resnet, tmp_path):
    converted, _ = to_detectron2_keys(trunk(resnet), "resnet18")
    with (tmp_path / "moco.pkl").open("wb") as f:  # as MoCo's convert-pretrain-to-detectron2.py writes it
        pickle.dump({"model": converted, "__author__": "MOCO", "matching_heuristics": True}, f)
    weights, arch = load_backbone_weights(tmp_path / "moco.pkl")
    assert arch is None and weights.keys() == trunk(resnet).keys()
    counter = "num_batches_tracked"  # dropped by the conversion: back as 0, the rest exactly
    assert all(torch.equal(weights[k], v.float()) for k, v in trunk(resnet).items() if not k.endswith(counter))
    assert all(weights[k] == 0 for k in weights if k.endswith(counter))


def test_detectron2_names_go_there_and_back():
    for arch in ("resnet18", "resnet50"):
        keys = trunk(getattr(models, arch)(weights=None).state_dict())
        assert [torchvision_name(detectron2_name(k)) for k in keys] == list(keys)
    assert detectron2_name("layer3.0.downsample.1.running_mean") == "res4.0.shortcut.norm.running_mean"
    assert detectron2_name("bn1.weight") == "stem.conv1.norm.weight"


def test_a_downloaded_release_converts_for_detectron2(resnet, tmp_path):
    payload, _ = layouts(resnet)["moco_release"]
    torch.save(payload, tmp_path / "moco_v2_200ep.pth.tar")
    converted = read_converted(convert_to_detectron2(tmp_path / "moco_v2_200ep.pth.tar", tmp_path / "out.pkl"))
    assert converted["arch"] == "resnet18"
    assert (converted["model"]["res2.0.conv1.weight"] == resnet["layer1.0.conv1.weight"].numpy()).all()


def test_an_unknown_layout_names_its_first_keys_and_the_layouts_accepted(tmp_path):
    torch.save({"state_dict": {"cls_token": torch.zeros(1), "blocks.0.attn.qkv.weight": torch.zeros(2)}},
               tmp_path / "vit.pth")
    with pytest.raises(ValueError) as err:
        load_backbone_weights(tmp_path / "vit.pth")
    message = str(err.value)
    assert "vit.pth" in message and "['cls_token', 'blocks.0.attn.qkv.weight']" in message
    assert "MoCo v1/v2 release" in message and "mmselfsup" in message and "detectron2 .pkl" in message


def moco_converted_pickle(resnet, path):
    """A .pkl laid out as MoCo's detectron2/convert-pretrain-to-detectron2.py writes it from a MoCo v2 release:
    every `module.encoder_q.` key, renamed to detectron2's names with `stem.` before any key outside layer1-4
    (so the MLP head fc.0/fc.2 becomes stem.fc.*), step counters kept, numpy values."""
    import re

    state = {**trunk(resnet), "fc.0.weight": torch.randn(512, 512), "fc.0.bias": torch.randn(512),
             "fc.2.weight": torch.randn(128, 512), "fc.2.bias": torch.randn(128)}
    model = {}
    for key, value in state.items():
        name = key if key.startswith("layer") else f"stem.{key}"
        name = re.sub(r"layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", name)
        name = re.sub(r"bn(\d)", r"conv\1.norm", name)
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model[name] = value.numpy()
    assert {"stem.fc.0.weight", "stem.fc.2.bias"} <= model.keys()
    with path.open("wb") as f:
        pickle.dump({"model": model, "__author__": "MOCO", "matching_heuristics": True}, f)
    return path


def test_a_moco_converted_pickle_drops_its_mlp_head_and_converts(resnet, tmp_path):
    pkl = moco_converted_pickle(resnet, tmp_path / "moco_v2_200ep.pkl")
    weights, _ = load_backbone_weights(pkl)
    assert weights.keys() == trunk(resnet).keys()
    assert all(torch.equal(weights[k], v) for k, v in trunk(resnet).items() if not k.endswith("num_batches_tracked"))
    converted = read_converted(convert_to_detectron2(pkl, tmp_path / "backbone.pkl"))
    assert not any(k.startswith("stem.fc") for k in converted["model"]) and converted["arch"] == "resnet18"
    assert (converted["model"]["res5.1.conv2.weight"] == resnet["layer4.1.conv2.weight"].numpy()).all()


@pytest.mark.detectron2
def test_a_moco_converted_pickle_given_to_a_transfer_stage_loses_its_head(resnet, tmp_path):
    """A `.pkl` of the trunk alone is used as it is; one with `stem.fc.*` is converted first (the strict load
    would refuse the head's weights)."""
    from densecl.transfer.pretrained import prepare_weights

    pkl = moco_converted_pickle(resnet, tmp_path / "moco_v2_200ep.pkl")
    prepared = Path(prepare_weights(pkl, tmp_path / "stage"))
    assert prepared == tmp_path / "stage" / "pretrained_backbone.pkl"
    assert not any(k.startswith("stem.fc") for k in read_converted(prepared)["model"])
    assert prepare_weights(prepared, tmp_path / "other") == str(prepared)  # the trunk alone: used as it is
