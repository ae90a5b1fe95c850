"""Starting weights for a transfer stage: what the user gave, resolved to a detectron2 `.pkl`, and loaded into
the model strictly. detectron2 itself only logs keys it could not match, which is how silent partial loads
happen; `load_pretrained` refuses them.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from detectron2.checkpoint import DetectionCheckpointer

from densecl.weights.detectron2 import convert_to_detectron2, read_converted

logger = logging.getLogger(__name__)

CONVERTED_NAME = "pretrained_backbone.pkl"
HEAD_PREFIX = "stem.fc."  # MoCo's conversion keeps the MLP head, under the stem
# ResNet parameters in a detectron2 model: (backbone.)(bottom_up.)stem/resN..., or roi_heads.res5 in C4.
_RESNET_KEY = re.compile(r"(^|\.)(stem|res[2-5])\.")
# Not part of the pre-trained trunk: the extra BN after the C4 box head's res5 (MoCo's Res5ROIHeadsExtraNorm).
_HEAD_ONLY = re.compile(r"(^|\.)res5\.norm\.")


def prepare_weights(weights: str | os.PathLike | None, output_dir: str | os.PathLike) -> str | None:
    """None (random init) stays None; a detectron2 `.pkl` of the trunk alone is used as it is; anything else
    densecl.weights.published.load_backbone_weights accepts (exported backbone, densecl checkpoint, torchvision
    ImageNet checkpoint, a MoCo-converted `.pkl` that kept its MLP head as `stem.fc.*`) is converted into
    `output_dir/pretrained_backbone.pkl`."""
    if weights is None or str(weights) == "":
        return None
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"starting weights not found: {path}")
    if path.suffix == ".pkl":
        data = read_converted(path)  # fail now, not after the data loaders started
        if not any(key.startswith(HEAD_PREFIX) for key in data["model"]):
            return str(path)
    return str(convert_to_detectron2(path, Path(output_dir) / CONVERTED_NAME))


def load_pretrained(model, pkl_path: str | os.PathLike, arch: str | None = None) -> None:
    """Load a converted backbone into `model` with detectron2's name matching; raise if any ResNet key (stem,
    res2..res5) of the model stayed uninitialised, a weight in the file was not used, or a shape differs."""
    data = read_converted(pkl_path)
    recorded = data.get("arch")
    if arch is not None and recorded is not None and recorded != arch:
        raise ValueError(f"{pkl_path} holds {recorded} weights, but the model is built as {arch}")
    checkpointer = DetectionCheckpointer(model)
    checkpoint = checkpointer._load_file(str(pkl_path))
    checkpoint.setdefault("matching_heuristics", True)
    incompatible = checkpointer._load_model(checkpoint)
    problems = []
    missing = [
        k
        for k in incompatible.missing_keys
        if _RESNET_KEY.search(k) and not _HEAD_ONLY.search(k) and not k.endswith("num_batches_tracked")
    ]
    if missing:
        problems.append(f"model keys left uninitialised: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if incompatible.unexpected_keys:
        unused = incompatible.unexpected_keys
        problems.append(f"weights in the file that match no model key: {unused[:10]}")
    if incompatible.incorrect_shapes:
        problems.append(f"shape mismatches (key, file, model): {incompatible.incorrect_shapes[:10]}")
    if problems:
        raise ValueError(f"loading {pkl_path} into the {type(model).__name__} failed: " + "; ".join(problems))
    logger.info("loaded %d backbone tensors from %s", len(data["model"]), pkl_path)
