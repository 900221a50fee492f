"""A member replays a deleted registry row, written as the attacker (SPEC.md §4.5, §9.15), over
real daemons and real sockets.

Mallory is a member of `home` (it joined honestly). While olive's perch `doomed` is listed,
mallory asks olive for her registry records (a member's right) and keeps the signed row. Olive
purges the perch. Then every node restarts, so no view holds the tombstone any more, and olive's
own memory of the deletion is aged past its 30 days in her store. Mallory pushes the recorded row
(and olive's presence from before the deletion) to beta from a throwaway socket with its own
key: first while olive is offline, then after olive is back. Beta must never list `doomed` again,
and olive's later perches must still reach it (spt.core.proto.registry, rule 6).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time

import pytest

from spt.testing.nodes import DEFAULT_CONFIG, fresh_code, request_as_member
from spt.testing.traffic import listed

pytestmark = [pytest.mark.slow, pytest.mark.root]  # subnet create/join are elevated

CONFIG = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 0.5\n"
MONTH = 31 * 24 * 3600


def config_on_own_port():
    """CONFIG on a UDP port free now, kept across restarts: after every node restarted, each
    must still find the others where it last saw them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return CONFIG.replace("port = 0", f"port = {port}")


def age_deletions(node, seconds):
    """Move the times `node` stored its deleted rows at (meta `registry_advertised`) `seconds`
    back, as if that long had passed: its next start no longer tombstones them again."""
    con = sqlite3.connect(node.home / "spt.db", timeout=5)
    try:
        (raw,) = con.execute("SELECT value FROM meta WHERE key='registry_advertised'").fetchone()
        doc = json.loads(raw)
        assert any(doc["gone"].values()), doc  # the purge is remembered: this is what ages
        doc["gone"] = {sub: [[home, eid, at - seconds] for home, eid, at in keys] for sub, keys in doc["gone"].items()}
        with con:
            con.execute("UPDATE meta SET value=? WHERE key='registry_advertised'", (json.dumps(doc),))
    finally:
        con.close()


def never_listed(node, endpoint_id, seconds=1.5):
    """`endpoint_id` stays out of `node`'s endpoint list for `seconds` (a few presence rounds)."""
    deadline = time.monotonic() + seconds
    while True:
        rows = listed(node, endpoint_id)
        assert rows == [], f"{node.name} lists the deleted {endpoint_id} again: {rows}"
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)


def test_a_member_cannot_revive_a_deleted_row_by_replaying_its_signature(spt_nodes):
    olive, beta, mallory = (spt_nodes(n, label=n, config=config_on_own_port()) for n in ("olive", "beta", "mallory"))
    olive.cli("subnet", "create", "home", check=True)
    for n in (beta, mallory):
        n.cli("subnet", "join", "home", "--code", fresh_code(olive, "home"), "--peer", olive.address, check=True)
    olive.cli("ready", "doomed", "--once", "--timeout", "0.1", check=True)
    beta.wait_listed("doomed")
    subnet_hex = beta.json("subnet", "status")["subnets"][0]["id"]
    mallory.stop()

    # mallory records olive's signed row and presence while the perch is listed
    held = asyncio.run(request_as_member(mallory, olive, "registry.sync", {"subnet": subnet_hex, "digest": {}}))["records"]
    replay = [r for r in held if r["node"] == olive.key and (r["kind"] == "presence" or r["id"] == "doomed")]
    assert {r["kind"] for r in replay} == {"row", "presence"} and not any(r.get("deleted") for r in replay), replay

    olive.cli("endpoint", "purge", "doomed", "--yes", check=True)
    for _ in range(100):
        if not listed(beta, "doomed"):
            break
        time.sleep(0.1)
    assert listed(beta, "doomed") == [], "the purge never reached beta"

    # every node restarts: no view holds the tombstone; olive stays offline
    olive.stop()
    beta.stop()
    beta.start()
    answer = asyncio.run(request_as_member(mallory, beta, "registry.push", {"subnet": subnet_hex, "records": replay}))
    assert answer == {}, answer  # taken without complaint: a replay is indistinguishable from a late forward
    never_listed(beta, "doomed")

    # olive is back after a month: she no longer tombstones the perch herself
    age_deletions(olive, MONTH)
    olive.start()
    olive.cli("ready", "fresh", "--once", "--timeout", "0.1", check=True)
    beta.wait_listed("fresh")  # her later rows still propagate
    for target in (beta, olive):
        answer = asyncio.run(request_as_member(mallory, target, "registry.push", {"subnet": subnet_hex, "records": replay}))
        assert answer == {}, answer
    never_listed(beta, "doomed")
    assert listed(olive, "doomed") == []
    assert listed(beta, "fresh") != []
