"""Several messages per control call (`msg.send_many`) and per member request
(`msg.deliver_batch`), over real daemons (issue 14): each message is answered on its own, only
once it is durable; a copy of a batch, or a batch partly refused, neither duplicates nor loses
a message; an oversize or malformed batch from a peer is refused whole with the reason."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from spt.core.errors import SptError
from spt.core.identity import NodeId, NodeKey
from spt.core.net.transport import AllowKeys, RequestError, Transport
from spt.core.proto.deliver import BATCH_TYPE, MAX_BATCH
from spt.testing.nodes import DEFAULT_CONFIG, installed_plugin
from spt.testing.traffic import Listener, check_stream, drain, listed
from spt.testing.wait import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.root]  # creates subnets (elevated)


def _tokens(result):
    return [r.get("token") or r["error"]["token"] for r in result["results"]]


def backlog_past_a_full_sink(alpha, beta) -> None:
    """Queued on alpha while beta is down: a, b, c for beta's sink, which holds 1,000 bytes (a,
    then b would not fit, c would), and o for its other perch. Once beta is back, o lands, and the
    sink gets all three in order as it is read: c is refused with b, never spooled ahead of it."""
    beta.stop()
    bodies = ["a" * 600, "b" * 600, "c" * 10]
    messages = [{"address": "sink@beta", "body": b, "id": os.urandom(16).hex()} for b in bodies]
    messages.append({"address": "other@beta", "body": "o", "id": os.urandom(16).hex()})
    assert _tokens(alpha.ipc("msg.send_many", {"from": "alice", "messages": messages})) == ["QUEUED"] * 4
    beta.start()
    wait_for(lambda: any(r.body == "o" for r in drain(beta, "other", timeout=0.3)), 30, "the drain to reach beta")
    got: list[str] = []

    def read_sink() -> bool:
        got.extend(r.body for r in drain(beta, "sink", timeout=0.3))
        return len(got) >= 3

    wait_for(read_sink, 60, "the sink to get all three messages", every=0.2)
    assert got == bodies  # c never overtook b


def test_a_batch_of_sends_is_answered_per_message_and_each_lands_once_in_order(spt_node_pair):
    alpha, beta = spt_node_pair
    beta.cli("ready", "sink", "--once", "--timeout", "0.1", check=True)
    alpha.cli("ready", "local", "--once", "--timeout", "0.1", check=True)
    wait_for(lambda: listed(alpha, "sink"), 15, "sink's row on alpha")
    ids = [os.urandom(16).hex() for _ in range(7)]
    messages = [
        {"address": "sink@beta", "body": "b0", "id": ids[0]},
        {"address": "local", "body": "l1", "id": ids[1]},
        {"address": "nobody", "body": "x", "id": ids[2]},
        {"address": "sink@beta", "body": "b3", "id": ids[3], "json": '{"k": 1}'},
        {"address": "not an address!", "body": "x"},
        {"address": "sink@beta", "body": "b5", "id": ids[5]},
        {"address": "sink@beta", "body": "b6", "id": ids[6], "window": "sometimes"},
    ]
    want = ["QUEUED", "QUEUED", "NO_PERCH", "QUEUED", "BAD_ADDRESS", "QUEUED", "BAD_USAGE"]
    first = alpha.ipc("msg.send_many", {"from": "alice", "messages": messages})
    assert (_tokens(first), first["from"]) == (want, "alice")
    assert [r["address"] for r in first["results"]] == [m["address"] for m in messages]
    # the same batch again (a caller retrying after DAEMON_DOWN): the same answers, no copies
    assert _tokens(alpha.ipc("msg.send_many", {"from": "alice", "messages": messages})) == want
    got = drain(beta, "sink")
    assert [r.body for r in got] == ["b0", "b3", "b5"]
    assert {r.sender for r in got} == {"alice"}
    assert "json=" in got[1].attrs and "json=" not in got[0].attrs
    assert [r.body for r in drain(alpha, "local")] == ["l1"]
    for bad in ([], [{"address": "local", "body": "x"}] * (MAX_BATCH + 1), ["local"], "local"):
        with pytest.raises(SptError) as refused:
            alpha.ipc("msg.send_many", {"from": "alice", "messages": bad})
        assert refused.value.instance_token == "BAD_USAGE"


def test_a_peers_batch_is_answered_per_message_and_a_copy_or_a_bad_batch_spools_nothing_twice(spt_node_pair):
    """Speaking as alpha (a member) to beta: a batch holding a copy of one of its own messages,
    a malformed message and one for no perch; then the same batch again; then batches beta must
    refuse whole. beta holds each good message once, in the batch's order."""
    alpha, beta = spt_node_pair
    beta.cli("ready", "sink", "--once", "--timeout", "0.1", check=True)
    subnet = alpha.json("subnet", "status")["subnets"][0]["id"]
    key = NodeKey.from_private_bytes((alpha.home / "node.key").read_bytes())
    alpha.stop()  # the test speaks as alpha from here
    host, port = beta.address.rsplit(":", 1)

    def payload(body, to="sink", **extra):
        return {"id": os.urandom(16).hex(), "type": "msg", "from": "alice", "to": to, "window": "default",
                "attrs": [], "body": body, "reply_to": None, **extra}

    p0, p1, p5 = payload("p0"), payload("p1"), payload("p5")
    batch = [p0, p1, dict(p0), payload("p3", id="not-hex"), payload("p4", to="nobody"), p5]

    async def scenario():
        t = Transport(key, host="127.0.0.1", accept=AllowKeys())
        await t.start()
        try:
            conn = await t.connect(NodeId.from_hex(beta.key), [(host, int(port))], timeout=5)

            async def ask(body):
                try:
                    reply = await conn.request(BATCH_TYPE, body, timeout=10)
                except RequestError as exc:
                    return exc.code, exc.remote_message
                return reply.type, reply.body

            return [
                await ask({"subnet": subnet, "payloads": batch}),
                await ask({"subnet": subnet, "payloads": batch}),
                await ask({"subnet": subnet, "payloads": [payload("big")] * (MAX_BATCH + 1)}),
                await ask({"subnet": subnet, "payloads": "p0"}),
                await ask({"subnet": subnet, "payloads": [payload("ok"), {"body": 5}]}),
                await ask({"subnet": "ab" * 16, "payloads": [payload("other subnet")]}),
            ]
        finally:
            await t.close()

    first, again, oversize, not_a_list, malformed, stranger = asyncio.run(scenario())
    assert first[0] == "msg.results"
    answers = [r.get("token") or r["error"]["code"] for r in first[1]["results"]]
    assert answers == ["QUEUED", "QUEUED", "QUEUED", "PROTOCOL_ERROR", "NO_PERCH", "QUEUED"]
    assert again == first  # a copy of the whole batch: the same answers
    assert oversize[0] == "PROTOCOL_ERROR" and f"the limit is {MAX_BATCH}" in oversize[1]
    assert not_a_list[0] == "PROTOCOL_ERROR" and "non-empty list" in not_a_list[1]
    assert malformed[0] == "PROTOCOL_ERROR" and "string 'body'" in malformed[1]
    assert stranger[0] == "NOT_HERE"  # a subnet beta does not hold
    assert [r.body for r in drain(beta, "sink")] == ["p0", "p1", "p5"]  # nothing of the refused batches
    assert beta.proc is not None and beta.proc.poll() is None


