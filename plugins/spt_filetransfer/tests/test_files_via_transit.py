"""A file through the relay's TCP transit between real daemons on loopback (no direct TCP path).

The sender is told to skip the direct TCP path (`SPT_FILE_DATA_PATH=transit`), as when the
receiver sits behind a NAT: the file goes through `spt relay serve --tcp-listen`, end-to-end
keyed over pinned QUIC, and arrives verified. That the relay sees no plaintext is shown in
plugins/spt_relay_fallback/tests/test_tcp_listener.py (its view of the transit, as the attacker).
"""

from __future__ import annotations

import json

import pytest
from ft_helpers import CONFIG, PERCH, file_hash, inbox, listed, one, random_file, wait_for

from spt.testing.nodes import fresh_code, relay_server

pytestmark = [pytest.mark.slow, pytest.mark.relay]


@pytest.fixture
def tcp_relay_url(tmp_path):
    with relay_server(tmp_path, tcp=True) as url:
        yield url


def test_a_file_crosses_the_relay_transit_and_arrives_verified(spt_nodes, tcp_relay_url, tmp_path):
    config = CONFIG + f"\n[relay]\nurls = {json.dumps([tcp_relay_url])}\n"
    a = spt_nodes("a", label="alpha", config=config, env={"SPT_FILE_DATA_PATH": "transit"})
    b = spt_nodes("b", label="beta", config=config)
    for node in (a, b):
        wait_for(lambda n=node: (r := n.json("relay", "list")["relays"]) and r[0]["reachable"], what="registration")
    # joined by rendezvous at the relay, as test_relay_nodes does (with --peer as well, the join
    # raced a direct and a relayed join connection and stalled here: left to the join's owner)
    a.cli("subnet", "create", "home", check=True)
    joined = b.cli("subnet", "join", "home", "--code", fresh_code(a, "home", margin=6), "--timeout", "15")
    assert joined.stdout == "JOINED:home\n", joined.stderr
    b.cli("ready", PERCH, "--once", "--timeout", "0.1")
    wait_for(lambda: listed(a, PERCH), what="bob's row on alpha")
    src = random_file(tmp_path / "through.bin", 6)
    sent = a.cli("file", "send", str(src), "bob", "--wait", timeout=120)
    assert sent.returncode == 0 and sent.stdout.startswith("FILE_SENT:"), sent.stderr
    tid = sent.stdout.strip().split(":", 1)[1]
    assert file_hash(inbox(b) / tid / "through.bin") == file_hash(src)
    assert one(a, tid)["path"] == "transit"
    assert one(b, tid)["path"] == "transit"
