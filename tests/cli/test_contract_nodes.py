"""The contract across two real nodes on loopback: `from=` leads back, detach is seen at once,
and a path learned from `--peer` says `direct static` (SPEC.md §3.4, §4.8, §7.5)."""

import importlib.util
import re
import subprocess
import time

import pytest

from spt.testing.nodes import DEFAULT_CONFIG
from spt.testing.wait import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.root]  # subnet create and join are elevated

CONFIG = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 1.0\n"


def rows(node, endpoint_id):
    doc = node.json("endpoint", "list")
    return [e for s in doc["subnets"] for e in s["endpoints"] if e["id"] == endpoint_id]


def member(node, label):
    doc = node.json("subnet", "status", "--nodes")
    return next(m for m in doc["subnets"][0]["members"] if m["label"] == label)


@pytest.fixture
def pair(spt_nodes):
    return spt_nodes.subnet(["alpha", "beta"], config=CONFIG)


def test_a_reply_to_a_from_sender_without_a_perch_is_held_for_it(pair):
    alpha, beta = pair
    bob = beta.popen("ready", "bob")
    try:
        assert bob.stderr.readline() == "READY:bob\n"
        wait_for(lambda: rows(alpha, "bob"), what="bob's row on alpha")
        # alice has no perch on alpha: the README's own example
        assert alpha.cli("send", "bob", "--from", "alice", input="hi bob").stdout == "SENT:bob\n"
        line = bob.stdout.readline()
        sender = re.search(r'from="([^"]+)"', line).group(1)
        assert sender == "alice"  # beta holds one subnet: no `home:`, and alice is unique there
        replied = beta.cli("send", sender, "--from", "bob", input="hi alice")
        assert (replied.returncode, replied.stdout) == (0, "QUEUED:alice\n"), replied.stderr
        got = alpha.cli("ready", "alice", "--once", "--timeout", "10")
        assert got.stdout == '<EVENT type="msg" from="bob">hi alice</EVENT>\n'
        # alice's perch was made for her, homed by the usual rules, not listening
        local = {p["id"]: p for p in alpha.json("endpoint", "list")["local"]}
        assert local["alice"]["home"] == "home"
    finally:
        bob.terminate()
        bob.wait(10)


def test_a_ring_from_a_new_identity_gets_its_reply(pair):
    alpha, beta = pair
    bob = beta.popen("ready", "bob")
    try:
        assert bob.stderr.readline() == "READY:bob\n"
        wait_for(lambda: rows(alpha, "bob"), what="bob's row on alpha")
        ring = alpha.popen("ring", "bob", "--from", "ghost", "--timeout", "30", stdin=subprocess.PIPE)
        ring.stdin.write("anyone?")
        ring.stdin.close()
        line = bob.stdout.readline()
        assert 'ring="1">anyone?</EVENT>' in line
        sender = re.search(r'from="([^"]+)"', line).group(1)
        answered = beta.cli("send", sender, "--from", "bob", input="here")
        assert answered.returncode == 0, answered.stderr
        out = ring.stdout.read()
        assert ring.wait(30) == 0
        assert re.fullmatch(r'<EVENT type="msg" from="bob" reply_to="[0-9a-f]{32}">here</EVENT>\n', out), out
    finally:
        bob.terminate()
        bob.wait(10)


def test_detach_is_seen_by_the_peer_within_two_seconds(pair):
    alpha, beta = pair
    beta.cli("ready", "carol", "--once", "--timeout", "0", check=True)
    wait_for(lambda: rows(alpha, "carol") and member(alpha, "beta")["online"], what="beta online on alpha")
    assert beta.cli("subnet", "detach", "home", check=True).stdout == "DETACHED:home\n"
    start = time.monotonic()
    seen = wait_for(lambda: member(alpha, "beta")["detached"] and member(alpha, "beta"), timeout=2.0,
                    what="beta detached on alpha", every=0.02)
    assert time.monotonic() - start < 2.0
    assert seen["online"] is False
    carol = rows(alpha, "carol")[0]
    assert (carol["state"], carol["offline_reason"]) == ("offline", "detached")
    human = alpha.cli("subnet", "status", "--nodes").stdout
    assert re.search(r"beta \([0-9a-f]{8}\u2026\)  detached", human), human
    assert "\u25a0 OFFLINE (detached)" in alpha.cli("endpoint", "list").stdout
    # attach: the peer sees it serving again
    assert beta.cli("subnet", "attach", "home", check=True).stdout == "ATTACHED:home\n"
    wait_for(lambda: not member(alpha, "beta")["detached"] and member(alpha, "beta")["online"], timeout=10,
             what="beta attached again")


def test_a_path_learned_from_peer_is_direct_static(pair):
    _alpha, beta = pair  # beta joined with --peer <alpha's address>
    path = wait_for(lambda: member(beta, "alpha")["path"]["kind"] != "none" and member(beta, "alpha")["path"],
                    what="a path to alpha")
    assert path["kind"] == "direct static", path


def test_doctor_covers_the_checks_of_section_7_5(pair):
    alpha, _beta = pair
    wait_for(lambda: member(alpha, "beta")["online"], what="beta online")
    doc = alpha.json("doctor")
    checks = {c["name"]: c for c in doc["checks"]}
    clock = next(c for n, c in checks.items() if n.startswith("clock beta ("))
    assert clock["level"] == "OK" and re.fullmatch(r"offset [+-]\d+\.\d\d s \(rtt \d+ ms\)", clock["detail"])
    assert checks["mdns"]["detail"].startswith("off (discovery.mdns = false)")
    assert checks["updates"]["detail"].startswith("none staged") or "no update plugin" in checks["updates"]["detail"]
    if importlib.util.find_spec("spt_relay_fallback") is not None:  # the relay plugin's own line
        assert checks["relays"]["detail"].startswith("none configured")
    else:  # the air-gapped build (scripts/airgap.sh)
        assert "relays" not in checks
    assert "inboxes" in checks or all(not n.startswith("inbox") for n in checks)
    for check in doc["checks"]:  # every line that is not OK says what to do next
        if check["level"] != "OK":
            assert any(w in check["detail"] for w in ("run", "spt ", "check", "remove", "nothing to do", "start")), check


def test_an_interactive_join_reports_which_member_it_tries_and_how(pair, spt_nodes):
    from spt.core.ipc import call, connect
    from spt.testing.nodes import fresh_code

    alpha, _beta = pair
    gamma = spt_nodes("g", label="gamma", config=CONFIG)
    events = []
    conn = connect(gamma.home / "spt.sock")
    try:
        args = {"name": "home", "code": fresh_code(alpha, "home"), "peers": [alpha.address], "timeout": 20,
                "entered_ago_ms": 0}
        result = call(conn, "subnet.join", args, interactive=True, on_event=events.append, timeout=80)
    finally:
        conn.close()
    assert result["name"] == "home"
    progress = [e["progress"] for e in events]
    assert f"trying {alpha.address} (found by peer; " in progress[0]
    assert progress[-1] == f"{alpha.address} answered; checking the code"
    # a non-interactive join (scripts, agents) stays quiet: just the token
    quiet = spt_nodes("q", label="quiet", config=CONFIG)
    joined = quiet.cli("subnet", "join", "home", "--code", fresh_code(alpha, "home"), "--peer", alpha.address)
    assert (joined.returncode, joined.stdout, joined.stderr) == (0, "JOINED:home\n", "")
