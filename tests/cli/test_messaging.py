"""Local messaging as agents use it: real daemons, real `spt` processes, one node per module.

Each test uses its own endpoint ids, so they share one daemon without seeing each other.
"""

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from spt.core.ipc import call, connect
from spt.core.proto.envelope import parse_events
from spt.testing.nodes import NodeFactory

pytestmark = pytest.mark.slow

ID_RE = re.compile(r'id="?([0-9a-f]{32})')


@pytest.fixture(scope="module")
def node():
    factory = NodeFactory()
    try:
        yield factory("m")
    finally:
        factory.close()


def send_ipc(node, address, bodies, **args):
    """Queue many messages fast: straight over the control socket, as `spt send` would."""
    tokens = []
    for body in bodies:
        conn = connect(node.home / "spt.sock")
        try:
            tokens.append(call(conn, "msg.send", {"address": address, "body": body, **args})["token"])
        finally:
            conn.close()
    return tokens


def create_perch(node, perch_id, *extra):
    result = node.cli("ready", perch_id, "--once", "--timeout", "0", *extra)
    assert result.returncode == 0 and result.stdout == "TIMEOUT\n", result.stderr


def start_listener(node, perch_id, *extra):
    proc = node.popen("ready", perch_id, *extra)
    assert proc.stderr.readline() == f"READY:{perch_id}\n"
    return proc


def bodies_of(text):
    return [e.body for e in parse_events(text.splitlines())]


def run_bytes(node, args, data):
    return subprocess.run(
        [sys.executable, "-m", "spt", *args], input=data, capture_output=True, env=node.env, timeout=60
    )


def test_send_to_a_blocked_listener_is_sent_and_printed_once(node):
    listener = start_listener(node, "bob")
    try:
        sent = node.cli("send", "bob", "--from", "alice", input='a <b> & "c"\nline two')
        assert (sent.returncode, sent.stdout) == (0, "SENT:bob\n"), sent.stderr
        assert listener.stdout.readline() == (
            '<EVENT type="msg" from="alice">a &lt;b&gt; &amp; &quot;c&quot;<br>line two</EVENT>\n'
        )
        with_json = node.cli(
            "send", "BOB", "--json-payload", '{ "k": [1, 2] }', input="x", env={"SPT_AGENT_ID": "carl"}
        )
        assert with_json.stdout == "SENT:BOB\n"
        assert (
            listener.stdout.readline()
            == '<EVENT type="msg" from="carl" json="{&quot;k&quot;:[1,2]}">x</EVENT>\n'
        )
        anonymous = node.cli("send", "bob", input="who")
        assert anonymous.stdout == "SENT:bob\n"
        assert re.fullmatch(
            r'<EVENT type="msg" from="tmp\.[0-9a-f]{8}">who</EVENT>\n', listener.stdout.readline()
        )
    finally:
        listener.send_signal(signal.SIGTERM)
        assert listener.wait(10) == 0


def test_queued_messages_drain_once_in_order_at_the_next_ready(node):
    create_perch(node, "dora")
    for i in range(3):
        queued = node.cli("send", "dora", input=f"m{i}")
        assert (queued.returncode, queued.stdout) == (0, "QUEUED:dora\n")
    first = node.cli("ready", "dora", "--once")
    assert first.returncode == 0 and first.stderr == "READY:dora\n"
    assert bodies_of(first.stdout) == ["m0", "m1", "m2"]
    again = node.cli("ready", "dora", "--once", "--timeout", "0.3")
    assert (again.returncode, again.stdout) == (0, "TIMEOUT\n")


def test_refusals_and_usage_errors(node):
    missing = node.cli("send", "nobody", input="x")
    assert missing.returncode == 1 and missing.stderr.startswith("NO_PERCH:nobody")
    assert node.cli("ready", "nobody", "--once", "--timeout", "0").returncode == 0  # its own ready creates it
    bad_address = node.cli("send", "a@b@c", input="x")
    assert bad_address.returncode == 2 and bad_address.stderr.startswith("BAD_ADDRESS:a@b@c")
    bad_json = node.cli("send", "nobody", "--json-payload", "{nope", input="x")
    assert bad_json.returncode == 2 and bad_json.stderr.startswith("BAD_JSON")
    bad_body = run_bytes(node, ["send", "nobody"], b"\xff\xfe")
    assert bad_body.returncode == 2 and bad_body.stderr.startswith(b"BAD_BODY")
    big_body = run_bytes(node, ["send", "nobody"], b"x" * (1024 * 1024 + 1))
    assert big_body.returncode == 2 and big_body.stderr.startswith(b"BAD_BODY")
    both = node.cli("send", "nobody", "--active-only", "--idle-only", input="x")
    assert both.returncode == 2
    no_identity = node.cli("ready")
    assert no_identity.returncode == 2 and no_identity.stderr.startswith("NO_IDENTITY")
    reserved = node.cli("ready", "tmp.mine", "--once", "--timeout", "0")
    assert reserved.returncode == 2 and reserved.stderr.startswith("BAD_ID:tmp.mine")
    no_subnet = node.cli("send", "work:nobody", input="x")
    assert no_subnet.returncode == 1 and no_subnet.stderr.startswith("NO_SUCH_SUBNET:work")


