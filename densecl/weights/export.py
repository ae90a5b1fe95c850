"""Writing a trained model's backbone under torchvision's key names, the one layout every downstream tool here
reads (densecl.weights.published reads it back, with every other layout people download)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

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
