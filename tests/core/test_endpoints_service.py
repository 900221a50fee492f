"""The endpoint service in-process, with the network layer faked on a stand-in host.

These pin the contract the network half builds on: `forward_message`, the outgoing spool,
`deliver_incoming`, `remote_request` / `Resting.handle_remote_request` and ring-reply stamping.
"""

import asyncio
import dataclasses
import sqlite3
import time

import pytest

from spt.core.config import NodeConfig
from spt.core.endpoints import Endpoints
from spt.core.errors import Refusal, UnreachableError
from spt.core.identity import NodeKey
from spt.core.paths import StatePaths
from spt.core.proto.resolve import RemoteTarget, Row
from spt.core.resting import Resting
from spt.core.store import Store
from spt.core.subnets import Subnets

FAR = NodeKey.generate().node_id


class NoProcesses:
    """Hosting with no hosted process (none of these perches is hosted)."""

    async def rest(self, perch, *, warm, grace):
        raise AssertionError(f"{perch.id} is not hosted")

    async def wake(self, perch):
        raise AssertionError(f"{perch.id} is not hosted")


class FakeDaemon:
    """The node around the endpoint service (`EndpointsHost`, `RestingHost`), with no network:
    every other node is unreachable until a test puts a network hook in."""

    def __init__(self, root):
        self.paths = StatePaths(root)
        self.paths.ensure()
        self.key = NodeKey.generate()
        self.store = Store(self.paths.db_file)
        self.config = NodeConfig()
        self.label = "here"
        self.subnets = Subnets(self)
        self.hosting = NoProcesses()
        self.endpoints = Endpoints(self)
        self.resting = Resting(self.endpoints, self)
        self.changed = []
        self.notified = []

    def on_endpoint_changed(self, perch_id):
        self.changed.append(perch_id)

    def registry_rows(self):
        return [Row(subnet="home", endpoint_id="far", home="home", node=FAR, state="active")]

    def offline_nodes(self):
        return set()

    def offline_reasons(self):
        return {}

    async def forward_message(self, target, payload):
        raise UnreachableError(target.node.key.short, "no network in this test")

    def forward_messages(self, target, payloads):
        return [asyncio.ensure_future(self.forward_message(target, p)) for p in payloads]

    def outgoing_queued(self):
        pass

    async def remote_request(self, node, subnet, kind, args):
        raise UnreachableError(node.short, "no network in this test")

    def hosted_alive(self, perch_id):
        return False

    def hosted_pid(self, perch_id):
        return None

    def notify(self, sub, kind, title, body, *, dedupe_seconds=0):
        self.notified.append(kind)
        return kind

    def fork_mind(self, source_id, new_id):
        pass


@pytest.fixture
def daemon(tmp_path):
    d = FakeDaemon(tmp_path / "n")
    d.home = d.subnets.create("home")
    d.work = d.subnets.create("work")
    yield d
    d.store.close()


async def test_a_message_its_node_cannot_take_waits_in_the_outgoing_spool(daemon):
    eps = daemon.endpoints
    token, sender = await eps.send("far", from_id="me", body="hi")
    assert (token, sender) == ("QUEUED", "me")
    [pending] = eps.pending_outgoing(FAR)
    assert pending.subnet == daemon.home.id
    assert (
        pending.payload["to"] == "far" and pending.payload["body"] == "hi" and pending.payload["from"] == "me"
    )
    eps.mark_forwarded(pending.msg_id)
    assert eps.pending_outgoing() == []


async def test_a_sender_is_the_named_perch_made_here_or_a_transient_identity_kept_an_hour(daemon):
    """What NodeRuntime.sender answers plugins (a file goes out as it), so `from` leads back."""
    eps = daemon.endpoints
    target = eps.resolve("far")
    assert eps.sender("me", target) == "me"
    assert eps.get("me").home == daemon.home.id and not eps.get("me").transient
    assert eps.sender("me", target) == "me" and len(eps.perches()) == 1  # the same perch again
    transient = eps.sender(None, target)
    perch = eps.get(transient)
    assert transient.startswith("tmp.") and perch.transient
    (expires,) = daemon.store.query("SELECT expires FROM perches WHERE id=?", (transient,))[0]
    assert expires == pytest.approx(time.time() + 3600, abs=60)