def test_a_large_body_arrives_as_parts_that_reassemble(node):
    create_perch(node, "large")
    body = ("0123456789abcdef<&>\n" * 10_000)[:190_000]
    assert node.cli("send", "large", input=body).stdout == "QUEUED:large\n"
    got = node.cli("ready", "large", "--once")
    lines = got.stdout.splitlines()
    assert len(lines) > 2 and all(line.startswith("<EVENT-PART seq=") for line in lines)
    assert all(len(line.encode()) <= 65_536 for line in lines)
    assert bodies_of(got.stdout) == [body]


def test_killing_the_listener_mid_stream_loses_and_duplicates_nothing(node):
    create_perch(node, "k9")
    expected = [f"k{i}:" + "x" * 1000 for i in range(300)]  # 300 KB: more than a pipe holds
    assert set(send_ipc(node, "k9", expected)) == {"QUEUED"}
    listener = start_listener(node, "k9")
    seen = [listener.stdout.readline() for _ in range(40)]
    # Stop reading: the listener blocks writing an envelope it has not acknowledged, and dies there.
    time.sleep(0.5)
    listener.kill()
    listener.wait(10)
    rest = listener.stdout.read()
    seen += [line for line in rest.splitlines(keepends=True) if line.endswith("\n")]  # drop a torn line
    again = node.cli("ready", "k9", "--once")
    got = bodies_of("".join(seen)) + bodies_of(again.stdout)
    assert len(seen) > 40 and got == expected


def test_killing_the_daemon_keeps_every_queued_message_exactly_once(node):
    create_perch(node, "durable")
    expected = [f"d{i}" for i in range(50)]
    send_ipc(node, "durable", expected)
    node.kill()  # SIGKILL
    node.start()
    got = node.cli("ready", "durable", "--once")
    assert bodies_of(got.stdout) == expected
    assert node.cli("ready", "durable", "--once", "--timeout", "0.2").stdout == "TIMEOUT\n"


def test_ring_gets_the_reply_and_the_perch_does_not(node):
    create_perch(node, "asker")
    listener = start_listener(node, "answerer")
    try:
        ring = node.popen("ring", "answerer", "--from", "asker", "--timeout", "30", stdin=subprocess.PIPE)
        ring.stdin.write("question?")
        ring.stdin.close()
        request = listener.stdout.readline()
        assert request.startswith('<EVENT type="msg" from="asker" ring="1">question?</EVENT>')
        assert ring.stderr.readline() == "SENT:answerer\n"
        reply = node.cli("send", "asker", "--from", "answerer", input="answer!")
        assert reply.stdout == "SENT:asker\n", reply.stderr
        assert ring.wait(20) == 0
        out = ring.stdout.read()
        assert re.fullmatch(
            r'<EVENT type="msg" from="answerer" reply_to="[0-9a-f]{32}">answer!</EVENT>\n', out
        )
        assert node.cli("ready", "asker", "--once", "--timeout", "0.3").stdout == "TIMEOUT\n"
        # Each ring is matched once: the next message to the asker is an ordinary one.
        assert node.cli("send", "asker", "--from", "answerer", input="later").stdout == "QUEUED:asker\n"
        later = node.cli("ready", "asker", "--once").stdout
        assert later == '<EVENT type="msg" from="answerer">later</EVENT>\n'
    finally:
        listener.send_signal(signal.SIGINT)
        assert listener.wait(10) == 0


