"""The spool tables in memory-free isolation: a real SQLite store in a temporary folder."""

import os
import time

import pytest

from spt.core.errors import Refusal
from spt.core.identity import NodeKey
from spt.core.spool import Message, Spool
from spt.core.store import Store

NODE = NodeKey.generate().node_id
OTHER = NodeKey.generate().node_id


@pytest.fixture
def spool(tmp_path):
    store = Store(tmp_path / "spt.db")
    with store.transaction() as db:
        for perch in ("bob", "alice"):
            db.execute("INSERT INTO perches(id, state, created) VALUES(?, 'active', ?)", (perch, time.time()))
    yield Spool(store, b"k" * 32)
    store.close()


def msg(body="hi", *, sender="alice", node=NODE, **kw):
    return Message(
        id=os.urandom(16).hex(), type="msg", from_=sender, sender_node=node, sender_id=sender, body=body, **kw
    )


def append(spool, perch, m, max_bytes=10_000):
    with spool.store.transaction():
        return spool.append(perch, m, max_bytes=max_bytes, subject=perch)


def test_messages_drain_in_arrival_order_and_leave_only_when_acknowledged(spool):
    sent = [msg(f"m{i}") for i in range(5)]
    for m in sent:
        assert append(spool, "bob", m) is None
    entries = spool.entries("BOB")  # ids match without regard to case
    assert [e.message.body for e in entries] == [f"m{i}" for i in range(5)]
    assert spool.mark_delivered(entries[0]) is True
    assert spool.mark_delivered(entries[0]) is False  # a second ack never delivers twice
    assert [e.message.body for e in spool.entries("bob")] == [f"m{i}" for i in range(1, 5)]


def test_a_repeated_message_id_is_never_spooled_twice(spool):
    m = msg()
    assert append(spool, "bob", m) is None
    assert append(spool, "bob", m) == "QUEUED"
    entry = spool.entries("bob")[0]
    spool.mark_delivered(entry)
    assert append(spool, "bob", m) == "SENT"
    assert spool.entries("bob") == []


def test_spool_full_refuses_past_the_byte_limit(spool):
    assert append(spool, "bob", msg("x" * 60), max_bytes=100) is None
    with pytest.raises(Refusal) as info:
        append(spool, "bob", msg("y" * 60), max_bytes=100)
    assert info.value.status_line().startswith("SPOOL_FULL:bob")
    assert spool.held("bob") == (1, 60)



def test_a_refused_message_leaves_no_record_of_its_id_so_its_retry_is_spooled(spool):
    """The id is recorded in the statement that looks for a copy; a refusal (SPOOL_FULL, held
    back behind one) or a perch purged meanwhile must take that record back, or the sender's
    retry would be answered QUEUED and the message lost."""
    import sqlite3

    first, refused, held = msg("x" * 60), msg("y" * 60), msg("z")
    assert append(spool, "bob", first, max_bytes=100) is None
    batch: dict[str, str] = {}
    with spool.store.transaction() as db:  # as the group commit's writer runs them: each in a savepoint
        for m in (refused, held):
            db.execute("SAVEPOINT w")
            with pytest.raises(Refusal):
                spool.append("bob", m, max_bytes=100, subject="bob", db=db, held_back=batch)
            db.execute("RELEASE w")
    assert batch == {"bob": "SPOOL_FULL"}
    with spool.store.transaction() as db:
        db.execute("SAVEPOINT w")
        with pytest.raises(sqlite3.IntegrityError):
            spool.append("nobody", held, max_bytes=100, subject="nobody", db=db)  # no such perch
        db.execute("RELEASE w")
    assert spool.seen(refused.id) is None and spool.seen(held.id) is None
    spool.mark_delivered(spool.entries("bob")[0])
    assert append(spool, "bob", refused, max_bytes=100) is None
    assert append(spool, "bob", held, max_bytes=100) is None
    assert [e.message.id for e in spool.entries("bob")] == [refused.id, held.id]


def test_the_row_check_is_the_one_rows_already_on_disk_carry(spool):
    """Rows spooled by earlier versions must still verify: the check is HMAC-SHA256 over the
    compact JSON of the row's fields, under a key derived from the node's."""
    import hashlib
    import hmac
    import json

    m = msg("h\u00e9llo", attrs=(("json", '{"a":1}'),))
    fields = ["bob", m.id, m.type, m.from_, m.sender_node.hex, m.sender_id, [["json", '{"a":1}']], m.body,
              m.window, m.reply_to]
    key = hashlib.sha256(b"spt/spool/v1" + b"k" * 32).digest()
    old = hmac.new(key, json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode(), hashlib.sha256)
    assert spool._mac("BOB", m) == old.digest()


