"""Fixtures for the file-transfer tests (helpers live in ft_helpers.py)."""

from __future__ import annotations

import pytest
from ft_helpers import make_pair

from spt.testing.nodes import NodeFactory


@pytest.fixture(scope="module")
def module_factory():
    factory = NodeFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def pair(module_factory):
    """alpha and beta in subnet home; beta holds the perch `bob`."""
    return make_pair(module_factory)