def test_ring_without_identity_gets_a_transient_one(node):
    listener = start_listener(node, "helper")
    try:
        ring = node.popen("ring", "helper", "--timeout", "30", stdin=subprocess.PIPE)
        ring.stdin.close()
        request = listener.stdout.readline()
        sender = re.match(r'<EVENT type="msg" from="(tmp\.[0-9a-f]{8})" ring="1"></EVENT>', request).group(1)
        assert node.cli("send", sender, "--from", "helper", input="to you").stdout == f"SENT:{sender}\n"
        assert ring.wait(20) == 0
        out = ring.stdout.read()
        assert ">to you</EVENT>" in out
    finally:
        listener.terminate()
        listener.wait(10)


def test_ring_times_out_and_the_late_reply_goes_to_the_perch(node):
    create_perch(node, "waiter")
    create_perch(node, "sleeper")
    ring = node.cli("ring", "sleeper", "--from", "waiter", "--timeout", "0.5", input="anyone?")
    assert (ring.returncode, ring.stdout, ring.stderr) == (0, "TIMEOUT\n", "QUEUED:sleeper\n")
    request = node.cli("ready", "sleeper", "--once").stdout
    assert 'ring="1">anyone?</EVENT>' in request
    assert node.cli("send", "waiter", "--from", "sleeper", input="sorry, late").stdout == "QUEUED:waiter\n"
    late = node.cli("ready", "waiter", "--once").stdout
    assert re.fullmatch(
        r'<EVENT type="msg" from="sleeper" reply_to="[0-9a-f]{32}">sorry, late</EVENT>\n', late
    )


def test_active_only_is_held_while_suspended_and_released_once_on_wake(node):
    listener = start_listener(node, "worker")
    deferred = node.cli("send", "worker", "--active-only", input="a1")
    assert deferred.stdout == "QUEUED:worker\n"  # never pushed into a waiting listener
    suspended = node.cli("endpoint", "suspend", "worker")
    assert suspended.stdout == "SUSPENDED:worker\n"
    assert listener.wait(10) == 0 and listener.stderr.read() == "SUSPENDED:worker\n"
    assert listener.stdout.read() == ""
    assert node.cli("send", "worker", "--deferred", input="a2").stdout == "QUEUED:worker\n"
    assert node.cli("send", "worker", input="d3").stdout == "QUEUED:worker\n"
    resting = node.cli("ready", "worker", "--once")
    assert resting.returncode == 1 and resting.stderr.startswith("SUSPENDED:worker")
    assert node.cli("endpoint", "wake", "worker").stdout == "WOKE:worker\n"
    assert node.json("endpoint", "list")["local"][-1]["state"] == "active"
    first = node.cli("ready", "worker", "--once")
    assert bodies_of(first.stdout) == ["a1", "a2", "d3"]
    assert node.cli("endpoint", "wake", "worker").stdout == "WOKE:worker\n"  # no second release
    assert node.cli("ready", "worker", "--once", "--timeout", "0.3").stdout == "TIMEOUT\n"
    warm = node.cli("endpoint", "suspend", "--warm", "worker")
    assert warm.stdout == "DORMANT:worker\n"
    node.cli("endpoint", "wake", "worker", check=True)


def test_idle_only_waits_until_the_endpoint_is_idle(node):
    create_perch(node, "busybee")
    assert node.cli("endpoint", "state", "busybee", "busy").stdout == "STATE:busybee busy\n"
    assert node.cli("send", "busybee", "--idle-only", input="i1").stdout == "QUEUED:busybee\n"
    assert node.cli("send", "busybee", input="d1").stdout == "QUEUED:busybee\n"
    drained = node.cli("ready", "busybee", "--once")
    assert bodies_of(drained.stdout) == ["d1"]  # busy: the drain skips idle-only
    pushed = node.cli("ready", "busybee", "--once")  # blocked ready reports idle: now it is pushed
    assert bodies_of(pushed.stdout) == ["i1"]


def test_stop_ends_the_listener_and_a_second_listener_collides(node):
    listener = start_listener(node, "solo")
    second = node.cli("ready", "solo")
    assert second.returncode == 1 and second.stderr.startswith("COLLISION:solo")
    assert node.cli("endpoint", "stop", "solo").stdout == "STOPPED:solo\n"
    assert listener.wait(10) == 0 and listener.stderr.read() == "STOPPED:solo\n"
    assert node.cli("endpoint", "stop", "ghost").stderr.startswith("NO_PERCH:ghost")


