"""Pre-training checkpoints: every state a run needs to continue exactly, written atomically."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from densecl.files import write_atomic
from densecl.training.settings import PretrainConfig

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Atomically (densecl.files.write_atomic): a crash or a full disk never replaces the last good one."""
    write_atomic(path, lambda file: torch.save(payload, file))


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err


def saved_config(state: dict) -> PretrainConfig:
    """The settings a checkpoint was written with; those added since at their defaults."""
    return PretrainConfig.from_dict(state["config"])
