"""Messaging speed, in one run, against baselines measured in the same run.

    .venv/bin/python bench/messaging.py [--quick]

1. `spt send` wall time (local perch, daemon running) against `python3 -c pass`; target ≤ 3×.
2. Cross-node ring round trip, p50/p99: a ringer on alpha, a responder agent on beta that
   answers each ring with a send, both speaking the control protocol directly (what `spt ring`
   and `spt ready` do, minus process start-up), against spt's raw transport request round trip
   (the transport benchmark's measurement, repeated here); target ≤ 3×. Also the full time an
   agent sees: `spt ring bob@beta` as a process (CLI start included) against the same responder.
   And the ring's floor on this machine: the parts it cannot skip, each measured here (one
   transport round trip, three durable commits on this disk, two new control connections),
   summed with no time for spt's handling; when the floor alone passes 3× the goal cannot be met.
3. Sustained durable messages per second from alpha to a perch on beta (each one spooled with
   fsync on beta), with 4 concurrent senders for a fixed time; target ≥ 3,000/s. Each `spt send`
   shape (one message per control call, answered once durable on beta) with 4 and 16 senders
   (concurrent messages for one node travel together in one `msg.deliver_batch` request and
   share one commit), and the batched client shape: 4 senders each sending 16 messages per
   `msg.send_many` call (a program with several messages at hand; each message still answered
   on its own, once durable). Baseline: the same 4 callers' control calls that touch neither
   disk nor network.
4. A backlog: messages queued on alpha while beta is down (durable in alpha's outgoing spool),
   then beta started; messages per second until alpha's spool is empty (each durable on beta),
   reconnecting included.
5. Where a ring's time goes, measured along its path: a second pair of daemons run with
   `SPT_TRACE` (`bench/ring.py`), and each point a ring passes on either daemon and in the two
   agents is printed with its median time after the ring started.

Every command gets its stdin from the bench (never the terminal) and every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _util import compile_spt, median, pct, row, time_command, time_interleaved
from ring import Marks, commit_ms, control_call_ms, floor_ms, responder, ring_once
from ring import measure as measure_rings
from transport import bench_spt

from spt.core.ipc import call, connect
from spt.testing.nodes import Node, NodeFactory


def ring_seconds(node: Node) -> float:
    """One ring from alice to bob@beta, untraced: its round trip in seconds."""
    start, end = ring_once(node, Marks(None))
    return (end - start) / 1e9


def per_second(senders: int, seconds: float, one: Callable[[int, int], int]) -> float:
    """Messages per second of `senders` threads, each calling `one(index, sent so far)` (which
    returns how many messages it sent) one call after another for `seconds`."""
    counts = [0] * senders
    deadline = time.monotonic() + seconds

    def run(index: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            n += one(index, n)
        counts[index] = n

    threads = [threading.Thread(target=run, args=(i,)) for i in range(senders)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def sustained(node: Node, seconds: float, senders: int, *, op: str = "msg.send") -> float:
    """Calls per second of `senders` threads, each making `op` calls one after another for
    `seconds`, each call on a new control connection (as `spt send` makes it). `msg.send`
    sends to a perch on beta (durable there before the answer); `endpoint.whoami` is the
    baseline: the same callers and control path, with neither disk nor network."""

    def one(index: int, n: int) -> int:
        conn = connect(node.home / "spt.sock")
        try:
            if op == "msg.send":
                result: Any = call(conn, op, {"address": "sink@beta", "from": "alice", "body": f"m{index}-{n}"})
                if result["token"] not in ("SENT", "QUEUED"):
                    raise SystemExit(f"unexpected token {result}")
            else:
                call(conn, op, {})
        finally:
            conn.close()
        return 1

    return per_second(senders, seconds, one)


def sustained_batched(node: Node, seconds: float, senders: int, size: int) -> float:
    """Messages per second of `senders` threads, each sending batches of `size` messages to the
    perch on beta with `msg.send_many` (one control connection per batch, as a program that has
    several messages to send at once would), each message with its own id; every message is
    durable on beta before the batch is answered."""

    def one(index: int, n: int) -> int:
        batch = [{"address": "sink@beta", "body": f"m{index}-{n + i}", "id": os.urandom(16).hex()}
                 for i in range(size)]
        conn = connect(node.home / "spt.sock")
        try:
            result: Any = call(conn, "msg.send_many", {"from": "alice", "messages": batch})
        finally:
            conn.close()
        bad = [r for r in result["results"] if r.get("token") not in ("SENT", "QUEUED")]
        if bad:
            raise SystemExit(f"unexpected answers {bad[:3]}")
        return size

    return per_second(senders, seconds, one)


def backlog_drain(alpha: Node, beta: Node, count: int) -> float:
    """Messages per second alpha's outgoing spool forwards once beta is back, after `count`
    messages were queued while beta was down (timed from beta's start, reconnecting included)."""
    beta.stop()
    for first in range(0, count, 200):
        batch = [{"address": "sink@beta", "body": f"q{i}", "id": os.urandom(16).hex()}
                 for i in range(first, min(first + 200, count))]
        conn = connect(alpha.home / "spt.sock")
        try:
            result: Any = call(conn, "msg.send_many", {"from": "alice", "messages": batch})
        finally:
            conn.close()
        if {r.get("token") for r in result["results"]} != {"QUEUED"}:
            raise SystemExit(f"backlog: unexpected answers {result['results'][:3]}")
    start = time.monotonic()  # before the start: alpha may reconnect and drain while it waits for beta to be up
    beta.start()
    while time.monotonic() - start < 120:
        conn = connect(alpha.home / "spt.sock")
        try:
            checks = call(conn, "doctor", {})["checks"]
        finally:
            conn.close()
        if not any(c["name"] == "outgoing-spool" for c in checks):
            return count / (time.monotonic() - start)
        time.sleep(0.05)
    raise SystemExit("backlog: alpha's outgoing spool did not drain within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs, rings, cli_rings, seconds = (10, 50, 10, 3.0) if args.quick else (30, 300, 30, 8.0)
    spt_exe = shutil.which("spt", path=str(Path(sys.executable).parent)) or "spt"
    factory = NodeFactory()
    try:
        alpha, beta = factory.subnet(["alpha", "beta"])
        alpha.cli("ready", "local", "--once", "--timeout", "0.1")  # a local perch to send to
        beta.cli("ready", "sink", "--once", "--timeout", "0.1")
        agent_env = {**alpha.env, "SPT_AGENT_ID": "alice"}
        compile_spt()  # start-up figures are about an installed spt (bench/_util.py)
        time_command([spt_exe, "send", "local"], 3, env=agent_env, input=b"hello")
        base, send = time_interleaved(
            [([sys.executable, "-c", "pass"], None, b""), ([spt_exe, "send", "local"], agent_env, b"hello")], runs
        )

        bob_conn = connect(beta.home / "spt.sock")
        bob = threading.Thread(target=responder, args=(bob_conn, beta, Marks(None)), daemon=True)
        bob.start()
        alpha.wait_listed("bob")
        alpha.cli("ready", "alice", "--once", "--timeout", "0.1")
        beta.wait_listed("alice")
        for _ in range(10):
            ring_seconds(alpha)
        ring_rtts = [ring_seconds(alpha) for _ in range(rings)]
        ring_argv = [spt_exe, "ring", "bob", "--timeout", "10"]
        cli_ring = time_command(ring_argv, cli_rings, env=agent_env, input=b"ping", timeout=20)
        bob_conn.sock.shutdown(socket.SHUT_RDWR)
        bob.join(5)
        bob_conn.close()
        commits = commit_ms(alpha.home, 200)  # the parts a ring cannot skip, for its floor
        controls = control_call_ms(alpha, 200)
        raw = asyncio.run(bench_spt(1000, 1024 * 1024))
        alpha.wait_listed("sink")
        control_rate = sustained(alpha, seconds, 4, op="endpoint.whoami")
        rate = sustained(alpha, seconds, 4)
        rate16 = sustained(alpha, seconds, 16)  # many senders at once: what group commit is for
        batched = sustained_batched(alpha, seconds, 4, 16)
        backlog = 1000 if args.quick else 4000
        drained = backlog_drain(alpha, beta, backlog)
    finally:
        factory.close()
    traced_rtts, _, breakdown = measure_rings(50 if args.quick else 150, traced=True)  # where a ring's time goes

    b, s = median(base), median(send)
    print(f"python3 -c pass            median {b * 1e3:8.1f} ms")
    print(f"spt send (local perch)     median {s * 1e3:8.1f} ms   ratio {s / b:5.2f}x  (target <= 3)")
    r50, r99 = pct(ring_rtts, 0.5) * 1e3, pct(ring_rtts, 0.99) * 1e3
    t50, t99 = raw.pct(0.5) / 1e3, raw.pct(0.99) / 1e3
    print(f"transport request RTT      p50 {t50:8.3f} ms   p99 {t99:8.3f} ms")
    print(f"cross-node ring RTT        p50 {r50:8.3f} ms   p99 {r99:8.3f} ms   ratio p50 {r50 / t50:6.1f}x  (target <= 3)")
    floor = floor_ms(t50, median(commits), median(controls))
    print(f"ring floor from its parts  {floor:8.3f} ms   ratio {floor / t50:6.1f}x  (transport RTT + 3 durable commits"
          f" p50 {median(commits):.3f} ms + 2 control calls p50 {median(controls):.3f} ms; no time for spt's handling)")
    c50 = median(cli_ring) * 1e3
    print(f"`spt ring` as an agent sees it (CLI start included) median {c50:8.1f} ms"
          f"   (python3 -c pass {b * 1e3:.1f} ms)")
    print(f"durable messages/s alpha->beta, 4 senders: {rate:8.0f}   (target >= 3000)")
    print(f"durable messages/s alpha->beta, 16 senders:{rate16:8.0f}")
    print(f"durable messages/s alpha->beta, 4 senders x 16 messages per msg.send_many call:{batched:8.0f}"
          "   (target >= 3000; a batched client shape, not one `spt send` per message)")
    print(f"backlog of {backlog} queued while beta was down, forwarded once it is back: {drained:8.0f} msg/s"
          "   (reconnect included)")
    print(f"baseline: control calls/s, same 4 senders, no disk or network (endpoint.whoami): {control_rate:8.0f}"
          f"   ratio 4 senders {rate / control_rate:.2f}x")
    print(f"where a ring's time goes (traced rings on a second pair of daemons, p50 {pct(traced_rtts, 0.5):.2f} ms;"
          " each daemon's commits are numbered in order: a ring's spool write, its ack's record, a reply's claim):")
    print("\n".join(breakdown))
    row("`spt send` wall time", s * 1e3, "ms", baseline_name="python3 -c pass", baseline=b * 1e3, goal="<= 3")
    row("cross-node ring RTT p50", r50, "ms", baseline_name="transport request RTT p50", baseline=t50, goal="<= 3")
    row(f"ring floor from its parts (transport RTT + 3 durable commits at {median(commits):.2f} ms"
        f" + 2 control calls at {median(controls):.2f} ms; none of spt's handling)", floor, "ms",
        baseline_name="transport request RTT p50", baseline=t50)
    row("`spt ring` agent-visible (CLI start included)", c50, "ms", baseline_name="python3 -c pass",
        baseline=b * 1e3)
    row("durable msgs/s, 2 nodes, 4 senders", rate, "msg/s", baseline_name="control calls/s, same senders",
        baseline=control_rate, goal=">= 3000", goal_on="value")
    row("durable msgs/s, 2 nodes, 16 senders", rate16, "msg/s", baseline_name="control calls/s, 4 senders",
        baseline=control_rate)
    row("backlog drained alpha->beta (reconnect included)", drained, "msg/s")
    row("durable msgs/s, 2 nodes, 4 senders x 16 per msg.send_many", batched, "msg/s",
        baseline_name="control calls/s, 4 senders", baseline=control_rate, goal=">= 3000", goal_on="value")


if __name__ == "__main__":
    main()
