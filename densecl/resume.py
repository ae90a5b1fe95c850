"""The one rule for reusing a folder's earlier work, followed by every stage (pre-training, the transfer
stages, the probe, the pipeline's stage markers).

A stage records the settings it runs with in its folder. Run again there, it is done (its result is read
back), resumed (from its own checkpoint) or refused: a setting that changes results differs, so its figures
would be reported under settings they were not made with. Settings that change no result may differ freely.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from enum import Enum
from typing import Any

from densecl.config import flatten, from_dict, plain

# Keys (at any depth: `pretrain.num_workers`, `downstream.det_voc.log_period`) that change neither the weights
# nor the figures a stage reports. Job folder names leave them out too (pipelines.schema.job_dirname).
RESULT_NEUTRAL = frozenset({
    "device",  # where it runs
    "num_workers", "progress",  # how fast, and what the console shows
    "log_every", "log_period", "ckpt_every", "checkpoint_period", "eval_period",  # when things are written
    "figure",  # the correspondence figure, a by-product
    "cache_dir",  # where generated scenes are kept: the same pixels as generating them again
    "compile",  # torch.compile: the same computation, fused (rounding aside, as on another device)
})  # fmt: skip


class Reuse(Enum):
    NEW = "new"  # nothing to reuse: start
    RESUME = "resume"  # unfinished work with the same settings: continue it
    DONE = "done"  # finished with the same settings: read its result back


class SettingsChangedError(ValueError):
    """A folder holds work made with other settings than the current ones."""

    def __init__(self, folder: str | os.PathLike, changes: list[tuple[str, Any, Any]]):
        self.folder, self.changes = folder, changes
        shown = "; ".join(f"{key}: {old!r} then, {new!r} now" for key, old, new in changes[:8])
        more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
        super().__init__(
            f"{folder} holds work made with other settings: {shown}{more}. Reusing it would report results "
            f"under settings they were not made with: run under another name= (a new folder), or move {folder} "
            f"away to start over"
        )


def is_result_neutral(key: str) -> bool:
    return any(part in RESULT_NEUTRAL for part in key.split("."))


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved, current) for each dotted key both hold that differs and changes results, sorted by key.

    A key only one side holds is not compared: callers fill a saved record's missing fields with their
    defaults first (a folder saved before a field existed ran as its default)."""
    old, new = flatten(saved), flatten(current)
    return [
        (key, old[key], new[key])
        for key in sorted(old.keys() & new.keys())
        if not is_result_neutral(key) and _comparable(old[key]) != _comparable(new[key])
    ]


def _comparable(value: Any) -> Any:
    value = value.value if isinstance(value, Enum) else value
    return list(value) if isinstance(value, tuple) else value


def reuse_recorded(folder: str | os.PathLike, record: str | os.PathLike, config_cls: type,
                   current: Mapping[str, Any], finished: bool) -> Reuse:
    """`reuse` for a folder whose settings file `record` holds {"config": ..., ...} (absent: none recorded);
    the config is read through `config_cls`, so that a field added since counts as its default."""
    saved = None
    if os.path.exists(record):
        with open(record) as file:
            recorded = json.load(file)
        saved = {**recorded, "config": plain(from_dict(config_cls, recorded["config"]))}
    return reuse(folder, saved, current, finished=saved is not None and finished)


def reuse(folder: str | os.PathLike, saved: Mapping[str, Any] | None, current: Mapping[str, Any],
          finished: bool) -> Reuse:
    """What to do with `folder`, given the settings it recorded (None: none recorded) and whether its work
    finished. Raises SettingsChangedError when the recorded settings differ in one that changes results.
    A finished folder that recorded no settings (written before they were recorded) is done: nothing can
    be compared."""
    if saved is not None:
        changes = changed_settings(saved, current)
        if changes:
            raise SettingsChangedError(folder, changes)
    if finished:
        return Reuse.DONE
    return Reuse.NEW if saved is None else Reuse.RESUME