def test_a_backlog_queued_while_the_target_was_down_drains_in_batches_in_order_once(spt_nodes):
    """300 messages queued on alpha while beta is down (in the outgoing spool) go, once beta is
    back, several per request and in order; each lands once, and alpha's spool empties."""
    alpha, beta = spt_nodes.subnet(["alpha", "beta"], config=DEFAULT_CONFIG + "\n[timing]\npresence_interval = 1.0\n")
    beta.cli("ready", "sink", "--once", "--timeout", "0.1", check=True)
    wait_for(lambda: listed(alpha, "sink"), 15, "sink's row on alpha")
    beta.stop()
    for first in range(0, 300, 100):
        messages = [{"address": "sink@beta", "body": f"q{i:05d}", "id": os.urandom(16).hex()}
                    for i in range(first, first + 100)]
        assert set(_tokens(alpha.ipc("msg.send_many", {"from": "alice", "messages": messages}))) == {"QUEUED"}
    beta.start()
    wait_for(lambda: not [c for c in alpha.json("doctor")["checks"] if c["name"] == "outgoing-spool"], 60,
             "alpha's outgoing spool to drain")
    check_stream([r.body for r in drain(beta, "sink")], "q", range(300))


def test_a_batch_to_a_live_listener_is_answered_sent_per_message_and_printed_in_order(spt_node_pair):
    """Each message of a batch for a listening perch is pushed and acknowledged in turn: the
    batch is answered SENT per message, and the listener prints each once, in order."""
    alpha, beta = spt_node_pair
    listener = Listener(beta, "sink")
    try:
        wait_for(lambda: listed(alpha, "sink"), 15, "sink's row on alpha")
        messages = [{"address": "sink@beta", "body": f"s{i:05d}", "id": os.urandom(16).hex()} for i in range(20)]
        result = alpha.ipc("msg.send_many", {"from": "alice", "messages": messages})
        assert _tokens(result) == ["SENT"] * 20
        wait_for(lambda: len(listener.bodies("s")) >= 20, 15, "the listener to print the batch")
    finally:
        listener.close()
    check_stream(listener.bodies("s"), "s", range(20))