async def test_the_forwarder_answers_and_unreachable_falls_back_to_queued(daemon):
    eps = daemon.endpoints
    calls = []

    async def forward(target, payload):
        calls.append((target, payload))
        if payload["body"] == "down":
            raise UnreachableError("far", "no path")
        if payload["body"] == "gone":
            raise Refusal("NO_PERCH", "far")
        return "SENT"

    daemon.forward_message = forward
    assert await eps.send("home:far", from_id="me", body="up", json_payload='{"a": 1}') == ("SENT", "me")
    target, payload = calls[0]
    assert isinstance(target, RemoteTarget) and target.node.key == FAR and target.subnet == "home"
    assert (
        payload["attrs"] == [["json", '{"a":1}']]
        and payload["window"] == "default"
        and len(payload["id"]) == 32
    )
    assert (await eps.send("far", from_id="me", body="down"))[0] == "QUEUED"
    assert [p.payload["body"] for p in eps.pending_outgoing()] == ["down"]
    # behind a queued message, the next one queues too (no forwarder call): it must not overtake
    assert (await eps.send("far", from_id="me", body="behind"))[0] == "QUEUED"
    assert [p.payload["body"] for p in eps.pending_outgoing()] == ["down", "behind"]
    assert len(calls) == 2
    eps.mark_forwarded(*(p.msg_id for p in eps.pending_outgoing()))  # the drain took them
    with pytest.raises(Refusal) as info:
        await eps.send("home:FAR", from_id="me", body="gone")
    assert info.value.status_line().startswith("NO_PERCH:home:FAR")  # the address as typed


async def test_incoming_messages_need_a_perch_visible_in_that_subnet(daemon):
    eps = daemon.endpoints
    perch = eps._create("bob", daemon.home, "active")
    msg = {
        "id": "ab" * 16,
        "type": "msg",
        "from": "far",
        "to": "bob",
        "body": "hello",
        "attrs": [["ring", "1"]],
    }
    kwargs = {"sender_node": FAR, "from_form": "far@there"}
    assert await eps.deliver_incoming(msg, subnet="home", **kwargs) == "QUEUED"
    assert await eps.deliver_incoming(msg, subnet="home", **kwargs) == "QUEUED"  # a duplicate id
    with pytest.raises(Refusal, match="bob"):
        await eps.deliver_incoming({**msg, "id": "cd" * 16}, subnet="work", **kwargs)  # hidden there
    with pytest.raises(Refusal):
        await eps.deliver_incoming({**msg, "id": "ef" * 16, "to": "nobody"}, subnet="home", **kwargs)
    [entry] = eps.spool.entries("bob")
    assert entry.envelope() == ['<EVENT type="msg" from="far@there" ring="1">hello</EVENT>']

    # Bob received the ring; his next message to its sender is stamped as the reply.
    eps.spool.mark_delivered(entry)
    captured = []

    async def forward(target, payload):
        captured.append(payload)
        return "QUEUED"

    daemon.forward_message = forward
    await eps.send("far", from_id=perch.id, body="answer")
    await eps.send("far", from_id=perch.id, body="more")
    assert [p["reply_to"] for p in captured] == ["ab" * 16, None]


async def test_remote_suspend_goes_through_remote_request_or_is_unreachable(daemon):
    with pytest.raises(Refusal) as info:
        await daemon.resting.rest_or_wake("far", "endpoint.suspend", {"warm": False})
    assert info.value.status_line().startswith("UNREACHABLE:far")
    asked = []

    async def remote_request(node, subnet, kind, args):
        asked.append((node, subnet, kind, dict(args)))
        return {"token": "DORMANT"}

    daemon.remote_request = remote_request
    assert await daemon.resting.rest_or_wake("far", "endpoint.suspend", {"warm": True}) == "DORMANT"
    assert asked == [(FAR, "home", "endpoint.suspend", {"warm": True, "id": "far"})]


async def test_a_member_may_suspend_and_wake_a_perch_visible_to_it(daemon):
    eps = daemon.endpoints
    eps._create("bob", daemon.home, "active")
    answer = await daemon.resting.handle_remote_request("endpoint.suspend", {"id": "bob"}, subnet="home", requester=FAR)
    assert answer == {"token": "SUSPENDED"} and eps.get("bob").state == "suspended"
    with pytest.raises(Refusal):
        await daemon.resting.handle_remote_request("endpoint.wake", {"id": "bob"}, subnet="work", requester=FAR)
    assert (
        await daemon.resting.handle_remote_request("endpoint.wake", {"id": "BOB"}, subnet="HOME", requester=FAR)
    ) == {"token": "WOKE"}
    assert eps.get("bob").state == "active" and "bob" in daemon.changed


