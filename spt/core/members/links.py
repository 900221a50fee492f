"""Member connections: where a member is (its addresses, what connectors offer), keeping a
connection to every member up (dial, sync, hold, back off), and how each path looks (§7.5).

Collaborators: `Net` (the transport) and the few daemon parts named in `LinksHost`; what happens
once a connection is up is the caller's (`on_connected`, `resync`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from spt.core.errors import PeerError, RemoteProtocolError
from spt.core.identity import NodeId
from spt.core.members.wire import DIAL_TIMEOUT, Address, Net
from spt.core.net.connections import Connection, ConnectionClosedError, RequestError
from spt.core.net.transport import ALPN_MEMBER
from spt.core.proto import join as jp
from spt.core.subnets import HeldSubnet, Subnets

if TYPE_CHECKING:
    from spt.core.config import NodeConfig
    from spt.core.endpoints import Endpoints
    from spt.core.store import Store
    from spt.manager import PluginSystem

log = logging.getLogger(__name__)

RECONNECT_MIN: Final = 1.0
RECONNECT_MAX: Final = 60.0
LOG_RESYNC: Final = 60.0  # seconds between log comparisons on a connection that stays up


class LinksHost(Protocol):
    """What the links need of the daemon."""

    store: Store
    config: NodeConfig
    plugins: PluginSystem
    subnets: Subnets
    endpoints: Endpoints

    @property
    def node_id(self) -> NodeId: ...

    def peer_disconnected(self, node: NodeId) -> None: ...


class MemberLinks:
    """Addresses of members, a keeper task per member, and the path each connection takes."""

    def __init__(
        self, host: LinksHost, net: Net, *, on_connected: Callable[[Connection], Awaitable[None]],
        resync: Callable[[Connection, HeldSubnet], Awaitable[None]],
    ) -> None:
        self.host = host
        self.net = net
        self._on_connected = on_connected  # a fresh connection: logs, seeds, records
        self._resync = resync  # one subnet's log, again, on a connection that stays up
        self._keepers: dict[NodeId, asyncio.Task[None]] = {}
        self._detached_peers: set[NodeId] = set()  # members that told us they detached

    def close(self) -> None:
        for task in self._keepers.values():
            task.cancel()

    def addresses_of(self, node: NodeId) -> list[Address]:
        rows = self.host.store.query(
            "SELECT host, port FROM peer_addrs WHERE node=? ORDER BY seen DESC LIMIT 16", (node.raw,)
        )
        return [(str(r["host"]), int(r["port"])) for r in rows]

    def remember_address(self, node: NodeId, host: str, port: int, source: str) -> None:
        with self.host.store.transaction():
            self.host.store.db.execute(
                "INSERT INTO peer_addrs(node, host, port, source, seen) VALUES(?,?,?,?,?) "
                # an address the user gave (static peers, --peer) stays theirs: the path is `direct static`
                "ON CONFLICT(node, host, port) DO UPDATE SET seen=excluded.seen, source=CASE WHEN "
                "peer_addrs.source IN ('static', 'peer') THEN peer_addrs.source ELSE excluded.source END",
                (node.raw, host, port, source, time.time()),
            )

    # -- dialling through connectors (SPEC.md §7.3) ----------------------------------------------

    async def dial_addresses(self, node: NodeId) -> list[Address]:
        """Where to dial `node`: its known direct addresses, plus what connectors offer (relays).

        A relayed (virtual) address goes right after the first direct one: a live direct path
        wins the race, a dead one costs one dial stagger, and with no direct address the relay
        is dialled at once. Stored virtual addresses are left out; connectors offer them again
        only while their relay is registered.
        """
        from spt.core.net.paths import is_virtual
        from spt.hooks import Candidate

        direct = [a for a in self.addresses_of(node) if not is_virtual(a[0])]
        hints = [Candidate(h, p, node=node, source="known") for h, p in direct]
        offered: list[Address] = []
        connectors = sorted(self.host.plugins.registries.connectors, key=lambda c: (c.priority, c.name))
        for connector in connectors:
            try:
                found = await connector.candidates(self.host, node, hints)
            except Exception:  # per-plugin guard: a broken connector costs its own path only
                log.exception("connector failed", extra={"connector": connector.name})
                continue
            offered += [(c.host, c.port) for c in found if c.node in (None, node)]
        relayed = [a for a in offered if is_virtual(a[0])]
        return list(dict.fromkeys([*direct[:1], *relayed, *direct[1:], *offered]))

    async def connect_member(self, node: NodeId) -> Connection:
        """The live member connection to `node`, dialled from its known addresses if needed."""
        conn = self.net.transport.connection(node)
        if conn is not None:
            return conn
        addrs = await self.dial_addresses(node)
        if not addrs:
            raise PeerError(node.short, "no known address for this member")
        return await self.net.transport.connect(node, addrs, timeout=DIAL_TIMEOUT)

    def keep_members_connected(self) -> None:
        """Start a keeper task for every member of an attached subnet that has none."""
        if self.net.closing:
            return
        wanted = {n for s in self.host.subnets.attached() for n in s.state().members} - {self.host.node_id}
        for node, task in list(self._keepers.items()):
            if node not in wanted:
                task.cancel()
                del self._keepers[node]
        for node in wanted:
            if node not in self._keepers or self._keepers[node].done():
                self._keepers[node] = asyncio.get_running_loop().create_task(self._keep(node))

    def redial_all(self, reason: str) -> int:
        """Paths may be dead (the machine moved): close member connections and dial afresh now,
        rather than after idle timeouts and keeper backoff. Returns how many were closed."""
        closed = 0
        for conn in self.net.transport.connections():
            if conn.alpn == ALPN_MEMBER:
                conn.close(reason)
                closed += 1
        for task in self._keepers.values():
            task.cancel()
        self._keepers.clear()
        self.host.endpoints.retry_all_now()
        self.keep_members_connected()
        return closed

    async def _keep(self, node: NodeId) -> None:
        """Hold a member connection to `node`: dial, sync, wait for it to close, back off, again."""
        delay = RECONNECT_MIN
        while not self.net.closing and self.net.shared_subnets(node):
            conn = self.net.transport.connection(node)
            try:
                if conn is None:
                    addrs = await self.dial_addresses(node)
                    if not addrs:
                        return  # nothing to dial yet; discovery or the peer will bring an address
                    conn = await self.net.transport.connect(node, addrs, timeout=DIAL_TIMEOUT)
                await self._on_connected(conn)
                self._detached_peers.discard(node)
                delay = RECONNECT_MIN
                reason = await self._hold(conn)
                log.info("member connection closed", extra={"peer": node.short, "reason": reason})
                if "detached" in reason:
                    self._detached_peers.add(node)
            except asyncio.CancelledError:
                raise
            except (PeerError, TimeoutError, RemoteProtocolError) as exc:
                if "detached" in str(exc):
                    self._detached_peers.add(node)
                log.debug("member unreachable", extra={"peer": node.short, "reason": str(exc)})
            except Exception:
                log.exception("member keeper failed", extra={"peer": node.short})
            if conn is not None and not conn.is_open:
                self.host.peer_disconnected(node)  # held or mid-sync: what was in flight goes on
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _hold(self, conn: Connection) -> str:
        """Wait for the connection to close, comparing logs every LOG_RESYNC seconds meanwhile
        (a push that missed this member while the connection stayed up is caught here)."""
        closed = asyncio.ensure_future(conn.wait_closed())
        try:
            while not closed.done():
                await asyncio.wait({closed}, timeout=LOG_RESYNC)
                if not closed.done():
                    for sub in list(self.host.subnets.attached()):
                        if sub.state().is_member(conn.peer):
                            with contextlib.suppress(RequestError, TimeoutError, ConnectionClosedError):
                                await self._resync(conn, sub)
            return closed.result()
        finally:
            closed.cancel()

    # -- paths (SPEC.md §7.5) ---------------------------------------------------------------

    def path_view(self, node: NodeId, sub: HeldSubnet) -> dict[str, Any]:
        conn = self.net.transport.connection(node)
        if conn is None:
            if not sub.attached or node in self._detached_peers:
                reason = "detached"
            else:
                reason = "peer-offline" if self.addresses_of(node) else "no-direct-address"
            return {"kind": "none", "addr": None, "via": None, "reason": reason, "rtt_ms": None, "since": None}
        host, port = conn.remote_addr
        source = self.host.store.query(
            "SELECT source FROM peer_addrs WHERE node=? AND host=? AND port=?", (node.raw, host, port)
        )
        given = (source and source[0]["source"] in ("static", "peer")) or f"{host}:{port}" in self.host.config.static_peers
        kind = "direct static" if given else "direct lan"
        via: str | None = None
        why: str | None = None
        relayed = self.net.transport.paths.describe(node, (host, port))  # relayed or punched (§7.4, §7.6)
        if relayed is not None:
            kind, via, why = relayed.kind, relayed.via, relayed.reason
        shown = relayed.addr if relayed is not None and relayed.addr else f"{host}:{port}"
        since = conn.registered_at
        return {
            "kind": kind,
            "addr": shown,
            "via": via,
            "reason": why,
            "rtt_ms": conn.rtt_ms,
            "since": jp.iso_utc(int((time.time() - (asyncio.get_running_loop().time() - since)) * 1000)) if since is not None else None,
        }

    # -- detach, attach (SPEC.md §4.8) -----------------------------------------------------------

    def detached(self, sub: HeldSubnet) -> None:
        """Stop serving `sub`: close member connections it alone justified, telling peers why."""
        for conn in self.net.transport.connections():
            if conn.alpn == ALPN_MEMBER and sub.state().is_member(conn.peer) and not self.net.shared_subnets(conn.peer):
                conn.close("detached")
        self.keep_members_connected()

    def attached(self, sub: HeldSubnet) -> None:
        """Serve `sub` again: dial its members now (their own keepers may be backing off)."""
        self.keep_members_connected()