def test_whoami_and_endpoint_list_json(node):
    create_perch(node, "me")
    nobody = node.json("whoami")
    assert nobody["self"] is None and set(nobody) == {"self", "subnets", "node"}
    assert set(nobody["node"]) == {"label", "key"} and len(nobody["node"]["key"]) == 64
    assert node.cli("whoami").stdout.startswith("SELF: none")
    me = json.loads(node.cli("whoami", "--json", env={"SPT_AGENT_ID": "me"}).stdout)
    assert me["self"] == {"id": "me", "status": "active", "ready": False, "alive": False}
    text = node.cli("whoami", env={"SPT_AGENT_ID": "me"}).stdout
    assert text.startswith("SELF: me  active  ready=false alive=false")
    listing = json.loads(node.cli("endpoint", "list", "--json", env={"SPT_AGENT_ID": "me"}).stdout)
    assert set(listing) >= {"self", "subnets", "local"} and listing["self"]["id"] == "me"
    assert listing["subnets"] == []  # no subnet: nothing is advertised
    row = next(p for p in listing["local"] if p["id"] == "me")
    assert set(row) >= {"id", "home", "state", "ready", "alive", "folder", "visible_in", "scope"}
    assert row["home"] is None and row["folder"].endswith("/endpoints/me")
    human = node.cli("endpoint").stdout
    assert "ENDPOINTS:0\n" in human and "This node: " in human and "  me  active" in human


def test_description_fork_and_purge(node):
    create_perch(node, "orig")
    assert node.cli("endpoint", "description", "show", "orig").stderr.startswith("NO_DESCRIPTION:orig")
    assert (
        node.cli("endpoint", "description", "set", "orig", "reviews code").stdout == "DESCRIPTION_SET:orig\n"
    )
    assert node.cli("endpoint", "description", "show", "orig").stdout == "reviews code\n"
    too_long = node.cli("endpoint", "description", "set", "orig", "x" * 1025)
    assert too_long.returncode == 2 and too_long.stderr.startswith("BAD_DESCRIPTION")
    node.cli("endpoint", "description", "set", "orig", "--clear", check=True)
    assert node.cli("endpoint", "description", "show", "orig").returncode == 1

    assert node.cli("endpoint", "fork", "orig", "copy").stdout == "FORKED:copy from=orig\n"
    local = {p["id"]: p for p in node.json("endpoint", "list")["local"]}
    assert local["copy"]["state"] == "unbound"
    assert node.cli("endpoint", "fork", "orig", "copy").stderr.startswith("COLLISION:copy")
    assert node.cli("endpoint", "fork", "nothing", "x2").stderr.startswith("NO_PERCH:nothing")
    assert node.cli("send", "copy", input="for the fork").stdout == "QUEUED:copy\n"
    assert bodies_of(node.cli("ready", "copy", "--once").stdout) == ["for the fork"]

    node.cli("send", "orig", input="dropped", check=True)
    refused = node.cli("endpoint", "purge", "orig")
    assert refused.returncode == 2  # no terminal to confirm
    purged = node.cli("endpoint", "purge", "orig", "--yes")
    assert purged.stdout == "PURGED:orig\n" and "dropped 1" in purged.stderr
    assert not (node.home / "endpoints" / "orig").exists()
    assert node.cli("send", "orig", input="x").stderr.startswith("NO_PERCH:orig")


def test_sigint_ends_ready_with_exit_0(node):
    listener = start_listener(node, "sig")
    time.sleep(0.1)
    listener.send_signal(signal.SIGINT)
    assert listener.wait(10) == 0


def test_a_listener_acks_a_restarted_daemons_copy_without_printing_it_again(capsys):
    """The daemon can die after the listener's ack left but before it recorded it; once back it
    hands the same message out again, and the listener that outlived it must not print it twice."""
    import socket

    from spt.cli._stream import Stream
    from spt.core.ipc import IpcConnection

    ours, daemons = socket.socketpair()
    stream = Stream()
    stream.conn = IpcConnection(ours)
    for msg in ("m1", "m2", "m1"):
        stream.envelope({"msg": msg, "line": f"line of {msg} a", "last": False})
        stream.envelope({"msg": msg, "line": f"line of {msg} b", "last": True})
    ours.shutdown(socket.SHUT_WR)
    daemons.settimeout(10)
    acks = [json.loads(line)["ack"] for line in daemons.makefile("rb").read().splitlines()]
    ours.close()
    daemons.close()
    assert acks == ["m1", "m2", "m1"]  # the copy is acked, so it leaves the restarted daemon's spool
    assert capsys.readouterr().out.splitlines() == ["line of m1 a", "line of m1 b", "line of m2 a", "line of m2 b"]