def test_the_byte_limit_follows_deliveries_and_purges_whatever_the_case(spool):
    """The held bytes are kept by triggers (not summed per arrival): an acknowledged message
    frees its bytes, a purged perch holds nothing, and ids match without regard to case."""
    assert append(spool, "bob", msg("x" * 60), max_bytes=100) is None
    assert append(spool, "BOB", msg("y" * 30), max_bytes=100) is None
    with pytest.raises(Refusal):
        append(spool, "Bob", msg("z" * 20), max_bytes=100)
    spool.mark_delivered(spool.entries("bob")[0])
    assert append(spool, "bob", msg("z" * 60), max_bytes=100) is None  # 30 + 60 fit again
    assert spool.held("bob") == (2, 90)
    with spool.store.transaction() as db:
        db.execute("DELETE FROM perches WHERE id='bob'")
        db.execute("INSERT INTO perches(id, state, created) VALUES('bob', 'active', 0)")
    assert append(spool, "bob", msg("w" * 100), max_bytes=100) is None


def test_the_spool_rebuilt_without_its_msg_id_index_keeps_rows_order_counter_and_copies_out(tmp_path, monkeypatch):
    """Migration 11 rebuilds the spool table without the UNIQUE index on msg_id (a page written
    per message): held rows keep their seq and their check, the AUTOINCREMENT counter goes on
    past delivered ones, held bytes still follow, and a copy is still refused (seen_messages)."""
    import spt.core.store as store_module

    with monkeypatch.context() as patched:
        patched.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:10])
        old = Store(tmp_path / "old.db")
        with old.transaction() as db:
            db.execute("INSERT INTO perches(id, state, created) VALUES('bob', 'active', 0)")
        before = Spool(old, b"k" * 32)
        sent = [msg(f"m{i}") for i in range(4)]
        for m in sent:
            append(before, "bob", m)
        before.mark_delivered(before.entries("bob")[-1])  # the highest seq is gone before the rebuild
        old.close()
    store = Store(tmp_path / "old.db")
    try:
        assert store.schema_version == len(store_module.MIGRATIONS) >= 11
        assert not [r for r in store.query("PRAGMA index_list(spool)") if r["unique"]]
        spool = Spool(store, b"k" * 32)
        assert [(e.seq, e.message.body) for e in spool.entries("bob")] == [(1, "m0"), (2, "m1"), (3, "m2")]
        assert spool.held("bob") == (3, 6)
        assert append(spool, "bob", sent[0]) == "QUEUED"  # a copy of a held message
        assert append(spool, "bob", sent[3]) == "SENT"  # a copy of a delivered one
        assert append(spool, "bob", msg("m4")) is None
        assert [e.seq for e in spool.entries("bob")] == [1, 2, 3, 5]  # 4 is never given out again
        assert spool.held("bob") == (4, 8)
    finally:
        store.close()


def test_group_commit_answers_each_write_after_one_shared_commit(spool):
    """Writes queued while the writer is busy share its next transaction; one that raises is
    undone alone; every caller hears only after its transaction committed (a fresh connection
    sees the row by then)."""
    import asyncio
    import sqlite3

    writer = spool.store.group_commit()

    def add(m, db):
        return spool.append("bob", m, max_bytes=200, subject="bob", db=db)

    async def main():
        sent = [msg("m" * 40) for _ in range(6)]  # the 5th and 6th do not fit in 200 bytes

        async def one(m):
            try:
                result = await writer.run(lambda db: add(m, db))
            except Refusal as exc:
                return exc.instance_token
            fresh = sqlite3.connect(spool.store.path)
            try:
                durable = fresh.execute("SELECT COUNT(*) FROM spool WHERE msg_id=?", (m.id,)).fetchone()[0]
            finally:
                fresh.close()
            return (result, durable)

        outcomes = await asyncio.gather(*(one(m) for m in sent))
        await writer.close()
        return outcomes

    outcomes = asyncio.run(main())
    assert outcomes == [(None, 1)] * 5 + ["SPOOL_FULL"]
    assert writer.writes == 6 and writer.commits <= 2  # the first alone, the rest together
    assert spool.held("bob") == (5, 200)


