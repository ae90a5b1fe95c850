"""Reading a configuration saved by an earlier version of the code, to decide whether a run may resume.

A field added since was not saved; the earlier run behaved as that field's default, so the saved config
is compared as if it held the default. Without this, every new option would make every older run folder
un-resumable.
"""

from __future__ import annotations

import dataclasses


def field_defaults(cls) -> dict:
    """Each field of dataclass `cls` with a default, as `dataclasses.asdict` writes it (tuples as lists)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def with_defaults(saved: dict, cls) -> dict:
    """`saved` with the fields it lacks filled from `cls`'s defaults (its own values win)."""
    return {**field_defaults(cls), **saved}


def changed_settings(saved: dict, current: dict, cls, ignored: set[str] | frozenset[str] = frozenset()) -> list:
    """(key, saved value, current value) for each setting outside `ignored` that differs, sorted by key.

    Fields added since the save count as their defaults (`with_defaults`)."""
    saved = with_defaults(saved, cls)
    return [
        (key, saved.get(key), current.get(key))
        for key in sorted(set(saved) | set(current))
        if key not in ignored and saved.get(key) != current.get(key)
    ]