async def test_rows_this_node_advertises_follow_visibility(daemon):
    eps = daemon.endpoints
    bob = eps._create("bob", daemon.home, "active")
    assert [r["id"] for r in eps.local_rows(daemon.home)] == ["bob"] and eps.local_rows(daemon.work) == []
    eps._set_setting(bob, daemon.work, visible=True)
    assert [r["id"] for r in eps.local_rows(daemon.work)] == ["bob"]
    assert [r["id"] for r in eps.subnet_rows(daemon.home)] == ["bob", "far"]
    assert eps.homed_in(daemon.home) == ["bob"]


async def test_leaving_the_home_subnet_orphans_its_perches(daemon):
    eps = daemon.endpoints
    eps._create("bob", daemon.home, "active")
    eps._create("wendy", daemon.work, "active")
    assert eps.orphan(daemon.home) == ["bob"]
    daemon.subnets.forget(daemon.home)
    assert eps.get("bob").home is None and eps.get("wendy").home == daemon.work.id


async def test_perches_read_from_memory_follow_every_write_to_the_store(daemon):
    """Perches are read once per change of the store's connection (issue 14), so a change made
    by any statement on it, in a transaction or not, and a cascade from a subnet, is seen at once."""
    eps = daemon.endpoints
    await eps.send("far", from_id="me", body="hi")  # makes perch `me`, homed in `home`
    assert eps.get("ME") is not None and eps.get("me").busy is False
    daemon.store.db.execute("UPDATE perches SET busy=1 WHERE id='me'")  # autocommit, no transaction
    assert eps.get("me").busy is True
    await eps.send("far", from_id="ke", body="hi")
    assert eps.get("KE") is not None
    assert eps.get("\u212ae") is None  # KELVIN SIGN lower-cases to "k" in Python, not in SQLite
    with daemon.store.transaction() as db:
        db.execute("DELETE FROM subnets WHERE id=?", (daemon.home.id,))  # home set NULL by the cascade
    assert eps.get("me").home is None
    eps.purge(eps.get("me"))
    assert eps.get("me") is None and "me" not in [p.id for p in eps.perches()]


async def _control_call(op, args):
    """A control connection on a socket pair: the daemon side as a Call, the caller's streams."""
    import asyncio
    import socket

    from spt.core.daemon import Call

    ours, theirs = socket.socketpair()
    d_reader, d_writer = await asyncio.open_unix_connection(sock=theirs)
    c_reader, c_writer = await asyncio.open_unix_connection(sock=ours)
    return Call(op, args, uid=0, interactive=False, reader=d_reader, writer=d_writer), c_reader, c_writer


async def _ack_each_envelope(reader, writer):
    """The caller's side of a stream: acknowledge every envelope once its last line arrived."""
    import json

    while line := await reader.readline():
        event = json.loads(line).get("event", {})
        if event.get("last"):
            writer.write(json.dumps({"ack": event["msg"]}).encode() + b"\n")
            await writer.drain()


def _hold_the_writer(eps, seconds):
    """Keep the group-commit writer busy for `seconds`: acknowledgements queue behind it."""
    import threading

    gate = threading.Event()
    eps.commits.submit(lambda db: gate.wait(5))
    # released by a thread, not the loop: a write on the loop's connection blocks the loop
    # while the writer holds its transaction open (busy_timeout), and would hold the gate too
    threading.Timer(seconds, gate.set).start()


async def test_ready_once_answers_only_after_its_acknowledgement_committed(daemon):
    """`spt ready --once` exits on the op's answer; answered before the delivery is on disk, a
    daemon killed then would hand the message to the next `ready --once`, which prints it again."""
    import asyncio

    eps = daemon.endpoints
    eps._create("bob", daemon.home, "active")
    assert (await eps.send("bob", from_id="me", body="once only"))[0] == "QUEUED"
    call, reader, writer = await _control_call("endpoint.ready", {"id": "bob", "once": True})
    acker = asyncio.ensure_future(_ack_each_envelope(reader, writer))
    try:
        _hold_the_writer(eps, 0.5)
        result = await asyncio.wait_for(eps.ready(call), 10)
        assert result.get("delivered") == 1
        assert eps.spool.held("bob")[0] == 0, "answered while the delivery was not yet recorded"
    finally:
        acker.cancel()
        await eps.commits.close()