def test_windows_filter_what_is_handed_out(spool):

    append(spool, "bob", msg("a", window="active"))
    append(spool, "bob", msg("i", window="idle"))
    append(spool, "bob", msg("d"))
    assert [e.message.body for e in spool.entries("bob", windows=("default", "idle"))] == ["i", "d"]
    assert [e.message.body for e in spool.entries("bob", windows=("default", "active"))] == ["a", "d"]


def test_a_tampered_record_is_quarantined_not_delivered(spool):
    append(spool, "bob", msg("honest"))
    append(spool, "bob", msg("victim"))
    with spool.store.transaction() as db:
        db.execute("UPDATE spool SET body='forged' WHERE body='victim'")
    assert [e.message.body for e in spool.entries("bob")] == ["honest"]
    assert spool.store.query("SELECT quarantined FROM spool WHERE body='forged'")[0][0] == 1


def test_a_reply_claims_the_oldest_received_ring_once(spool):
    rings = [msg("q1", attrs=(("ring", "1"),)), msg("q2", attrs=(("ring", "1"),))]
    for r in rings:
        append(spool, "bob", r)
    with spool.store.transaction():
        assert spool.claim_reply("bob", NODE, "alice") is None  # not received yet
    for entry in spool.entries("bob"):
        spool.mark_delivered(entry)
    with spool.store.transaction():
        assert spool.claim_reply("bob", OTHER, "alice") is None  # another node's alice
        first = spool.claim_reply("bob", NODE, "ALICE")
        second = spool.claim_reply("bob", NODE, "alice")
        third = spool.claim_reply("bob", NODE, "alice")
    assert (first, second, third) == (rings[0].id, rings[1].id, None)
    with spool.store.transaction() as db:
        spool.mark_answered(first, False, db)  # the reply never left: the ring is answerable again
    assert spool.ring_to_answer("bob", NODE, "alice") == first
    assert spool.ring_to_answer("bob", NODE, "alice", excluding={first}) is None  # a claim on its way
    with spool.store.transaction():
        assert spool.claim_reply("bob", NODE, "alice") == first


def test_the_envelope_carries_ring_json_and_reply_to_in_order(spool):
    m = msg("body", attrs=(("ring", "1"), ("json", '{"a":1}')), reply_to="ab" * 16)
    append(spool, "bob", m)
    [line] = spool.entries("bob")[0].envelope()
    assert line == (
        '<EVENT type="msg" from="alice" ring="1" json="{&quot;a&quot;:1}" '
        f'reply_to="{"ab" * 16}">body</EVENT>'
    )


def test_the_outgoing_spool_keeps_messages_until_forwarded(spool):
    with spool.store.transaction() as db:
        db.execute(
            "INSERT INTO subnets(id, name, canonical, joined_at) VALUES(?, 'home', 'home', 0)", (b"s" * 16,)
        )
    payload = {"id": "cd" * 16, "to": "bob", "body": "hi"}
    spool.queue_outgoing(OTHER, b"s" * 16, payload)
    spool.queue_outgoing(OTHER, b"s" * 16, payload)  # idempotent per id
    [pending] = spool.pending_outgoing(OTHER)
    assert (pending.msg_id, pending.node, pending.subnet, pending.payload) == (
        "cd" * 16,
        OTHER,
        b"s" * 16,
        payload,
    )
    assert spool.pending_outgoing(NODE) == []
    spool.record_attempt(pending.msg_id, time.time() + 5)
    assert spool.pending_outgoing()[0].attempts == 1
    spool.mark_forwarded(pending.msg_id)
    assert spool.pending_outgoing() == []


def test_a_message_queued_behind_a_backoff_is_not_due_before_the_ones_it_follows(spool):
    # §4.2 step 7: the drain forwards what is due in order; a new message due at once while the
    # node's older ones wait out their backoff would overtake them
    with spool.store.transaction() as db:
        db.execute(
            "INSERT INTO subnets(id, name, canonical, joined_at) VALUES(?, 'home', 'home', 0)", (b"s" * 16,)
        )
    first, second, elsewhere = ({"id": c * 32, "to": "bob", "body": c} for c in "abc")
    spool.queue_outgoing(OTHER, b"s" * 16, first)
    spool.defer_node(OTHER, time.time() + 60)
    spool.queue_outgoing(OTHER, b"s" * 16, second)
    spool.queue_outgoing(NODE, b"s" * 16, elsewhere)  # another node's backoff is not this one's
    assert [m.msg_id for m in spool.pending_outgoing(due_before=time.time())] == ["c" * 32]
    spool.retry_node_now(OTHER)
    assert [m.msg_id for m in spool.pending_outgoing(OTHER, due_before=time.time())] == ["a" * 32, "b" * 32]


