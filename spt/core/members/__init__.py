"""The network half of subnets: the node's transport, who may connect, and the dispatch of what
peers ask, over the parts that answer it.

- `Members` (here): owns the transport, the accept policy (who may connect on which ALPN), the
  per-stream dispatch (`spt-join/1`: the join ceremony, log offers, key claims; `spt/1`: the
  request types of every part and of other services, each judged against the sender's standing
  in the subnet it names), and what a fresh member connection exchanges.
- `links.MemberLinks`: member addresses, dialling, keeping member connections up, paths.
- `log_service.LogService`: merge and relay log entries, log sync, seeds, prune, leave, conflicts.
- `join_port.JoinPort`: both sides of the join ceremony, its records, log offers.
- `spt.core.key_claims.KeyClaims`: key-change claims (on the join ALPN) and `trust accept`.
- `ops`: the control operations on subnets that need the network.

Each part is given `Net` (the narrow view of this class) and the few daemon parts it names in its
own `…Host` protocol. The rules themselves (what a valid entry is, the ceremony's steps, the
lockout) are in `spt.core.proto`; these modules only move their messages and store their results.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from spt.core import trace
from spt.core.errors import Refusal, RemoteProtocolError, SptError
from spt.core.identity import NodeId
from spt.core.key_claims import KeyClaims
from spt.core.members.join_port import JoinPort, JoinResult
from spt.core.members.links import MemberLinks
from spt.core.members.log_service import LogService
from spt.core.members.ops import register_ops
from spt.core.members.wire import STREAM_TIMEOUT, Address, body_map, remote_refusal
from spt.core.net.connections import Connection, RequestError, Stream
from spt.core.net.transport import ALPN_JOIN, ALPN_MEMBER, Transport
from spt.core.proto.frames import Frame
from spt.core.proto.membership import MembershipState
from spt.core.subnets import HeldSubnet

if TYPE_CHECKING:
    from spt.core.daemon import Daemon

__all__ = ["JoinResult", "Members", "body_map", "register_ops", "remote_refusal"]

log = logging.getLogger(__name__)

MemberHandler = Callable[[Connection, Frame], Awaitable[tuple[str, Any]]]

# Member requests whose handler judges the sender's standing itself, instead of the dispatcher.
# None today: log.push too needs a current member (issue 10), and its entries then pass the log's
# arrival checks one by one.
STANDING_CHECKED_BY_HANDLER: Final[frozenset[str]] = frozenset()


class Members:
    """Owns the transport; answers peers through its parts (links, logs, joins, claims)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.subnets = daemon.subnets
        self.transport = self._make_transport(daemon.config.port)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._known_conns: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._closing = False
        self.links = MemberLinks(daemon, self, on_connected=self.sync, resync=self._resync)
        self.logs = LogService(daemon, self, self.links, on_change=self._claims_settle)
        self.claims = KeyClaims(daemon, self, self.links, self.logs)
        self.joins = JoinPort(daemon, self, self.links, self.logs)
        self.handlers: dict[str, MemberHandler] = {
            "log.sync": self.logs.handle_log_sync,
            "log.push": self.logs.handle_log_push,
            "seed.fetch": self.logs.handle_seed_fetch,
            "seed.install": self.logs.handle_seed_install,
            "join.record": self.joins.handle_join_record,
            "join.records": self.joins.handle_join_records,
        }
        # Long-lived streams of a plugin's own type (rc): the handler owns the stream.
        self.stream_handlers: dict[str, Callable[[Connection, Stream, Frame], Awaitable[None]]] = {}
        # Requests anyone may make on the join ALPN (the peer is not a member, or not yet).
        self.join_handlers: dict[str, MemberHandler] = {
            "log.offer": self.joins.handle_log_offer,
            "key.claim": self.claims.handle_claim,
            "key.countersign": self.claims.handle_countersign,
        }

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self.transport.start()
        except OSError:
            if self.daemon.config.port == 0:
                raise
            # SPEC.md §3.11: a random free port if the configured one is taken.
            log.warning("port taken; using a free one", extra={"port": self.daemon.config.port})
            self.transport = self._make_transport(0)
            await self.transport.start()
        self.links.keep_members_connected()
        self.transport.paths.when_relay_registered(self.links.keep_members_connected)  # §7.3: a new path
        claims = self.claims.to_claim()
        if claims:
            self.spawn(self.claims.send(claims), "key-change claim")

    def _make_transport(self, port: int) -> Transport:
        cfg = self.daemon.config
        return Transport(
            self.daemon.key, host=cfg.bind, port=port, accept=self, on_stream=self._on_stream,
            idle_timeout=cfg.idle_timeout,
        )

    async def close(self) -> None:
        self._closing = True
        self.links.close()
        for task in self._tasks:
            task.cancel()
        await self.transport.close()

    @property
    def port(self) -> int:
        return self.transport.sockname[1]

    def spawn(self, coro: Awaitable[Any], what: str) -> None:
        """Run background work; failures are logged, never lost silently."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except SptError as exc:
                log.info("background work ended", extra={"what": what, "reason": exc.status_line()})
            except Exception:
                log.exception("background work failed", extra={"what": what})

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- who may connect --------------------------------------------------------------------

    def accept(self, peer: NodeId, alpn: str, addr: Address) -> str | None:
        """The accept policy: anyone on the join ALPN, current members of an attached subnet on spt/1."""
        if alpn == ALPN_JOIN:
            return None
        if alpn != ALPN_MEMBER:
            return f"unknown ALPN {alpn}"
        standings = [s.state().standing(peer) for s in self.subnets.attached()]
        if "member" in standings:
            return None
        if any(s.state().is_member(peer) for s in self.subnets.held.values() if not s.attached):
            return "detached"  # §4.8: peers show this node offline, reason detached
        for reason in ("pruned", "left"):
            if reason in standings:
                return reason
        return "not-a-member"

    def shared_subnets(self, peer: NodeId) -> list[HeldSubnet]:
        return self.subnets.member_subnets(peer)

    def require_member(self, conn: Connection, subnet_hex: Any) -> HeldSubnet:
        """The subnet a member request names (its id in hex, or its name), checked against the
        peer's standing in it now: a connection outlives a prune, so every request is judged."""
        if not isinstance(subnet_hex, str) or not subnet_hex:
            raise RemoteProtocolError("subnet", "a member request names its subnet (`subnet`: id hex or name)")
        sub = None
        with contextlib.suppress(ValueError):
            sub = self.subnets.held.get(bytes.fromhex(subnet_hex))
        if sub is None:
            sub = self.subnets.by_name(subnet_hex)
        if sub is None or not sub.attached:
            raise Refusal("NOT_HERE", subnet_hex[:16], "this node does not serve that subnet")
        standing = sub.state().standing(conn.peer)
        if standing != "member":
            raise Refusal("NOT_A_MEMBER", conn.peer.short, f"refused: {standing}")
        return sub

    # -- streams from peers -----------------------------------------------------------------

    async def _on_stream(self, conn: Connection, stream: Stream) -> None:
        first = await stream.recv(timeout=STREAM_TIMEOUT)
        if first is None:
            return
        trace.mark("member", first.type, "in")
        if conn.alpn == ALPN_JOIN:
            if first.type == "join":
                await self.joins.respond(conn, stream, first)
            elif first.type in self.join_handlers:
                try:
                    reply = await self.join_handlers[first.type](conn, first)
                except SptError as exc:
                    reply = ("error", {"code": exc.instance_token, "message": exc.status_line()})
                await self._reply(stream, *reply)
            else:
                await self._reply(stream, "error", {"code": "unknown-type", "message": f"unknown join request {first.type!r}"})
            return
        if conn not in self._known_conns:
            self._known_conns.add(conn)
            self.links.remember_address(conn.peer, *conn.remote_addr, "incoming" if not conn.is_outgoing else "dialled")
        owner = self.stream_handlers.get(first.type)
        handler = self.handlers.get(first.type)
        if owner is None and handler is None:
            await self._reply(stream, "error", {"code": "unknown-type", "message": f"this node does not handle {first.type!r}"})
            return
        try:
            if first.type not in STANDING_CHECKED_BY_HANDLER:
                # Once, here, for every member request and stream (plugins' too), however long the
                # connection has been up: the sender must be a member of the subnet it names now.
                body = first.body
                self.require_member(conn, body.get("subnet") if isinstance(body, Mapping) else None)
        except SptError as exc:
            await self._reply(stream, "error", {"code": exc.instance_token, "message": exc.status_line(), "error": exc.to_wire()})
            return
        if owner is not None:
            await owner(conn, stream, first)
            return
        assert handler is not None
        try:
            reply = await handler(conn, first)
        except SptError as exc:
            reply = ("error", {"code": exc.instance_token, "message": exc.status_line(), "error": exc.to_wire()})
        trace.mark("member", first.type, "answers")
        await self._reply(stream, *reply)

    async def _reply(self, stream: Stream, type_name: str, body: Any) -> None:
        await stream.send(type_name, body, end=True)


    @property
    def closing(self) -> bool:
        return self._closing

    def held(self, subnet_hex: Any) -> HeldSubnet | None:
        if not isinstance(subnet_hex, str):
            raise RemoteProtocolError("subnet", "a subnet id is hex")
        try:
            return self.subnets.held.get(bytes.fromhex(subnet_hex))
        except ValueError:
            raise RemoteProtocolError(subnet_hex, "a subnet id is hex") from None

    # -- a fresh member connection ----------------------------------------------------------------

    async def sync(self, conn: Connection) -> None:
        """Exchange log heads for every shared subnet; fetch and push what is missing; seeds and
        join records; then the daemon's own syncs (registry, replication)."""
        for sub in list(self.subnets.attached()):
            if not sub.state().is_member(conn.peer):
                continue
            try:
                await self.logs.sync_log(conn, sub)
            except RequestError as exc:  # e.g. the peer detached this one subnet; go on with the rest
                log.info("log sync skipped a subnet", extra={"subnet": sub.name, "reason": str(exc)})
                continue
            if sub.id in self.subnets.held and (sub.seed is None or sub.epoch != sub.state().epoch):
                await self.logs.fetch_seed(conn, sub)
            if sub.id in self.subnets.held:
                await self.joins.fetch_join_records(conn, sub)
        self.daemon.peer_synced(conn)

    def _claims_settle(self, sub: HeldSubnet, before: MembershipState, after: MembershipState) -> None:
        self.claims.membership_changed(sub, before, after)

    async def _resync(self, conn: Connection, sub: HeldSubnet) -> None:
        await self.logs.sync_log(conn, sub)
