"""Fixtures of the relay plugin's tests."""

import pytest

from spt.testing.nodes import relay_server


@pytest.fixture
def relay_url(tmp_path):
    with relay_server(tmp_path) as url:
        yield url
