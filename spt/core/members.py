"""The network half of subnets: the node's transport, joins, log replication, prune and leave.

What lives here: the accept policy (who may connect on which ALPN), the per-stream dispatch of
everything peers ask (`spt-join/1`: the join ceremony and log offers; `spt/1`: log sync and
pushes, seed distribution, failure records, and the request types other services register), the
joiner's side of `spt subnet join`, and keeping member connections up.

The rules themselves (what a valid entry is, the ceremony's steps, the lockout) are in
`spt.core.proto`; this module only moves their messages and stores their results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from spt.core.errors import PeerError, Refusal, RemoteProtocolError, SptError, UsageError
from spt.core.identity import NodeId
from spt.core.key_claims import KeyClaims
from spt.core.net.connections import Connection, ConnectionClosedError, RequestError, Stream
from spt.core.net.transport import ALPN_JOIN, ALPN_MEMBER, Transport
from spt.core.proto import join as jp
from spt.core.proto.canonical import canonical_bytes
from spt.core.proto.frames import Frame
from spt.core.proto.membership import (
    Entry,
    PruneConflict,
    make_leave,
    make_prune,
    make_seed_rotate,
)
from spt.core.proto.resolve import NodeInfo, resolve_node
from spt.core.proto.totp import SEED_BYTES, Secret, new_seed, seed_commitment
from spt.core.subnets import HeldSubnet, check_join_code, rendezvous_tag
from spt.core.types import parse_hostport

if TYPE_CHECKING:
    from spt.core.daemon import Call, Daemon
    from spt.hooks import Candidate

log = logging.getLogger(__name__)

Address = tuple[str, int]
MemberHandler = Callable[[Connection, Frame], Awaitable[tuple[str, Any]]]

STREAM_TIMEOUT: Final = 15.0  # seconds a peer may take for one message of a multi-step exchange
JOIN_EXCHANGE_TIMEOUT: Final = 60.0  # one join exchange, hello to bundle
JOIN_LOCK_WAIT: Final = 10.0  # a joiner waits this long for another's SPAKE2 run on the subnet
JOIN_LOCKED_EXCHANGE: Final = 20.0  # an exchange holds its subnet's lock this long at most
MAX_JOIN_RECORDS: Final = 512  # failure and unlock records one sync answer carries
REQUEST_TIMEOUT: Final = 10.0
DIAL_TIMEOUT: Final = 5.0
MAX_SYNC_ENTRIES: Final = 4096  # entries one sync answer carries at most (§6.3 "a bounded amount")
MAX_OFFER_ENTRIES: Final = 48  # ancestors a join offer carries at most (join-ALPN frames stay small)
RECONNECT_MIN: Final = 1.0
RECONNECT_MAX: Final = 60.0
LOG_RESYNC: Final = 60.0  # seconds between log comparisons on a connection that stays up
FIRST_DISCOVERY_ROUND: Final = 0.1  # seconds the first discovery round of a join waits; doubles each round
MAX_DISCOVERY_ROUND: Final = 2.0
# Member requests whose handler judges the sender's standing itself, instead of the dispatcher.
# None today: log.push too needs a current member (issue 10), and its entries then pass the log's
# arrival checks one by one.
STANDING_CHECKED_BY_HANDLER: Final[frozenset[str]] = frozenset()


@dataclass
class JoinResult:
    sub: HeldSubnet
    member: NodeId
    discovery_s: float = 0.0  # from the call to the first member hello (finding a member)
    ceremony_s: float = 0.0  # from there to the installed bundle (SPAKE2, admission, bundle)


class Members:
    """Owns the transport; answers peers; joins; replicates membership logs."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.subnets = daemon.subnets
        cfg = daemon.config
        self.transport = self._make_transport(cfg.port)
        self.handlers: dict[str, MemberHandler] = {
            "log.sync": self._handle_log_sync,
            "log.push": self._handle_log_push,
            "seed.fetch": self._handle_seed_fetch,
            "seed.install": self._handle_seed_install,
            "join.record": self._handle_join_record,
            "join.records": self._handle_join_records,
        }
        # Long-lived streams of a plugin's own type (rc): the handler owns the stream.
        self.stream_handlers: dict[str, Callable[[Connection, Stream, Frame], Awaitable[None]]] = {}
        self.claims = KeyClaims(self)
        # Requests anyone may make on the join ALPN (the peer is not a member, or not yet).
        self.join_handlers: dict[str, MemberHandler] = {
            "log.offer": self._handle_log_offer,
            "key.claim": self.claims.handle_claim,
            "key.countersign": self.claims.handle_countersign,
        }
        # §5.5: a node answers joins for a subnet one at a time: from the first SPAKE2 message to
        # the end, and for JOIN_LOCKED_EXCHANGE seconds at most; hellos need no lock
        self._responder_locks: dict[bytes, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keepers: dict[NodeId, asyncio.Task[None]] = {}
        self._known_conns: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._detached_peers: set[NodeId] = set()  # members that told us they detached
        self._closing = False
        self.limiter = jp.JoinLimiter(
            max_failures=cfg.join_max_failures, lockout_ms=cfg.join_lockout_seconds * 1000
        )

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
        self.keep_members_connected()
        self.transport.paths.when_relay_registered(self.keep_members_connected)  # §7.3: a new path
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
        for task in [*self._tasks, *self._keepers.values()]:
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
        if conn.alpn == ALPN_JOIN:
            if first.type == "join":
                await self._respond_join(conn, stream, first)
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
            self.remember_address(conn.peer, *conn.remote_addr, "incoming" if not conn.is_outgoing else "dialled")
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
        await self._reply(stream, *reply)

    async def _reply(self, stream: Stream, type_name: str, body: Any) -> None:
        await stream.send(type_name, body, end=True)

    # -- the join ceremony: member side -------------------------------------------------------

    def join_status(self, sub: HeldSubnet, now_ms: int | None = None) -> jp.JoinStatus:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        failures, unlocks = self._join_records(sub)
        return self.limiter.status(failures, unlocks, now_ms)

    def _join_records(self, sub: HeldSubnet) -> tuple[list[jp.FailureRecord], list[jp.UnlockRecord]]:
        failures: list[jp.FailureRecord] = []
        unlocks: list[jp.UnlockRecord] = []
        for row in self.daemon.store.query("SELECT kind, data FROM join_records WHERE subnet=?", (sub.id,)):
            data = _loads(row["data"])
            if row["kind"] == "failure":
                failures.append(jp.FailureRecord.from_dict(data))
            else:
                unlocks.append(jp.UnlockRecord.from_dict(data))
        members = sub.state().members
        return [f for f in failures if f.responder in members], [u for u in unlocks if u.author in members]

    def _serving(self) -> dict[str, jp.ResponderSubnet]:
        serving: dict[str, jp.ResponderSubnet] = {}
        for sub in self.subnets.attached():
            st = sub.state()
            if sub.seed is None or sub.epoch != st.epoch:
                continue  # without the current seed this node cannot answer joins (§6.5)
            serving[sub.canonical] = jp.ResponderSubnet(
                sub.log, sub.seed, st.epoch, self.daemon.label, self.contacts(st.members)
            )
        return serving

    def contacts(self, members: Iterable[NodeId]) -> dict[NodeId, jp.Contact]:
        out: dict[NodeId, jp.Contact] = {}
        for node in members:
            if node == self.daemon.key.node_id:
                # Loopback only helps a joiner on this very machine (the demo); elsewhere it makes
                # peers dial themselves.
                mine = self.daemon.addresses()
                out[node] = jp.Contact(
                    tuple([a for a in mine if not a.startswith("127.")] or mine), self.daemon.announced_relays
                )
            else:
                out[node] = jp.Contact(
                    tuple(f"{h}:{p}" for h, p in self.addresses_of(node)), self.daemon.relay_book.announced_by(node)
                )
        return out

    async def _respond_join(self, conn: Connection, stream: Stream, first: Frame) -> None:
        exporter = conn.export_keying_material(jp.EXPORTER_LABEL, jp.EXPORTER_BYTES)
        host, port = conn.remote_addr
        session = jp.ResponderSession(
            self.daemon.key, conn.peer, exporter, subnets=self._serving(), source=f"{host}:{port}"
        )
        loop = asyncio.get_running_loop()
        lock: asyncio.Lock | None = None
        deadline = loop.time() + JOIN_EXCHANGE_TIMEOUT
        try:
            frame: Frame | None = first
            while frame is not None and not session.is_finished:
                if lock is None and session.subnet_id:
                    # past the hello: the SPAKE2 run and its record, one at a time per subnet
                    lock = self._responder_locks.setdefault(session.subnet_id, asyncio.Lock())
                    await asyncio.wait_for(lock.acquire(), JOIN_LOCK_WAIT)
                    deadline = min(deadline, loop.time() + JOIN_LOCKED_EXCHANGE)
                locks = {s.id: self.join_status(s) for s in self.subnets.attached()}
                out = session.receive(frame.body, wall=time.time(), locks=locks)
                for event in out.events:  # records are stored before the reply goes out
                    await self._responder_event(event, conn)
                for msg in out.messages:
                    await stream.send("join", msg)
                if session.is_finished:
                    break
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError("the join exchange took too long")
                frame = await stream.recv(timeout=min(STREAM_TIMEOUT, left))
        except (TimeoutError, RemoteProtocolError, PeerError) as exc:
            session.abort()
            log.info("join stream ended", extra={"peer": conn.peer.short, "reason": str(exc) or type(exc).__name__})
        finally:
            if lock is not None and lock.locked():
                lock.release()
            with contextlib.suppress(Exception):
                await stream.end()

    async def _responder_event(self, event: jp.ResponderEvent, conn: Connection) -> None:
        match event:
            case jp.AttemptFailed(record=record, skew_ms=skew):
                sub = self.subnets.held[record.subnet_id]
                self._store_join_record(sub, "failure", record.to_dict(), record.time_ms)
                log.warning(
                    "join attempt failed",
                    extra={"subnet": sub.name, "joiner": conn.peer.short, "source": record.source, "skew_ms": skew},
                )
                self.daemon.join_failed(sub, conn.peer, record.source)
                self.spawn(self.gossip(sub, "join.record", {"subnet": sub.id.hex(), "kind": "failure", "record": record.to_dict()}), "gossip failure")
            case jp.MemberAdmitted(entry=entry, joiner=joiner, label=label):
                sub = self._sub_of_entry(entry)
                self.merge(sub, [entry])
                host, port = conn.remote_addr
                self.remember_address(joiner, host, port, "join")
                log.info("member admitted", extra={"subnet": sub.name, "node": joiner.display(label)})
                self.spawn(self.push_entries(sub, [entry]), "push join entry")
            case jp.HelloRefused(name=name, state=state, joiner=joiner):
                log.info("join hello refused", extra={"subnet": name, "state": state, "joiner": joiner.short})

    def _sub_of_entry(self, entry: Entry) -> HeldSubnet:
        for sub in self.subnets.held.values():
            if all(p in sub.log for p in entry.parents):
                return sub
        raise RemoteProtocolError(entry.type, "an admitted entry names parents of no held subnet")

    def _store_join_record(self, sub: HeldSubnet, kind: str, data: Mapping[str, Any], time_ms: int) -> None:
        from spt.core.identity import sha256

        raw = canonical_bytes(dict(data))
        with self.daemon.store.transaction():
            self.daemon.store.db.execute(
                "INSERT OR IGNORE INTO join_records(id, subnet, kind, time, data) VALUES(?,?,?,?,?)",
                (sha256(raw), sub.id, kind, time_ms / 1000, raw),
            )
            # §5.5: failure records are kept 24 h
            self.daemon.store.db.execute(
                "DELETE FROM join_records WHERE kind='failure' AND time < ?", (time.time() - 24 * 3600,)
            )

    async def _handle_join_record(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.require_member(conn, body.get("subnet"))
        if body.get("kind") == "failure":
            failure = jp.FailureRecord.from_dict(body.get("record"))
            if failure.subnet_id != sub.id:
                raise RemoteProtocolError("join.record", "a failure record of another subnet")
            self._store_join_record(sub, "failure", failure.to_dict(), failure.time_ms)
        elif body.get("kind") == "unlock":
            unlock = jp.UnlockRecord.from_dict(body.get("record"))
            if unlock.subnet_id != sub.id:
                raise RemoteProtocolError("join.record", "an unlock record of another subnet")
            self._store_join_record(sub, "unlock", unlock.to_dict(), unlock.time_ms)
        else:
            raise RemoteProtocolError("join.record", "kind is failure or unlock")
        return "ok", {}

    async def _handle_join_records(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        """Every failure and unlock record this node holds for the subnet (24 h of them): how a
        member that joined later counts the failures that came before it (§5.5)."""
        sub = self.require_member(conn, body_map(frame.body).get("subnet"))
        rows = self.daemon.store.query(
            "SELECT kind, data FROM join_records WHERE subnet=? ORDER BY time DESC LIMIT ?", (sub.id, MAX_JOIN_RECORDS)
        )
        return "join.records", {"records": [{"kind": r["kind"], "record": _loads(r["data"])} for r in rows]}

    async def _fetch_join_records(self, conn: Connection, sub: HeldSubnet) -> None:
        try:
            reply = await conn.request("join.records", {"subnet": sub.id.hex()}, timeout=REQUEST_TIMEOUT)
        except RequestError as exc:
            log.info("join records not fetched", extra={"subnet": sub.name, "reason": str(exc)})
            return
        records = body_map(reply.body).get("records")
        if not isinstance(records, list) or len(records) > MAX_JOIN_RECORDS:
            raise RemoteProtocolError("join.records", f"a list of at most {MAX_JOIN_RECORDS} records")
        members = sub.state().members
        for item in records:
            try:
                item = body_map(item)
                if item.get("kind") == "failure":
                    failure = jp.FailureRecord.from_dict(item.get("record"))
                    if failure.subnet_id == sub.id and failure.responder in members:
                        self._store_join_record(sub, "failure", failure.to_dict(), failure.time_ms)
                elif item.get("kind") == "unlock":
                    unlock = jp.UnlockRecord.from_dict(item.get("record"))
                    if unlock.subnet_id == sub.id and unlock.author in members:
                        self._store_join_record(sub, "unlock", unlock.to_dict(), unlock.time_ms)
            except RemoteProtocolError as exc:  # one bad record costs itself only
                log.info("join record refused", extra={"peer": conn.peer.short, "reason": str(exc)})

    def unlock(self, sub: HeldSubnet) -> None:
        record = jp.UnlockRecord.sign(self.daemon.key, subnet_id=sub.id, time_ms=int(time.time() * 1000))
        self._store_join_record(sub, "unlock", record.to_dict(), record.time_ms)
        self.spawn(self.gossip(sub, "join.record", {"subnet": sub.id.hex(), "kind": "unlock", "record": record.to_dict()}), "gossip unlock")

    # -- the join ceremony: joiner side --------------------------------------------------------

    async def join(
        self, name: str, code: str, *, peers: Sequence[str], timeout: float, entered_at: float, id_prefix: str | None,
        on_progress: Callable[[str], Awaitable[None]] | None = None,
    ) -> JoinResult:
        """Find members of `name`, run the ceremony with one, install what it sends.

        `on_progress` hears, in words, which candidate is tried by which path (an interactive
        `spt subnet join` prints it while it searches)."""
        existing = self.subnets.by_name(name)
        if existing is not None:
            raise Refusal("ALREADY_MEMBER", name, "this node is already a member")
        extra = []
        for text in peers:
            try:
                host, port = parse_hostport(text)
            except ValueError as exc:
                raise UsageError("BAD_ADDRESS", text, str(exc)) from None
            extra.append(_candidate(host, port, "peer"))
        started = time.monotonic()
        deadline = started + timeout
        tag = rendezvous_tag(name)
        secret_code = Secret(code)
        tried: set[Address] = set()
        hellos: list[tuple[jp.MemberHello, _JoinAttempt]] = []
        refusals: list[SptError] = []
        rounds = 0
        while time.monotonic() < deadline and not hellos:
            # Ask the backends briefly first (static peers and adverts already heard answer at
            # once), then for longer: a backend that waits for its whole budget must not hold
            # up candidates another one has already returned.
            remaining = deadline - time.monotonic()
            budget = max(0.05, min(remaining, FIRST_DISCOVERY_ROUND * 2**rounds, MAX_DISCOVERY_ROUND))
            rounds += 1
            round_end = min(time.monotonic() + budget, deadline)
            found = await self.daemon.find_candidates(tag, budget, extra)
            fresh = [c for c in found if (c.host, c.port) not in tried and (not c.tags or tag in c.tags)]
            tried.update((c.host, c.port) for c in fresh)
            if on_progress is not None:
                left = max(0.0, deadline - time.monotonic())
                for c in fresh:
                    await on_progress(f"trying {c.host}:{c.port} (found by {c.source}; {left:.0f} s left)")
                if not fresh and rounds in (1, 3, 6, 10):
                    await on_progress(f"searching for a member of {name} ({left:.0f} s left)")
            attempts = [_JoinAttempt(self, c, name, secret_code, entered_at) for c in fresh]
            dial_budget = max(0.5, min(DIAL_TIMEOUT, deadline - time.monotonic()))
            results = await asyncio.gather(*(a.hello(dial_budget) for a in attempts))
            for attempt, result in zip(attempts, results, strict=True):
                if isinstance(result, jp.MemberHello):
                    hellos.append((result, attempt))
                elif isinstance(result, SptError):
                    refusals.append(result)
                    attempt.close()
                else:
                    attempt.close()
            if refusals and not hellos:
                raise refusals[0]
            if not fresh:  # backends that answer at once (static peers) must not spin this loop
                await asyncio.sleep(max(0.0, round_end - time.monotonic()))
        if not hellos:
            raise Refusal("JOIN_NOT_FOUND", name, "no member of that subnet answered")
        ids = sorted({h.subnet_id for h, _ in hellos})
        if id_prefix:
            ids = [i for i in ids if i.hex().startswith(id_prefix.lower())]
            for h, a in hellos:
                if h.subnet_id not in ids:
                    a.close()
            hellos = [(h, a) for h, a in hellos if h.subnet_id in ids]
            if not hellos:
                raise Refusal("JOIN_NOT_FOUND", name, f"no subnet of that name has an id starting {id_prefix}")
        if len(ids) > 1:
            for _, attempt in hellos:
                attempt.close()
            lines = [f"  {i.hex()[:8]}  {sum(1 for h, _ in hellos if h.subnet_id == i)}" for i in ids]
            raise Refusal("JOIN_AMBIGUOUS", name, "several subnets answer to that name; pass --id", lines=lines)
        _, chosen = hellos[0]
        for _, other in hellos[1:]:
            other.close()
        found_at = time.monotonic()
        if on_progress is not None:
            await on_progress(f"{chosen.candidate.host}:{chosen.candidate.port} answered; checking the code")
        try:
            event = await chosen.run()
        finally:
            chosen.close()
        done = self._install_bundle(event.bundle, event.member, chosen)
        done.discovery_s = round(found_at - started, 3)
        done.ceremony_s = round(time.monotonic() - found_at, 3)
        log.info(
            "join timing",
            extra={"subnet": done.sub.name, "discovery_s": done.discovery_s, "ceremony_s": done.ceremony_s},
        )
        return done

    def _install_bundle(self, bundle: jp.JoinBundle, member: NodeId, attempt: _JoinAttempt) -> JoinResult:
        sub = HeldSubnet(bundle.subnet_id, bundle.name, True, bundle.log, bundle.seed, bundle.epoch)
        with self.daemon.store.transaction():
            self.subnets.save_subnet(sub)
            self.subnets.save_entries(sub, bundle.log.entries())
        self.subnets.held[sub.id] = sub
        self.daemon.store.db.execute("DELETE FROM meta WHERE key=?", (f"departed:{sub.id.hex()}",))
        given = attempt.candidate.source in ("static", "peer")
        self.remember_address(member, attempt.candidate.host, attempt.candidate.port,
                              attempt.candidate.source if given else "join")
        for node, contact in bundle.contacts.items():
            if node != self.daemon.key.node_id:
                self.daemon.relay_book.learn(node, contact.relays)  # §7.6: the subnet's relays
            for text in contact.addresses:
                host, _, port = text.rpartition(":")
                if host and port.isdigit():
                    self.remember_address(node, host, int(port), "introduced")
        log.info("joined subnet", extra={"subnet": sub.name, "id": sub.short_id, "via": member.short})
        self.keep_members_connected()
        self.spawn(self._offer_join(sub, bundle.join_entry), "offer join entry")
        return JoinResult(sub, member)

    async def _offer_join(self, sub: HeldSubnet, join: Entry) -> None:
        """Reach every member; one that has not heard of our join yet gets it on the join ALPN,
        with its nearest ancestors (the admitting member pushes it too; this is the fallback)."""
        ancestry = sub.log.ancestry(join.hash)[-(MAX_OFFER_ENTRIES + 1):]
        body = {"subnet": sub.id.hex(), "entries": [e.to_dict() for e in ancestry]}
        for node in sub.state().members:
            if node == self.daemon.key.node_id:
                continue
            addrs = await self.dial_addresses(node)
            if not addrs:
                continue
            try:
                conn = await self.transport.connect(node, addrs, alpn=ALPN_JOIN, timeout=DIAL_TIMEOUT)
                await conn.request("log.offer", body, timeout=REQUEST_TIMEOUT)
                conn.close("offer done")
            except (PeerError, TimeoutError) as exc:
                log.info("could not offer the join entry", extra={"peer": node.short, "reason": str(exc)})
        self.keep_members_connected()

    async def _handle_log_offer(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        """A newly joined node offers its own join entry and that entry's ancestors, nothing else.

        The answer is the same whatever the log says of the offerer (a stranger learns nothing),
        and nothing an offer carries waits for parents here.
        """
        body = body_map(frame.body)
        sub = self.held(body.get("subnet"))
        if sub is None or not sub.attached:
            return "error", {"code": "not-here", "message": "this node does not serve that subnet"}
        raw = body.get("entries")
        if not isinstance(raw, list) or not raw or len(raw) > MAX_OFFER_ENTRIES + 1:
            raise RemoteProtocolError("log.offer", f"an offer carries a join entry and at most {MAX_OFFER_ENTRIES} ancestors")
        entries = [Entry.from_dict(v) for v in raw]
        join = entries[-1]
        if join.type != "join" or join.key() != conn.peer:
            raise RemoteProtocolError("log.offer", "an offer ends with the offerer's own join entry")
        wanted = set(join.parents)
        for entry in reversed(entries[:-1]):  # parents first: walk back from the join
            if entry.hash not in wanted:
                raise RemoteProtocolError("log.offer", "an offer carries only ancestors of the offerer's join")
            wanted.update(entry.parents)
        self.merge(sub, entries)
        sub.log.forget_pending(e.hash for e in entries)
        return "ok", {}

    # -- member connections and log replication -----------------------------------------------

    def addresses_of(self, node: NodeId) -> list[Address]:
        rows = self.daemon.store.query(
            "SELECT host, port FROM peer_addrs WHERE node=? ORDER BY seen DESC LIMIT 16", (node.raw,)
        )
        return [(str(r["host"]), int(r["port"])) for r in rows]

    def remember_address(self, node: NodeId, host: str, port: int, source: str) -> None:
        with self.daemon.store.transaction():
            self.daemon.store.db.execute(
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
        connectors = sorted(self.daemon.plugins.registries.connectors, key=lambda c: (c.priority, c.name))
        for connector in connectors:
            try:
                found = await connector.candidates(self.daemon, node, hints)
            except Exception:  # per-plugin guard: a broken connector costs its own path only
                log.exception("connector failed", extra={"connector": connector.name})
                continue
            offered += [(c.host, c.port) for c in found if c.node in (None, node)]
        relayed = [a for a in offered if is_virtual(a[0])]
        return list(dict.fromkeys([*direct[:1], *relayed, *direct[1:], *offered]))

    async def connect_member(self, node: NodeId) -> Connection:
        """The live member connection to `node`, dialled from its known addresses if needed."""
        conn = self.transport.connection(node)
        if conn is not None:
            return conn
        addrs = await self.dial_addresses(node)
        if not addrs:
            raise PeerError(node.short, "no known address for this member")
        return await self.transport.connect(node, addrs, timeout=DIAL_TIMEOUT)

    def keep_members_connected(self) -> None:
        """Start a keeper task for every member of an attached subnet that has none."""
        if self._closing:
            return
        wanted = {n for s in self.subnets.attached() for n in s.state().members} - {self.daemon.key.node_id}
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
        for conn in self.transport.connections():
            if conn.alpn == ALPN_MEMBER:
                conn.close(reason)
                closed += 1
        for task in self._keepers.values():
            task.cancel()
        self._keepers.clear()
        self.daemon.endpoints.retry_all_now()
        self.keep_members_connected()
        return closed

    async def _keep(self, node: NodeId) -> None:
        """Hold a member connection to `node`: dial, sync, wait for it to close, back off, again."""
        delay = RECONNECT_MIN
        while not self._closing and self.shared_subnets(node):
            conn = self.transport.connection(node)
            try:
                if conn is None:
                    addrs = await self.dial_addresses(node)
                    if not addrs:
                        return  # nothing to dial yet; discovery or the peer will bring an address
                    conn = await self.transport.connect(node, addrs, timeout=DIAL_TIMEOUT)
                await self.sync(conn)
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
                self.daemon.peer_disconnected(node)  # held or mid-sync: what was in flight goes on
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
                    for sub in list(self.subnets.attached()):
                        if sub.state().is_member(conn.peer):
                            with contextlib.suppress(RequestError, TimeoutError, ConnectionClosedError):
                                await self._sync_log(conn, sub)
            return closed.result()
        finally:
            closed.cancel()

    async def _sync_log(self, conn: Connection, sub: HeldSubnet) -> None:
        """Exchange log heads for one subnet; fetch and push what is missing."""
        reply = await conn.request(
            "log.sync", {"subnet": sub.id.hex(), "heads": [h.hex() for h in sub.log.heads()]},
            timeout=REQUEST_TIMEOUT,
        )
        body = body_map(reply.body)
        self.merge_from(conn, sub, _entries(body.get("entries")))
        their_heads = [bytes.fromhex(h) for h in body.get("heads", []) if isinstance(h, str)]
        theirs_missing = sub.log.entries_since(their_heads, limit=MAX_SYNC_ENTRIES)
        if theirs_missing:
            await conn.request(
                "log.push", {"subnet": sub.id.hex(), "entries": [e.to_dict() for e in theirs_missing]},
                timeout=REQUEST_TIMEOUT,
            )

    async def sync(self, conn: Connection) -> None:
        """Exchange log heads for every shared subnet; fetch and push what is missing; seeds."""
        for sub in list(self.subnets.attached()):
            if not sub.state().is_member(conn.peer):
                continue
            try:
                await self._sync_log(conn, sub)
            except RequestError as exc:  # e.g. the peer detached this one subnet; go on with the rest
                log.info("log sync skipped a subnet", extra={"subnet": sub.name, "reason": str(exc)})
                continue
            if sub.id in self.subnets.held and (sub.seed is None or sub.epoch != sub.state().epoch):
                await self._fetch_seed(conn, sub)
            if sub.id in self.subnets.held:
                await self._fetch_join_records(conn, sub)
        self.daemon.peer_synced(conn)

    async def _handle_log_sync(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.require_member(conn, body.get("subnet"))
        heads = [bytes.fromhex(h) for h in body.get("heads", []) if isinstance(h, str)]
        entries = sub.log.entries_since(heads, limit=MAX_SYNC_ENTRIES)
        return "log.entries", {"entries": [e.to_dict() for e in entries], "heads": [h.hex() for h in sub.log.heads()]}

    async def _handle_log_push(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        # The dispatcher checked the pusher is a member now (a pruned node learns of its prune from
        # the member that pruned it, which pushes before merging).
        sub = self.require_member(conn, body.get("subnet"))
        self.merge_from(conn, sub, _entries(body.get("entries")))
        return "ok", {}

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

    def merge(self, sub: HeldSubnet, entries: Sequence[Entry]) -> list[Entry]:
        """Merge verified entries, persist them, and act on membership changes; the ones added."""
        if not entries:
            return []
        before = sub.state()
        result = sub.log.merge(entries)
        for h, why in result.refused:
            log.warning("log entry refused", extra={"subnet": sub.name, "entry": h.hex()[:12], "reason": why})
        for h, why in result.dropped:
            log.info("log entry not stored", extra={"subnet": sub.name, "entry": h.hex()[:12], "reason": why})
        if result.conflicts:
            try:
                self.prune_conflicts(sub, result.conflicts)
            except SptError:  # telling the human must not stop the merge
                log.exception("prune conflict not recorded", extra={"subnet": sub.name})
        if not result.added:
            return []
        # what the log stored, not only what was sent: entries that waited for parents from an
        # earlier merge, and dropped ones a member's entry brought in, must reach the store too
        # (or a restart loses them and the entries built on them wait for parents again)
        added = [e for e in map(sub.log.get, result.added) if e is not None]
        with self.daemon.store.transaction():
            self.subnets.save_entries(sub, added)
        for entry in added:  # our later entries order after these, whatever our clock says (§2.10)
            self.subnets.observe(entry.hlc)
        after = sub.state()
        self._membership_changed(sub, before, after)
        return added

    def merge_from(self, conn: Connection, sub: HeldSubnet, entries: Sequence[Entry]) -> None:
        """Merge entries a member sent, and pass the ones new here to the other members this node
        is connected to: an author pushes once, to the members it knows then, so a member admitted
        meanwhile (or one its push missed) would otherwise learn them only at its next reconnect.
        Each node forwards an entry once, when it first stores it, so the flood ends."""
        added = self.merge(sub, entries)
        if not added:
            return
        body = {"subnet": sub.id.hex(), "entries": [e.to_dict() for e in added]}
        members = sub.state().members
        for other in self.transport.connections():
            if other.alpn == ALPN_MEMBER and other.peer != conn.peer and other.peer in members:
                self.spawn(self._push_one(other.peer, "log.push", body), "forward log entries")

    def prune_conflicts(self, sub: HeldSubnet, conflicts: Iterable[PruneConflict]) -> None:
        """Record prunes this log refused because histories disagree on who was removed first,
        once per (author, target), and tell the human: the log never picks by seniority."""
        store = self.daemon.store
        meta_key = f"prune_conflicts:{sub.id.hex()}"
        known = json.loads(store.get_meta(meta_key) or "[]")
        pairs = {(c["author"], c["target"]) for c in known}
        fresh = [c for c in conflicts if (c.author.hex, c.target.hex) not in pairs]
        if not fresh:
            return
        for c in fresh:
            pairs.add((c.author.hex, c.target.hex))
            known.append({"author": c.author.hex, "target": c.target.hex, "entry": c.entry.hex(), "time": time.time()})
        store.set_meta(meta_key, json.dumps(known[-64:]))
        st = sub.state()
        for c in fresh:
            who = st.former.get(c.author)
            author = c.author.display(who.label if who else st.members.get(c.author, ""))
            gone = st.former.get(c.target)  # a target may have left or been removed since
            target = c.target.display(gone.label if gone else st.members.get(c.target, ""))
            log.warning("prune conflict", extra={"subnet": sub.name, "author": c.author.short, "target": c.target.short})
            self.daemon.notify(
                sub, "prune-conflict", f"{author} tried to prune {target} in {sub.name}; refused here",
                f"{author} signed a prune of {target} that did not see {author}'s own removal (or that a removed "
                f"node's branch carried). This node kept the history it had first. If {target} should go, "
                f"prune it from a member you trust: `spt subnet prune {c.target.hex[:8]} --subnet {sub.name}`.",
                event=f"prune-conflict:{c.author.hex}>{c.target.hex}",  # members that saw it raise one
            )

    def conflicts_of(self, sub: HeldSubnet) -> list[dict[str, Any]]:
        """Recorded prune conflicts and removals the log holds that void each other."""
        out = [
            {"author": c["author"], "target": c["target"]}
            for c in json.loads(self.daemon.store.get_meta(f"prune_conflicts:{sub.id.hex()}") or "[]")
        ]
        for h in sorted(sub.state().conflicts):
            entry = sub.log.get(h)
            if entry is not None and entry.subject() is not None:
                out.append({"author": entry.author.hex, "target": (entry.type == "rekey" and entry.key("old").hex) or entry.key().hex})
        return out

    def _membership_changed(self, sub: HeldSubnet, before: Any, after: Any) -> None:
        me = self.daemon.key.node_id
        self.claims.settle(sub, after)
        if after.is_member(me) and not before.is_member(me):
            self.daemon.store.db.execute("DELETE FROM meta WHERE key=?", (f"key_claim:{sub.id.hex()}",))
            if not self.daemon.store.query("SELECT 1 FROM meta WHERE key LIKE 'key_claim:%'"):
                self.claims.forget_old_key()
        if not after.is_member(me) and before.is_member(me):
            reason = after.standing(me)
            log.warning("this node is no longer a member", extra={"subnet": sub.name, "reason": reason})
            self.daemon.departed(sub, reason)
            return
        removed = [n for n in before.members if n not in after.members]
        for node in removed:
            standing = after.standing(node)
            if standing in ("left", "pruned"):  # §8.4; every member sees it: one notification
                label = before.members[node]
                self.daemon.notify(
                    sub, f"member-{standing}", f"{label} {standing if standing == 'left' else 'was pruned from'} {sub.name}",
                    f"{node.display(label)} is no longer a member of {sub.name}.", event=f"{standing}:{node.hex}",
                )
            if self.shared_subnets(node):
                continue
            for conn in self.transport.connections():
                if conn.peer == node:
                    conn.close(after.standing(node))
        if sub.seed is not None and sub.epoch != after.epoch:
            log.info("seed rotated; waiting for the new seed", extra={"subnet": sub.name, "epoch": after.epoch})
        self.keep_members_connected()
        self.daemon.membership_changed(sub)

    async def push_entries(self, sub: HeldSubnet, entries: Sequence[Entry], extra: Iterable[NodeId] = ()) -> None:
        """Push new entries to every member (and `extra` nodes, e.g. the one just pruned)."""
        body = {"subnet": sub.id.hex(), "entries": [e.to_dict() for e in entries]}
        targets = (set(sub.state().members) | set(extra)) - {self.daemon.key.node_id}
        await asyncio.gather(*(self._push_one(node, "log.push", body) for node in targets))

    async def gossip(self, sub: HeldSubnet, type_name: str, body: Mapping[str, Any]) -> None:
        targets = set(sub.state().members) - {self.daemon.key.node_id}
        await asyncio.gather(*(self._push_one(node, type_name, body) for node in targets))

    async def _push_one(self, node: NodeId, type_name: str, body: Mapping[str, Any]) -> None:
        try:
            conn = self.transport.connection(node) or await self.transport.connect(
                node, await self.dial_addresses(node), timeout=DIAL_TIMEOUT
            )
            await conn.request(type_name, dict(body), timeout=REQUEST_TIMEOUT)
        except (PeerError, TimeoutError, RemoteProtocolError, ConnectionClosedError) as exc:
            log.info("push did not reach a member", extra={"peer": node.short, "what": type_name, "reason": str(exc)})

    # -- seeds ------------------------------------------------------------------------------

    async def _fetch_seed(self, conn: Connection, sub: HeldSubnet) -> None:
        reply = await conn.request("seed.fetch", {"subnet": sub.id.hex()}, timeout=REQUEST_TIMEOUT)
        if reply.type == "seed":
            self._install_seed(sub, body_map(reply.body))

    def _install_seed(self, sub: HeldSubnet, body: Mapping[str, Any]) -> bool:
        epoch, raw = body.get("epoch"), body.get("seed")
        if not isinstance(epoch, int) or not isinstance(raw, bytes) or len(raw) != SEED_BYTES:
            raise RemoteProtocolError("seed", "a seed message carries an integer epoch and 20 bytes")
        seed = Secret(raw)
        if not sub.state().seed_matches(seed, epoch):
            log.warning("a seed that does not match the log's commitment was refused", extra={"subnet": sub.name})
            return False
        sub.seed, sub.epoch = seed, epoch
        with self.daemon.store.transaction():
            self.subnets.save_subnet(sub)
        log.info("seed installed", extra={"subnet": sub.name, "epoch": epoch})
        return True

    async def _handle_seed_fetch(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        sub = self.require_member(conn, body_map(frame.body).get("subnet"))
        if sub.seed is None or sub.epoch != sub.state().epoch:
            return "no-seed", {}
        return "seed", {"epoch": sub.epoch, "seed": sub.seed.reveal()}

    async def _handle_seed_install(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.require_member(conn, body.get("subnet"))
        return "ok", {"installed": self._install_seed(sub, body)}

    # -- paths (SPEC.md §7.5) ---------------------------------------------------------------

    def path_view(self, node: NodeId, sub: HeldSubnet) -> dict[str, Any]:
        conn = self.transport.connection(node)
        if conn is None:
            if not sub.attached or node in self._detached_peers:
                reason = "detached"
            else:
                reason = "peer-offline" if self.addresses_of(node) else "no-direct-address"
            return {"kind": "none", "addr": None, "via": None, "reason": reason, "rtt_ms": None, "since": None}
        host, port = conn.remote_addr
        source = self.daemon.store.query(
            "SELECT source FROM peer_addrs WHERE node=? AND host=? AND port=?", (node.raw, host, port)
        )
        given = (source and source[0]["source"] in ("static", "peer")) or f"{host}:{port}" in self.daemon.config.static_peers
        kind = "direct static" if given else "direct lan"
        via: str | None = None
        why: str | None = None
        relayed = self.transport.paths.describe(node, (host, port))  # relayed or punched (§7.4, §7.6)
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
        for conn in self.transport.connections():
            if conn.alpn == ALPN_MEMBER and sub.state().is_member(conn.peer) and not self.shared_subnets(conn.peer):
                conn.close("detached")
        self.keep_members_connected()

    def attached(self, sub: HeldSubnet) -> None:
        """Serve `sub` again: dial its members now (their own keepers may be backing off)."""
        self.keep_members_connected()

    # -- prune, leave ---------------------------------------------------------------------------

    def resolve_member(self, sub: HeldSubnet, qualifier: str) -> NodeInfo:
        st = sub.state()
        nodes = [NodeInfo(k, label) for k, label in st.members.items()]
        nodes += [NodeInfo(k, f.label) for k, f in st.former.items() if f.reason != "rekeyed"]
        return resolve_node(qualifier, nodes)

    async def prune(self, sub: HeldSubnet, target: NodeInfo) -> None:
        me = self.daemon.key
        if target.key == me.node_id:
            raise Refusal("CANNOT_PRUNE_SELF", target.display, "use spt subnet leave on this node")
        prune = make_prune(me, parents=sub.log.valid_heads(), target=target.key, hlc=self.subnets.stamp())
        # Tell the pruned node first, while its connection is still open, so it learns why it is
        # refused from now on; merging locally closes that connection.
        await self._push_one(target.key, "log.push", {"subnet": sub.id.hex(), "entries": [prune.to_dict()]})
        self.merge(sub, [prune])
        seed = new_seed(os.urandom(SEED_BYTES))
        epoch = sub.state().epoch + 1
        rotate = make_seed_rotate(
            me, parents=sub.log.valid_heads(), epoch=epoch,
            commitment=seed_commitment(sub.state().create_nonce, epoch, seed), hlc=self.subnets.stamp(),
        )
        self.merge(sub, [rotate])
        if not self._install_seed(sub, {"epoch": epoch, "seed": seed.reveal()}):
            raise Refusal("PRUNE_FAILED", target.display, "the seed rotation did not take effect")
        await self.push_entries(sub, [prune, rotate])
        await self.gossip(sub, "seed.install", {"subnet": sub.id.hex(), "epoch": epoch, "seed": seed.reveal()})
        for conn in self.transport.connections():
            if conn.peer == target.key and not self.shared_subnets(target.key):
                conn.close("pruned")

    async def leave(self, sub: HeldSubnet) -> None:
        entry = make_leave(self.daemon.key, parents=sub.log.valid_heads(), hlc=self.subnets.stamp())
        sub.log.merge([entry])
        with self.daemon.store.transaction():
            self.subnets.save_entries(sub, [entry])
        await self.push_entries(sub, [entry])


class _JoinAttempt:
    """One candidate member, on the join ALPN: hello first, then (if chosen) the ceremony."""

    def __init__(self, members: Members, candidate: Candidate, name: str, code: Secret[str], entered_at: float) -> None:
        self.members = members
        self.candidate = candidate
        self.name = name
        self.code = code
        self.entered_at = entered_at
        self.conn: Connection | None = None
        self.stream: Stream | None = None
        self.session: jp.JoinerSession | None = None

    async def hello(self, dial_timeout: float = DIAL_TIMEOUT) -> jp.JoinerEvent | SptError | None:
        """Connect and exchange hellos; the member's answer, a refusal, or None (unreachable)."""
        transport = self.members.transport
        addr = (self.candidate.host, self.candidate.port)
        try:
            if self.candidate.node is not None:
                self.conn = await transport.connect(self.candidate.node, [addr], alpn=ALPN_JOIN, timeout=dial_timeout)
            else:
                self.conn = await transport.connect_any(addr, alpn=ALPN_JOIN, timeout=dial_timeout)
            exporter = self.conn.export_keying_material(jp.EXPORTER_LABEL, jp.EXPORTER_BYTES)
            daemon = self.members.daemon
            self.session = jp.JoinerSession(
                daemon.key, self.conn.peer, exporter, name=self.name, label=daemon.label,
                code=self.code, entered_at=self.entered_at,
            )
            self.stream = self.conn.open_stream()
            await self._write(self.session.start(wall=time.time(), mono=time.monotonic()))
            return await self._next_event()
        except (PeerError, TimeoutError, RemoteProtocolError) as exc:
            log.info("join candidate did not answer", extra={"addr": f"{addr[0]}:{addr[1]}", "reason": str(exc)})
            return None

    async def _write(self, out: jp.Output[jp.JoinerEvent]) -> list[jp.JoinerEvent]:
        assert self.stream is not None
        for msg in out.messages:
            await self.stream.send("join", msg)
        return list(out.events)

    async def _next_event(self) -> jp.JoinerEvent | SptError | None:
        assert self.stream is not None and self.session is not None
        while True:
            frame = await self.stream.recv(timeout=STREAM_TIMEOUT)
            if frame is None:
                raise PeerError("", "the member closed the join stream")
            if frame.type != "join":
                raise RemoteProtocolError(frame.type, "expected a join message")
            events = await self._write(self.session.receive(frame.body))
            for event in events:
                if isinstance(event, jp.NotHere):
                    return None
                if isinstance(event, jp.SkewRetry):
                    log.warning("clock skew with the member; retrying at the joiner's step", extra={"skew_ms": event.skew_ms})
                    continue
                if isinstance(event, jp.MemberHello | jp.Joined):
                    return event
                if hasattr(event, "error"):
                    err: SptError = event.error()
                    return err
            if self.session.is_finished:
                return None

    async def run(self) -> jp.Joined:
        """Try the code with this member and return the bundle; refusals raise their token."""
        assert self.session is not None
        events = await self._write(self.session.proceed())
        result: jp.JoinerEvent | SptError | None = events[0] if events else await self._next_event()
        if isinstance(result, jp.Joined):
            return result
        if isinstance(result, SptError):
            raise result
        raise Refusal("JOIN_NOT_FOUND", self.name, "the member ended the exchange")

    def close(self) -> None:
        if self.session is not None and not self.session.is_finished:
            self.session.abort()
        if self.conn is not None and self.conn.is_open:
            self.conn.close("join attempt finished")




def remote_refusal(exc: RequestError, address: str) -> SptError:
    """A member's refusal (an `error` reply carrying a token), re-raised here with that token.

    NO_PERCH names the address as the user typed it; other tokens keep the peer's subject.
    """
    if exc.code == "NO_PERCH":
        return Refusal("NO_PERCH", address)
    head, _, detail = exc.remote_message.partition(" ")
    token, _, subject = head.partition(":")
    if exc.code and token == exc.code:
        return Refusal(token, subject, detail)
    return Refusal(exc.code or "REFUSED", "", exc.remote_message)


def _candidate(host: str, port: int, source: str) -> Candidate:
    from spt.hooks import Candidate

    return Candidate(host, port, source=source)










def body_map(value: Any) -> dict[str, Any]:
    """A request or reply body that must be a map; RemoteProtocolError otherwise."""
    if not isinstance(value, dict):
        raise RemoteProtocolError("body", "expected a map")
    return value


def _entries(value: Any) -> list[Entry]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_SYNC_ENTRIES:
        raise RemoteProtocolError("entries", f"expected a list of at most {MAX_SYNC_ENTRIES} entries")
    return [Entry.from_dict(v) for v in value]


def _loads(raw: bytes) -> Any:
    from spt.core.proto.canonical import parse_canonical

    return parse_canonical(raw)


def register_ops(daemon: Daemon, members: Members) -> None:
    """Control operations on subnets that need the network."""

    @daemon.op("subnet.join", elevated=True)
    async def join(call: Call) -> Any:
        args = call.args
        entered_at = time.monotonic() - int(args.get("entered_ago_ms", 0)) / 1000
        result = await members.join(
            str(args.get("name", "")),
            check_join_code(str(args.get("code", ""))),
            peers=[str(p) for p in args.get("peers", [])],
            timeout=float(args.get("timeout", 30.0)),
            entered_at=entered_at,
            id_prefix=args.get("id"),
            on_progress=(lambda text: call.emit({"progress": text})) if call.interactive else None,
        )
        homed = daemon.on_first_subnet(result.sub)
        await daemon.subnets_changed()
        return {
            "name": result.sub.name,
            "id": result.sub.short_id,
            "homed": homed,
            "timing": {"discovery_s": result.discovery_s, "ceremony_s": result.ceremony_s},
        }

    @daemon.op("subnet.prune", elevated=True)
    async def prune(call: Call) -> Any:
        sub = daemon.subnets.only_or_named(call.args.get("subnet"))
        target = members.resolve_member(sub, str(call.args.get("node", "")))
        await members.prune(sub, target)
        return {**daemon.subnets.code_answer(sub), "pruned": target.display}

    @daemon.op("subnet.leave", elevated=True)
    async def leave(call: Call) -> Any:
        sub = daemon.subnets.require(str(call.args.get("name", "")))
        await members.leave(sub)
        orphaned = daemon.departed(sub, "left")
        await daemon.subnets_changed()
        return {"name": sub.name, "orphaned": orphaned}

    @daemon.op("node.trust.list")
    async def trust_list(call: Call) -> Any:
        pins = [
            {"subnet": sub.name, "label": label, "key": key.hex}
            for sub in sorted(daemon.subnets.held.values(), key=lambda s: s.canonical)
            for key, label in sorted(sub.state().members.items(), key=lambda kv: (kv[1].lower(), kv[0].hex))
        ]
        return {"pins": pins, "pending": members.claims.pending()}

    @daemon.op("node.trust.accept", elevated=True)
    async def trust_accept(call: Call) -> Any:
        node, subnet = str(call.args.get("node", "")), call.args.get("subnet")
        if call.args.get("preview"):
            sub, old, new = members.claims.resolve(node, subnet)
            label = sub.state().members.get(old, "")
            return {"subnet": sub.name, "old": old.display(label), "old_fingerprint": old.fingerprint,
                    "new": new.display(label), "new_fingerprint": new.fingerprint, "new_key": new.hex}
        # The accept names the exact new key the human compared: a claim that arrived since the
        # preview (an outsider's, say) is never the one accepted.
        new_key = call.args.get("new")
        if not isinstance(new_key, str) or len(new_key) != 64:
            raise UsageError("BAD_USAGE", node, "trust accept names the previewed new key (64 hex digits)")
        sub, old, new = members.claims.resolve(node, subnet, new_key)
        return {"subnet": sub.name, "trusted": await members.claims.accept(sub, old, new)}

    @daemon.op("node.trust.reject")
    async def trust_reject(call: Call) -> Any:
        node = str(call.args.get("node", ""))
        sub, old, new = members.claims.resolve(node, call.args.get("subnet"))
        members.claims.drop(sub, old, new)
        return {"subnet": sub.name, "node": node}

    @daemon.op("node.rekey", elevated=True)
    async def rekey(call: Call) -> Any:
        new = members.claims.rekey()
        # Answer first, then restart under the new key (the service manager or autostart brings
        # the daemon back; `spt node rekey` restarts it itself when it may).
        asyncio.get_running_loop().call_later(0.2, daemon.request_stop)
        return {"display": new.node_id.display(daemon.label), "key": new.node_id.hex, "pid": os.getpid()}

    @daemon.op("subnet.unlock", elevated=True)
    async def unlock(call: Call) -> Any:
        sub = daemon.subnets.require(str(call.args.get("name", "")))
        members.unlock(sub)
        return {"name": sub.name}
