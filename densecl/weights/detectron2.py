"""Backbone weights -> detectron2 `.pkl` (MoCo's conversion), checked against the architecture's full key set.

Key mapping (torchvision -> detectron2): conv1 -> stem.conv1, bn1 -> stem.conv1.norm, layerN -> res(N+1),
bnK -> convK.norm, downsample.0/1 -> shortcut/shortcut.norm. Dropped: `num_batches_tracked` counters
(a step counter, not a weight; detectron2's frozen BN has none) and a classifier `fc.*`. The pickle is
{"model": numpy arrays, "__author__": "densecl", "matching_heuristics": True, "arch": arch, "source": src},
which detectron2's DetectionCheckpointer loads by suffix matching into C4 (res5 in the ROI head) and FPN
models. The weights must be torchvision-style (RGB, 0-1 input normalised by ImageNet mean/std, stride in the
3x3 conv): the stage configs set INPUT.FORMAT RGB, the torchvision pixel statistics and STRIDE_IN_1X1 False.
No detectron2 here: the pipeline's convert stage runs without it.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torchvision import models

from densecl.files import write_atomic
from densecl.weights.published import detectron2_name, load_backbone_weights

AUTHOR = "densecl"
BLOCKS_PER_STAGE = {
    (2, 2, 2, 2, False): "resnet18",
    (3, 4, 6, 3, False): "resnet34",
    (3, 4, 6, 3, True): "resnet50",
    (3, 4, 23, 3, True): "resnet101",
    (3, 8, 36, 3, True): "resnet152",
}
CONVERTIBLE_ARCHS = tuple(BLOCKS_PER_STAGE.values())
_COUNTER = "num_batches_tracked"


def infer_arch(state_dict: dict[str, torch.Tensor]) -> str:
    """The torchvision ResNet whose block layout matches the keys (bottleneck blocks have a conv3)."""
    blocks = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(len(indices))
    bottleneck = "layer1.0.conv3.weight" in state_dict
    layout = (*blocks, bottleneck)
    if layout not in BLOCKS_PER_STAGE:
        raise ValueError(
            f"cannot infer the ResNet architecture: blocks per stage {tuple(blocks)}, "
            f"{'bottleneck' if bottleneck else 'basic'} blocks; expected one of "
            + ", ".join(f"{v} {k[:4]}" for k, v in BLOCKS_PER_STAGE.items())
        )
    return BLOCKS_PER_STAGE[layout]


def reference_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Every backbone key of torchvision's `arch` (no fc, no counters) with its shape."""
    if arch not in CONVERTIBLE_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(CONVERTIBLE_ARCHS)}")
    with torch.device("meta"):
        net = getattr(models, arch)(weights=None)
    return {
        k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith("fc.") and not k.endswith(_COUNTER)
    }


def to_detectron2_keys(
    state_dict: dict[str, torch.Tensor], arch: str | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """Rename to detectron2's ResNet keys after checking every key and shape of `arch` (inferred if None)."""
    inferred = infer_arch(state_dict)
    if arch is not None and arch != inferred:
        raise ValueError(f"weights were recorded as {arch!r}, but their block layout is {inferred!r}")
    arch = inferred
    expected = reference_shapes(arch)
    weights = {k: v for k, v in state_dict.items() if not k.endswith(_COUNTER) and not k.startswith("fc.")}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k}: {tuple(weights[k].shape)} (expected {expected[k]})"
        for k in sorted(set(expected) & set(weights))
        if tuple(weights[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:10]}")
    if problems:
        raise ValueError(f"not a complete torchvision {arch} backbone: " + "; ".join(problems))
    converted = {detectron2_name(k): v.detach().cpu().float().numpy() for k, v in weights.items()}
    return converted, arch


def convert_to_detectron2(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write `src`'s backbone (anything densecl.weights.published.load_backbone_weights accepts: exported backbone,
    densecl training checkpoint, torchvision ImageNet checkpoint) as a detectron2 `.pkl` at `dst`, atomically;
    returns `dst`."""
    dst = Path(dst)
    if dst.suffix != ".pkl":
        raise ValueError(f"detectron2 reads converted weights only from a .pkl file; got dst={dst}")
    weights, arch = load_backbone_weights(src)
    converted, arch = to_detectron2_keys(weights, arch)
    data = {"model": converted, "__author__": AUTHOR, "matching_heuristics": True, "arch": arch, "source": str(src)}
    write_atomic(dst, lambda f: pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL))
    return dst


def read_converted(path: str | os.PathLike) -> dict:
    """Load a detectron2-style weights pickle ({"model": {key: array}, ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detectron2 weights file not found: {path}")
    with path.open("rb") as f:
        data = pickle.load(f, encoding="latin1")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path}: expected a pickle of {{'model': {{key: array}}, ...}}, got {type(data).__name__}")
    return data
