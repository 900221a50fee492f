"""The network half of messaging: forwarding, remote endpoint requests, the registry.

What lives here (SPEC.md §4.2–4.6):
- `forward_message`: a message for a perch on another node goes over the member connection of the
  resolution subnet; the target re-checks membership and visibility and answers SENT, QUEUED or
  NO_PERCH. Unreachable targets leave the message in the sender's outgoing spool, which
  `_drain_outgoing` forwards when a path exists, with backoff, never expiring.
- `remote_request`: suspend and wake for an instance on another node.
- Registry replication: each node signs its own rows per subnet (only where the instance is
  visible; hiding publishes a tombstone) and a presence record; changes are pushed at once,
  digests compared on connect and every 60 s; silent nodes turn offline.

Subnet isolation: a record or message for subnet S only ever travels on a member connection to a
current member of S, and rows of S never leave S's view.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from spt import __version__
from spt.core.errors import PeerError, Refusal, RemoteProtocolError
from spt.core.identity import NodeId, sha256
from spt.core.members import body_map, remote_refusal
from spt.core.net.connections import Connection, RequestError
from spt.core.net.transport import ALPN_MEMBER
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
from spt.core.spool import OutgoingMessage
from spt.core.subnets import HeldSubnet
from spt.hooks import IncomingPayload

if TYPE_CHECKING:
    from spt.core.daemon import Daemon

log = logging.getLogger(__name__)

FORWARD_TIMEOUT: Final = 10.0
ANTI_ENTROPY_SECONDS: Final = 60.0  # §4.2 step 4: no answer within 10 s means QUEUED
DRAIN_INTERVAL: Final = 1.0
DRAIN_BATCH: Final = 200
DRAIN_BATCHES: Final = 100
IDLE_RECHECK: Final = 5.0  # seconds before a node with no path or a detached subnet is looked at again
FINAL_REFUSALS: Final = ("NO_PERCH", "UNKNOWN_PAYLOAD_TYPE")  # the target will never take it
BACKOFF_MAX: Final = 600.0
FORWARDED_COMMIT: Final = 64  # forwarded messages removed from the outgoing spool per transaction
MAX_RECORDS: Final = 4096  # records one registry message carries at most


class Messaging:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.members = daemon.members
        self.endpoints = daemon.endpoints
        self.views: dict[bytes, RegistryView] = {}
        self._advertised: dict[bytes, dict[tuple[str, str], str]] = {}  # subnet -> (home, id) -> home name
        self._drain_wake = asyncio.Event()
        self.staged_release: str | None = None  # the release this node offers (a plugin sets it)
        handlers = self.members.handlers
        handlers["msg.deliver"] = self._handle_deliver
        handlers["endpoint.request"] = self._handle_endpoint_request
        handlers["registry.push"] = self._handle_registry_push
        handlers["registry.sync"] = self._handle_registry_sync

    def start(self) -> None:
        self.members.spawn(self._drain_loop(), "outgoing spool")
        self.members.spawn(self._presence_loop(), "presence")

    # -- forwarding -------------------------------------------------------------------------

    async def forward_message(self, target: RemoteTarget, payload: Mapping[str, Any]) -> str:
        """Hand a message to the target node; "SENT" or "QUEUED", or Refusal NO_PERCH."""
        sub = self.daemon.subnets.by_name(target.subnet)
        if sub is None:
            raise Refusal("NO_SUCH_SUBNET", target.subnet)
        return await self._forward(target.node.key, sub, payload)

    async def _forward(self, node: NodeId, sub: HeldSubnet, payload: Mapping[str, Any]) -> str:
        async with asyncio.timeout(FORWARD_TIMEOUT):
            conn = await self.members.connect_member(node)
            try:
                reply = await conn.request(
                    "msg.deliver", {"subnet": sub.id.hex(), "payload": dict(payload)}, timeout=FORWARD_TIMEOUT
                )
            except RequestError as exc:
                if exc.code in ("NOT_A_MEMBER", "NOT_HERE"):
                    raise  # a path or standing problem: the message waits in the outgoing spool
                raise remote_refusal(exc, str(payload.get("to", ""))) from exc
        token = body_map(reply.body).get("token")
        if token not in ("SENT", "QUEUED"):
            raise RemoteProtocolError("msg.deliver", f"unexpected answer {token!r}")
        return str(token)

    async def _handle_deliver(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.members.require_member(conn, body.get("subnet"))
        payload = body_map(body.get("payload"))
        # Messages are the `send` and `ring` payload types: their plugins handle them (a node
        # that lacks one refuses it by name), after the payload policy hook.
        attrs = payload.get("attrs") or []
        kind = "ring" if ["ring", "1"] in [list(a) for a in attrs if isinstance(a, list | tuple)] else "send"
        sender_id = str(payload.get("from", ""))
        from_form = shortest_from_form(sender_id, conn.peer, self.endpoints.snapshot(), via_subnet=sub.name)
        incoming = IncomingPayload(kind, conn.peer, sub.name, str(payload.get("to", "")), from_form, payload)
        reply = await self.daemon.payloads.handle(incoming)
        return "msg.result", {"token": reply.get("token")}

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
        """One batch; True when something was forwarded and more may be due."""
        now = time.time()
        forwarded = False
        held_back: set[NodeId] = set()  # nodes deferred in this batch: their later messages wait too
        done: list[str] = []  # forwarded, removed from the spool together (one transaction)
        try:
            for msg in self.endpoints.pending_outgoing(limit=DRAIN_BATCH, due_before=now):
                if await self._drain_one(msg, now, held_back):
                    done.append(msg.msg_id)
                    forwarded = True
                    if len(done) >= FORWARDED_COMMIT:
                        self.endpoints.mark_forwarded(*done)
                        done.clear()
        finally:
            if done:
                self.endpoints.mark_forwarded(*done)
        return forwarded

    async def _drain_one(self, msg: OutgoingMessage, now: float, held_back: set[NodeId]) -> bool:
        """Try to forward one queued message; True when the target node took it (the caller
        removes it from the spool). A node that fails is held back for the rest of the batch."""
        if msg.node in held_back:
            return False
        sub = self.daemon.subnets.held.get(msg.subnet)
        if sub is None or not sub.state().is_member(msg.node):
            # §4.8: traffic for a node that left or was pruned is dropped, and the user told;
            # it must never travel to a non-member over another subnet's connection.
            self._drop(msg.msg_id, sub, "its node is no longer a member of the subnet")
            return False
        if not sub.attached or (
            self.members.transport.connection(msg.node) is None and not await self.members.dial_addresses(msg.node)
        ):
            self.endpoints.defer_node(msg.node, now + IDLE_RECHECK)
            held_back.add(msg.node)
            return False
        try:
            await self._forward(msg.node, sub, msg.payload)
        except Refusal as exc:
            if exc.instance_token not in FINAL_REFUSALS:
                self.endpoints.defer_node(msg.node, now + min(2.0 ** min(msg.attempts, 10), BACKOFF_MAX))
                held_back.add(msg.node)
                return False
            self._drop(msg.msg_id, sub, exc.status_line())
            return False
        except (PeerError, TimeoutError, RemoteProtocolError, OSError) as exc:
            # The whole node backs off, so its messages keep their order (§4.2 step 7).
            self.endpoints.defer_node(msg.node, now + min(2.0 ** min(msg.attempts, 10), BACKOFF_MAX))
            held_back.add(msg.node)
            log.debug("queued message not forwarded yet", extra={"msg_id": msg.msg_id[:12], "reason": str(exc)})
            return False
        return True

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
            conn = await self.members.connect_member(node)
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
        return view

    def _next_version(self) -> int:
        version = int(self.daemon.store.get_meta("registry_version") or "0") + 1
        with self.daemon.store.transaction():
            self.daemon.store.set_meta("registry_version", str(version))
        return version

    def own_records(self, sub: HeldSubnet, version: int) -> list[RegistryRow | Presence]:
        """This node's signed rows in `sub` (tombstones for rows no longer visible) and presence."""
        key = self.daemon.key
        hlc = self.daemon.subnets.stamp()
        records: list[RegistryRow | Presence] = []
        current: dict[tuple[str, str], str] = {}
        for row in self.endpoints.local_rows(sub):
            home = row["home"] or ""
            current[(home, row["id"])] = home
            records.append(sign_row(
                key, subnet=sub.name, endpoint_id=row["id"], home=home, version=version, hlc=hlc,
                state=row["state"], ready=bool(row["ready"]), alive=bool(row["alive"]),
                hosted=bool(row["hosted"]), description=row["description"] or "",
            ))
        for (home, endpoint_id) in set(self._advertised.get(sub.id, {})) - set(current):
            records.append(sign_tombstone(key, subnet=sub.name, endpoint_id=endpoint_id, home=home, version=version, hlc=hlc))
        self._advertised[sub.id] = current
        records.append(sign_presence(
            key, subnet=sub.name, version=version, software_version=__version__,
            addresses=tuple(self.daemon.addresses()), relays=self.daemon.announced_relays,
            detached=not sub.attached, staged_release=self.staged_release,
            last_activity_ms=self.daemon.user_activity_ms,
        ))
        return records

    def publish(self) -> None:
        """Re-sign this node's rows everywhere and push them to connected members."""
        version = self._next_version()
        now_ms = int(time.time() * 1000)
        for sub in self.daemon.subnets.attached():
            records = self.own_records(sub, version)
            self.view(sub).merge_all(records, now_ms=now_ms)
            self.members.spawn(self._push_records(sub, records), "registry push")

    async def announce(self, sub: HeldSubnet) -> None:
        """Sign and push this node's rows and presence in `sub` now, and wait for the pushes.

        Detach calls it after marking the subnet detached and before closing connections, so
        peers show this node `detached` at once rather than after the offline TTL (SPEC.md §4.8).
        """
        records = self.own_records(sub, self._next_version())
        self.view(sub).merge_all(records, now_ms=int(time.time() * 1000))
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

    def forget(self, sub: HeldSubnet) -> None:
        self.views.pop(sub.id, None)
        self._advertised.pop(sub.id, None)

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


def _digest_hash(view: RegistryView) -> str:
    """A short hash of a view's digest: equal views, equal hashes."""
    return sha256(canonical_bytes(digest_to_wire(view.digest())))[:16].hex()