async def test_a_ring_answers_only_after_the_reply_it_printed_is_recorded(daemon):
    """`spt ring` exits on the op's answer: the reply must have left the sender's spool by then,
    else a daemon killed at that moment hands it to the sender's next `spt ready` too."""
    import asyncio
    import json

    eps = daemon.endpoints

    async def envelope(reader):  # the message id, once its last line arrived
        while True:
            event = json.loads(await reader.readline())["event"]
            if event.get("last"):
                return event["msg"]

    async def ack(writer, msg_id):
        writer.write(json.dumps({"ack": msg_id}).encode() + b"\n")
        await writer.drain()

    for perch in ("alice", "bob"):
        eps._create(perch, daemon.home, "active")
    bob_call, bob_reader, bob_writer = await _control_call("endpoint.ready", {"id": "bob"})
    bob = asyncio.ensure_future(eps.ready(bob_call))
    try:
        assert json.loads(await asyncio.wait_for(bob_reader.readline(), 10))["event"] == {"ready": "bob"}
        ring_call, ring_reader, ring_writer = await _control_call(
            "msg.ring", {"address": "bob", "from": "alice", "body": "ping", "timeout": 10})
        ring = asyncio.ensure_future(eps.ring(ring_call))
        await ack(bob_writer, await asyncio.wait_for(envelope(bob_reader), 10))
        assert json.loads(await ring_reader.readline())["event"]["sent"] == "SENT"
        reply = asyncio.ensure_future(eps.send("alice", from_id="bob", body="pong"))
        reply_id = await asyncio.wait_for(envelope(ring_reader), 10)
        _hold_the_writer(eps, 0.5)
        await ack(ring_writer, reply_id)
        assert (await asyncio.wait_for(ring, 10)).get("reply") is True
        assert eps.spool.held("alice")[0] == 0, "answered while the reply's delivery was not yet recorded"
        assert (await asyncio.wait_for(reply, 10))[0] == "SENT"
    finally:
        bob.cancel()
        await asyncio.gather(bob, return_exceptions=True)
        await eps.commits.close()


async def test_a_delivery_whose_record_failed_is_handed_to_the_waiting_listener_again(daemon):
    """The acknowledgement's commit failed (an I/O error, say): the message is still held, and
    a listener that is already waiting gets it again at once, not only when another arrives."""
    import asyncio
    import json

    eps = daemon.endpoints
    eps._create("bob", daemon.home, "active")
    record = eps.spool.mark_delivered
    failures = []

    def fail_once(entry, db):
        if not failures:
            failures.append(entry.message.id)
            raise sqlite3.OperationalError("disk I/O error")
        return record(entry, db)

    eps.spool.mark_delivered = fail_once
    call, reader, writer = await _control_call("endpoint.ready", {"id": "bob"})
    listener = asyncio.ensure_future(eps.ready(call))
    try:
        assert json.loads(await asyncio.wait_for(reader.readline(), 10))["event"] == {"ready": "bob"}
        sent = asyncio.ensure_future(eps.send("bob", from_id="me", body="twice if need be"))
        seen = []
        for _ in range(2):
            while True:
                event = json.loads(await asyncio.wait_for(reader.readline(), 5))["event"]
                if event.get("last"):
                    break
            seen.append(event["msg"])
            writer.write(json.dumps({"ack": event["msg"]}).encode() + b"\n")
            await writer.drain()
        assert seen == failures * 2  # the same message, handed out again after its record failed
        assert (await sent)[0] == "SENT"
        await asyncio.sleep(0.2)
        assert eps.spool.held("bob")[0] == 0  # the second record landed
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await eps.commits.close()


async def test_a_remote_reply_is_stamped_while_the_rings_acknowledgement_is_still_being_recorded(daemon):
    """The reply to another node's ring leaves without waiting for the commit that records the
    ring's acknowledgement (one fsync fewer on a ring's round trip), and is still its answer."""
    import asyncio
    import json

    eps = daemon.endpoints
    eps._create("bob", daemon.home, "active")
    ring = {"id": "ab" * 16, "type": "msg", "from": "far", "to": "bob", "body": "ping", "attrs": [["ring", "1"]]}
    assert await eps.deliver_incoming(ring, subnet="home", sender_node=FAR, from_form="far") == "QUEUED"
    captured = []

    async def forward(target, payload):
        captured.append(payload)
        return "SENT"

    daemon.forward_message = forward
    call, reader, writer = await _control_call("endpoint.ready", {"id": "bob"})
    listener = asyncio.ensure_future(eps.ready(call))
    try:
        while not json.loads(await asyncio.wait_for(reader.readline(), 10))["event"].get("last"):
            pass
        _hold_the_writer(eps, 1.5)  # the acknowledgement's record waits behind this
        writer.write(json.dumps({"ack": ring["id"]}).encode() + b"\n")
        await writer.drain()
        await asyncio.sleep(0.1)  # the ack line is read
        assert eps.spool.held("bob")[0] == 1  # not recorded yet
        start = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(eps.send("far", from_id="bob", body="pong"), 10) == ("SENT", "bob")
        assert asyncio.get_running_loop().time() - start < 1.0, "the reply waited for the record"
        assert captured[0]["reply_to"] == ring["id"]
        assert (await eps.send("far", from_id="bob", body="more"))[0] == "SENT"
        assert captured[1]["reply_to"] is None  # each ring is answered once
        for _ in range(50):  # the record, then the claim, land once the writer is free
            if eps.spool.held("bob")[0] == 0:
                break
            await asyncio.sleep(0.1)
        assert eps.spool.held("bob")[0] == 0
        assert eps.spool.ring_to_answer("bob", FAR, "far") is None  # claimed on disk too
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await eps.commits.close()


