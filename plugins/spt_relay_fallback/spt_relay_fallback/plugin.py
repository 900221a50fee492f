"""The relay plugin's hooks: relay connector, rendezvous discovery, `spt relay`, the client.

Relays come from `relay.urls` in config (`spt relay add`), from the members of this node's
subnets, and from this distribution's build-time list (empty here); see `sources.py`. Without this distribution installed (or with it disabled: `SPT_DISABLE_PLUGINS=relay`)
a node never talks to a relay, never looks anything up at one and never punches through one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from spt.core.errors import PeerError, SptError
from spt.core.identity import NodeId
from spt.hooks import (
    BulkTransit,
    Candidate,
    CommandRef,
    Connector,
    DiscoveryBackend,
    DiscoveryContext,
    Registry,
    hookimpl,
)
from spt.hooks.interfaces import ConnectContext, NodeRuntime
from spt_relay_fallback.client import REQUEST_TIMEOUT, _clients, client_for
from spt_relay_fallback.tcp import TICKET_BYTES, dial_transit


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


class RelayTransit(BulkTransit):
    """Bulk transit through a registered relay's TCP listener (`tcp.py`): tickets over QUIC."""

    name: ClassVar[str] = "relay"
    priority: ClassVar[int] = 50

    async def offer(self, ctx: ConnectContext, peer: NodeId) -> tuple[Mapping[str, Any], Callable[[], Any]] | None:
        for link in client_for(ctx.node_id).registered_links():
            conn, addr, port = link.conn, link.addr, link.tcp_port
            if conn is None or addr is None or port is None:
                continue
            try:
                reply = await conn.request("relay.transit", {"peer": peer.raw}, timeout=REQUEST_TIMEOUT)
            except (SptError, OSError):
                continue  # that relay does not know the peer: try the next
            body = reply.body if isinstance(reply.body, dict) else {}
            ticket, theirs = body.get("ticket"), body.get("peer_ticket")
            if not (isinstance(ticket, bytes) and isinstance(theirs, bytes) and len(ticket) == len(theirs) == TICKET_BYTES):
                continue
            join_ours = functools.partial(dial_transit, addr[0], port, link.url.key, ticket)
            return {"relay": link.url.key.raw, "ticket": theirs}, join_ours
        return None

    def join(self, ctx: ConnectContext, peer: NodeId, invitation: Mapping[str, Any]) -> Any:
        relay, ticket = invitation.get("relay"), invitation.get("ticket")
        if not isinstance(ticket, bytes) or len(ticket) != TICKET_BYTES:
            raise PeerError(peer.short, "the transit invitation has no valid ticket")
        # only relays this node registered with itself: a peer cannot send us elsewhere
        for link in client_for(ctx.node_id).registered_links():
            addr, port = link.addr, link.tcp_port
            if link.url.key.raw == relay and addr is not None and port is not None:
                return dial_transit(addr[0], port, link.url.key, ticket)
        raise PeerError(peer.short, "the transit names a relay this node is not registered with")


@hookimpl
def spt_register_bulk_transits(registry: Registry[BulkTransit]) -> None:
    registry.add(RelayTransit())


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
