"""Fixtures for the self-update tests (helpers live in su_helpers.py)."""

from __future__ import annotations

import pytest
from su_helpers import TestKeys


@pytest.fixture(scope="module")
def test_keys(tmp_path_factory):
    return TestKeys(tmp_path_factory.mktemp("keys"))
