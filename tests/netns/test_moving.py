"""Zero-config reach for a machine that moves (SPEC.md §7.6, issue 15), in the netns lab.

Also: a node on a network that blocks UDP reaches its subnet through the relay's TCP listener.

Laptop B joins A on A's LAN with no relay of its own (A uses a self-hosted relay on the core).
Then B's cable is moved to the LAN behind the other NAT: new address, new default route, every
NAT mapping gone. With no command on B, a message from A to `bob` on B must arrive exactly once,
and quickly: B noticed the move, learned the subnet's relay from A, registered there and
re-dialled A.
"""

from __future__ import annotations

import os
import select
import subprocess
import time

import pytest
from test_reach import NODE_PORT, logs, send_and_receive, start_listener, wait_for

from spt.testing.nodes import fresh_code

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.relay]

DELIVERY_BUDGET = 30.0  # seconds from the move to the message in B's listener (the bound)


def relay_rows(node):
    return {r["url"]: r for r in node.json("relay", "list")["relays"]}


def read_lines(proc: subprocess.Popen[str], seconds: float, *, until: str | None = None) -> list[str]:
    """What the listener prints within `seconds`, stopping early after a line holding `until`."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if until is not None and until in line:
            break
    return lines


def move_and_deliver(rl, *, marker: str) -> tuple[float, dict]:
    """Join B to A on LAN a, move B behind NAT b, send from A; seconds to delivery and A's path."""
    url = rl.start_relay()
    a = rl.node(rl.topo.a, relays=[url])
    b_host = rl.lab.add_host(rl.topo.lan_a)
    b = rl.node(b_host, relays=[])
    a.cli("subnet", "create", "home", check=True)
    joined = b.cli("subnet", "join", "home", "--code", fresh_code(a, "home"), "--peer", f"{rl.lab.addr(rl.topo.a)}:{NODE_PORT}",
                   "--timeout", "20", timeout=60)
    assert joined.returncode == 0, f"{joined.stdout}{joined.stderr}\n{logs(a, b)}"
    # B was told no relay, yet learns A's from the subnet and registers with it
    learned = wait_for(lambda: (r := relay_rows(b).get(url.split("@")[-1])) and r["reachable"] and r, 20,
                       "B to register with the subnet's relay")
    assert learned["source"] == "subnet"
    assert wait_for(lambda: (p := a.path()) and p["kind"] == "direct lan", 20, "A's LAN path to B")
    listener = start_listener(b, "bob")
    try:
        wait_for(lambda: any(e["id"] == "bob" for s in a.json("endpoint", "list")["subnets"] for e in s["endpoints"]),
                 20, "bob's row on A")
        moved_at = time.monotonic()
        new_addr = rl.lab.move_host(b_host, rl.topo.lan_b)
        assert new_addr.startswith("10.10.") and new_addr != rl.lab.addr(rl.topo.a)
        sent = a.cli("send", "bob", "--from", "alice", input=marker, timeout=30)
        assert sent.returncode == 0 and sent.stdout in ("SENT:bob\n", "QUEUED:bob\n"), sent.stderr
        got = read_lines(listener, DELIVERY_BUDGET, until=marker)
        elapsed = time.monotonic() - moved_at
        assert any(marker in line for line in got), f"nothing within {DELIVERY_BUDGET:g} s: {got}\n{logs(a, b)}"
        got += read_lines(listener, 2.0)  # anything more would be a duplicate
        assert sum(marker in line for line in got) == 1, got
    finally:
        listener.terminate()
        listener.wait(10)
    path = wait_for(lambda: (p := a.path()) and p["kind"] != "none" and p, 15, "A's path to B after the move")
    doctor = b.cli("doctor").stdout
    return elapsed, {"path": path, "doctor": doctor, "b": b, "a": a}


def test_a_laptop_moved_behind_another_nat_is_reached_through_the_subnets_relay(reach):
    rl = reach("eim", "eim")
    elapsed, seen = move_and_deliver(rl, marker="after the move 7f3a")
    path = seen["path"]
    # relayed through the subnet's relay, or already punched direct through both NATs
    assert path["kind"].startswith("relayed") or path["kind"] == "direct punched", path
    if path["kind"].startswith("relayed"):
        assert path["reason"], path  # not direct: it says why
    network = next(line for line in seen["doctor"].splitlines() if " network:" in line)
    assert "last change" in network and "re-dialled" in network and "re-registering" in network, network
    print(f"move -> delivered: {elapsed:.2f} s via {path['kind']}")
    assert elapsed < DELIVERY_BUDGET


def test_a_node_on_a_network_that_blocks_udp_reaches_the_subnet_through_the_relays_tcp_listener(reach, tmp_path):
    rl = reach("eim", "eim")
    rl.lab.run(rl.topo.nat_b, ["iptables", "-I", "FORWARD", "-i", "lan", "-p", "udp", "-j", "DROP"])
    url = rl.start_relay("--tcp-listen", f"{rl.topo.relay_addr}:47472")
    assert "?tcp=47472#" in url  # the URL names the TCP listener: UDP-blocked nodes need it up front
    a = rl.node(rl.topo.a, relays=[url])
    b = rl.node(rl.topo.b, relays=[url])
    relay = wait_for(lambda: (r := b.json("relay", "list")["relays"]) and r[0]["reachable"] and r[0], 30,
                     "B to register with the relay over TCP")
    assert relay["via"] == "tcp" and relay["mapping"] == "udp-blocked", relay
    assert a.json("relay", "list")["relays"][0]["via"] == "udp"
    a.cli("subnet", "create", "home", check=True)
    joined = b.cli("subnet", "join", "home", "--code", fresh_code(a, "home", margin=6), "--timeout", "20", timeout=60)
    assert joined.returncode == 0, f"{joined.stdout}{joined.stderr}\n{logs(a, b)}"  # by rendezvous, no --peer
    send_and_receive(a, b, "bob", "over the tunnel, to b")
    send_and_receive(b, a, "alice", "over the tunnel, to a")
    path = wait_for(lambda: (p := b.path()) and p["reason"] == "udp-blocked" and p, 15, "B's path reason")
    assert path["kind"].startswith("relayed"), path
    listener = start_listener(a, "carol")
    try:
        payload = tmp_path / "notes.bin"
        payload.write_bytes(os.urandom(200_000))
        sent = b.cli("file", "send", str(payload), "carol", "--wait", timeout=120)
        assert sent.returncode == 0 and sent.stdout.startswith("FILE_SENT:"), f"{sent.stdout}{sent.stderr}\n{logs(a, b)}"
        tid = sent.stdout.strip().split(":", 1)[1]
        landed = a.home / "endpoints" / "carol" / "inbox" / tid / "notes.bin"
        assert landed.read_bytes() == payload.read_bytes()
    finally:
        listener.terminate()
        listener.wait(10)
