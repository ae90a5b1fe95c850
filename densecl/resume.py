"""The one rule for reusing a folder's earlier work, followed by every stage (pre-training, the transfer
stages, the probe, the pipeline's stage markers).

A stage records the settings it runs with in its folder. Run again there, it is done (its result is read
back), resumed (from its own checkpoint) or refused: a setting that changes results differs, so its figures
would be reported under settings they were not made with. Settings that change no result may differ freely:
each field declares which it is (densecl.typed_settings: `result` or `neutral`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from enum import Enum
from typing import Any

from densecl.typed_settings import changes_results, flatten, from_dict, plain


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


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any], schema: type,
                     within: str = "") -> list[tuple[str, Any, Any]]:
    """(key, saved, current) for each dotted key both hold that differs and changes results, sorted by key.

    The keys under `within` ("config." for a record {"config": ..., "weights": ...}) are `schema`'s fields,
    classified by their declared roles; every other key changes results. A key only one side holds is not
    compared: callers fill a saved record's missing fields with their defaults first (a folder saved before a
    field existed ran as its default)."""
    old, new = flatten(saved), flatten(current)
    return [
        (key, old[key], new[key])
        for key in sorted(old.keys() & new.keys())
        if _changes_results(schema, within, key) and _comparable(old[key]) != _comparable(new[key])
    ]


def _changes_results(schema: type, within: str, key: str) -> bool:
    return not key.startswith(within) or changes_results(schema, key[len(within) :])


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
    return reuse(folder, saved, current, finished=saved is not None and finished, schema=config_cls, within="config.")


def reuse(folder: str | os.PathLike, saved: Mapping[str, Any] | None, current: Mapping[str, Any],
          finished: bool, schema: type, within: str = "") -> Reuse:
    """What to do with `folder`, given the settings it recorded (None: none recorded) and whether its work
    finished. Raises SettingsChangedError when the recorded settings differ in one that changes results
    (`changed_settings`: `schema` and `within` say which keys do).
    A finished folder that recorded no settings (written before they were recorded) is done: nothing can
    be compared."""
    if saved is not None:
        changes = changed_settings(saved, current, schema, within)
        if changes:
            raise SettingsChangedError(folder, changes)
    if finished:
        return Reuse.DONE
    return Reuse.NEW if saved is None else Reuse.RESUME
