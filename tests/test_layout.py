"""The library's rooms (densecl/__init__.py) import downwards only: a room imports the top-level modules and
the rooms listed before it, never one after it. Read from the sources, so an import inside a function counts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "densecl"
ROOMS = ("method", "data", "weights", "evaluation", "training", "transfer")  # each may import the ones before
TOP_LEVEL = {"typed_settings", "files", "resume", "distributed"}


def densecl_imports(path: Path) -> set[str]:
    """The densecl modules a file imports, as `room` or `top-level module` names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("densecl"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("densecl")]
        for name in names:
            parts = name.split(".")
            if len(parts) > 1 and (parts[1] in ROOMS or parts[1] in TOP_LEVEL):
                found.add(parts[1])
    return found


def room_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_downwards(path):
    room = room_of(path)
    allowed = TOP_LEVEL | (set(ROOMS[: ROOMS.index(room) + 1]) if room in ROOMS else set())
    if room in TOP_LEVEL:  # the top level builds on nothing but itself
        allowed = TOP_LEVEL
    assert densecl_imports(path) <= allowed


def test_the_rooms_and_at_most_eight_top_level_modules():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == TOP_LEVEL and len(top) <= 8
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == set(ROOMS)
    for room in ROOMS:
        assert ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text())), room


def test_the_check_sees_an_upward_import(tmp_path):
    planted = tmp_path / "quality.py"
    planted.write_text("from densecl.transfer.layouts import VOC_CLASSES\nimport densecl.training.hooks\n")
    assert densecl_imports(planted) == {"transfer", "training"}
