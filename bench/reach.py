"""Reach benchmark: two NATed LANs in the netns lab, direct (punched) vs relayed, in one run.

Run as root: `.venv/bin/python bench/reach.py [--quick]`. Not a test; it prints figures and
ratios measured in the same run (DESIGN.md §6):

1. real daemons (`tests/netns/test_reach.py`'s `ReachLab`): a join by rendezvous through the
   relay, then the time from `spt send` to the `spt ready` listener printing the message, on a
   punched path (two EIM NATs) and on a relayed one (one symmetric NAT); the first message of
   each pair, then the median of the following ones;
2. throughput of one QUIC stream between two transports in the lab, relayed and then, after
   punching and `Transport.upgrade`, direct: the same code path the daemons use, driven by two
   child processes (`reach.py child …`) so the numbers are not bounded by the CLI;
3. a laptop that moves (`tests/netns/test_moving.py`): B joined A on A's LAN with no relay of
   its own, then is carried behind the other NAT; the time from the move to A's message
   arriving in B's listener (goal ≤ 5 s), next to the direct-path message time of item 1.

Traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "netns"))
sys.path.insert(0, str(ROOT / "bench"))

from _util import row  # noqa: E402

CHUNK = 64 * 1024


# --- child processes: one transport each, inside a lab host --------------------------------------


class _AcceptAll:
    def accept(self, peer: Any, alpn: str, addr: Any) -> str | None:
        return None


async def _child(role: str, relay_url: str, peer_hex: str | None, total: int) -> None:
    from spt_relay_fallback.url import RelayUrl, token_proof

    from spt.core.identity import NodeId, NodeKey
    from spt.core.net.connections import Connection, Stream
    from spt.core.net.transport import ALPN_RELAY, Transport

    url = RelayUrl.parse(relay_url)
    punch_done: list[asyncio.Task[Any]] = []

    async def on_stream(conn: Connection, stream: Stream) -> None:
        first = await stream.recv(timeout=30)
        if first is None:
            return
        if first.type == "punch":
            nonce, addrs = first.body["nonce"], [tuple(a) for a in first.body["addrs"]]
            punch_done.append(asyncio.ensure_future(transport.paths.punch(conn.peer, nonce, addrs, active=False)))
            await asyncio.sleep(0)  # prime before answering
            await stream.send("punch", {"addrs": [reflexive]}, end=True)
            return
        got = len(first.body)
        while (frame := await stream.recv(timeout=60)) is not None:
            got += len(frame.body)
        await stream.send("done", got, end=True)

    transport = Transport(NodeKey.generate(), port=0, accept=_AcceptAll(), on_stream=on_stream, idle_timeout=30.0)
    await transport.start()
    relay_conn = await transport.connect(url.key, [url.address], alpn=ALPN_RELAY)
    register = {"port": transport.sockname[1]}
    if url.token:
        register["proof"] = token_proof(url.token, relay_conn)
    reply = await relay_conn.request("relay.register", register)
    transport.paths.set_relay(url.key, url.address, reply.body["token"])
    host, _, port = reply.body["addr"].rpartition(":")
    reflexive = [host, int(port)]
    print(f"READY {transport.node_id.hex}", flush=True)
    if role == "server":
        await asyncio.sleep(120)  # the parent stops us
        return
    assert peer_hex is not None
    peer = NodeId.from_hex(peer_hex)
    virtual = transport.paths.relay_path(url.key, peer)

    async def bulk(conn: Connection) -> float:
        payload = os.urandom(CHUNK)
        started = time.perf_counter()
        async with conn.open_stream() as stream:
            for _ in range(total // CHUNK):
                await stream.send("bulk", payload, timeout=60)
            await stream.end()
            done = await stream.recv(timeout=120)
        elapsed = time.perf_counter() - started
        assert done is not None and done.body == total // CHUNK * CHUNK
        return total / elapsed

    relayed_conn = await transport.connect(peer, [virtual], timeout=10)
    relayed = await bulk(relayed_conn)
    nonce = os.urandom(16)
    answer = await relayed_conn.request("punch", {"nonce": nonce, "addrs": [reflexive]})
    found = await transport.paths.punch(peer, nonce, [tuple(a) for a in answer.body["addrs"]])
    assert found is not None, "punching failed"
    direct_conn = await transport.upgrade(peer, found, grace=0.5)
    direct = await bulk(direct_conn)
    print(json.dumps({"relayed_Bps": relayed, "direct_Bps": direct, "direct_addr": list(found)}), flush=True)
    await transport.close()


# --- the parent ------------------------------------------------------------------------------


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError("child did not answer in time")
    return proc.stdout.readline().strip()


def daemon_figures(kind_b: str, sends: int) -> dict[str, Any]:
    from test_reach import ReachLab, send_and_receive, wait_settled

    from spt.testing.netns import Lab

    lab = Lab()
    rl = ReachLab(lab, "eim", kind_b)
    try:
        rl.start_relay("--rate", "0")  # the path is measured, not the default per-node cap
        a, b, join_s = rl.pair("home")
        settled = time.monotonic()
        path = wait_settled(b)
        settle_s = time.monotonic() - settled
        latencies = [send_and_receive(a, b, f"bob{i}", f"message {i}") for i in range(sends)]
        local = [send_and_receive(a, a, f"self{i}", f"local {i}") for i in range(sends)]
        return {"path": path["kind"], "reason": path["reason"], "join_s": join_s, "settle_s": settle_s,
                "first_s": latencies[0], "median_s": statistics.median(latencies[1:] or latencies),
                "local_s": statistics.median(local)}
    finally:
        rl.close()
        lab.close()


def throughput_figures(total: int) -> dict[str, Any]:
    from test_reach import ReachLab

    from spt.testing.netns import Lab

    lab = Lab()
    rl = ReachLab(lab, "eim", "eim")
    try:
        url = rl.start_relay("--rate", "0")  # the path is measured, not the default per-node cap
        base = [sys.executable, str(Path(__file__).resolve()), "child", "--relay", url, "--bytes", str(total)]
        server = lab.popen(rl.topo.b, [*base, "--role", "server"], stdout=subprocess.PIPE, text=True)
        key = _readline(server, 15).split()[1]
        client = lab.popen(rl.topo.a, [*base, "--role", "client", "--peer", key], stdout=subprocess.PIPE, text=True)
        _readline(client, 15)
        result = json.loads(_readline(client, 300))
        server.terminate()
        return dict(result)
    finally:
        rl.close()
        lab.close()


def move_figures(trials: int) -> list[float]:
    """Seconds from moving B behind the other NAT to A's message in B's listener, per trial."""
    from test_moving import move_and_deliver
    from test_reach import ReachLab

    from spt.testing.netns import Lab

    out: list[float] = []
    for trial in range(trials):
        lab = Lab()
        rl = ReachLab(lab, "eim", "eim")
        try:
            elapsed, _ = move_and_deliver(rl, marker=f"moved {trial}")
            out.append(elapsed)
        finally:
            rl.close()
            lab.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    child = sub.add_parser("child")
    child.add_argument("--role", choices=["server", "client"], required=True)
    child.add_argument("--relay", required=True)
    child.add_argument("--peer")
    child.add_argument("--bytes", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--quick", action="store_true", help="fewer messages, 8 MiB transfers")
    args = parser.parse_args()
    if args.cmd == "child":
        asyncio.run(_child(args.role, args.relay, args.peer, args.bytes))
        return
    sends = 3 if args.quick else 6
    total = (8 if args.quick else 32) * 1024 * 1024
    direct = daemon_figures("eim", sends)
    relayed = daemon_figures("symmetric", sends)
    bulk = throughput_figures(total)
    moves = move_figures(2 if args.quick else 5)
    print("reach across two NATed LANs (netns lab; one relay on the routed core)")
    print(f"direct:  {direct['path']}")
    print(f"relayed: {relayed['path']} (reason {relayed['reason']})")
    print(f"{'':34}{'direct':>10}{'relayed':>10}{'relayed/direct':>16}")
    rows = (("join by rendezvous (ms)", "join_s"), ("path settled after join (ms)", "settle_s"),
            ("first message (ms)", "first_s"), ("message, median (ms)", "median_s"),
            ("baseline: same-node message (ms)", "local_s"))
    for label, key in rows:
        d, r = direct[key] * 1000, relayed[key] * 1000
        print(f"{label:34}{d:>10.1f}{r:>10.1f}{r / d:>16.2f}")
    print("  (a message is `spt send` to a `spt ready` listener printing it; the same-node baseline")
    print("   is the CLI and local delivery alone, so the network share is the difference)")
    d, r = bulk["direct_Bps"] / 1e6, bulk["relayed_Bps"] / 1e6
    print(f"{'one QUIC stream (MB/s)':34}{d:>10.2f}{r:>10.2f}{r / d:>16.2f}   ({total >> 20} MiB each, one run)")
    row("relayed path settled after join", relayed["settle_s"] * 1000, "ms", goal="<= 1000")
    row("direct path settled after join", direct["settle_s"] * 1000, "ms")
    row("message across NATs, relayed", relayed["median_s"] * 1000, "ms", baseline_name="same-node message",
        baseline=relayed["local_s"] * 1000)
    row("one QUIC stream across NATs, relayed", r, "MB/s", baseline_name="direct (punched)", baseline=d)
    moved, base = statistics.median(moves), direct["median_s"]
    print(f"moved behind another NAT -> first message: median {moved * 1000:.0f} ms over {len(moves)} trials "
          f"(max {max(moves) * 1000:.0f} ms; goal <= 5000 ms), {moved / base:.1f}x a direct-path message")
    row("moved behind another NAT -> first message", moved * 1000, "ms", baseline_name="direct-path message",
        baseline=base * 1000, goal="<= 5000", goal_on="value")

if __name__ == "__main__":
    main()
