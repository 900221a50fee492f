"""A mind entry does not travel to a node where the endpoint is hidden: seen on the wire.

Three hosts on one LAN of the namespace lab. `bob` runs on alpha and beta, and on gamma hidden in
`home`. Alpha takes a commune with a 48 KiB live section of random text; a capture on beta and on
gamma counts the UDP bytes that arrive from alpha meanwhile. QUIC hides the content, so the claim
is made by volume: beta receives the entry's size (at least half of it: tcpdump may drop packets
on a loaded machine), gamma a small fraction (presence and registry traffic only), and gamma's
store holds no mind entry. Needs root; skips without it.
"""

import os
import sqlite3
import time

import pytest
from test_subnets_lan import current_code, lan_nodes  # noqa: F401  (the three-host fixture)

from spt.testing.netns import udp_datagrams
from spt.testing.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ENTRY_BYTES = 48 * 1024


def mind_rows(node):
    con = sqlite3.connect(f"file:{node.home / 'spt.db'}?mode=ro", uri=True, timeout=5)
    try:
        return [r[0] for r in con.execute("SELECT id FROM replicated WHERE kind='mind'")]
    finally:
        con.close()


def test_a_hidden_instance_receives_no_mind_bytes(lan_nodes):  # noqa: F811
    a, b, c = lan_nodes
    assert a.cli("subnet", "create", "home").returncode == 0
    for node in (b, c):
        joined = node.cli("subnet", "join", "home", "--code", current_code(a), "--timeout", "10")
        assert joined.returncode == 0, joined.stderr
    for node in (a, b, c):
        assert node.cli("ready", "bob", "--once", "--timeout", "0.1").returncode == 0
    assert c.cli("endpoint", "visibility", "hide", "bob", "home").returncode == 0
    b_key = b.json("node", "show")["key"]
    wait_for(lambda: any(r["node"]["key"] == b_key for s in a.json("endpoint", "list")["subnets"]
                         for r in s["endpoints"] if r["id"] == "bob"), 20.0, "alpha to see bob on beta")
    a_addr = a.lab.addr(a.host)

    with a.lab.capture(b.host, "udp port 47470") as cap_b, a.lab.capture(c.host, "udp port 47470") as cap_c:
        body = os.urandom(ENTRY_BYTES // 2).hex()  # random: nothing on the way compresses it
        (a.home / "endpoints" / "bob" / "bob-commune.md").write_text(f"# live\n{body}\n")
        entry = wait_for(lambda: mind_rows(b), 20.0, "beta to receive bob's entry")
        time.sleep(1.0)
        data_b, data_c = cap_b.stop(), cap_c.stop()
    from_a_to_b = sum(len(d.payload) for d in udp_datagrams(data_b) if d.src == a_addr)
    from_a_to_c = sum(len(d.payload) for d in udp_datagrams(data_c) if d.src == a_addr)
    # beta's capture is the control: it sees the entry go by (tcpdump may drop some packets on a
    # loaded machine, hence half); gamma's sees none of it
    assert from_a_to_b >= ENTRY_BYTES // 2, (from_a_to_b, from_a_to_c, cap_b.stderr)
    assert from_a_to_c < ENTRY_BYTES // 8, (from_a_to_b, from_a_to_c)
    assert mind_rows(a) == entry and mind_rows(c) == []
