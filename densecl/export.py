"""Backbone export: the query encoder's ResNet under torchvision's key names, for every downstream tool."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from densecl.config import PretrainConfig
from densecl.files import write_atomic

QUERY_BACKBONE_PREFIX = "encoder_q.backbone."
EXPORT_AUTHOR = "densecl"


def backbone_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The query backbone's weights, prefix stripped: exactly torchvision's ResNet keys without `fc`."""
    weights = {
        key[len(QUERY_BACKBONE_PREFIX) :]: value.detach().cpu().clone()
        for key, value in model_state.items()
        if key.startswith(QUERY_BACKBONE_PREFIX)
    }
    if not weights:
        raise KeyError(f"no key starts with {QUERY_BACKBONE_PREFIX!r}: this is not a DenseCL model state")
    return weights


def save_backbone(weights: dict[str, torch.Tensor], path: str | os.PathLike, arch: str | None) -> Path:
    """Write {'state_dict', 'arch', 'author'} atomically (densecl.files.write_atomic)."""
    payload = {"state_dict": weights, "arch": arch, "author": EXPORT_AUTHOR}
    return write_atomic(path, lambda file: torch.save(payload, file))


def load_backbone_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """Torchvision-named backbone weights (no `fc`) and the architecture name when the file records it.

    Accepts an exported backbone ({'state_dict', 'arch'}), a densecl training checkpoint ({'model': ...}),
    or a torchvision ImageNet checkpoint (a plain state dict, or one under 'state_dict'); `fc.*` is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of weights, got {type(obj).__name__}")
    arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    if "model" in obj and isinstance(obj["model"], dict):
        weights = backbone_state_dict(obj["model"])
        config = obj.get("config")
        if arch is None and isinstance(config, dict):
            arch = PretrainConfig.from_dict(config).backbone.arch
    else:
        weights = obj.get("state_dict", obj)
        if any(k.startswith(QUERY_BACKBONE_PREFIX) for k in weights):
            weights = backbone_state_dict(weights)
        weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad or "conv1.weight" not in weights:
        raise ValueError(
            f"{path}: not a ResNet state dict in torchvision naming "
            f"(expected tensors under keys like 'conv1.weight', 'layer1.0.conv1.weight'; got {list(weights)[:5]})"
        )
    return weights, arch
