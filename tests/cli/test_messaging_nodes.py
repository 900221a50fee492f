"""Messaging across real nodes in one subnet on loopback (issue 5's must-shows)."""

import contextlib
import signal
import socket
import subprocess
import threading

import pytest

from spt.core.errors import DaemonDown
from spt.core.ipc import call, connect
from spt.testing.nodes import DEFAULT_CONFIG, NodeFactory
from spt.testing.traffic import listed
from spt.testing.wait import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.root]  # creates subnets (elevated)

CONFIG = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 1.0\n"


@pytest.fixture(scope="module")
def trio():
    """One subnet of three for the tests that only add endpoints: each test names its own (bob1,
    bob2, …), so what one leaves behind (a hidden or suspended perch, rows, queued messages)
    never meets another's. A test that changes the nodes themselves makes its own."""
    factory = NodeFactory()
    try:
        yield factory.subnet(["alpha", "beta", "gamma"], config=CONFIG)
    finally:
        factory.close()


def start_listener(node, endpoint_id):
    proc = node.popen("ready", endpoint_id)
    assert proc.stderr.readline().strip() == f"READY:{endpoint_id}"
    return proc


def test_send_reaches_a_listener_on_another_node(trio):
    a, _, c = trio
    bob = start_listener(c, "bob1")
    try:
        wait_for(lambda: listed(a, "bob1"), what="bob1's row on alpha")
        sent = a.cli("send", "bob1", "--from", "alice1", input="hello <there> & you")
        assert (sent.returncode, sent.stdout) == (0, "SENT:bob1\n")
        line = bob.stdout.readline()
        assert line == '<EVENT type="msg" from="alice1">hello &lt;there&gt; &amp; you</EVENT>\n'
    finally:
        bob.terminate()
        bob.wait(10)


def test_queued_message_drains_exactly_once(trio):
    a, _, c = trio
    start_listener(c, "bob2").terminate()  # the perch exists, nobody listens
    wait_for(lambda: listed(a, "bob2"), what="bob2's row on alpha")
    queued = a.cli("send", "bob2", input="while you were out")
    assert (queued.returncode, queued.stdout) == (0, "QUEUED:bob2\n")
    first = c.cli("ready", "bob2", "--once", "--timeout", "5")
    assert first.stdout.count("while you were out") == 1
    again = c.cli("ready", "bob2", "--once", "--timeout", "1")
    assert again.stdout == "TIMEOUT\n"


def test_ring_gets_the_reply_and_a_late_reply_lands_in_the_perch(trio):
    a, _, c = trio
    bob = start_listener(c, "bob3")
    start_listener(a, "alice3").terminate()
    wait_for(lambda: listed(c, "alice3") and listed(a, "bob3"), what="rows")
    try:
        ring = a.popen("ring", "bob3", "--from", "alice3", "--timeout", "20", stdin=subprocess.PIPE)
        ring.stdin.write("are you there?")
        ring.stdin.close()
        ring.stdin = None  # communicate() must not flush it again
        assert 'ring="1">are you there?</EVENT>' in bob.stdout.readline()
        assert c.cli("send", "alice3", "--from", "bob3", input="yes").stdout == "SENT:alice3\n"
        out, err = ring.communicate(timeout=20)
        assert ring.returncode == 0 and ">yes</EVENT>" in out and "SENT:bob3" in err

        short = a.cli("ring", "bob3", "--from", "alice3", "--timeout", "1", input="quick?")
        assert (short.returncode, short.stdout) == (0, "TIMEOUT\n")
        assert "quick?" in bob.stdout.readline()
        assert c.cli("send", "alice3", "--from", "bob3", input="late answer").returncode == 0
        late = a.cli("ready", "alice3", "--once", "--timeout", "5")
        assert "late answer" in late.stdout
    finally:
        bob.terminate()
        bob.wait(10)


