"""The replicated-records facility: one mechanism for every signed record that spreads.

Plugins declare a `spt.hooks.RecordKind` (who may receive a record, which partitions two nodes
compare); this service signs, stores (SQLite table `replicated`), pushes new records to the
kind's recipients at once, and runs digest anti-entropy with connected members on connect and
every `anti_entropy_seconds` (docs/design/replication.md).

Anti-entropy, one round with one member over one subnet:
1. `rep.digest`: the requester sends, per kind, the digest of each partition it shares with the
   peer (one 128-bit hash of the sorted ids). Identical partitions end the round here: the bytes
   exchanged do not grow with the number of records.
2. The responder answers, for partitions that it shares too and whose digests differ, its bucket
   digests (ids split by their first two hex digits).
3. `rep.reconcile`: for each differing bucket the requester sends its ids; the responder answers
   with the records the requester lacks and the ids it lacks itself, which the requester then
   pushes (`rep.push`).

Isolation: a record only travels on a member connection named for a subnet the peer is a current
member of; the receiver re-checks that standing (`require_member`), the author's signature and
the kind's `accept` before storing anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from spt.core.errors import PeerError, RemoteProtocolError
from spt.core.identity import NodeId
from spt.core.members import body_map
from spt.core.net.connections import Connection, RequestError
from spt.core.net.transport import ALPN_MEMBER
from spt.core.proto.frames import Frame, encode_frame
from spt.core.proto.replicated import (
    BUCKETS,
    SignedRecord,
    bucket_digests,
    bucket_of,
    check_digest_map,
    check_ids,
    differing_buckets,
    digest_of,
    sign_record,
)
from spt.core.subnets import HeldSubnet
from spt.hooks import RecordKind

if TYPE_CHECKING:
    from spt.core.daemon import Daemon

log = logging.getLogger(__name__)

REQUEST_TIMEOUT: Final = 15.0
MAX_PUSH_RECORDS: Final = 512  # records one push or reconcile answer carries at most
MAX_BATCH_BYTES: Final = 4 * 1024 * 1024  # and their bytes, well inside a frame (MAX_FRAME)
MAX_PARTS: Final = 4096  # partitions one digest names at most
TICK_SECONDS: Final = 5.0
MIN_SYNC_GAP: Final = 1.0  # a requested sync with one node runs at most this often


def batches(records: Sequence[SignedRecord]) -> list[list[SignedRecord]]:
    """Split records into batches of at most MAX_PUSH_RECORDS records and MAX_BATCH_BYTES."""
    out: list[list[SignedRecord]] = [[]]
    size = 0
    for r in records:
        n = len(r.raw())
        if out[-1] and (len(out[-1]) >= MAX_PUSH_RECORDS or size + n > MAX_BATCH_BYTES):
            out.append([])
            size = 0
        out[-1].append(r)
        size += n
    return [b for b in out if b]


def _hlc_key(record: SignedRecord) -> str:
    """A text key whose string order is the HLC order (wall, counter, node)."""
    return f"{record.hlc.wall_ms:016d}.{record.hlc.counter:010d}.{record.hlc.node}"


class Replication:
    """The daemon's replicated records (the `spt.hooks.Replication` surface for plugins)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.members = daemon.members
        self.kinds: dict[str, RecordKind] = {k.name: k for k in daemon.plugins.registries.record_kinds}
        self._digests: dict[tuple[str, str], str] = {}
        self._last_round: dict[tuple[str, NodeId], float] = {}  # (kind, node) -> monotonic time
        self._last_requested: dict[NodeId, float] = {}
        self._running: set[NodeId] = set()
        self.stats = {"rounds": 0, "bytes_sent": 0, "bytes_received": 0}
        override = daemon.config.section("timing").get("anti_entropy")
        self._period_override = float(override) if isinstance(override, int | float) else None
        handlers = self.members.handlers
        handlers["rep.push"] = self._handle_push
        handlers["rep.digest"] = self._handle_digest
        handlers["rep.reconcile"] = self._handle_reconcile
        daemon.op("replication.stats")(self._stats_op)

    async def _stats_op(self, call: Any) -> Any:
        """Counters of anti-entropy rounds this node started and their bytes (bench, doctor)."""
        held = self.daemon.store.query("SELECT kind, count(*) AS n FROM replicated GROUP BY kind")
        return {**self.stats, "held": {r["kind"]: r["n"] for r in held}}

    def start(self) -> None:
        self.members.spawn(self._loop(), "replication anti-entropy")

    # -- the plugin surface -------------------------------------------------------------------

    def publish(
        self, kind: str, part: str, data: Mapping[str, Any], *, record_id: str | None = None
    ) -> SignedRecord:
        import os

        impl = self.kinds.get(kind)
        if impl is None:
            raise RemoteProtocolError(kind, "no plugin declares this record kind")
        if record_id is not None and self.get(kind, record_id) is not None:
            held = self.get(kind, record_id)
            assert held is not None
            return held  # another member already raised it
        record = sign_record(
            self.daemon.key, kind=kind, record_id=record_id or os.urandom(16).hex(), part=part,
            hlc=self.daemon.subnets.stamp(), data=data,
        )
        self._store([record])
        self._merged(impl, [record])
        targets: dict[tuple[str, NodeId], list[SignedRecord]] = {}
        for subnet, node in impl.recipients(record):
            if node != self.daemon.key.node_id:
                targets.setdefault((subnet, node), []).append(record)
        for (subnet, node), records in targets.items():
            self.members.spawn(self._push(node, subnet, records), f"push {kind}")
        return record

    def records(self, kind: str, part: str | None = None) -> list[SignedRecord]:
        if part is None:
            rows = self.daemon.store.query("SELECT raw FROM replicated WHERE kind=? ORDER BY hlc, id", (kind,))
        else:
            rows = self.daemon.store.query(
                "SELECT raw FROM replicated WHERE kind=? AND part=? ORDER BY hlc, id", (kind, part)
            )
        return [self._load(r["raw"]) for r in rows]

    def get(self, kind: str, record_id: str) -> SignedRecord | None:
        rows = self.daemon.store.query("SELECT raw FROM replicated WHERE kind=? AND id=?", (kind, record_id))
        return self._load(rows[0]["raw"]) if rows else None

    def parts(self, kind: str) -> list[str]:
        rows = self.daemon.store.query("SELECT DISTINCT part FROM replicated WHERE kind=? ORDER BY part", (kind,))
        return [r["part"] for r in rows]

    def request_sync(self, node: NodeId) -> None:
        now = time.monotonic()
        if now - self._last_requested.get(node, 0.0) < MIN_SYNC_GAP:
            return
        conn = self.members.transport.connection(node)
        if conn is None or conn.alpn != ALPN_MEMBER:
            return
        self._last_requested[node] = now
        self.members.spawn(self.sync(conn), "replication sync")

    # -- storage ------------------------------------------------------------------------------

    @staticmethod
    def _load(raw: bytes) -> SignedRecord:
        import json

        return SignedRecord.from_dict(json.loads(raw))

    def _store(self, records: Sequence[SignedRecord]) -> list[SignedRecord]:
        """Insert records not held yet; returns the new ones."""
        new: list[SignedRecord] = []
        now = time.time()
        with self.daemon.store.transaction() as db:
            for r in records:
                cur = db.execute(
                    "INSERT OR IGNORE INTO replicated(kind, id, part, author, hlc, raw, received) VALUES(?,?,?,?,?,?,?)",
                    (r.kind, r.id, r.part, r.author.hex, _hlc_key(r), r.raw(), now),
                )
                if cur.rowcount:
                    new.append(r)
                    self._digests.pop((r.kind, r.part), None)
        return new

    def delete(self, kind: str, ids: Iterable[str]) -> None:
        """Drop held records (expiry); the kind refuses them if offered again."""
        ids = list(ids)
        if not ids:
            return
        with self.daemon.store.transaction() as db:
            for rid in ids:
                row = db.execute("SELECT part FROM replicated WHERE kind=? AND id=?", (kind, rid)).fetchone()
                if row is not None:
                    self._digests.pop((kind, row["part"]), None)
                    db.execute("DELETE FROM replicated WHERE kind=? AND id=?", (kind, rid))

    def _ids(self, kind: str, part: str, buckets: Iterable[str] | None = None) -> list[str]:
        rows = self.daemon.store.query("SELECT id FROM replicated WHERE kind=? AND part=?", (kind, part))
        ids = [r["id"] for r in rows]
        if buckets is not None:
            wanted = set(buckets)
            ids = [i for i in ids if bucket_of(i) in wanted]
        return ids

    def digest(self, kind: str, part: str) -> str:
        held = self._digests.get((kind, part))
        if held is None:
            held = self._digests[(kind, part)] = digest_of(self._ids(kind, part))
        return held

    def _merged(self, impl: RecordKind, records: Sequence[SignedRecord]) -> None:
        if not records:
            return
        try:
            impl.merged(records)
        except Exception:
            log.exception("a record kind failed to take new records", extra={"kind": impl.name})

    # -- receiving ----------------------------------------------------------------------------

    def _take(self, sub: HeldSubnet, raw: Any, peer: NodeId) -> int:
        """Check and store records a member sent over `sub`; returns how many were new."""
        if not isinstance(raw, list) or len(raw) > MAX_PUSH_RECORDS:
            raise RemoteProtocolError("records", f"expected a list of at most {MAX_PUSH_RECORDS} records")
        now_ms = int(time.time() * 1000)
        by_kind: dict[str, list[SignedRecord]] = {}
        for item in raw:
            record = SignedRecord.from_dict(item)
            impl = self.kinds.get(record.kind)
            if impl is None:
                continue  # a kind this node does not run (plugin absent): nothing to keep
            if not record.verify():
                raise RemoteProtocolError(record.id, "a record whose signature does not verify")
            if impl.expired(record, now_ms) or not impl.accept(record, subnet=sub.name, peer=peer):
                continue
            by_kind.setdefault(record.kind, []).append(record)
        count = 0
        for kind, records in by_kind.items():
            for r in records:
                self.daemon.subnets.observe(r.hlc)
            new = self._store(records)
            count += len(new)
            self._merged(self.kinds[kind], new)
        return count

    async def _handle_push(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.members.require_member(conn, body.get("subnet"))
        return "ok", {"new": self._take(sub, body.get("records"), conn.peer)}

    def _shared(self, sub: HeldSubnet, peer: NodeId) -> dict[str, list[str]]:
        """Kind -> partitions this node compares with `peer` over `sub`."""
        out: dict[str, list[str]] = {}
        for name, impl in self.kinds.items():
            try:
                parts = list(impl.partitions(sub.name, peer))[:MAX_PARTS]
            except Exception:
                log.exception("a record kind failed to name its partitions", extra={"kind": name})
                continue
            if parts:
                out[name] = parts
        return out

    async def _handle_digest(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.members.require_member(conn, body.get("subnet"))
        theirs = body_map(body.get("kinds"))
        mine = self._shared(sub, conn.peer)
        answer: dict[str, dict[str, dict[str, str]]] = {}
        for kind, parts in theirs.items():
            digests = check_digest_map(parts, "digest", limit=MAX_PARTS)
            common = set(mine.get(str(kind), ())) & set(digests)
            for part in sorted(common):
                if self.digest(kind, part) != digests[part]:
                    answer.setdefault(kind, {})[part] = bucket_digests(self._ids(kind, part))
        return "rep.buckets", {"kinds": answer}

    async def _handle_reconcile(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.members.require_member(conn, body.get("subnet"))
        kind, part = body.get("kind"), body.get("part")
        if not isinstance(kind, str) or not isinstance(part, str):
            raise RemoteProtocolError("rep.reconcile", "kind and part are strings")
        if part not in self._shared(sub, conn.peer).get(kind, ()):
            return "rep.records", {"records": [], "want": []}  # not shared with this peer: say nothing
        buckets = body.get("buckets")
        if not isinstance(buckets, list) or len(buckets) > BUCKETS or not all(isinstance(b, str) for b in buckets):
            raise RemoteProtocolError("buckets", "a list of bucket names")
        theirs = set(check_ids(body.get("ids"), limit=1_000_000))
        mine = set(self._ids(kind, part, buckets))
        give = sorted(mine - theirs)[:MAX_PUSH_RECORDS]
        held = [r for r in (self.get(kind, rid) for rid in give) if r is not None]
        first = batches(held)[:1]  # the rest comes in the next round
        records = [r.to_dict() for r in (first[0] if first else [])]
        return "rep.records", {"records": records, "want": sorted(theirs - mine)[:MAX_PUSH_RECORDS]}

    # -- sending ------------------------------------------------------------------------------

    async def _request(self, conn: Connection, type_name: str, body: Mapping[str, Any]) -> Frame:
        self.stats["bytes_sent"] += len(encode_frame(type_name, dict(body)))
        reply = await conn.request(type_name, dict(body), timeout=REQUEST_TIMEOUT)
        self.stats["bytes_received"] += len(encode_frame(reply.type, reply.body))
        return reply

    async def _push(self, node: NodeId, subnet: str, records: Sequence[SignedRecord]) -> None:
        sub = self.daemon.subnets.by_name(subnet)
        if sub is None or not sub.attached or not sub.state().is_member(node):
            return  # isolation: never send a subnet's records to a non-member
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                conn = await self.members.links.connect_member(node)
            for chunk in batches(records):
                await conn.request(
                    "rep.push", {"subnet": sub.id.hex(), "records": [r.to_dict() for r in chunk]},
                    timeout=REQUEST_TIMEOUT,
                )
        except (PeerError, TimeoutError, RemoteProtocolError, RequestError, OSError) as exc:
            log.debug("record push missed a member; anti-entropy catches up", extra={"peer": node.short, "reason": str(exc)})

    async def sync(self, conn: Connection, kinds: Iterable[str] | None = None) -> None:
        """One anti-entropy round with a connected member, over every shared subnet."""
        if conn.peer in self._running:
            return
        self._running.add(conn.peer)
        try:
            for sub in self.members.shared_subnets(conn.peer):
                try:
                    await self._sync_subnet(conn, sub, None if kinds is None else set(kinds))
                except (PeerError, TimeoutError, RequestError, RemoteProtocolError) as exc:
                    log.info("replication sync skipped a subnet", extra={"subnet": sub.name, "reason": str(exc)})
        finally:
            self._running.discard(conn.peer)

    async def _sync_subnet(self, conn: Connection, sub: HeldSubnet, kinds: set[str] | None) -> None:
        shared = self._shared(sub, conn.peer)
        offer = {
            kind: {part: self.digest(kind, part) for part in parts}
            for kind, parts in shared.items()
            if kinds is None or kind in kinds
        }
        if not offer:
            return
        now = time.monotonic()
        for kind in offer:
            self._last_round[(kind, conn.peer)] = now
        self.stats["rounds"] += 1
        reply = await self._request(conn, "rep.digest", {"subnet": sub.id.hex(), "kinds": offer})
        answer = body_map(body_map(reply.body).get("kinds"))
        for kind, parts in answer.items():
            if kind not in offer:
                continue
            for part, theirs_raw in body_map(parts).items():
                if part not in offer[kind]:
                    continue
                theirs = check_digest_map(theirs_raw, "buckets", limit=BUCKETS)
                buckets = differing_buckets(bucket_digests(self._ids(kind, part)), theirs)
                if buckets:
                    await self._reconcile(conn, sub, kind, part, buckets)

    async def _reconcile(self, conn: Connection, sub: HeldSubnet, kind: str, part: str, buckets: list[str]) -> None:
        body = {"subnet": sub.id.hex(), "kind": kind, "part": part, "buckets": buckets, "ids": self._ids(kind, part, buckets)}
        reply = body_map((await self._request(conn, "rep.reconcile", body)).body)
        self._take(sub, reply.get("records"), conn.peer)
        want = check_ids(reply.get("want"), limit=MAX_PUSH_RECORDS)
        records = [r for r in (self.get(kind, rid) for rid in want) if r is not None and r.part == part]
        for chunk in batches(records):
            await self._request(conn, "rep.push", {"subnet": sub.id.hex(), "records": [r.to_dict() for r in chunk]})

    async def _loop(self) -> None:
        """Periodic anti-entropy: each kind with each connected member every `anti_entropy_seconds`."""
        while True:
            await asyncio.sleep(min(TICK_SECONDS, self._period_override or TICK_SECONDS))
            try:
                self._expire()
                now = time.monotonic()
                for conn in self.members.transport.connections():
                    if conn.alpn != ALPN_MEMBER or not self.members.shared_subnets(conn.peer):
                        continue
                    due = [
                        name for name, impl in self.kinds.items()
                        if now - self._last_round.get((name, conn.peer), 0.0)
                        >= (self._period_override or impl.anti_entropy_seconds)
                    ]
                    if due:
                        self.members.spawn(self.sync(conn, due), "replication anti-entropy")
            except Exception:
                log.exception("replication round failed")

    def _expire(self) -> None:
        now_ms = int(time.time() * 1000)
        for name, impl in self.kinds.items():
            if type(impl).expired is RecordKind.expired:
                continue  # this kind never expires anything: skip the scan
            gone = [r.id for r in self.records(name) if impl.expired(r, now_ms)]
            self.delete(name, gone)

    def forget(self, sub: HeldSubnet) -> None:
        """This node left `sub`: each kind names the partitions only that subnet's members held."""
        for name, impl in self.kinds.items():
            try:
                parts = list(impl.left_subnet(sub.name))
            except Exception:
                log.exception("a record kind failed to forget a subnet", extra={"kind": name})
                continue
            with self.daemon.store.transaction() as db:
                for part in parts:
                    db.execute("DELETE FROM replicated WHERE kind=? AND part=?", (name, part))
                    self._digests.pop((name, part), None)
