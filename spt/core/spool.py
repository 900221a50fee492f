"""The durable message stores of one node: perch spools, seen ids, ring records, outgoing spool.

What lives here: `Message` (a message as it reaches a perch), `SpoolEntry` (one held message),
`OutgoingMessage`, and `Spool`, the SQL over the tables of migration 3. Every method is
synchronous and short; the daemon calls them on its loop, except calls given a connection `db`:
those the group-commit writer makes on its own thread with its own connection
(`spt.core.store.GroupCommit`).

Rules this module keeps (SPEC.md §4.2, §4.3, §8.1):
1. A message is durable before anyone is told it was queued: `append` runs inside the caller's
   transaction (which may also claim a ring reply), and the caller answers only after it commits.
2. Message ids are remembered for 30 days (`seen_messages`); a second arrival of the same id is
   never spooled again, and its answer repeats the first outcome (SENT once delivered).
3. Delivery is recorded in the same transaction that deletes the spool row (`mark_delivered`),
   so an acknowledged message is never handed out again and an unacknowledged one always is.
4. Each perch drains first-in, first-out by arrival (`seq`).
5. Every spool row carries an HMAC under a key derived from the node key; a row that fails the
   check is quarantined (kept, logged, never delivered).

What must not: sockets, listeners or timers. Who is waiting for what lives in
`spt.core.endpoints`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import sqlite3
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

from spt.core.errors import Refusal, RemoteProtocolError, UsageError
from spt.core.identity import NodeId
from spt.core.proto.body import check_body
from spt.core.proto.envelope import compact_json
from spt.core.store import Store
from spt.core.types import check_endpoint_id

log = logging.getLogger(__name__)

WINDOWS: Final = ("default", "active", "idle")
DEDUPE_SECONDS: Final = 30 * 24 * 3600
MAC_DOMAIN: Final = b"spt/spool/v1"
_HEX = frozenset("0123456789abcdef")

# While a `msg.deliver_batch` is handled: the perches (lower-case ids) it refused a message for
# with a retryable token, and that token. Its later messages for such a perch are refused the
# same way, not spooled, so they stay behind the refused one for the sender's retry (the
# batch's messages are spooled concurrently; `Spool.append` checks and fills it on the writer
# thread, in the batch's order). Set by the batch's handler, read by the task that spools.
BATCH_HELD_BACK: ContextVar[dict[str, str] | None] = ContextVar("batch_held_back", default=None)
# the row check's encoding of its fields, made once (json.dumps with options builds an encoder per call)
_MAC_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
HELD_BACK: Final = "an earlier message of the same batch for this perch was refused; this one stays behind it"


def check_message_id(value: object) -> str:
    """A message id is 128 bits as 32 lowercase hex characters (SPEC.md §2.10)."""
    if not isinstance(value, str) or len(value) != 32 or not set(value) <= _HEX:
        raise RemoteProtocolError(str(value)[:40], "a message id is 32 lowercase hex characters")
    return value


@dataclass(frozen=True, slots=True)
class Message:
    """A message as it arrives at a perch, from a local sender or forwarded by a peer.

    `from_` is the envelope's `from` attribute as rendered on this node; `sender_node` and
    `sender_id` name the sending instance, for reply matching (§4.3). `attrs` are the envelope
    attributes after `type` and `from` (`ring`, `json`), in order; `reply_to` is added last.
    """

    id: str
    type: str
    from_: str
    sender_node: NodeId
    sender_id: str
    body: str
    attrs: tuple[tuple[str, str], ...] = ()
    window: str = "default"
    reply_to: str | None = None

    @property
    def is_ring(self) -> bool:
        return dict(self.attrs).get("ring") == "1"

    @property
    def size(self) -> int:
        """What the message costs against `spool.max_bytes`: body plus attribute values."""
        return len(self.body.encode("utf-8")) + sum(len(v.encode("utf-8")) for _, v in self.attrs)

    def envelope_attrs(self) -> dict[str, str]:
        out = dict(self.attrs)
        if self.reply_to:
            out["reply_to"] = self.reply_to
        return out


def message_from_wire(payload: Mapping[str, Any], *, sender_node: NodeId, from_form: str) -> Message:
    """A message as a member forwarded it (`msg.deliver`, one payload of `msg.deliver_batch`);
    RemoteProtocolError when it is malformed. `from_form` is the `from` attribute as this node
    renders it. Pure: a fuzz target (tests/fuzz)."""
    try:
        check_endpoint_id(str(payload["to"]))
        sender_id = check_endpoint_id(str(payload["from"]))
        attrs = _check_attrs(payload.get("attrs") or ())
        window = str(payload.get("window") or "default")
        reply_to = payload.get("reply_to")
        return Message(
            id=check_message_id(payload["id"]),
            type=str(payload.get("type") or "msg"),
            from_=from_form,
            sender_node=sender_node,
            sender_id=sender_id,
            body=check_body(str(payload["body"])),
            attrs=attrs,
            window=window if window in WINDOWS else "default",
            reply_to=check_message_id(reply_to) if reply_to else None,
        )
    except (KeyError, TypeError, ValueError, UsageError) as exc:
        raise RemoteProtocolError("send", f"malformed message: {exc}") from exc


def _check_attrs(raw: Any) -> tuple[tuple[str, str], ...]:
    """Envelope attributes a peer may set on a message: `ring="1"` and a compact `json`.

    Anything else would make the envelope unrenderable at the listener (and stall the perch).
    """
    attrs: list[tuple[str, str]] = []
    for item in raw:
        key, value = (str(x) for x in item)
        if key == "ring" and value == "1":
            attrs.append((key, value))
        elif key == "json":
            attrs.append((key, compact_json(value)))
        else:
            raise ValueError(f"attribute {key!r} is not allowed on a message")
    return tuple(attrs)


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One message held for a perch; `seq` orders a perch's spool by arrival."""

    seq: int
    perch: str
    message: Message
    arrived: float

    def envelope(self) -> list[str]:
        """The `<EVENT …>` line, or the `<EVENT-PART …>` lines, to print for this entry."""
        from spt.core.proto.envelope import render_event

        msg = self.message
        return render_event(msg.type, msg.from_, msg.body, attrs=msg.envelope_attrs(), chunk_id=msg.id)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message waiting in this node's outgoing spool for a path to `node` through `subnet`."""

    seq: int
    msg_id: str
    node: NodeId
    subnet: bytes
    payload: dict[str, Any]
    created: float
    attempts: int
    next_try: float