def test_a_reply_sent_the_moment_a_ring_is_acknowledged_answers_it(trio):
    """The acknowledgement that makes a ring answerable commits off the round trip; a reply that
    arrives before that commit landed must still be stamped as the ring's answer (SPEC §4.3)."""
    a, _, c = trio
    bob = connect(c.home / "spt.sock")
    bob.send({"v": 1, "op": "endpoint.ready", "args": {"id": "bob4"}, "interactive": False})
    assert next(bob.lines(timeout=10))["event"] == {"ready": "bob4"}
    start_listener(a, "alice4").terminate()
    wait_for(lambda: listed(c, "alice4") and listed(a, "bob4"), what="rows")
    answered = []

    def answer_each_ring() -> None:
        with contextlib.suppress(DaemonDown):  # the test's end shuts bob's connection
            answer_rings()

    def answer_rings() -> None:
        for msg in bob.lines(timeout=30):
            event = msg.get("event", {})
            if not event.get("last"):
                continue
            reply = connect(c.home / "spt.sock")  # opened first: the send follows the ack at once
            bob.send({"ack": event["msg"]})
            answered.append(call(reply, "msg.send", {"address": "alice4", "from": "bob4", "body": "pong"}))
            reply.close()

    responder = threading.Thread(target=answer_each_ring, daemon=True)
    responder.start()
    try:
        for _ in range(15):
            ring = a.ipc("msg.ring", {"address": "bob4", "from": "alice4", "body": "ping", "timeout": 10})
            assert ring.get("reply") is True, ring
        wait_for(lambda: len(answered) == 15, what="the last reply's answer")  # it may trail the ring's
        assert [r["token"] for r in answered] == ["SENT"] * 15
    finally:
        bob.sock.shutdown(socket.SHUT_RDWR)
        responder.join(10)
        bob.close()


def test_hidden_endpoint_is_neither_listed_nor_routable(trio):
    a, _, c = trio
    start_listener(c, "bob5").terminate()
    wait_for(lambda: listed(a, "bob5"), what="bob5's row")
    assert c.cli("endpoint", "visibility", "hide", "bob5", "home").stdout == "HIDDEN:bob5 home\n"
    wait_for(lambda: not listed(a, "bob5"), what="bob5's row withdrawn")
    refused = a.cli("send", "bob5", input="x")
    assert refused.returncode == 1 and refused.stderr.startswith("NO_PERCH:bob5")


def test_two_live_instances_refuse_a_bare_address_and_qualified_forms_work(trio):
    a, b, c = trio
    bob_b, bob_c = start_listener(b, "bob6"), start_listener(c, "bob6")
    try:
        wait_for(lambda: len(listed(a, "bob6")) == 2, what="both bob6 rows")
        ambiguous = a.cli("send", "bob6", input="x")
        assert ambiguous.returncode == 1
        lines = ambiguous.stderr.splitlines()
        assert lines[0] == "AMBIGUOUS:bob6 matches 2 endpoints; qualify the address"
        assert sorted(line.split()[0] for line in lines[1:]) == ["bob6@beta", "bob6@gamma"]
        assert a.cli("send", "bob6@beta", input="to beta").stdout == "SENT:bob6@beta\n"
        assert "to beta" in bob_b.stdout.readline()
        prefix = c.key[:8]
        assert a.cli("send", f"bob6@{prefix}", input="to gamma").stdout == f"SENT:bob6@{prefix}\n"
        assert "to gamma" in bob_c.stdout.readline()
    finally:
        for proc in (bob_b, bob_c):
            proc.terminate()
            proc.wait(10)