def test_a_message_refused_spool_full_keeps_the_later_ones_of_its_batch_behind_it(spt_nodes):
    """Queued on alpha while beta is down, then drained to beta in one batch: beta's sink has room
    for the first message but not the second, and the third would fit. The third is refused with
    the second (not spooled ahead of it), a message for another perch of the batch lands, and once
    the sink is read, alpha's retry brings the second and third: the sink gets all three in order."""
    config = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 1.0\n\n[spool]\nmax_bytes = 1000\n"
    alpha, beta = spt_nodes.subnet(["alpha", "beta"], config=config)
    for perch in ("sink", "other"):
        beta.cli("ready", perch, "--once", "--timeout", "0.1", check=True)
        wait_for(lambda perch=perch: listed(alpha, perch), 15, f"{perch}'s row on alpha")
    backlog_past_a_full_sink(alpha, beta)


def test_a_node_without_the_batch_request_gets_one_request_per_message_in_order_and_spool_full_holds_the_rest(spt_nodes):
    """beta runs as a node older than `msg.deliver_batch` (`spt.testing.older`): it answers the
    batch as an unknown request. alpha falls back to one `msg.deliver` per message: a batch sent
    live lands once, in order. Then a drained backlog whose second message for the sink is refused
    SPOOL_FULL while the third would fit: the third is not sent ahead of it, and the sink gets all
    three in order once it is read (on the old code the batch never went: the answer's code was
    not recognised, so every message stayed queued; and the third overtook the second)."""
    config = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 1.0\n\n[spool]\nmax_bytes = 1000\n"
    alpha, beta = spt_nodes.subnet(["alpha", "beta"], config=config)
    beta.stop()
    beta.daemon_argv = [sys.executable, "-m", "spt.testing.older", "daemon", "run"]
    beta.start()
    for perch in ("sink", "other"):
        beta.cli("ready", perch, "--once", "--timeout", "0.1", check=True)
        wait_for(lambda perch=perch: listed(alpha, perch), 15, f"{perch}'s row on alpha")
    live = [{"address": "other@beta", "body": f"v{i}", "id": os.urandom(16).hex()} for i in range(6)]
    result = alpha.ipc("msg.send_many", {"from": "alice", "messages": live})
    assert _tokens(result) == ["QUEUED"] * 6  # durable on beta: nothing in alpha's outgoing spool
    assert not any(c["name"] == "outgoing-spool" for c in alpha.ipc("doctor")["checks"])
    assert [r.body for r in drain(beta, "other", timeout=0.3)] == [m["body"] for m in live]

    backlog_past_a_full_sink(alpha, beta)


THIRD_PARTY_SEND = '''\
"""A third party's `send` payload type with only the per-message `handle` (no `handle_batch`);
it notes each message it handles."""
import os

from spt.hooks import PayloadType, hookimpl
from spt.plugins.send import Send


class PlainSend(PayloadType):
    name = "send"
    decode = Send.decode

    @classmethod
    async def handle(cls, ctx, payload):
        with open(os.path.join(os.environ["SPT_HOME"], "handled.log"), "a") as log:
            log.write(payload.value["id"] + "\\n")
        return {"token": await ctx.deliver_message(payload)}


@hookimpl
def spt_register_payload_types(registry):
    registry.add(PlainSend)
'''


def test_a_payload_type_without_the_batch_hook_handles_each_message_of_a_batch_once_in_order(spt_nodes, tmp_path):
    """beta's `send` payload type is a third party's that has only `handle` (the built-in one is
    disabled): a batch from alpha reaches it as one `msg.deliver_batch`, which calls `handle` once
    per message (the default `handle_batch`); each message lands once, in order, and the same
    batch sent again (same ids) is answered alike and spools nothing twice."""
    site = installed_plugin(tmp_path / "site", "plainsend", {"plugin.py": THIRD_PARTY_SEND})
    alpha, beta = spt_nodes.subnet(["alpha", "beta"])
    beta.stop()
    with open(beta.home / "config.toml", "a") as config:
        config.write('\n[plugins]\ndisabled = ["send"]\n')
    beta.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    beta.start()
    beta.cli("ready", "sink", "--once", "--timeout", "0.1", check=True)
    wait_for(lambda: listed(alpha, "sink"), 15, "sink's row on alpha")
    messages = [{"address": "sink@beta", "body": f"t{i}", "id": os.urandom(16).hex()} for i in range(12)]
    for _ in range(2):
        result = alpha.ipc("msg.send_many", {"from": "alice", "messages": messages})
        assert _tokens(result) == ["QUEUED"] * 12
    assert not any(c["name"] == "outgoing-spool" for c in alpha.ipc("doctor")["checks"])
    handled = (beta.home / "handled.log").read_text().split()
    assert handled == [m["id"] for m in messages] * 2  # each copy reached the plugin's handle
    assert [r.body for r in drain(beta, "sink", timeout=0.3)] == [m["body"] for m in messages]
