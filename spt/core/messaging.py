"""The network half of messaging: forwarding, remote endpoint requests, the registry.

What lives here (SPEC.md §4.2–4.6):
- `forward_message`: a message for a perch on another node goes over the member connection of the
  resolution subnet; the target re-checks membership and visibility and answers SENT, QUEUED or
  NO_PERCH. Unreachable targets leave the message in the sender's outgoing spool, which
  `_drain_outgoing` forwards when a path exists, with backoff, never expiring.
- `remote_request`: suspend and wake for an instance on another node.
- Registry replication: each node signs its own rows per subnet (only where the instance is
  visible; hiding publishes a tombstone) and a presence record; changes are pushed at once,
  digests compared on connect and every 60 s; silent nodes turn offline. Views live in memory;
  what is stored is this node's own signed rows and recent deletions (meta
  `registry_advertised`) and, per member, the presence that settled a deletion of its rows
  (table `registry_presence`), which refuses replays of deleted rows after restarts
  (docs/design/registry.md).

Subnet isolation: a record or message for subnet S only ever travels on a member connection to a
current member of S, and rows of S never leave S's view.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from spt import __version__
from spt.core.endpoint_views import TRANSIENT_PREFIX
from spt.core.errors import PeerError, Refusal, RemoteProtocolError, SptError
from spt.core.identity import NodeId, sha256
from spt.core.members import body_map, remote_refusal
from spt.core.net.connections import Connection, RequestError, error_body
from spt.core.net.transport import ALPN_MEMBER
from spt.core.payloads import FINAL_REFUSALS
from spt.core.proto import deliver as batch_wire
from spt.core.proto.canonical import canonical_bytes
from spt.core.proto.frames import Frame
from spt.core.proto.registry import (
    MergeOutcome,
    Presence,
    RegistryRow,
    RegistryView,
    digest_from_wire,
    digest_to_wire,
    record_from_dict,
    sign_presence,
    sign_row,
    sign_tombstone,
)
from spt.core.proto.resolve import RemoteTarget, Row, shortest_from_form
from spt.core.spool import HELD_BACK, OutgoingMessage
from spt.core.subnets import HeldSubnet
from spt.hooks import IncomingPayload

if TYPE_CHECKING:
    from spt.core.daemon import Daemon
    from spt.core.proto.hlc import HlcTimestamp

log = logging.getLogger(__name__)

FORWARD_TIMEOUT: Final = 10.0
ANTI_ENTROPY_SECONDS: Final = 60.0  # §4.2 step 4: no answer within 10 s means QUEUED
DRAIN_INTERVAL: Final = 1.0
DRAIN_BATCH: Final = 200
DRAIN_BATCHES: Final = 100
IDLE_RECHECK: Final = 5.0  # seconds before a node with no path or a detached subnet is looked at again
ADVERTISED_META: Final = "registry_advertised"  # meta key: the rows this node last signed, by subnet
TOMBSTONES_KEPT: Final = 30 * 24 * 3600.0  # a deleted perch is tombstoned again after restarts this long
BACKOFF_MAX: Final = 600.0
FORWARDED_COMMIT: Final = 64  # forwarded messages removed from the outgoing spool per transaction
MAX_RECORDS: Final = 4096  # records one registry message carries at most
IN_FLIGHT: Final = 2  # deliver requests in flight per node; messages arriving meanwhile go together next
SLOT_HOLD: Final = 0.05  # seconds: a request slower than this (a listener's SENT wait) frees its slot
MEMBERSHIP_ERRORS: Final = ("NOT_A_MEMBER", "NOT_HERE")  # a path or standing problem: the message waits
# how a node without a request's handler answers it (older nodes: "unknown-type", Members._on_stream)
UNKNOWN_REQUEST: Final = ("unknown-type", "UNKNOWN_TYPE")


@dataclasses.dataclass
class _Outgoing:
    """One message waiting in a node's outbox: its payload, its caller's future, and its group
    (messages of one caller's batch travel in one request, never split, so they keep their order)."""

    payload: Mapping[str, Any]
    future: asyncio.Future[str]
    group: object
    size: int


@dataclasses.dataclass
class _Outbox:
    """Messages for one node through one subnet, waiting for a free request slot."""

    waiting: list[_Outgoing] = dataclasses.field(default_factory=list)
    in_flight: int = 0


class Messaging:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.members = daemon.members
        self.endpoints = daemon.endpoints
        self.views: dict[bytes, RegistryView] = {}
        # subnet -> perch id (lower case) -> (home, id) -> the local row last signed there, for
        # tombstones and publish(perch=…)
        self._advertised: dict[bytes, dict[str, dict[tuple[str, str], dict[str, Any]]]] = {}
        # subnet -> (home, id) -> when this node tombstoned it (not transient senders'), kept
        # TOMBSTONES_KEPT so that a restart tombstones it again (`_load_advertised`)
        self._tombstoned: dict[bytes, dict[tuple[str, str], float]] = {}
        self._advertised_moved = False  # rows shown or tombstoned since it was last stored
        self._signed_all: set[bytes] = set()  # subnets where every row was signed since the start
        self._load_advertised()
        self._drain_wake = asyncio.Event()
        self.staged_release: str | None = None  # the release this node offers (a plugin sets it)
        handlers = self.members.handlers
        handlers["msg.deliver"] = self._handle_deliver
        handlers[batch_wire.BATCH_TYPE] = self._handle_deliver_batch
        self._outboxes: dict[tuple[NodeId, bytes], _Outbox] = {}
        self._single_only: set[NodeId] = set()  # nodes that answered a batch as an unknown request
        handlers["endpoint.request"] = self._handle_endpoint_request
        handlers["registry.push"] = self._handle_registry_push
        handlers["registry.sync"] = self._handle_registry_sync

    def start(self) -> None:
        self.members.spawn(self._drain_loop(), "outgoing spool")
        self.members.spawn(self._presence_loop(), "presence")

    # -- forwarding -------------------------------------------------------------------------

    async def forward_message(self, target: RemoteTarget, payload: Mapping[str, Any]) -> str:
        """Hand a message to the target node; "SENT" or "QUEUED", or Refusal NO_PERCH."""
        return await self.forward_messages(target, [payload])[0]

    def forward_messages(
        self, target: RemoteTarget, payloads: Sequence[Mapping[str, Any]]
    ) -> list[asyncio.Future[str]]:
        """Queue messages for the target node, in order, as one group; a future per message
        (its token, or what `forward_message` raises). Queued now, before any await, so callers
        that queue one after another keep their order."""
        sub = self.daemon.subnets.by_name(target.subnet)
        if sub is None:
            raise Refusal("NO_SUCH_SUBNET", target.subnet)
        return self._queue(target.node.key, sub, payloads)

    async def _forward(self, node: NodeId, sub: HeldSubnet, payload: Mapping[str, Any]) -> str:
        return await self._queue(node, sub, [payload])[0]

    def _queue(self, node: NodeId, sub: HeldSubnet, payloads: Sequence[Mapping[str, Any]]) -> list[asyncio.Future[str]]:
        loop = asyncio.get_running_loop()
        box = self._outboxes.setdefault((node, sub.id), _Outbox())
        group = object()
        futures: list[asyncio.Future[str]] = []
        for payload in payloads:
            future: asyncio.Future[str] = loop.create_future()
            box.waiting.append(_Outgoing(payload, future, group, batch_wire.body_bytes(payload)))
            futures.append(future)
        self._pump(node, sub, box)  # a free slot takes them now; else they wait for one, and go together
        return futures

    def _pump(self, node: NodeId, sub: HeldSubnet, box: _Outbox) -> None:
        """Start requests for waiting messages while a slot is free: each takes what waits, up
        to the batch limits, cut only between groups."""
        while box.waiting and box.in_flight < IN_FLIGHT:
            take, size = 0, 0
            while take < len(box.waiting):
                item = box.waiting[take]
                if take and (take + 1 > batch_wire.MAX_BATCH or size + item.size > batch_wire.MAX_BATCH_BYTES):
                    break
                take, size = take + 1, size + item.size
            while 0 < take < len(box.waiting) and box.waiting[take].group is box.waiting[take - 1].group:
                take -= 1  # a cut inside a group moves back to the group's start
            if take == 0:  # one group over the limits (callers bound their batches): it goes alone
                group = box.waiting[0].group
                take = next((i for i, o in enumerate(box.waiting) if o.group is not group), len(box.waiting))
            batch, box.waiting = box.waiting[:take], box.waiting[take:]
            box.in_flight += 1
            self.members.spawn(self._send_batch(node, sub, box, batch), "message delivery")
        if not box.waiting and not box.in_flight:
            self._outboxes.pop((node, sub.id), None)

    async def _send_batch(self, node: NodeId, sub: HeldSubnet, box: _Outbox, batch: list[_Outgoing]) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                box.in_flight -= 1
                self._pump(node, sub, box)

        timer = asyncio.get_running_loop().call_later(SLOT_HOLD, release)
        try:
            outcomes = await self._deliver(node, sub, [o.payload for o in batch])
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else PeerError(node.short, "the daemon is stopping")
            outcomes = [failure] * len(batch)
            if not isinstance(exc, Exception):
                raise
        finally:
            timer.cancel()
            release()
            for item, outcome in zip(batch, outcomes, strict=True):
                if item.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)

    async def _deliver(
        self, node: NodeId, sub: HeldSubnet, payloads: list[Mapping[str, Any]]
    ) -> list[str | Exception]:
        """One request carrying `payloads` (one `msg.deliver`, or a batch when several): per
        message its token or its refusal. Raises what fails the whole request (path, timeout)."""
        if len(payloads) > 1 and node not in self._single_only:
            async with asyncio.timeout(FORWARD_TIMEOUT):
                conn = await self.members.links.connect_member(node)
                try:
                    reply = await conn.request(
                        batch_wire.BATCH_TYPE, {"subnet": sub.id.hex(), "payloads": [dict(p) for p in payloads]},
                        timeout=FORWARD_TIMEOUT,
                    )
                except RequestError as exc:
                    if exc.code not in UNKNOWN_REQUEST:
                        raise
                    self._single_only.add(node)  # an older node: one request per message
                else:
                    results = batch_wire.decode_results(reply.body, len(payloads))
                    return [
                        value if kind == "token" else _refusal(RequestError(node.short, value, message), payload)
                        for (kind, value, message), payload in zip(results, payloads, strict=True)
                    ]
        # One request per message, in order; a failure of the path fails the rest with it. Once
        # a message for a perch is refused retryably (SPOOL_FULL), its later ones are not sent
        # but refused alike, as a batch's receiver would: they must stay behind it (§4.2 step 7).
        outcomes: list[str | Exception] = []
        held_back: dict[str, str] = {}
        for payload in payloads:
            to = str(payload.get("to", "")).lower()
            try:
                if to in held_back:
                    raise RequestError(node.short, held_back[to], HELD_BACK)
                outcomes.append(await self._deliver_one(node, sub, payload))
            except Refusal as exc:
                outcomes.append(exc)
            except RequestError as exc:
                if exc.code in MEMBERSHIP_ERRORS:
                    raise
                if exc.code not in FINAL_REFUSALS:
                    held_back.setdefault(to, exc.code)
                outcomes.append(_refusal(exc, payload))
        return outcomes

    async def _deliver_one(self, node: NodeId, sub: HeldSubnet, payload: Mapping[str, Any]) -> str:
        async with asyncio.timeout(FORWARD_TIMEOUT):
            conn = await self.members.links.connect_member(node)
            reply = await conn.request(
                "msg.deliver", {"subnet": sub.id.hex(), "payload": dict(payload)}, timeout=FORWARD_TIMEOUT
            )
        token = body_map(reply.body).get("token")
        if token not in ("SENT", "QUEUED"):
            raise RemoteProtocolError("msg.deliver", f"unexpected answer {token!r}")
        return str(token)

    async def _handle_deliver(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.members.require_member(conn, body.get("subnet"))
        (outcome,) = await self._deliver_here(conn, sub, [body_map(body.get("payload"))])
        if isinstance(outcome, Exception):
            raise outcome
        return "msg.result", {"token": outcome}

    async def _handle_deliver_batch(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        """Several messages from one member: spooled together (one group commit), answered per
        message once each is durable or refused; a malformed or oversize batch is refused whole."""
        body = body_map(frame.body)
        sub = self.members.require_member(conn, body.get("subnet"))
        results: list[dict[str, Any]] = []
        for outcome in await self._deliver_here(conn, sub, batch_wire.decode_batch(body)):
            if isinstance(outcome, SptError):
                results.append({"error": error_body(outcome.instance_token, outcome.message or outcome.subject)})
            elif isinstance(outcome, Exception):
                log.error("a batched message failed", exc_info=outcome)
                results.append({"error": error_body("INTERNAL", "the node failed while handling this message")})
            else:
                results.append({"token": outcome})
        return batch_wire.RESULTS_TYPE, {"results": results}

    async def _deliver_here(
        self, conn: Connection, sub: HeldSubnet, payloads: Sequence[Mapping[str, Any]]
    ) -> list[str | Exception]:
        """Messages from a member, in order: per message its token or its refusal. Messages are
        the `send` and `ring` payload types: their plugins handle them (a node that lacks one
        refuses it by name), after the payload policy hook (`Payloads.handle_many`, which also
        keeps a perch's later messages behind one it refused)."""
        snapshot = self.endpoints.snapshot()
        forms: dict[str, str] = {}  # a batch's messages mostly share their sender
        incomings: list[IncomingPayload] = []
        for payload in payloads:
            sender = str(payload.get("from", ""))
            if sender not in forms:
                forms[sender] = shortest_from_form(sender, conn.peer, snapshot, via_subnet=sub.name)
            attrs = payload.get("attrs") or []
            kind = "ring" if ["ring", "1"] in [list(a) for a in attrs if isinstance(a, list | tuple)] else "send"
            incomings.append(IncomingPayload(kind, conn.peer, sub.name, str(payload.get("to", "")), forms[sender], payload))
        replies = await self.daemon.payloads.handle_many(incomings)
        return [r if isinstance(r, Exception) else str(r.get("token")) for r in replies]

    async def _drain_loop(self) -> None:
        """Forward the outgoing spool when paths exist (§4.2 step 4); bounded batches, backoff."""
        while True:
            try:
                async with asyncio.timeout(DRAIN_INTERVAL):
                    await self._drain_wake.wait()
            except TimeoutError:
                pass
            self._drain_wake.clear()
            try:
                await self._drain_once()
            except Exception:
                log.exception("outgoing spool drain failed; retrying")

    async def _drain_once(self) -> None:
        """Forward due messages in batches until none is due (at most DRAIN_BATCHES batches)."""
        for _ in range(DRAIN_BATCHES):
            if not await self._drain_batch():
                return

    async def _drain_batch(self) -> bool:
        """One batch of due messages; True when something was forwarded and more may be due.

        Each node's messages go in order, several per request (`msg.deliver_batch`), the nodes
        side by side. A node that fails a message is deferred with the rest of its messages,
        so they keep their order (§4.2 step 7)."""
        now = time.time()
        by_node: dict[NodeId, list[OutgoingMessage]] = {}
        for msg in self.endpoints.pending_outgoing(limit=DRAIN_BATCH, due_before=now):
            by_node.setdefault(msg.node, []).append(msg)
        done: list[str] = []  # forwarded, removed from the spool together
        try:
            await asyncio.gather(*(self._drain_node(node, msgs, now, done) for node, msgs in by_node.items()))
        finally:
            for first in range(0, len(done), FORWARDED_COMMIT):
                self.endpoints.mark_forwarded(*done[first : first + FORWARDED_COMMIT])
        return bool(done)

    async def _drain_node(self, node: NodeId, msgs: list[OutgoingMessage], now: float, done: list[str]) -> None:
        """Forward one node's due messages in order, in requests within the batch limits; stop
        (deferring the node) at the first that did not go."""
        ready: list[OutgoingMessage] = []
        for msg in msgs:
            sub = self.daemon.subnets.held.get(msg.subnet)
            if sub is None or not sub.state().is_member(msg.node):
                # §4.8: traffic for a node that left or was pruned is dropped, and the user told;
                # it must never travel to a non-member over another subnet's connection.
                self._drop(msg.msg_id, sub, "its node is no longer a member of the subnet")
            elif not sub.attached:
                self.endpoints.defer_node(node, now + IDLE_RECHECK)
                return
            else:
                ready.append(msg)
        if not ready:
            return
        if self.members.transport.connection(node) is None and not await self.members.links.dial_addresses(node):
            self.endpoints.defer_node(node, now + IDLE_RECHECK)
            return
        while ready:
            sub = self.daemon.subnets.held.get(ready[0].subnet)
            if sub is None:
                return  # left meanwhile: the next drain drops what it held
            same = next((i for i, m in enumerate(ready) if m.subnet != sub.id), len(ready))
            chunk = _within_limits(ready[:same])  # one request: one subnet, within the limits
            ready = ready[len(chunk):]
            outcomes = await asyncio.gather(*self._queue(node, sub, [m.payload for m in chunk]), return_exceptions=True)
            failed: OutgoingMessage | None = None
            for msg, outcome in zip(chunk, outcomes, strict=True):
                if isinstance(outcome, str):
                    done.append(msg.msg_id)  # durable there (a later copy is dropped by id)
                elif isinstance(outcome, Refusal) and outcome.instance_token in FINAL_REFUSALS:
                    self._drop(msg.msg_id, sub, outcome.status_line())
                elif isinstance(outcome, PeerError | TimeoutError | RemoteProtocolError | OSError | Refusal):
                    failed = failed or msg
                    log.debug("queued message not forwarded yet", extra={"msg_id": msg.msg_id[:12], "reason": str(outcome)})
                else:
                    raise outcome
            if failed is not None:
                # The whole node backs off, so its messages keep their order (§4.2 step 7).
                self.endpoints.defer_node(node, now + min(2.0 ** min(failed.attempts, 10), BACKOFF_MAX))
                return

    def _drop(self, msg_id: str, sub: HeldSubnet | None, why: str) -> None:
        log.warning("queued message dropped", extra={"msg_id": msg_id[:12], "reason": why})
        self.endpoints.mark_forwarded(msg_id)
        self.daemon.notify(sub, "dropped-messages", "a queued message was dropped", f"{why} (message {msg_id[:12]})")

    # -- remote endpoint requests -----------------------------------------------------------

    async def remote_request(self, node: NodeId, subnet: str, kind: str, args: Mapping[str, Any]) -> dict[str, Any]:
        sub = self.daemon.subnets.by_name(subnet)
        if sub is None:
            raise Refusal("NO_SUCH_SUBNET", subnet)
        # a suspend waits out the hosted process's grace on the other side (§4.6)
        grace = args.get("grace")
        timeout = FORWARD_TIMEOUT + (float(grace) if isinstance(grace, int | float) else 0.0)
        async with asyncio.timeout(timeout):
            conn = await self.members.links.connect_member(node)
            try:
                reply = await conn.request(
                    "endpoint.request", {"subnet": sub.id.hex(), "kind": kind, "args": dict(args)}, timeout=timeout
                )
            except RequestError as exc:
                raise remote_refusal(exc, str(args.get("id", ""))) from exc
        return body_map(reply.body)

    async def _handle_endpoint_request(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.members.require_member(conn, body.get("subnet"))
        result = await self.daemon.resting.handle_remote_request(
            str(body.get("kind")), body_map(body.get("args")), subnet=sub.name, requester=conn.peer
        )
        return "endpoint.result", result

    # -- the registry ------------------------------------------------------------------------

    def view(self, sub: HeldSubnet) -> RegistryView:
        view = self.views.get(sub.id)
        if view is None or view.subnet != sub.name:
            view = self.views[sub.id] = RegistryView(sub.name, self_node=self.daemon.key.node_id)
            self._load_kept(sub, view)
        return view

    def _load_kept(self, sub: HeldSubnet, view: RegistryView) -> None:
        """The presence records stored by `_store_kept` before a restart, back into a new view."""
        members = sub.state().members
        for row in self.daemon.store.query("SELECT raw FROM registry_presence WHERE subnet=?", (sub.id,)):
            try:
                record = record_from_dict(json.loads(row["raw"]))
            except (ValueError, RemoteProtocolError):
                continue  # unreadable: as if never stored (the owner's next presence replaces it)
            if isinstance(record, Presence) and record.node in members:
                view.keep(record)

    def _store_kept(self, sub: HeldSubnet, view: RegistryView) -> None:
        """Store the presence records that settled a deletion seen here (rule 6 of
        spt.core.proto.registry): after a restart they still refuse replays of deleted rows,
        while the owner is offline and after its 30 days of re-tombstoning. One record per
        member and subnet, written only when a row was deleted."""
        fresh = view.to_keep()
        if not fresh:
            return
        with self.daemon.store.transaction() as db:
            for presence in fresh:
                db.execute(
                    "INSERT INTO registry_presence(subnet, node, version, raw) VALUES(?,?,?,?) "
                    "ON CONFLICT(subnet, node) DO UPDATE SET version=excluded.version, raw=excluded.raw "
                    "WHERE excluded.version > registry_presence.version",
                    (sub.id, presence.node.raw, presence.version, json.dumps(presence.to_dict())),
                )
        for presence in fresh:
            view.keep(presence)

    def _next_stamps(self, subs: Sequence[HeldSubnet]) -> tuple[int, list[HlcTimestamp]]:
        """The next registry version and a fresh HLC stamp for each of `subs`, stored in one
        transaction: one fsync per publish, not one per held subnet (a stamp outside a
        transaction commits alone, and every `spt ready` publishes twice)."""
        store = self.daemon.store
        with store.transaction():
            version = int(store.get_meta("registry_version") or "0") + 1
            store.set_meta("registry_version", str(version))
            stamps = [self.daemon.subnets.stamp() for _ in subs]
        return version, stamps

    def own_records(self, sub: HeldSubnet, version: int, hlc: HlcTimestamp) -> list[RegistryRow | Presence]:
        """This node's signed rows in `sub` (tombstones for rows no longer visible) and presence."""
        key = self.daemon.key
        advertised = {k: row for rows in self._advertised.get(sub.id, {}).values() for k, row in rows.items()}
        records = self._rows_records(sub, self.endpoints.local_rows(sub), advertised, version, hlc)
        self._signed_all.add(sub.id)
        records.append(sign_presence(
            key, subnet=sub.name, version=version, software_version=__version__,
            addresses=tuple(self.daemon.addresses()), relays=self.daemon.announced_relays,
            detached=not sub.attached, staged_release=self.staged_release,
            last_activity_ms=self.daemon.user_activity_ms,
        ))
        return records

    def _rows_records(
        self, sub: HeldSubnet, rows: list[dict[str, Any]], advertised: Mapping[tuple[str, str], dict[str, Any]],
        version: int, hlc: HlcTimestamp,
    ) -> list[RegistryRow | Presence]:
        """`rows` signed, and tombstones for the `advertised` rows they replace (every row this
        node advertised in `sub`, or one perch's); `_advertised` remembers what was signed."""
        key = self.daemon.key
        records: list[RegistryRow | Presence] = []
        current: dict[tuple[str, str], dict[str, Any]] = {}
        for row in rows:
            home = row["home"] or ""
            current[(home, row["id"])] = row
            records.append(sign_row(
                key, subnet=sub.name, endpoint_id=row["id"], home=home, version=version, hlc=hlc,
                state=row["state"], ready=bool(row["ready"]), alive=bool(row["alive"]),
                hosted=bool(row["hosted"]), description=row["description"] or "",
            ))
        gone = set(advertised) - set(current)
        for (home, endpoint_id) in gone:
            records.append(sign_tombstone(key, subnet=sub.name, endpoint_id=endpoint_id, home=home, version=version, hlc=hlc))
        signed = self._advertised.setdefault(sub.id, {})
        kept = [k for k in (*gone, *(k for k in current if k not in advertised)) if not k[1].startswith(TRANSIENT_PREFIX)]
        if kept:
            self._advertised_moved = True  # a perch shown, hidden or deleted: `_store_advertised`
            tombstoned = self._tombstoned.setdefault(sub.id, {})
            for row_key in kept:
                if row_key in gone:
                    tombstoned.setdefault(row_key, time.time())
                else:
                    tombstoned.pop(row_key, None)
        for row_key in gone:
            of_perch = signed.get(row_key[1].lower(), {})
            of_perch.pop(row_key, None)
            if not of_perch:
                signed.pop(row_key[1].lower(), None)
        for row_key, row in current.items():
            signed.setdefault(row_key[1].lower(), {})[row_key] = row
        return records

    def publish(self, *, perch: str | None = None) -> None:
        """Re-sign this node's rows and presence everywhere and push them to connected members.

        With `perch` (the id of a local perch that changed): only that perch's rows, and only in
        the subnets where they differ from what was signed there last. Re-signing every row in
        every subnet made each `spt ready` (which publishes twice), `send` and `ring` cost more
        with every subnet held and every transient sender of the last hour (issue 14). Presence
        and the other rows are unchanged; the presence loop re-signs everything each round, which
        also repairs a member that missed a push and then took a later one. A subnet where a row
        of the perch was deleted (hidden, purged) gets the full round at once: presence is only
        ever signed with every live row (rule 6 of spt.core.proto.registry), and the presence
        signed with a deletion is what members keep to refuse a replay of the deleted row.
        """
        plan: list[tuple[HeldSubnet, list[dict[str, Any]] | None]] = []  # None: everything
        for sub in self.daemon.subnets.attached():
            view = self.views.get(sub.id)
            if perch is None or view is None or view.subnet != sub.name or sub.id not in self._signed_all:
                plan.append((sub, None))
                continue
            rows = self.endpoints.views.perch_rows(sub, perch)
            now_signed, last_signed = {(r["home"] or "", r["id"]): r for r in rows}, self._advertised_of(sub, perch)
            if now_signed != last_signed:
                # a deletion goes out in a full round: the presence signed with it is what
                # members keep to refuse replays of the deleted row (registry.py, rule 6)
                plan.append((sub, None if set(last_signed) - set(now_signed) else rows))
        if not plan:
            return  # nothing to sign (and no version to spend: that is a write to disk)
        version, stamps = self._next_stamps([sub for sub, _ in plan])
        now_ms = int(time.time() * 1000)
        for (sub, perch_rows), hlc in zip(plan, stamps, strict=True):
            if perch_rows is None:
                records = self.own_records(sub, version, hlc)
            else:
                assert perch is not None  # they are that perch's rows
                records = self._rows_records(sub, perch_rows, self._advertised_of(sub, perch), version, hlc)
            self.view(sub).merge_all(records, now_ms=now_ms, signed_here=True)
            self.members.spawn(self._push_records(sub, records), "registry push")
        self._store_advertised()  # before any push leaves (they start once this returns)

    def _load_advertised(self) -> None:
        """The rows this node signed where, and those it deleted lately, as stored before a
        restart: the first publish after it tombstones them again. Views are not stored, so a
        member away while a perch was deleted (or that missed the push, the node killed just
        after) would otherwise keep its row forever. Transient senders are left out: they are
        never listed, and storing each would cost a write per anonymous send."""
        try:
            stored = json.loads(self.daemon.store.get_meta(ADVERTISED_META) or "{}")
            for sub_hex, keys in stored.get("rows", {}).items():
                by_perch = self._advertised.setdefault(bytes.fromhex(sub_hex), {})
                for home, endpoint_id in keys:
                    # an empty row: it differs from any current one, so a change re-signs it
                    by_perch.setdefault(str(endpoint_id).lower(), {})[(str(home), str(endpoint_id))] = {}
            horizon = time.time() - TOMBSTONES_KEPT
            for sub_hex, keys in stored.get("gone", {}).items():
                sub_id = bytes.fromhex(sub_hex)
                for home, endpoint_id, at in keys:
                    if float(at) > horizon:
                        self._tombstoned.setdefault(sub_id, {})[(str(home), str(endpoint_id))] = float(at)
                        self._advertised.setdefault(sub_id, {}).setdefault(
                            str(endpoint_id).lower(), {})[(str(home), str(endpoint_id))] = {}
        except (ValueError, TypeError, AttributeError):
            log.warning("the stored list of signed registry rows is unreadable; starting without it")
            self._advertised.clear()
            self._tombstoned.clear()

    def _store_advertised(self) -> None:
        """Keep what `_load_advertised` reads, when it moved (a perch shown, hidden or deleted)."""
        if not self._advertised_moved:
            return
        rows = {
            sub_id.hex(): sorted([home, endpoint_id] for by_id in by_perch.values() for home, endpoint_id in by_id
                                 if not endpoint_id.startswith(TRANSIENT_PREFIX))
            for sub_id, by_perch in self._advertised.items()
        }
        gone = {
            sub_id.hex(): sorted([home, endpoint_id, at] for (home, endpoint_id), at in keys.items())
            for sub_id, keys in self._tombstoned.items()
        }
        with self.daemon.store.transaction():
            self.daemon.store.set_meta(ADVERTISED_META, json.dumps({"rows": rows, "gone": gone}))
        self._advertised_moved = False

    def _advertised_of(self, sub: HeldSubnet, perch: str) -> dict[tuple[str, str], dict[str, Any]]:
        """The rows of `perch` (any home) this node last signed in `sub`."""
        return dict(self._advertised.get(sub.id, {}).get(perch.lower(), {}))

    async def announce(self, sub: HeldSubnet) -> None:
        """Sign and push this node's rows and presence in `sub` now, and wait for the pushes.

        Detach calls it after marking the subnet detached and before closing connections, so
        peers show this node `detached` at once rather than after the offline TTL (SPEC.md §4.8).
        """
        version, (hlc,) = self._next_stamps([sub])
        records = self.own_records(sub, version, hlc)
        self.view(sub).merge_all(records, now_ms=int(time.time() * 1000), signed_here=True)
        self._store_advertised()
        await self._push_records(sub, records)

    async def _push_records(self, sub: HeldSubnet, records: list[RegistryRow | Presence]) -> None:
        """Push to every connected member at once: one after another, a change took N-1 round
        trips to reach the last member, and a member that did not answer held the rest back for
        FORWARD_TIMEOUT (bench/scale.py --simulate)."""
        body = {"subnet": sub.id.hex(), "records": [r.to_dict() for r in records]}

        async def push(node: NodeId, conn: Connection) -> None:
            try:
                await conn.request("registry.push", body, timeout=FORWARD_TIMEOUT)
            except (PeerError, TimeoutError, RemoteProtocolError) as exc:
                log.debug("registry push missed a member", extra={"peer": node.short, "reason": str(exc)})

        conns = {n: self.members.transport.connection(n) for n in set(sub.state().members) - {self.daemon.key.node_id}}
        # a member without a connection gets the records by digest at its next connect
        await asyncio.gather(*(push(n, c) for n, c in conns.items() if c is not None))

    def _merge_records(self, sub: HeldSubnet, raw: Any, source: NodeId) -> None:
        if not isinstance(raw, list) or len(raw) > MAX_RECORDS:
            raise RemoteProtocolError("records", f"expected a list of at most {MAX_RECORDS} records")
        now_ms = int(time.time() * 1000)
        members = sub.state().members
        view = self.view(sub)
        for item in raw:
            record = record_from_dict(item)
            # rows are accepted only for current members of this subnet; local events after an
            # accepted row are stamped after it, whatever our own clock says (§2.10)
            if (
                record.node in members
                and view.merge(record, now_ms=now_ms) is MergeOutcome.ACCEPTED
                and isinstance(record, RegistryRow)
            ):
                self.daemon.subnets.observe(record.hlc)
        view.note_heard(source, now_ms)
        self._store_kept(sub, view)

    async def _handle_registry_push(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.members.require_member(conn, body.get("subnet"))
        self._merge_records(sub, body.get("records"), conn.peer)
        return "ok", {}

    async def _handle_registry_sync(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.members.require_member(conn, body.get("subnet"))
        view = self.view(sub)
        if "digest_hash" in body:  # a periodic round: the full exchange only when the views differ
            return "registry.records", {"records": [], "same": body["digest_hash"] == _digest_hash(view)}
        theirs = digest_from_wire(body.get("digest"))
        missing = view.missing_for(theirs)[:MAX_RECORDS]
        return "registry.records", {"records": [r.to_dict() for r in missing], "digest": digest_to_wire(view.digest())}

    async def sync(self, conn: Connection, *, periodic: bool = False) -> None:
        """Compare digests per shared subnet and exchange what each side lacks. A periodic round
        first compares a hash of the digests: a digest names every node of the subnet, so sending
        it to every member every minute grew as N² per node (bench/scale.py --simulate)."""
        for sub in self.members.shared_subnets(conn.peer):
            view = self.view(sub)
            try:
                if periodic:
                    probe = await conn.request(
                        "registry.sync", {"subnet": sub.id.hex(), "digest_hash": _digest_hash(view)},
                        timeout=FORWARD_TIMEOUT,
                    )
                    if body_map(probe.body).get("same") is True:
                        continue
                reply = await conn.request(
                    "registry.sync", {"subnet": sub.id.hex(), "digest": digest_to_wire(view.digest())},
                    timeout=FORWARD_TIMEOUT,
                )
            except (PeerError, TimeoutError) as exc:  # e.g. the peer detached this one subnet
                log.info("registry sync skipped a subnet", extra={"subnet": sub.name, "reason": str(exc)})
                continue
            body = body_map(reply.body)
            self._merge_records(sub, body.get("records"), conn.peer)
            lacking = view.missing_for(digest_from_wire(body.get("digest")))[:MAX_RECORDS]
            if lacking:
                await conn.request(
                    "registry.push", {"subnet": sub.id.hex(), "records": [r.to_dict() for r in lacking]},
                    timeout=FORWARD_TIMEOUT,
                )
        self.retry_now(conn.peer)  # queued traffic goes now, not after its backoff

    def retry_now(self, node: NodeId) -> None:
        """A path to `node` appeared, or the one in use closed (messages in flight on it were
        queued): forward its queued messages now, not after their backoff or the next tick."""
        self.endpoints.retry_node_now(node)
        self._drain_wake.set()

    def wake_drain(self) -> None:
        """Look at the outgoing spool now (what is due goes; backoffs are kept)."""
        self._drain_wake.set()

    async def _presence_loop(self) -> None:
        interval = self.daemon.config.presence_interval
        every = max(1, round(ANTI_ENTROPY_SECONDS / interval))  # digest rounds, in presence ticks
        tick = 0
        while True:
            try:
                self.publish()
                tick += 1
                if tick % every == 0:  # §4.5: digests are compared every 60 s, not only on connect
                    for conn in self.members.transport.connections():
                        if conn.alpn == ALPN_MEMBER and self.members.shared_subnets(conn.peer):
                            self.members.spawn(self.sync(conn, periodic=True), "registry anti-entropy")
            except Exception:
                log.exception("publishing presence failed")
            await asyncio.sleep(interval)

    def membership_changed(self, sub: HeldSubnet) -> None:
        view = self.views.get(sub.id)
        if view is None:
            return
        members = sub.state().members
        for node in view.nodes() - set(members):
            view.remove_node(node)
        stored = self.daemon.store.query("SELECT node FROM registry_presence WHERE subnet=?", (sub.id,))
        gone = [n for n in (NodeId(bytes(r["node"])) for r in stored) if n not in members]
        if gone:  # their kept presence goes too (the removal floor above refuses old copies)
            with self.daemon.store.transaction() as db:
                for node in gone:
                    db.execute("DELETE FROM registry_presence WHERE subnet=? AND node=?", (sub.id, node.raw))
            for node in gone:
                view.remove_node(node)

    def forget(self, sub: HeldSubnet) -> None:
        self.views.pop(sub.id, None)
        self._signed_all.discard(sub.id)
        signed, tombstoned = self._advertised.pop(sub.id, None), self._tombstoned.pop(sub.id, None)
        if signed is not None or tombstoned is not None:
            self._advertised_moved = True  # stored by the next publish

    def registry_rows(self) -> list[Row]:
        me = self.daemon.key.node_id
        rows: list[Row] = []
        for sub in self.daemon.subnets.attached():
            view = self.views.get(sub.id)
            if view is not None:
                rows.extend(r for r in view.resolve_rows() if r.node != me)
        return rows

    def offline_nodes(self) -> set[NodeId]:
        return set(self.offline_reasons())

    def offline_reasons(self) -> dict[NodeId, str]:
        """Offline nodes and why: `detached` (they announced it) or `silent` (no fresh presence)."""
        now_ms = int(time.time() * 1000)
        ttl_ms = int(self.daemon.config.offline_after * 1000)
        offline: dict[NodeId, str] = {}
        for sub in self.daemon.subnets.attached():
            view = self.views.get(sub.id)
            if view is None:
                continue
            for node in view.nodes():
                reason = view.offline_reason(node, now_ms, ttl_ms=ttl_ms)
                if reason is not None and offline.get(node) != "detached":
                    offline[node] = reason
        return offline

    def presence_of(self, sub: HeldSubnet, node: NodeId) -> Presence | None:
        view = self.views.get(sub.id)
        return view.presence(node) if view is not None else None


def _within_limits(msgs: list[OutgoingMessage]) -> list[OutgoingMessage]:
    """The longest head of `msgs` one request may carry (at least one message)."""
    size = 0
    for count, msg in enumerate(msgs):
        size += batch_wire.body_bytes(msg.payload)
        if count and (count >= batch_wire.MAX_BATCH or size > batch_wire.MAX_BATCH_BYTES):
            return msgs[:count]
    return msgs


def _refusal(exc: RequestError, payload: Mapping[str, Any]) -> Exception:
    """A member's refusal of one message, as `forward_message` raises it."""
    if exc.code in MEMBERSHIP_ERRORS:
        return exc  # a path or standing problem: the message waits in the outgoing spool
    return remote_refusal(exc, str(payload.get("to", "")))


def _digest_hash(view: RegistryView) -> str:
    """A short hash of a view's digest: equal views, equal hashes."""
    return sha256(canonical_bytes(digest_to_wire(view.digest())))[:16].hex()
