"""The pytest plugin that spt and plugin authors test with (entry point `pytest11`).

Fixtures:
- `spt_pm`: a fresh plugin system with only the built-ins (autoload off).
- `register_plugin`: build a plugin system with extra plugin objects for one test.
- `spt_nodes`: a factory of real nodes (daemon processes, each its own `SPT_HOME`) on loopback,
  stopped at teardown by the pids it started.
- `spt_node_pair`: two real nodes, `alpha` and `beta`, in one subnet `home` (for plugin authors).
- `netns_lab`: a factory of network-namespace labs (`spt.testing.netns`), torn down after.

Markers (`spt.testing.required`): `@pytest.mark.root` for tests that need root and
`@pytest.mark.lab` (alias `netns`) for tests that build a netns lab. As a normal user they skip,
folded into one summary line; as root they must run (a skip becomes a failure, and a lab that
cannot be built fails with the reason).

pytest loads this module wherever spt is installed, so it imports only what is cheap; the rest
is imported inside the fixtures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from spt.testing.netns import netns_lab
from spt.testing.required import (
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_makereport,
    pytest_runtest_setup,
)

if TYPE_CHECKING:
    from spt.manager import PluginSystem
    from spt.testing.nodes import Node, NodeFactory


__all__ = [
    "netns_lab",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_runtest_makereport",
    "pytest_runtest_setup",
    "register_plugin",
    "spt_node_pair",
    "spt_nodes",
    "spt_pm",
]


@pytest.fixture
def spt_pm() -> PluginSystem:
    from spt.manager import build_plugin_manager

    return build_plugin_manager(autoload=False)


@pytest.fixture
def register_plugin() -> Callable[..., PluginSystem]:
    from spt.manager import build_plugin_manager

    def build(*plugins: tuple[str, Any], blocked: tuple[str, ...] = ()) -> PluginSystem:
        return build_plugin_manager(autoload=False, extra_plugins=plugins, blocked=blocked)

    return build


@pytest.fixture
def spt_nodes() -> Iterator[NodeFactory]:
    from spt.testing.nodes import NodeFactory

    factory = NodeFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def spt_node_pair(spt_nodes: NodeFactory) -> list[Node]:
    return spt_nodes.subnet(["alpha", "beta"])