def test_a_batch_whose_commit_fails_fails_every_caller_and_the_writer_goes_on(spool):
    """A COMMIT that fails (here a deferred foreign key; on a real node an I/O error) leaves
    nothing of the batch on disk, tells every caller in it, and the next batch begins anew."""
    import asyncio
    import sqlite3

    writer = spool.store.group_commit()

    def dangling(db):  # checked only at COMMIT, which then fails with the transaction still open
        db.execute("PRAGMA defer_foreign_keys=ON")
        db.execute("INSERT INTO perch_subnets(perch, subnet, visible, in_scope) VALUES('nobody', x'00', 1, 1)")

    async def main():
        m = msg()
        first = await asyncio.gather(
            writer.run(lambda db: time.sleep(0.05)),  # holds the writer, so the next two share a batch
            writer.run(dangling), writer.run(lambda db: spool.append("bob", m, max_bytes=10_000, subject="bob", db=db)),
            return_exceptions=True,
        )
        first = first[1:]
        later = msg()
        second = await writer.run(lambda db: spool.append("bob", later, max_bytes=10_000, subject="bob", db=db))
        await writer.close()
        return first, second, later

    first, second, later = asyncio.run(main())
    assert all(isinstance(x, sqlite3.IntegrityError) for x in first), first
    assert second is None
    assert [e.message.id for e in spool.entries("bob")] == [later.id]  # m was never committed


def test_a_batch_of_writes_commits_together_and_a_refused_one_is_undone_alone(spool):
    """`GroupCommit.run_each`: the writes of a batch share one transaction, each in its own
    savepoint; one refused (SPOOL_FULL) is undone alone, and every other is durable once the
    batch is answered."""
    import asyncio
    import sqlite3

    writer = spool.store.group_commit()
    sent = [msg("m" * 80) for _ in range(3)] + [msg("n" * 10)]  # the 3rd does not fit in 200 bytes

    async def main():
        outcomes = await writer.run_each(
            [lambda db, m=m: spool.append("bob", m, max_bytes=200, subject="bob", db=db) for m in sent])
        await writer.close()
        return outcomes

    outcomes = asyncio.run(main())
    assert outcomes[:2] == [None, None] and outcomes[3] is None
    assert isinstance(outcomes[2], Refusal) and outcomes[2].instance_token == "SPOOL_FULL"
    assert writer.commits == 1
    fresh = sqlite3.connect(spool.store.path)
    try:
        held = [r[0] for r in fresh.execute("SELECT msg_id FROM spool ORDER BY seq")]
    finally:
        fresh.close()
    assert held == [sent[0].id, sent[1].id, sent[3].id]


def test_the_writer_begins_the_next_batch_without_waiting_for_the_event_loop(spool):
    """Writes queued while a commit runs go into the next transaction as soon as it committed,
    on the writer thread: a busy event loop (here blocked outright) does not hold them up; their
    callers hear once the loop runs again."""
    import asyncio
    import sqlite3
    import threading

    writer = spool.store.group_commit()
    first_running, release_first = threading.Event(), threading.Event()
    later = msg()

    def first(db):
        first_running.set()
        release_first.wait(5)

    def durable() -> bool:
        fresh = sqlite3.connect(spool.store.path)
        try:
            return fresh.execute("SELECT COUNT(*) FROM spool WHERE msg_id=?", (later.id,)).fetchone()[0] == 1
        finally:
            fresh.close()

    async def main():
        held = asyncio.ensure_future(writer.run(first))
        await asyncio.to_thread(first_running.wait, 5)
        queued = asyncio.ensure_future(
            writer.run(lambda db: spool.append("bob", later, max_bytes=10_000, subject="bob", db=db)))
        await asyncio.sleep(0)  # submitted while the first commit runs
        release_first.set()
        deadline = time.monotonic() + 5  # the loop is blocked from here until the row is on disk
        while not durable() and time.monotonic() < deadline:
            time.sleep(0.01)
        committed_while_blocked = durable()
        outcomes = await asyncio.gather(held, queued)
        await writer.close()
        return committed_while_blocked, outcomes

    committed_while_blocked, outcomes = asyncio.run(main())
    assert committed_while_blocked
    assert outcomes == [None, None] and writer.commits == 2