def test_a_duplicated_label_is_never_guessed_between(spt_nodes):
    a, b, c = spt_nodes.subnet(["alpha", "beta", "gamma"], config=CONFIG)  # relabelled: not the shared trio
    assert b.cli("node", "label", "set", "twin").returncode == 0
    assert c.cli("node", "label", "set", "twin").returncode == 0
    start_listener(b, "bob").terminate()
    # labels travel in presence/log; until then the old labels still resolve, so wait for the refusal
    refused = wait_for(lambda: (r := a.cli("send", "bob@twin", input="x")).returncode == 1
                       and r.stderr.startswith("AMBIGUOUS_NODE:twin") and r, what="AMBIGUOUS_NODE")
    assert len(refused.stderr.splitlines()) == 3


def test_remote_suspend_holds_active_only_messages_and_wake_releases_each_once(trio):
    a, _, c = trio
    start_listener(c, "bob7").terminate()
    wait_for(lambda: listed(a, "bob7"), what="bob7's row")
    assert a.cli("endpoint", "suspend", "bob7@gamma").stdout == "SUSPENDED:bob7@gamma\n"
    for i in range(3):
        assert a.cli("send", "bob7", "--active-only", input=f"held {i}").returncode == 0
    held = c.cli("ready", "bob7", "--once", "--timeout", "1")
    assert "held" not in held.stdout
    assert a.cli("endpoint", "wake", "bob7@gamma").stdout == "WOKE:bob7@gamma\n"
    drained = c.cli("ready", "bob7", "--once", "--timeout", "5").stdout
    assert [drained.count(f"held {i}") for i in range(3)] == [1, 1, 1]
    assert c.cli("ready", "bob7", "--once", "--timeout", "1").stdout == "TIMEOUT\n"


# kill -9 mid-stream: tests/cli/test_kill_midstream.py


def test_rows_of_a_silent_node_turn_offline_after_the_ttl_and_back(spt_nodes):
    config = CONFIG + "offline_after = 3.0\n"
    a, b = spt_nodes.subnet(["alpha", "beta"], config=config)
    start_listener(b, "bob").terminate()
    wait_for(lambda: listed(a, "bob") and listed(a, "bob")[0]["state"] == "active", what="bob active")
    b.kill(signal.SIGKILL)
    wait_for(lambda: listed(a, "bob")[0]["state"] == "offline", timeout=20, what="bob offline")
    members = a.json("subnet", "status", "--nodes")["subnets"][0]["members"]
    assert [m["online"] for m in members if m["label"] == "beta"] == [False]
    b.start()
    wait_for(lambda: listed(a, "bob")[0]["state"] == "active", timeout=30, what="bob back")


def test_a_node_without_the_ring_plugin_refuses_rings_by_name(spt_nodes):
    a, b = spt_nodes.subnet(["alpha", "beta"], config=CONFIG)
    b.stop()
    b.env["SPT_DISABLE_PLUGINS"] = "ring"
    b.start()
    start_listener(b, "bob").terminate()
    wait_for(lambda: listed(a, "bob"), what="bob's row")
    refused = a.cli("ring", "bob", "--timeout", "3", input="x")
    assert refused.returncode == 1
    assert refused.stderr.startswith("UNKNOWN_PAYLOAD_TYPE:ring")
    assert a.cli("send", "bob", input="plain send still works").stdout == "QUEUED:bob\n"


def test_messages_queued_for_an_unreachable_node_log_it_once(spt_nodes):
    a, b = spt_nodes.subnet(["alpha", "beta"])
    b.cli("ready", "sink", "--once", "--timeout", "0.1")
    wait_for(lambda: listed(a, "sink"), what="sink's row on alpha")
    b.stop()
    conn = connect(a.home / "spt.sock")
    try:
        batch = [{"address": "sink@beta", "body": f"m{i}"} for i in range(40)]
        result = call(conn, "msg.send_many", {"from": "alice", "messages": batch}, timeout=30)
    finally:
        conn.close()
    assert {r["token"] for r in result["results"]} == {"QUEUED"}
    lines = [line for line in (a.home / "daemon.log").read_text().splitlines() if "target unreachable" in line]
    assert len(lines) == 1, lines[:3]
