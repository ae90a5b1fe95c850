"""Typed settings, the machinery every room's `settings` module uses: errors that name the key, each field's
role, and conversion to and from plain values (YAML, JSON, checkpoints). No torch.

A field's role is declared where the field is (`result(...)` or `neutral(...)`), never in a side table: whether
it changes results (a rerun compares it, densecl.resume; job folder names show it) and whether it belongs to a
published protocol (densecl.transfer.protocol compares it). tests/test_settings_roles.py fails on a field
declared without one.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from enum import Enum
from typing import Any


class ConfigValueError(ValueError):
    """A setting that is well-typed but cannot run: names the key (dotted, from the config's root), the
    value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        shown = value.value if isinstance(value, Enum) else value
        super().__init__(f"{key}={shown!r} is invalid: {allowed}")

    def within(self, section: str) -> ConfigValueError:
        """The same error, its key prefixed by the section that holds it."""
        return ConfigValueError(f"{section}.{self.key}", self.value, self.allowed)


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigValueError(key, value, allowed)


def check_positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        check(value is None or value >= 1, name, value, "allowed: an integer >= 1")


def validate_sections(config: Any, names: tuple[str, ...], **kwargs: Any) -> None:
    """Each named section's `validate(**kwargs)`, its errors' keys prefixed with the section's name."""
    for name in names:
        try:
            getattr(config, name).validate(**kwargs.get(name, {}))
        except ConfigValueError as err:
            raise err.within(name) from None


# ------------------------------------------------------------------------------------------------ roles
ROLE = "densecl.role"  # the key of a field's Role in its metadata


@dataclass(frozen=True)
class Role:
    """What a setting does to a run's outcome."""

    changes_results: bool  # the weights or the figures depend on it: compared on a rerun, shown in folder names
    protocol: bool = False  # part of the published protocol a transfer stage reproduces (compared with it)


def result(default: Any = MISSING, *, factory: Any = MISSING, protocol: bool = True) -> Any:
    """A field that changes results. `protocol=False`: a result setting that no published protocol fixes (the
    seed, where the data are, the user's own set) or one compared in another form."""
    return _field(default, factory, Role(changes_results=True, protocol=protocol))


def neutral(default: Any = MISSING, *, factory: Any = MISSING) -> Any:
    """A field that changes no result: where and how fast a run goes, what it shows and when it writes."""
    return _field(default, factory, Role(changes_results=False))


def _field(default: Any, factory: Any, role: Role) -> Any:
    return dataclasses.field(default=default, default_factory=factory, metadata={ROLE: role})


def role_of(field: dataclasses.Field) -> Role | None:
    return field.metadata.get(ROLE)


def fields_along(schema: type, key: str) -> list[dataclasses.Field] | None:
    """The fields a dotted key passes through, from `schema`'s down to its own; None when `schema` has no
    such path (a key of no field)."""
    found, cls = [], schema
    for part in key.split("."):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return None
        match = next((f for f in dataclasses.fields(cls) if f.name == part), None)
        if match is None:
            return None
        found.append(match)
        cls = concrete_type(typing.get_type_hints(cls)[part])
    return found


def changes_results(schema: type, key: str) -> bool:
    """Whether the setting at dotted `key` of `schema` changes results: not when it, or a section holding it, is
    neutral. A key the schema does not know counts as changing results (compared, never silently ignored)."""
    along = fields_along(schema, key)
    return along is None or all(getattr(role_of(f), "changes_results", True) for f in along)


def unclassified_fields(schema: type, prefix: str = "") -> list[str]:
    """Every field of `schema` and its nested sections declared without a role (dotted keys)."""
    missing = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if role_of(f) is None:
            missing.append(f"{prefix}{f.name}")
        kind = concrete_type(hints[f.name])
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            missing += unclassified_fields(kind, f"{prefix}{f.name}.")
    return missing


# ------------------------------------------------------------------------------------ dict conversions


def plain(value: Any) -> Any:
    """Dataclasses as dicts, enums as their values, tuples as lists: what JSON, torch's weights-only loader
    and a comparison with a saved copy all accept."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def from_dict(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass `cls` from plain values: nested sections, enums and tuples rebuilt, missing
    fields at their defaults (a folder saved before a field existed ran as its default), an unknown key an
    error that lists the known ones."""
    return cls(**field_values(cls, values, prefix))


def field_values(cls: type, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`values` as the fields of dataclass `cls` hold them (what `from_dict` builds `cls` from): a nested
    section as its dataclass, an enum as its member, a list as a tuple where the field is one."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigValueError(f"{prefix}{unknown[0]}", values[unknown[0]], f"unknown key; known: {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        kind = concrete_type(hints[name])
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = from_dict(kind, value, f"{prefix}{name}.")
        elif isinstance(kind, type) and issubclass(kind, Enum) and value is not None:
            try:
                value = kind(value)
            except ValueError:
                raise ConfigValueError(f"{prefix}{name}", value, f"allowed: {', '.join(kind)}") from None
        elif kind is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return kwargs


def concrete_type(hint: Any) -> Any:
    """`X | None` -> X; `tuple[int, ...]` -> tuple; anything else as it is."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return concrete_type(args[0]) if len(args) == 1 else hint
    return origin or hint


def flatten(tree: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": 2} -> {"a.b": 1, "c": 2}; an empty mapping stays a leaf."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, sep, name + sep))
        else:
            flat[name] = value
    return flat
