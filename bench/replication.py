"""Replicated records: live-tier propagation, anti-entropy bytes, notification fan-out.

    .venv/bin/python bench/replication.py [--quick]

Real daemons on loopback, one subnet. Latencies come from the store: each node writes the time
it stored a record (`replicated.received`), so "propagation" is a receiver's time minus the
author's, for the same record, with no polling in between.

1. Live-tier propagation: an endpoint hosted on N = 2, 5, 10 nodes; communes on the first node;
   p50/p99 of the delay until each other instance holds the entry. Baseline: spt's raw transport
   request round trip, measured in the same run (a push is one request per receiver).
2. Anti-entropy bytes per round between two nodes that hold the same 10 / 1,000 / 10,000
   entries (the goal: constant, not growing with the entry count).
3. Notification fan-out: `subnet notify` on one node of 10; p50/p99/max until every member holds it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _util import pct, row
from transport import bench_spt

from spt.core.ipc import call, connect
from spt.testing.nodes import DEFAULT_CONFIG, Node, NodeFactory, fresh_code

CONFIG = DEFAULT_CONFIG  # default timing: pushes carry the live tier, anti-entropy every 60/300 s
AE_CONFIG = DEFAULT_CONFIG + "\n[timing]\nanti_entropy = 1.0\n"  # many rounds to count bytes over


def received(node: Node, record_id: str) -> float | None:
    con = sqlite3.connect(f"file:{node.home / 'spt.db'}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT received FROM replicated WHERE id=?", (record_id,)).fetchone()
        return float(row[0]) if row else None
    finally:
        con.close()


def newest_mind_id(node: Node, endpoint_id: str) -> str | None:
    con = sqlite3.connect(f"file:{node.home / 'spt.db'}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute(
            "SELECT id FROM replicated WHERE kind='mind' AND part LIKE ? ORDER BY hlc DESC LIMIT 1",
            (f"live/%/{endpoint_id}",),
        ).fetchone()
        return str(row[0]) if row else None
    finally:
        con.close()


def wait_for(check, what: str, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def subnet_of(factory: NodeFactory, count: int, prefix: str, config: str = CONFIG) -> list[Node]:
    nodes = [factory(f"{prefix}{i}", label=f"{prefix}{i}", config=config) for i in range(count)]
    nodes[0].cli("subnet", "create", "bench", check=True)
    for n in nodes[1:]:
        n.cli("subnet", "join", "bench", "--code", fresh_code(nodes[0], "bench"), "--peer", nodes[0].address, check=True)
    return nodes


def host(node: Node, endpoint_id: str) -> None:
    node.cli("ready", endpoint_id, "--once", "--timeout", "0.1", check=True)


def listed_on(node: Node, endpoint_id: str) -> int:
    doc = node.json("endpoint", "list")
    return sum(1 for s in doc["subnets"] for e in s["endpoints"] if e["id"] == endpoint_id)


def live_propagation(nodes: list[Node], n: int, rounds: int) -> list[float]:
    endpoint_id = f"agent{n}"
    for node in nodes[:n]:
        host(node, endpoint_id)
    wait_for(lambda: listed_on(nodes[0], endpoint_id) >= n - 1, f"{endpoint_id} rows on the writer")
    delays: list[float] = []
    folder = nodes[0].home / "endpoints" / endpoint_id
    last = None
    for r in range(rounds):
        tmp = folder / f".{endpoint_id}-commune.tmp"
        tmp.write_text(f"# live\nround {r}: state of the work\n")
        os.utime(tmp, (time.time() - 5, time.time() - 5))  # renamed into place: taken at once
        tmp.rename(folder / f"{endpoint_id}-commune.md")
        rid = wait_for(lambda last=last: (i := newest_mind_id(nodes[0], endpoint_id)) != last and i, "the commune")
        last = rid
        written = received(nodes[0], rid)
        assert written is not None
        for other in nodes[1:n]:
            got = wait_for(lambda other=other, rid=rid: received(other, rid), "the entry at an instance", timeout=30)
            delays.append(got - written)
    return delays


def seed_entries(a: Node, b: Node, count: int) -> None:
    """Write `count` identical signed live entries of `keeper` into both stores (daemons stopped)."""
    from spt.core.identity import NodeKey
    from spt.core.proto.hlc import Hlc
    from spt.core.proto.replicated import sign_record

    key = NodeKey.from_private_bytes((a.home / "node.key").read_bytes())
    hlc = Hlc(key.node_id)
    records = [
        sign_record(key, kind="mind", record_id=os.urandom(16).hex(), part="live/bench/keeper", hlc=hlc.now(1_700_000_000_000 + i),
                    data={"home": "bench", "endpoint": "keeper", "tier": "live", "project": None,
                          "body": f"entry {i}", "forked_from": None})
        for i in range(count)
    ]
    for node in (a, b):
        con = sqlite3.connect(node.home / "spt.db")
        with con:
            con.executemany(
                "INSERT OR IGNORE INTO replicated(kind, id, part, author, hlc, raw, received) VALUES(?,?,?,?,?,?,?)",
                [(r.kind, r.id, r.part, r.author.hex, f"{r.hlc.wall_ms:016d}.{r.hlc.counter:010d}.{r.hlc.node}",
                  r.raw(), time.time()) for r in records],
            )
        con.close()


def stats(node: Node) -> dict:
    conn = connect(node.home / "spt.sock")
    try:
        return dict(call(conn, "replication.stats"))
    finally:
        conn.close()


def anti_entropy_bytes(factory: NodeFactory, count: int, seconds: float) -> tuple[float, int]:
    a, b = subnet_of(factory, 2, f"ae{count}-", AE_CONFIG)
    for n in (a, b):
        host(n, "keeper")
    wait_for(lambda: listed_on(a, "keeper") >= 1 and listed_on(b, "keeper") >= 1, "keeper rows")
    for n in (a, b):
        n.env["SPT_PORT"] = n.address.rsplit(":", 1)[1]  # same ports after the restart: they find each other
        n.stop()
    seed_entries(a, b, count)
    for n in (a, b):
        n.start()
    wait_for(lambda: listed_on(a, "keeper") >= 1, "keeper rows after restart")
    time.sleep(2.0)  # connect-time rounds done
    before = stats(a)
    time.sleep(seconds)
    after = stats(a)
    rounds = after["rounds"] - before["rounds"]
    sent = (after["bytes_sent"] - before["bytes_sent"]) + (after["bytes_received"] - before["bytes_received"])
    assert after["held"]["mind"] == count, after
    for n in (a, b):
        n.stop()
    return (sent / rounds if rounds else float("nan")), rounds


def notification_fanout(nodes: list[Node], rounds: int) -> list[float]:
    delays: list[float] = []
    worst: list[float] = []
    for r in range(rounds):
        rid = nodes[0].cli("subnet", "notify", f"bench {r}", check=True).stdout.strip().split(":", 1)[1]
        written = received(nodes[0], rid)
        assert written is not None
        times = [
            wait_for(lambda n=n, rid=rid: received(n, rid), "the notification", timeout=30) - written for n in nodes[1:]
        ]
        delays.extend(times)
        worst.append(max(times))
    return delays + [-w for w in worst]  # worst cases carried along, negated, for the caller


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 5 if args.quick else 20
    raw = asyncio.run(bench_spt(200 if args.quick else 1000, 64 * 1024))
    base = raw.pct(0.5) / 1e6
    print(f"baseline: raw spt request round trip p50 {base * 1e3:.2f} ms")

    factory = NodeFactory()
    try:
        nodes = subnet_of(factory, 10, "n")
        print("\nlive-tier propagation (writer's store -> each other instance's store)")
        for n in (2, 5, 10):
            d = live_propagation(nodes, n, rounds)
            print(f"  N={n:2d}: p50 {pct(d, 0.5) * 1e3:7.1f} ms  p99 {pct(d, 0.99) * 1e3:7.1f} ms  "
                  f"(p50 = {pct(d, 0.5) / base:5.1f}x the raw round trip; {len(d)} samples)")
            row(f"live-tier propagation to {n} nodes, p50", pct(d, 0.5) * 1e3, "ms",
                baseline_name="raw spt request round trip", baseline=base * 1e3,
                note=f"p99 {pct(d, 0.99) * 1e3:.1f} ms")
        print("\nnotification fan-out to 10 nodes (origin's store -> each member's store)")
        mixed = notification_fanout(nodes, rounds)
        d = [x for x in mixed if x >= 0]
        worst = [-x for x in mixed if x < 0]
        print(f"  p50 {pct(d, 0.5) * 1e3:.1f} ms  p99 {pct(d, 0.99) * 1e3:.1f} ms  "
              f"all 9 others: p50 {pct(worst, 0.5) * 1e3:.1f} ms, max {max(worst) * 1e3:.1f} ms")
        row("notification fan-out to 10 nodes, all reached (p50)", pct(worst, 0.5) * 1e3, "ms",
            baseline_name="raw spt request round trip", baseline=base * 1e3,
            note=f"per member p50 {pct(d, 0.5) * 1e3:.1f} ms, p99 {pct(d, 0.99) * 1e3:.1f} ms")
        for node in nodes:
            node.stop()
        print("\nanti-entropy bytes per round between two nodes holding the same entries")
        sizes = {}
        for count in (10, 1_000, 10_000):
            per_round, n_rounds = anti_entropy_bytes(factory, count, 4.0 if args.quick else 8.0)
            sizes[count] = per_round
            print(f"  {count:6d} entries: {per_round:7.0f} bytes per round ({n_rounds} rounds)")
        row("anti-entropy bytes per round, 10,000 identical entries", sizes[10_000], "bytes",
            baseline_name="same with 10 entries", baseline=sizes[10], goal="<= 1.0",
            note="constant: digests do not grow with the entry count")
    finally:
        factory.close()


if __name__ == "__main__":
    main()
