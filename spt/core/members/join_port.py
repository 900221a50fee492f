"""The join port (`spt-join/1`, SPEC.md §5): the member's side of the ceremony (one SPAKE2 run
per subnet at a time, failure and unlock records, the lockout), the joiner's side of
`spt subnet join` (find members, run the ceremony with one, install the bundle), and log offers
(a new member's own join, offered to members that have not heard of it).

The ceremony's steps are `spt.core.proto.join`'s; this part moves its messages and stores its
results. Collaborators: `Net`, `MemberLinks` (addresses), `LogService` (merge and push) and the
daemon parts named in `JoinHost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from spt.core.errors import PeerError, Refusal, RemoteProtocolError, SptError, UsageError
from spt.core.identity import NodeId, NodeKey
from spt.core.members.links import MemberLinks
from spt.core.members.log_service import LogService
from spt.core.members.wire import (
    DIAL_TIMEOUT,
    REQUEST_TIMEOUT,
    STREAM_TIMEOUT,
    Address,
    Net,
    body_map,
    loads,
)
from spt.core.net.connections import Connection, RequestError, Stream
from spt.core.net.transport import ALPN_JOIN
from spt.core.proto import join as jp
from spt.core.proto.canonical import canonical_bytes
from spt.core.proto.frames import Frame
from spt.core.proto.membership import Entry
from spt.core.proto.totp import Secret
from spt.core.subnets import HeldSubnet, Subnets, rendezvous_tag
from spt.core.types import parse_hostport

if TYPE_CHECKING:
    from spt.core.config import NodeConfig
    from spt.core.relaybook import RelayBook
    from spt.core.store import Store
    from spt.hooks import Candidate

log = logging.getLogger(__name__)

JOIN_EXCHANGE_TIMEOUT: Final = 60.0  # one join exchange, hello to bundle
JOIN_LOCK_WAIT: Final = 10.0  # a joiner waits this long for another's SPAKE2 run on the subnet
JOIN_LOCKED_EXCHANGE: Final = 20.0  # an exchange holds its subnet's lock this long at most
MAX_JOIN_RECORDS: Final = 512  # failure and unlock records one sync answer carries
MAX_OFFER_ENTRIES: Final = 48  # ancestors a join offer carries at most (join-ALPN frames stay small)
FIRST_DISCOVERY_ROUND: Final = 0.1  # seconds the first discovery round of a join waits; doubles each round
MAX_DISCOVERY_ROUND: Final = 2.0


@dataclass
class JoinResult:
    sub: HeldSubnet
    member: NodeId
    discovery_s: float = 0.0  # from the call to the first member hello (finding a member)
    ceremony_s: float = 0.0  # from there to the installed bundle (SPAKE2, admission, bundle)


class JoinHost(Protocol):
    """What the join port needs of the daemon."""

    store: Store
    key: NodeKey
    config: NodeConfig
    subnets: Subnets
    relay_book: RelayBook
    announced_relays: tuple[str, ...]

    @property
    def label(self) -> str: ...

    def addresses(self) -> list[str]: ...

    def join_failed(self, sub: HeldSubnet, joiner: NodeId, source: str) -> None: ...

    async def find_candidates(self, tag: bytes, timeout: float, extra: Sequence[Candidate] = ()) -> list[Candidate]: ...


class JoinPort:
    """Both sides of joins, the lockout's records, and log offers."""

    def __init__(self, host: JoinHost, net: Net, links: MemberLinks, logs: LogService) -> None:
        self.host = host
        self.net = net
        self.links = links
        self.logs = logs
        # §5.5: a node answers joins for a subnet one at a time: from the first SPAKE2 message to
        # the end, and for JOIN_LOCKED_EXCHANGE seconds at most; hellos need no lock
        self._responder_locks: dict[bytes, asyncio.Lock] = {}
        self.limiter = jp.JoinLimiter(
            max_failures=host.config.join_max_failures, lockout_ms=host.config.join_lockout_seconds * 1000
        )

    # -- the join ceremony: member side -------------------------------------------------------

    def join_status(self, sub: HeldSubnet, now_ms: int | None = None) -> jp.JoinStatus:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        failures, unlocks = self._join_records(sub)
        return self.limiter.status(failures, unlocks, now_ms)

    def _join_records(self, sub: HeldSubnet) -> tuple[list[jp.FailureRecord], list[jp.UnlockRecord]]:
        failures: list[jp.FailureRecord] = []
        unlocks: list[jp.UnlockRecord] = []
        for row in self.host.store.query("SELECT kind, data FROM join_records WHERE subnet=?", (sub.id,)):
            data = loads(row["data"])
            if row["kind"] == "failure":
                failures.append(jp.FailureRecord.from_dict(data))
            else:
                unlocks.append(jp.UnlockRecord.from_dict(data))
        members = sub.state().members
        return [f for f in failures if f.responder in members], [u for u in unlocks if u.author in members]

    def _serving(self) -> dict[str, jp.ResponderSubnet]:
        serving: dict[str, jp.ResponderSubnet] = {}
        for sub in self.host.subnets.attached():
            st = sub.state()
            if sub.seed is None or sub.epoch != st.epoch:
                continue  # without the current seed this node cannot answer joins (§6.5)
            serving[sub.canonical] = jp.ResponderSubnet(
                sub.log, sub.seed, st.epoch, self.host.label, self.contacts(st.members)
            )
        return serving

    def contacts(self, members: Iterable[NodeId]) -> dict[NodeId, jp.Contact]:
        out: dict[NodeId, jp.Contact] = {}
        for node in members:
            if node == self.host.key.node_id:
                # Loopback only helps a joiner on this very machine (the demo); elsewhere it makes
                # peers dial themselves.
                mine = self.host.addresses()
                out[node] = jp.Contact(
                    tuple([a for a in mine if not a.startswith("127.")] or mine), self.host.announced_relays
                )
            else:
                out[node] = jp.Contact(
                    tuple(f"{h}:{p}" for h, p in self.links.addresses_of(node)), self.host.relay_book.announced_by(node)
                )
        return out

    async def respond(self, conn: Connection, stream: Stream, first: Frame) -> None:
        exporter = conn.export_keying_material(jp.EXPORTER_LABEL, jp.EXPORTER_BYTES)
        host, port = conn.remote_addr
        session = jp.ResponderSession(
            self.host.key, conn.peer, exporter, subnets=self._serving(), source=f"{host}:{port}"
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
                locks = {s.id: self.join_status(s) for s in self.host.subnets.attached()}
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
                sub = self.host.subnets.held[record.subnet_id]
                self._store_join_record(sub, "failure", record.to_dict(), record.time_ms)
                log.warning(
                    "join attempt failed",
                    extra={"subnet": sub.name, "joiner": conn.peer.short, "source": record.source, "skew_ms": skew},
                )
                self.host.join_failed(sub, conn.peer, record.source)
                self.net.spawn(self.logs.gossip(sub, "join.record", {"subnet": sub.id.hex(), "kind": "failure", "record": record.to_dict()}), "gossip failure")
            case jp.MemberAdmitted(entry=entry, joiner=joiner, label=label):
                sub = self._sub_of_entry(entry)
                self.logs.merge(sub, [entry])
                host, port = conn.remote_addr
                self.links.remember_address(joiner, host, port, "join")
                log.info("member admitted", extra={"subnet": sub.name, "node": joiner.display(label)})
                self.net.spawn(self.logs.push_entries(sub, [entry]), "push join entry")
            case jp.HelloRefused(name=name, state=state, joiner=joiner):
                log.info("join hello refused", extra={"subnet": name, "state": state, "joiner": joiner.short})

    def _sub_of_entry(self, entry: Entry) -> HeldSubnet:
        for sub in self.host.subnets.held.values():
            if all(p in sub.log for p in entry.parents):
                return sub
        raise RemoteProtocolError(entry.type, "an admitted entry names parents of no held subnet")

    def _store_join_record(self, sub: HeldSubnet, kind: str, data: Mapping[str, Any], time_ms: int) -> None:
        from spt.core.identity import sha256

        raw = canonical_bytes(dict(data))
        with self.host.store.transaction():
            self.host.store.db.execute(
                "INSERT OR IGNORE INTO join_records(id, subnet, kind, time, data) VALUES(?,?,?,?,?)",
                (sha256(raw), sub.id, kind, time_ms / 1000, raw),
            )
            # §5.5: failure records are kept 24 h
            self.host.store.db.execute(
                "DELETE FROM join_records WHERE kind='failure' AND time < ?", (time.time() - 24 * 3600,)
            )

    async def handle_join_record(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.net.require_member(conn, body.get("subnet"))
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

    async def handle_join_records(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        """Every failure and unlock record this node holds for the subnet (24 h of them): how a
        member that joined later counts the failures that came before it (§5.5)."""
        sub = self.net.require_member(conn, body_map(frame.body).get("subnet"))
        rows = self.host.store.query(
            "SELECT kind, data FROM join_records WHERE subnet=? ORDER BY time DESC LIMIT ?", (sub.id, MAX_JOIN_RECORDS)
        )
        return "join.records", {"records": [{"kind": r["kind"], "record": loads(r["data"])} for r in rows]}

    async def fetch_join_records(self, conn: Connection, sub: HeldSubnet) -> None:
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
        record = jp.UnlockRecord.sign(self.host.key, subnet_id=sub.id, time_ms=int(time.time() * 1000))
        self._store_join_record(sub, "unlock", record.to_dict(), record.time_ms)
        self.net.spawn(self.logs.gossip(sub, "join.record", {"subnet": sub.id.hex(), "kind": "unlock", "record": record.to_dict()}), "gossip unlock")

    # -- the join ceremony: joiner side --------------------------------------------------------

    async def join(
        self, name: str, code: str, *, peers: Sequence[str], timeout: float, entered_at: float, id_prefix: str | None,
        on_progress: Callable[[str], Awaitable[None]] | None = None,
    ) -> JoinResult:
        """Find members of `name`, run the ceremony with one, install what it sends.

        `on_progress` hears, in words, which candidate is tried by which path (an interactive
        `spt subnet join` prints it while it searches)."""
        existing = self.host.subnets.by_name(name)
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
            found = await self.host.find_candidates(tag, budget, extra)
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
        with self.host.store.transaction():
            self.host.subnets.save_subnet(sub)
            self.host.subnets.save_entries(sub, bundle.log.entries())
        self.host.subnets.held[sub.id] = sub
        self.host.store.db.execute("DELETE FROM meta WHERE key=?", (f"departed:{sub.id.hex()}",))
        given = attempt.candidate.source in ("static", "peer")
        self.links.remember_address(member, attempt.candidate.host, attempt.candidate.port,
                              attempt.candidate.source if given else "join")
        for node, contact in bundle.contacts.items():
            if node != self.host.key.node_id:
                self.host.relay_book.learn(node, contact.relays)  # §7.6: the subnet's relays
            for text in contact.addresses:
                host, _, port = text.rpartition(":")
                if host and port.isdigit():
                    self.links.remember_address(node, host, int(port), "introduced")
        log.info("joined subnet", extra={"subnet": sub.name, "id": sub.short_id, "via": member.short})
        self.links.keep_members_connected()
        self.net.spawn(self._offer_join(sub, bundle.join_entry), "offer join entry")
        return JoinResult(sub, member)

    async def _offer_join(self, sub: HeldSubnet, join: Entry) -> None:
        """Reach every member; one that has not heard of our join yet gets it on the join ALPN,
        with its nearest ancestors (the admitting member pushes it too; this is the fallback)."""
        ancestry = sub.log.ancestry(join.hash)[-(MAX_OFFER_ENTRIES + 1):]
        body = {"subnet": sub.id.hex(), "entries": [e.to_dict() for e in ancestry]}
        for node in sub.state().members:
            if node == self.host.key.node_id:
                continue
            addrs = await self.links.dial_addresses(node)
            if not addrs:
                continue
            try:
                conn = await self.net.transport.connect(node, addrs, alpn=ALPN_JOIN, timeout=DIAL_TIMEOUT)
                await conn.request("log.offer", body, timeout=REQUEST_TIMEOUT)
                conn.close("offer done")
            except (PeerError, TimeoutError) as exc:
                log.info("could not offer the join entry", extra={"peer": node.short, "reason": str(exc)})
        self.links.keep_members_connected()

    async def handle_log_offer(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        """A newly joined node offers its own join entry and that entry's ancestors, nothing else.

        The answer is the same whatever the log says of the offerer (a stranger learns nothing),
        and nothing an offer carries waits for parents here.
        """
        body = body_map(frame.body)
        sub = self.net.held(body.get("subnet"))
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
        self.logs.merge(sub, entries)
        sub.log.forget_pending(e.hash for e in entries)
        return "ok", {}


class _JoinAttempt:
    """One candidate member, on the join ALPN: hello first, then (if chosen) the ceremony."""

    def __init__(self, port: JoinPort, candidate: Candidate, name: str, code: Secret[str], entered_at: float) -> None:
        self.port = port
        self.candidate = candidate
        self.name = name
        self.code = code
        self.entered_at = entered_at
        self.conn: Connection | None = None
        self.stream: Stream | None = None
        self.session: jp.JoinerSession | None = None

    async def hello(self, dial_timeout: float = DIAL_TIMEOUT) -> jp.JoinerEvent | SptError | None:
        """Connect and exchange hellos; the member's answer, a refusal, or None (unreachable)."""
        transport = self.port.net.transport
        addr = (self.candidate.host, self.candidate.port)
        try:
            if self.candidate.node is not None:
                self.conn = await transport.connect(self.candidate.node, [addr], alpn=ALPN_JOIN, timeout=dial_timeout)
            else:
                self.conn = await transport.connect_any(addr, alpn=ALPN_JOIN, timeout=dial_timeout)
            exporter = self.conn.export_keying_material(jp.EXPORTER_LABEL, jp.EXPORTER_BYTES)
            daemon = self.port.host
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


def _candidate(host: str, port: int, source: str) -> Candidate:
    from spt.hooks import Candidate

    return Candidate(host, port, source=source)
