"""Fixtures and rules shared by several test modules."""

import importlib.util
import os
from typing import NoReturn

import pytest
import torch


def skip_or_fail_in_ci(reason: str) -> NoReturn:
    """A tool a test needs is missing: on a developer's machine the test skips; under CI=true, where .ci/run
    installs every tool, it fails, so that no test silently stops running there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item):
    if item.get_closest_marker("detectron2") and importlib.util.find_spec("detectron2") is None:
        skip_or_fail_in_ci("detectron2 is not installed (scripts/setup.sh installs it)")


@pytest.fixture
def one_thread():
    """Tiny convolutions run faster on one thread, and much faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
