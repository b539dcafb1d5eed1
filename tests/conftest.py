"""Shared pytest configuration."""

import os

import pytest
from hypothesis import settings

# The suite must give the same verdict on every run: property tests use a fixed
# sequence of examples unless STUI_HYPOTHESIS_EXPLORE=1 asks for fresh ones
# (do that when hunting bugs, then pin what it finds as an explicit test).
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile("explore" if os.environ.get("STUI_HYPOTHESIS_EXPLORE") == "1" else "deterministic")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(120))
