"""Fixtures of the environment matrix: one set of targets and one cache of runs per session,
so that each (environment, caller) is entered only as often as it must be."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


@pytest.fixture(scope="session")
def runner() -> Iterator[harness.Runner]:
    targets = harness.Targets.create()
    try:
        yield harness.Runner(targets)
    finally:
        targets.close()