async def test_a_reply_its_ring_takes_before_the_sender_resumes_is_answered_sent(daemon):
    """A ring (or a listener) may take a message the moment its commit lands, before the task
    that spooled it resumes; that sender must still answer SENT, at once (it answered QUEUED, or
    SENT only after waiting out the 5 s for an ack that had come first)."""
    import asyncio

    eps = daemon.endpoints
    eps._create("alice", daemon.home, "active")
    run = eps.commits.run

    async def late_resume(write):  # the loop is busy elsewhere between the commit and the sender's turn
        result = await run(write)
        await asyncio.sleep(0.5)
        return result

    eps.commits.run = late_resume
    replies = []

    async def forward(target, payload):  # the ring's SENT and the far side's reply arrive together
        reply = {"id": "cd" * 16, "type": "msg", "from": "far", "to": "alice", "body": "pong", "reply_to": payload["id"]}
        replies.append(asyncio.ensure_future(
            eps.deliver_incoming(reply, subnet="home", sender_node=FAR, from_form="far")))
        await asyncio.sleep(0.1)
        return "SENT"

    daemon.forward_message = forward
    call, reader, writer = await _control_call(
        "msg.ring", {"address": "far", "from": "alice", "body": "ping", "timeout": 10})
    acker = asyncio.ensure_future(_ack_each_envelope(reader, writer))
    try:
        assert (await asyncio.wait_for(eps.ring(call), 10)).get("reply") is True
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await asyncio.wait_for(replies[0], 10) == "SENT"
        assert loop.time() - start < 2.0
    finally:
        acker.cancel()
        await eps.commits.close()


async def test_the_next_message_is_found_behind_more_in_flight_ones_than_one_read_holds(daemon):
    """`_next` reads the spool a few entries at a time (NEXT_BATCH); entries in flight (handed
    out, their ack not yet recorded) are skipped, however many there are."""
    from spt.core.delivery import NEXT_BATCH

    eps = daemon.endpoints
    eps._create("bob", daemon.home, "active")
    for i in range(2 * NEXT_BATCH + 3):
        await eps.send("bob", from_id="me", body=f"m{i}")
    held = eps.spool.entries("bob", limit=100)
    eps.delivery._in_flight.update(e.seq for e in held[: 2 * NEXT_BATCH + 1])
    assert eps.delivery._next(eps.get("bob"), drain=True).message.body == f"m{2 * NEXT_BATCH + 1}"
    eps.delivery._in_flight.update(e.seq for e in held)
    assert eps.delivery._next(eps.get("bob"), drain=True) is None


async def test_a_local_batch_keeps_a_perchs_later_messages_behind_one_refused_spool_full(daemon):
    """`send_many` to local perches: bob has room for the first message but not the second, and
    the third would fit; it is refused with the second (spooled, it would overtake it on the
    caller's retry), while a message for another perch of the batch lands."""
    daemon.config = dataclasses.replace(daemon.config, spool_max_bytes=1000)
    eps = daemon.endpoints
    for perch in ("bob", "carol"):
        eps._create(perch, daemon.home, "active")
    bodies = ["a" * 600, "b" * 600, "c" * 10]
    results, _ = await eps.send_many(
        [{"address": "bob", "body": b} for b in bodies] + [{"address": "carol", "body": "o"}], from_id="me")
    tokens = [r if isinstance(r, str) else r.instance_token for r in results]
    assert tokens == ["QUEUED", "SPOOL_FULL", "SPOOL_FULL", "QUEUED"]
    assert [e.message.body for e in eps.spool.entries("bob")] == [bodies[0]]
    assert [e.message.body for e in eps.spool.entries("carol")] == ["o"]