class Spool:
    """The SQL of the spools; `mac_key` authenticates spool rows (derive it from the node key)."""

    def __init__(self, store: Store, mac_key: bytes) -> None:
        self.store = store
        self._mac_key = hashlib.sha256(MAC_DOMAIN + mac_key).digest()
        self._keyed = hmac.new(self._mac_key, digestmod=hashlib.sha256)  # copied per row: the key is set up once

    # -- incoming -------------------------------------------------------------------------

    def _mac(self, perch: str, msg: Message) -> bytes:
        fields = [
            perch.lower(),
            msg.id,
            msg.type,
            msg.from_,
            msg.sender_node.hex,
            msg.sender_id,
            [list(a) for a in msg.attrs],
            msg.body,
            msg.window,
            msg.reply_to,
        ]
        mac = self._keyed.copy()
        mac.update(_MAC_JSON.encode(fields).encode("utf-8"))
        return mac.digest()

    def seen(self, msg_id: str, db: sqlite3.Connection | None = None) -> str | None:
        """ "SENT" when the id was delivered, "QUEUED" when it is held, None when new."""
        row = (db or self.store.db).execute(
            "SELECT delivered FROM seen_messages WHERE msg_id=?", (msg_id,)
        ).fetchone()
        if row is None:
            return None
        return "SENT" if row[0] else "QUEUED"

    def append(
        self, perch: str, msg: Message, *, max_bytes: int, subject: str, db: sqlite3.Connection | None = None,
        held_back: dict[str, str] | None = None,
    ) -> str | None:
        """Hold `msg` for `perch`; returns None when new, else the earlier outcome ("SENT"/"QUEUED").

        Call inside a store transaction (the caller may claim a ring reply in the same one), and
        announce nothing before it commits. Raises Refusal SPOOL_FULL, naming `subject`, when the
        perch's held bytes would pass `max_bytes`. `db` is the connection of that transaction
        (a group commit's writer); default the store's. `held_back` is the batch's
        `BATCH_HELD_BACK`: a perch in it refuses the message with its token, and SPOOL_FULL adds it.
        """
        db = db or self.store.db
        now = time.time()
        # the id is recorded first: one statement both finds a copy and records a new message
        # (a SELECT then an INSERT before); a refusal below removes the record again
        if not db.execute(
            "INSERT OR IGNORE INTO seen_messages(msg_id, perch, delivered, time) VALUES(?,?,0,?)", (msg.id, perch, now)
        ).rowcount:
            return self.seen(msg.id, db)
        try:
            if held_back is not None and perch.lower() in held_back:
                raise Refusal(held_back[perch.lower()], subject, HELD_BACK)
            row = db.execute("SELECT bytes FROM spool_held WHERE perch=?", (perch,)).fetchone()
            held = int(row[0]) if row else 0
            if held + msg.size > max_bytes:
                if held_back is not None:
                    held_back.setdefault(perch.lower(), "SPOOL_FULL")
                raise Refusal("SPOOL_FULL", subject, f"the perch holds {held} bytes; the limit is {max_bytes}")
            db.execute(
                "INSERT INTO spool(perch, msg_id, type, sender, sender_node, sender_id, attrs, body, win, "
                "reply_to, size, arrived, mac) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    perch,
                    msg.id,
                    msg.type,
                    msg.from_,
                    msg.sender_node.raw,
                    msg.sender_id,
                    json.dumps([list(a) for a in msg.attrs]),
                    msg.body,
                    msg.window,
                    msg.reply_to,
                    msg.size,
                    now,
                    self._mac(perch, msg),
                ),
            )
        except Exception:  # refused, or the perch was purged meanwhile (its foreign key)
            db.execute("DELETE FROM seen_messages WHERE msg_id=?", (msg.id,))
            raise
        if msg.is_ring:
            db.execute(
                "INSERT OR IGNORE INTO rings_in(ring_id, recipient, sender_node, sender_id, time) "
                "VALUES(?,?,?,?,?)",
                (msg.id, perch, msg.sender_node.raw, msg.sender_id, now),
            )
        return None

    def entries(
        self, perch: str, *, windows: Iterable[str] = WINDOWS, after: int = 0, limit: int = 64
    ) -> list[SpoolEntry]:
        """Held messages of `perch` in arrival order, only the given windows, from `seq > after`.

        A row whose HMAC does not verify is quarantined here and left out.
        """
        wanted = [w for w in WINDOWS if w in set(windows)]
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        rows = self.store.query(
            f"SELECT * FROM spool WHERE perch=? AND quarantined=0 AND win IN ({marks}) AND seq>? "
            "ORDER BY seq LIMIT ?",
            (perch, *wanted, after, limit),
        )
        found: list[SpoolEntry] = []
        for row in rows:
            entry = _entry(row)
            if not hmac.compare_digest(bytes(row["mac"]), self._mac(row["perch"], entry.message)):
                log.warning(
                    "spool record failed its check; quarantined",
                    extra={"perch": row["perch"], "seq": row["seq"]},
                )
                with self.store.transaction() as db:
                    db.execute("UPDATE spool SET quarantined=1 WHERE seq=?", (row["seq"],))
                continue
            found.append(entry)
        return found

    def find_reply(self, perch: str, ring_id: str) -> SpoolEntry | None:
        """The held message for `perch` stamped `reply_to=ring_id`, if one arrived."""
        row = self.store.db.execute(
            "SELECT seq FROM spool WHERE perch=? AND reply_to=? AND quarantined=0 ORDER BY seq LIMIT 1",
            (perch, ring_id),
        ).fetchone()
        if row is None:
            return None
        found = self.entries(perch, after=int(row[0]) - 1, limit=1)
        return found[0] if found and found[0].message.reply_to == ring_id else None

    def mark_delivered(self, entry: SpoolEntry, db: sqlite3.Connection | None = None) -> bool:
        """Record the listener's acknowledgement: one transaction deletes the row and marks the id
        (the caller's, on its connection `db`, e.g. a group commit's; else one of its own).

        Returns False when the row was already gone (delivered or purged meanwhile).
        """
        if db is None:
            with self.store.transaction() as own:
                return self.mark_delivered(entry, own)
        if not db.execute("DELETE FROM spool WHERE seq=?", (entry.seq,)).rowcount:
            return False
        db.execute("UPDATE seen_messages SET delivered=1 WHERE msg_id=?", (entry.message.id,))
        if entry.message.is_ring:
            db.execute("UPDATE rings_in SET received=1 WHERE ring_id=?", (entry.message.id,))
        return True

    def held(self, perch: str) -> tuple[int, int]:
        """(count, bytes) of the messages held for `perch`."""
        row = self.store.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool WHERE perch=?", (perch,)
        ).fetchone()
        return int(row[0]), int(row[1])

    # -- ring replies (SPEC.md §4.3) ------------------------------------------------------

    def claim_reply(
        self, recipient: str, sender_node: NodeId, sender_id: str, db: sqlite3.Connection | None = None
    ) -> str | None:
        """The oldest ring from (`sender_node`, `sender_id`) that `recipient` received and has not
        answered; it is marked answered, so each ring is matched by one reply. Call inside the
        transaction that sends the reply (on its connection `db`, default the store's)."""
        db = db or self.store.db
        ring_id = self._ring_to_answer(db, recipient, sender_node, sender_id)
        if ring_id is not None:
            self.mark_answered(ring_id, True, db)
        return ring_id

    def ring_to_answer(
        self, recipient: str, sender_node: NodeId, sender_id: str, *, excluding: Collection[str] = (),
        received: Collection[str] = (),
    ) -> str | None:
        """What `claim_reply` would claim, read on the store's connection without a transaction
        and without claiming, skipping the ring ids in `excluding` (claims not yet committed) and
        taking those in `received` as received (acknowledged, their record not committed yet)."""
        return self._ring_to_answer(self.store.db, recipient, sender_node, sender_id, excluding, received)

    def mark_answered(self, ring_id: str, answered: bool, db: sqlite3.Connection) -> None:
        """Claim a ring for a reply, or release the claim when the reply never left (the target
        refused it), in the caller's transaction on `db`."""
        db.execute("UPDATE rings_in SET answered=? WHERE ring_id=?", (int(answered), ring_id))

    @staticmethod
    def _ring_to_answer(
        db: sqlite3.Connection, recipient: str, sender_node: NodeId, sender_id: str,
        excluding: Collection[str] = (), received: Collection[str] = (),
    ) -> str | None:
        rows = db.execute(
            "SELECT ring_id, received FROM rings_in WHERE recipient=? AND sender_node=? AND sender_id=? "
            "AND answered=0 ORDER BY time, rowid",
            (recipient, sender_node.raw, sender_id),
        )
        return next(
            (str(ring_id) for ring_id, was_received in rows
             if (was_received or ring_id in received) and ring_id not in excluding),
            None,
        )

    # -- outgoing (SPEC.md §4.2 step 4) ---------------------------------------------------

    def queue_outgoing(self, node: NodeId, subnet: bytes, payload: Mapping[str, Any]) -> None:
        """Hold a message for a remote node until a path exists; idempotent per message id."""
        with self.store.transaction():
            self.hold_outgoing(node, subnet, payload)

    def hold_outgoing(
        self, node: NodeId, subnet: bytes, payload: Mapping[str, Any], db: sqlite3.Connection | None = None
    ) -> None:
        """`queue_outgoing` inside the caller's transaction (e.g. a group commit's, on its `db`)."""
        msg_id = check_message_id(payload.get("id"))
        # Behind messages the node's backoff holds, a new one waits as long: due at once, it
        # would be forwarded before them (§4.2 step 7). Every message of a node shares its
        # backoff (`defer_node`), so the oldest one's is the node's.
        (db or self.store.db).execute(
            "INSERT OR IGNORE INTO outgoing(msg_id, node, subnet, payload, created, next_try) VALUES(?,?,?,?,?,"
            "COALESCE((SELECT next_try FROM outgoing WHERE node=? ORDER BY seq LIMIT 1), 0))",
            (msg_id, node.raw, subnet, json.dumps(dict(payload)), time.time(), node.raw),
        )

    def pending_outgoing(
        self, node: NodeId | None = None, *, limit: int = 100, due_before: float | None = None
    ) -> list[OutgoingMessage]:
        """Queued outgoing messages in order, all or those for `node`, or only those due by then."""
        due = float("inf") if due_before is None else due_before
        if node is None:
            rows = self.store.query(
                "SELECT * FROM outgoing WHERE next_try <= ? ORDER BY seq LIMIT ?", (due, limit)
            )
        else:
            rows = self.store.query(
                "SELECT * FROM outgoing WHERE node=? AND next_try <= ? ORDER BY seq LIMIT ?", (node.raw, due, limit)
            )
        return [
            OutgoingMessage(
                int(r["seq"]),
                str(r["msg_id"]),
                NodeId(bytes(r["node"])),
                bytes(r["subnet"]),
                json.loads(r["payload"]),
                float(r["created"]),
                int(r["attempts"]),
                float(r["next_try"]),
            )
            for r in rows
        ]

    def mark_forwarded(self, *msg_ids: str) -> None:
        """The target node answered SENT, QUEUED or NO_PERCH: the messages leave the outgoing
        spool (several in one transaction: a crash before it only makes receivers see copies,
        which they drop by id, §4.2 step 5)."""
        with self.store.transaction() as db:
            db.executemany("DELETE FROM outgoing WHERE msg_id=?", [(m,) for m in msg_ids])

    def defer_node(self, node: NodeId, next_try: float) -> None:
        """Forwarding to `node` failed: all its queued messages wait until `next_try` (epoch s),
        so they keep their order."""
        with self.store.transaction() as db:
            db.execute("UPDATE outgoing SET attempts=attempts+1, next_try=? WHERE node=?", (next_try, node.raw))

    def retry_node_now(self, node: NodeId | None) -> None:
        """A path to `node` (None: to anyone) appeared: its queued messages are due at once,
        whatever their backoff."""
        with self.store.transaction() as db:
            if node is None:
                db.execute("UPDATE outgoing SET next_try=0")
            else:
                db.execute("UPDATE outgoing SET next_try=0 WHERE node=?", (node.raw,))

    def record_attempt(self, msg_id: str, next_try: float) -> None:
        """A forwarding attempt failed; try again no earlier than `next_try` (epoch seconds)."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE outgoing SET attempts=attempts+1, next_try=? WHERE msg_id=?", (next_try, msg_id)
            )

    # -- housekeeping ---------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Forget message ids and ring records older than 30 days."""
        cutoff = now - DEDUPE_SECONDS
        with self.store.transaction() as db:
            db.execute(
                "DELETE FROM seen_messages WHERE time<? AND msg_id NOT IN (SELECT msg_id FROM spool)",
                (cutoff,),
            )
            db.execute("DELETE FROM rings_in WHERE time<?", (cutoff,))


def _entry(row: Any) -> SpoolEntry:
    attrs: Sequence[Sequence[str]] = json.loads(row["attrs"])
    msg = Message(
        id=row["msg_id"],
        type=row["type"],
        from_=row["sender"],
        sender_node=NodeId(bytes(row["sender_node"])),
        sender_id=row["sender_id"],
        body=row["body"],
        attrs=tuple((str(k), str(v)) for k, v in attrs),
        window=row["win"],
        reply_to=row["reply_to"],
    )
    return SpoolEntry(int(row["seq"]), str(row["perch"]), msg, float(row["arrived"]))
