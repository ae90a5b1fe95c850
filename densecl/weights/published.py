"""Backbone weights read back under torchvision's key names from every layout people download (this project's
export and training checkpoints, MoCo, OpenSelfSup, mmselfsup, DDP, torchvision, detectron2 .pkl), and the key
names of detectron2's ResNet."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from densecl.weights.export import QUERY_BACKBONE_PREFIX

# The layouts people download, told apart by the prefix of their keys (the first that holds a `conv1.weight`):
# what the checkpoint is, and the prefix its backbone's torchvision-named keys carry there.
LAYOUTS = (
    ("a densecl training checkpoint", QUERY_BACKBONE_PREFIX),
    ("a MoCo v1/v2 release", "module.encoder_q."),
    ("an OpenSelfSup training checkpoint (DenseCL's own code)", "encoder_q.0."),
    ("an mmselfsup / mmcv checkpoint", "backbone."),
    ("a DistributedDataParallel state dict", "module."),
    ("a torchvision ResNet, or the official DenseCL release (its backbone, extracted)", ""),
)
DETECTRON2_LAYOUT = "a detectron2 .pkl (MoCo's or densecl's conversion: torchvision-style weights)"


def load_backbone_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """Torchvision-named backbone weights (no `fc`) from any of the layouts people download (LAYOUTS, and
    detectron2 .pkl files), and the architecture when the file records it. The layout is found from the keys;
    a file in none of them is an error naming its first keys and the layouts accepted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.suffix == ".pkl":  # detectron2's format is a plain pickle, as detectron2 itself reads it
        with path.open("rb") as file:
            obj = pickle.load(file, encoding="latin1")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of weights, got {type(obj).__name__}")
    arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    state = obj.get("state_dict", obj.get("model", obj))
    state = state if isinstance(state, dict) else {}
    if "stem.conv1.weight" in state:
        # MoCo's convert-pretrain-to-detectron2.py keeps the encoder's MLP head, renamed stem.fc.*: not backbone
        weights = {torchvision_name(k): torch.as_tensor(v) for k, v in state.items()}
        # detectron2's files drop BN's step counters (not weights): they come back as 0, as in a fresh ResNet
        counters = [k.replace("running_mean", "num_batches_tracked") for k in weights if k.endswith("running_mean")]
        weights.update({k: torch.tensor(0) for k in counters})
    else:
        prefix = next((p for _, p in LAYOUTS if f"{p}conv1.weight" in state), None)
        if prefix is None:
            accepted = "; ".join([name for name, _ in LAYOUTS] + [DETECTRON2_LAYOUT])
            raise ValueError(f"{path}: no ResNet backbone in a layout this loader knows. Its first keys: "
                             f"{list(state)[:8]}. Accepted: {accepted}")
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if arch is None and isinstance(obj.get("config"), dict):  # a densecl training checkpoint
            arch = obj["config"].get("backbone", {}).get("arch")
    weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}  # a classifier, or MoCo's MLP head
    bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: the backbone's entries must be tensors; not so for {bad[:5]}")
    return weights, arch


# ------------------------------------------------------------------------------------ detectron2 names
# torchvision -> detectron2: conv1 -> stem.conv1, bn1 -> stem.conv1.norm, layerN -> res(N+1), bnK -> convK.norm,
# downsample.0/1 -> shortcut/shortcut.norm (MoCo's conversion); and back.


def detectron2_name(key: str) -> str:
    if not key.startswith("layer"):
        key = "stem." + key
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"bn(\d)", r"conv\1.norm", key)
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def torchvision_name(key: str) -> str:
    key = key.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    key = re.sub(r"conv(\d)\.norm", r"bn\1", key)
    key = re.sub(r"^res(\d)", lambda m: f"layer{int(m.group(1)) - 1}", key)
    return key.removeprefix("stem.")
