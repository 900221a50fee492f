"""Where a cross-node ring's time goes, measured along its path (not by subtraction).

    .venv/bin/python bench/ring.py [--rings N] [--trace]

Two daemons, alpha and beta, on loopback; a ringer (alice on alpha) and a responder (bob on
beta, acking each envelope and answering with a send), both speaking the control protocol
directly, as `bench/messaging.py` does. Prints the ring RTT p50/p99 and, with `--trace`, the
daemons run with `SPT_TRACE` (spt.core.trace): every point a ring passes on either daemon and in
the two agents is stamped with the host's monotonic clock, and the bench prints the median time
between consecutive points of the most common path, so the steps add up to the ring's median.
Untraced rings are the figure; traced ones cost a write per point (a few µs each).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _util import pct

from spt.core.errors import DaemonDown
from spt.core.ipc import IpcConnection, call, connect
from spt.testing.nodes import Node, NodeFactory


class Marks:
    """The agents' own points, in the daemons' trace file (same clock, same format)."""

    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if path else None

    def __call__(self, who: str, point: str) -> None:
        if self.fd is not None:
            os.write(self.fd, f"{time.monotonic_ns()} {who} {point}\n".encode())


def responder(conn: IpcConnection, node: Node, mark: Marks) -> None:
    """Agent bob on `node`: ack every envelope, then answer its sender with a send."""
    conn.send({"v": 1, "op": "endpoint.ready", "args": {"id": "bob"}, "interactive": False})
    try:
        for msg in conn.lines(timeout=120):
            if "result" in msg or "error" in msg:
                break
            event = msg.get("event", {})
            if not event.get("last"):
                continue
            mark("bob", "envelope read")
            reply = connect(node.home / "spt.sock")  # opened first, as an agent's next command would
            conn.send({"ack": event["msg"]})
            mark("bob", "acked")
            sender = re.search(r'from="([^"]+)"', event["line"])
            try:
                if sender:
                    call(reply, "msg.send", {"address": sender.group(1), "from": "bob", "body": "pong"})
                    mark("bob", "reply answered")
            finally:
                reply.close()
    except (OSError, ValueError, DaemonDown):
        pass  # shut down by the bench


def ring_once(node: Node, mark: Marks) -> tuple[int, int]:
    """One ring from alice; its (start, end) on the monotonic clock in ns."""
    start = time.monotonic_ns()
    mark("alice", "ring")
    conn: IpcConnection = connect(node.home / "spt.sock")
    try:
        conn.send({"v": 1, "op": "msg.ring", "args": {"address": "bob", "from": "alice", "body": "ping", "timeout": 10},
                   "interactive": False})
        for msg in conn.lines(timeout=15):
            event = msg.get("event", {})
            if event.get("last"):
                mark("alice", "reply read")
                conn.send({"ack": event["msg"]})
            if "result" in msg:
                if not msg["result"].get("reply"):
                    raise SystemExit(f"ring got no reply: {msg['result']}")
                break
            if "error" in msg:
                raise SystemExit(f"ring failed: {msg['error']}")
    finally:
        conn.close()
    end = time.monotonic_ns()
    mark("alice", "answered")
    return start, end


def breakdown(trace: Path, windows: list[tuple[int, int]]) -> list[str]:
    """Each point the rings in `windows` pass (the k-th time a process passes a point is its own
    point), in order of its median time after the ring started, with that median and the gap to
    the point before it. Points that only some rings pass (under 90 %) are left out."""
    points = []
    for line in trace.read_text().splitlines():
        stamp, who, point = line.split(" ", 2)
        points.append((int(stamp), f"{who}: {point}"))
    points.sort()
    offsets: dict[str, list[float]] = collections.defaultdict(list)
    i = 0
    for start, end in windows:
        while i < len(points) and points[i][0] < start:
            i += 1
        seen: collections.Counter[str] = collections.Counter()
        while i < len(points) and points[i][0] <= end:
            stamp, name = points[i]
            seen[name] += 1
            offsets[name if seen[name] == 1 else f"{name} #{seen[name]}"].append((stamp - start) / 1e6)
            i += 1
    common = {name: statistics.median(ms) for name, ms in offsets.items() if len(ms) >= 0.9 * len(windows)}
    lines = [f"  {'after (ms)':>10} {'gap (ms)':>9}  point (median over {len(windows)} rings)"]
    before = 0.0
    for name, at in sorted(common.items(), key=lambda kv: kv[1]):
        lines.append(f"  {at:10.3f} {at - before:9.3f}  {name}")
        before = at
    return lines


def commit_ms(folder: Path, samples: int) -> list[float]:
    """Wall ms of one durable SQLite commit of a small row in `folder` (WAL, `synchronous=FULL`,
    as spt's store): the least each of a ring's three commits costs on this disk."""
    db = sqlite3.connect(folder / "floor.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, body BLOB)")
        out = []
        for _ in range(samples):
            start = time.perf_counter_ns()
            db.execute("BEGIN")
            db.execute("INSERT INTO t(body) VALUES(?)", (os.urandom(200),))
            db.execute("COMMIT")
            out.append((time.perf_counter_ns() - start) / 1e6)
        return out
    finally:
        db.close()


def control_call_ms(node: Node, samples: int) -> list[float]:
    """Wall ms of one control call that touches neither disk nor network (`endpoint.whoami`) on
    a new connection, as alice's ring and bob's reply each make one."""
    out = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        conn = connect(node.home / "spt.sock")
        try:
            call(conn, "endpoint.whoami", {})
        finally:
            conn.close()
        out.append((time.perf_counter_ns() - start) / 1e6)
    return out


def floor_ms(transport_rtt: float, commit: float, control: float) -> float:
    """The least a ring can take from the parts it cannot skip, each at its median in this run,
    with no time at all for spt's own handling: the ring's and the reply's one-way QUIC trips
    (one transport round trip), three commits in sequence (the ring durable on beta before bob
    sees it, the reply durable on alpha before alice sees it, alice's acknowledgement before
    `spt ring` returns) and two control calls (alice's ring, bob's reply)."""
    return transport_rtt + 3 * commit + 2 * control


def cpu_seconds(node: Node) -> tuple[float, float]:
    """(user, system) CPU seconds of `node`'s daemon so far (steadier than wall time on a
    shared machine)."""
    assert node.proc is not None
    fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measure(rings: int, *, traced: bool) -> tuple[list[float], list[list[float]], list[str]]:
    """Ring RTTs (ms) of `rings` rings between two fresh daemons, their CPU per ring (ms, user
    and system, alpha then beta) and, `traced`, the breakdown lines."""
    tmp = Path(tempfile.mkdtemp(prefix="spt-ring-"))
    trace = tmp / "trace"
    env = {"SPT_TRACE": str(trace)} if traced else {}
    mark = Marks(str(trace) if traced else None)
    factory = NodeFactory()
    try:
        alpha, beta = factory.subnet(["alpha", "beta"], **({"env": env} if env else {}))
        bob_conn = connect(beta.home / "spt.sock")
        bob = threading.Thread(target=responder, args=(bob_conn, beta, mark), daemon=True)
        bob.start()
        alpha.wait_listed("bob")
        alpha.cli("ready", "alice", "--once", "--timeout", "0.1")
        beta.wait_listed("alice")
        for _ in range(10):
            ring_once(alpha, Marks(None))
        before = [cpu_seconds(alpha), cpu_seconds(beta)]
        windows = [ring_once(alpha, mark) for _ in range(rings)]
        cpu = [[(b - a) / rings * 1e3 for a, b in zip(was, cpu_seconds(n), strict=True)]
               for n, was in zip((alpha, beta), before, strict=True)]
        bob_conn.sock.shutdown(socket.SHUT_RDWR)
        bob.join(5)
        bob_conn.close()
    finally:
        factory.close()
    rtts = [(end - start) / 1e6 for start, end in windows]
    lines = breakdown(trace, windows) if traced else []
    shutil.rmtree(tmp, ignore_errors=True)
    return rtts, cpu, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rings", type=int, default=200)
    parser.add_argument("--trace", action="store_true", help="trace the rings and print where the time goes")
    args = parser.parse_args()
    rtts, cpu, lines = measure(args.rings, traced=args.trace)
    print(f"cross-node ring RTT ({args.rings} rings{', traced' if args.trace else ''}): "
          f"p50 {pct(rtts, 0.5):.3f} ms  p90 {pct(rtts, 0.9):.3f} ms  p99 {pct(rtts, 0.99):.3f} ms")
    print("daemon CPU per ring (user + system): " + "  ".join(
        f"{name} {u + k:.2f} ms ({u:.2f} + {k:.2f})" for name, (u, k) in zip(("alpha", "beta"), cpu, strict=True)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
