"""A transfer stage's effective settings against its published protocol (issue: most reproductions below the
paper come from deviations the user did not notice: a smaller total batch, no aug set).

Each paper stage has a reference config (`StageConfig.protocol`); every field declared part of the protocol
(`result(...)`, densecl.typed_settings: what is trained and how it is scored) is compared with it. SyncBN is not
compared on its own: its statistics cover the total batch, as plain BN's do in one process, so a one-GPU run at
the protocol's total batch has the protocol's statistics and a smaller batch deviates in `ims_per_batch`. The
synthetic and custom presets are their own protocols: nothing to compare. No torch and no detectron2: the
pipeline lists the deviations while it checks the config, before any job starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from densecl.typed_settings import role_of

PAPER, DEVIATES = "paper", "deviates"


@dataclass(frozen=True)
class Deviation:
    key: str
    value: Any
    protocol: Any
    effect: str = ""  # the documented effect on the result, where one is known

    def __str__(self) -> str:
        text = f"{self.key}={_show(self.value)} (protocol: {_show(self.protocol)})"
        return f"{text}: {self.effect}" if self.effect else text


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def compare(cfg: Any, reference: Any, effects: dict[str, str], derived: dict[str, tuple[Any, Any]] | None = None,
            alternatives: dict[str, tuple] | None = None) -> list[Deviation]:
    """Every protocol field where `cfg` differs from `reference` (same dataclass), then each derived value
    ({name: (cfg's, reference's)}, e.g. the data sets a name resolves to) that differs; a field named in
    `derived` is compared there only. A field whose value and reference are both among its `alternatives`
    (values the published code also runs) does not deviate."""
    derived, alternatives = derived or {}, alternatives or {}
    found = []
    for field in dataclasses.fields(reference):
        if not getattr(role_of(field), "protocol", False) or field.name in derived:
            continue
        value, expected = getattr(cfg, field.name), getattr(reference, field.name)
        accepted = alternatives.get(field.name, ())
        if _plain(value) != _plain(expected) and not (value in accepted and expected in accepted):
            found.append(Deviation(field.name, value, expected, effects.get(field.name, "")))
    for name, (value, expected) in derived.items():
        if _plain(value) != _plain(expected):
            found.append(Deviation(name, value, expected, effects.get(name, "")))
    return found


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# What the published detectron2 configs fix and no stage setting changes (torchvision-style weights: RGB
# input, torchvision's pixel statistics, stride on the 3x3 conv; the plain 7x7 stem; nothing frozen), as
# detectron2 config keys: checked on each stage's built config, a guard against the code drifting.
FIXED = {
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
    "INPUT.FORMAT": "RGB",
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.BACKBONE.FREEZE_AT": 0,
}


def fixed_deviations(d2_config: Any) -> list[Deviation]:
    """Each FIXED key where a detectron2 config (a CfgNode) differs."""
    found = []
    for key, expected in FIXED.items():
        value = d2_config
        for part in key.split("."):
            value = value[part]
        same = (len(value) == len(expected) and all(abs(a - b) < 1e-3 for a, b in zip(value, expected))
                if isinstance(expected, list) else value == expected)
        if not same:
            found.append(Deviation(key, value, expected))
    return found


def status(deviations: list[Deviation], own_protocol: str | None) -> str:
    """The mlflow tag's value: the preset's name when it is its own protocol, else paper or deviates."""
    if own_protocol is not None:
        return own_protocol
    return DEVIATES if deviations else PAPER


def summary(deviations: list[Deviation]) -> str:
    """One line for the mlflow param: key=value (protocol) pairs, effects left out."""
    return "; ".join(f"{d.key}={_show(d.value)} ({_show(d.protocol)})" for d in deviations)
