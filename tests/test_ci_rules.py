"""A test whose tool is missing skips on a developer's machine and fails under CI=true (SLURM, Chromium,
detectron2), so that nothing quietly stops running in CI."""

import importlib.util

import pytest

from tests import conftest


class Item:  # what pytest_runtest_setup reads of a test item
    def __init__(self, marker):
        self.marker = marker

    def get_closest_marker(self, name):
        return object() if name == self.marker else None


def test_a_missing_tool_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no tool"):
        conftest.skip_or_fail_in_ci("no tool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but no tool"):
        conftest.skip_or_fail_in_ci("no tool")


def test_detectron2_tests_fail_in_ci_when_detectron2_is_missing(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "detectron2" else find_spec(name))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="detectron2 is not installed"):
        conftest.pytest_runtest_setup(Item("detectron2"))
    conftest.pytest_runtest_setup(Item("slow"))  # other tests are not concerned
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="detectron2 is not installed"):
        conftest.pytest_runtest_setup(Item("detectron2"))
