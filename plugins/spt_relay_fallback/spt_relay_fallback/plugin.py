"""The relay plugin's hooks: relay connector, rendezvous discovery, `spt relay`, the client.

Relays come from `relay.urls` in config (`spt relay add`), from the members of this node's
subnets, and from this distribution's build-time list (empty here); see `sources.py`. Without this distribution installed (or with it disabled: `SPT_DISABLE_PLUGINS=relay`)
a node never talks to a relay, never looks anything up at one and never punches through one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from spt.core.identity import NodeId
from spt.hooks import Candidate, CommandRef, Connector, DiscoveryBackend, DiscoveryContext, Registry, hookimpl
from spt.hooks.interfaces import ConnectContext, NodeRuntime
from spt_relay_fallback.client import _clients, client_for


class RelayConnector(Connector):
    """Reaches a peer through every registered relay; dialled after the first direct address."""

    name: ClassVar[str] = "relay"
    priority: ClassVar[int] = 50
    start_delay: ClassVar[float] = 0.25

    async def candidates(self, ctx: ConnectContext, peer: NodeId, hints: Sequence[Candidate]) -> Sequence[Candidate]:
        return client_for(ctx.node_id).candidates(peer)


class RelayRendezvous(DiscoveryBackend):
    """Finds members by rendezvous tag at the configured relays; announces our tags there."""

    name: ClassVar[str] = "relay"
    priority: ClassVar[int] = 50

    def __init__(self) -> None:
        self._node: NodeId | None = None

    async def start(self, ctx: DiscoveryContext) -> None:
        self._node = ctx.node_id
        client_for(ctx.node_id).attach(ctx)

    async def refresh(self) -> None:
        if self._node is None:
            return
        for link in client_for(self._node).registered_links():
            await link.push_tags()

    async def stop(self) -> None:
        if self._node is not None and self._node in _clients:
            await _clients[self._node].stop()

    async def find(self, tag: bytes, timeout: float) -> Sequence[Candidate]:
        if self._node is None:
            return []
        return await client_for(self._node).find(tag, timeout)


@hookimpl
def spt_register_connectors(registry: Registry[Connector]) -> None:
    registry.add(RelayConnector())


@hookimpl
def spt_register_discovery_backends(registry: Registry[DiscoveryBackend]) -> None:
    registry.add(RelayRendezvous())


@hookimpl
def spt_register_commands(registry: Registry[CommandRef]) -> None:
    registry.add(CommandRef("relay", "spt_relay_fallback.cli:relay", help="Run a relay, or choose the relays this node uses."))


@hookimpl
def spt_runtime_started(runtime: NodeRuntime) -> None:
    client_for(runtime.node_id).started(runtime)
