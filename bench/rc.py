"""Remote attach (`spt rc`) speed across two nodes, against the transport measured in the same run.

    .venv/bin/python bench/rc.py [--quick]

1. Keystroke echo round trip: a hosted program on alpha echoes every byte it reads (raw mode);
   a viewer on beta speaks the `rc.attach` control operation directly (what `spt rc` does, minus
   process start-up), sends one keystroke and waits for its echo; goal ≤ RTT + 5 ms. Two RTTs
   are measured alongside: spt's transport on fresh connections (bench/transport.py), and the
   round trip of the very member connection the viewer uses (`rc.ping`, answered by alpha's
   daemon, interleaved with the echoes). The goal is judged against the second: the daemons'
   connection is what a keystroke rides, and its RTT (QUIC's pacing follows its smoothed RTT)
   is often well above a fresh connection's on a loaded machine.
2. Output throughput: the hosted program is `cat` of a 100 MB file (20 MB with --quick), watched
   by a real `spt rc` process on beta whose stdout the bench counts; MB/s against the transport's
   bulk figure; goal ≥ 10 MB/s. The same watched on alpha itself shows what the pipeline does
   without QUIC (host process, daemon, the CLI's JSON lines).

Loopback only; every wait is bounded; the hosted programs end with the bench (purge).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _util import pct, row
from transport import bench_spt

from spt.core.ipc import IpcConnection, connect
from spt.testing.nodes import DEFAULT_CONFIG, NodeFactory

CONFIG = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 1.0\n"

ECHO = r"""
import os, tty
tty.setraw(0)
os.write(1, b"ready\r\n")
while True:
    data = os.read(0, 1024)
    if not data:
        break
    os.write(1, data)
"""


def wait_row(node, endpoint_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = node.json("endpoint", "list")
        if any(e["id"] == endpoint_id and e["alive"] for s in doc["subnets"] for e in s["endpoints"]):
            return
        time.sleep(0.1)
    raise SystemExit(f"{endpoint_id} did not show alive at {node.name}")


def echo_rtts(node, address: str, n: int) -> tuple[list[float], list[float]]:
    """Keystroke echo round trips, and `rc.ping` round trips on the same stream (answered by the
    hosting daemon: the member connection's own round trip, measured alongside)."""
    conn: IpcConnection = connect(node.home / "spt.sock")
    conn.send({"v": 1, "op": "rc.attach", "args": {"address": address, "offset": None, "replay": True,
                                                  "viewer": os.urandom(8).hex()}, "interactive": False})
    lines = conn.lines(timeout=15)
    seen = bytearray()

    def read_until(needle: bytes) -> None:
        while needle not in seen:
            msg = next(lines)
            ev = msg.get("event", {}).get("rc", {})
            if "error" in msg or "result" in msg:
                raise SystemExit(f"rc ended: {msg}")
            if ev.get("t") == "out":
                seen.extend(base64.b64decode(ev["data"]))

    def ping(n: int) -> None:
        conn.send({"rc": {"t": "ping", "n": n}})
        while True:
            msg = next(lines)
            if msg.get("event", {}).get("rc", {}).get("t") == "pong":
                return
            if "error" in msg or "result" in msg:
                raise SystemExit(f"rc ended: {msg}")

    read_until(b"ready")
    rtts: list[float] = []
    pings: list[float] = []
    try:
        for seq in range(1, n + 1):  # interleaved, so both see the same moment of the machine
            key = bytes([ord("a") + seq % 26])
            seen.clear()
            start = time.perf_counter()
            conn.send({"rc": {"t": "input", "seq": seq, "data": base64.b64encode(key).decode()}})
            read_until(key)
            rtts.append(time.perf_counter() - start)
            start = time.perf_counter()
            ping(seq)
            pings.append(time.perf_counter() - start)
    finally:
        conn.close()
    return rtts, pings


def cat_throughput(node, address: str, size: int) -> float:
    viewer = subprocess.Popen([sys.executable, "-m", "spt", "rc", "--no-replay", address], env=node.env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # attached
        assert viewer.stdin is not None and viewer.stdout is not None
        start = time.perf_counter()
        viewer.stdin.write(b"g")  # the hosted shell waits for one key, then cats
        viewer.stdin.flush()
        got = 0
        deadline = start + 600
        fd = viewer.stdout.fileno()
        while got < size and time.perf_counter() < deadline:
            data = os.read(fd, 1 << 20)
            if not data:
                break
            got += len(data)
        elapsed = time.perf_counter() - start
        if got < size:
            raise SystemExit(f"rc delivered {got} of {size} bytes")
        return got / elapsed / 1e6
    finally:
        viewer.terminate()
        viewer.wait(10)


def main(quick: bool) -> None:
    n_rtt = 100 if quick else 300
    size = (20 if quick else 100) * 1_000_000
    transport = asyncio.run(bench_spt(n_rtt, 32 * 1024 * 1024 if quick else 64 * 1024 * 1024, bulk_samples=3))
    t50 = transport.pct(0.5) / 1000  # ms
    bulk = transport.mb_s
    factory = NodeFactory()
    with tempfile.TemporaryDirectory(prefix="spt-rc-bench-") as tmp:
        try:
            alpha, beta = factory.subnet(["alpha", "beta"], config=CONFIG)
            echo = Path(tmp) / "echo.py"
            echo.write_text(ECHO)
            big = Path(tmp) / "big"
            with open(big, "wb") as fh:
                block = bytes(range(256)) * 4096  # 1 MiB, newlines included: raw mode keeps them
                written = 0
                while written < size:
                    part = block[: size - written]
                    fh.write(part)
                    written += len(part)
            alpha.cli("endpoint", "run", "--id", "echo", "--", sys.executable, str(echo), check=True)
            cat = f"stty raw -echo; head -c 1 >/dev/null; cat {big}; sleep 600"
            alpha.cli("endpoint", "run", "--id", "cat", "--", "sh", "-c", cat, check=True)
            alpha.cli("endpoint", "run", "--id", "cat2", "--", "sh", "-c", cat, check=True)
            wait_row(beta, "echo")
            wait_row(beta, "cat")
            rtts, pings = echo_rtts(beta, "echo@alpha", n_rtt)
            e50, e99 = pct(rtts, 0.5) * 1e3, pct(rtts, 0.99) * 1e3
            p50 = pct(pings, 0.5) * 1e3
            rate = cat_throughput(beta, "cat@alpha", size)
            local_rate = cat_throughput(alpha, "cat2", size)  # the same pipeline without QUIC
        finally:
            for node in factory.nodes:
                for endpoint_id in ("echo", "cat", "cat2"):
                    node.cli("endpoint", "purge", endpoint_id, "--yes")
            factory.close()
    print(f"transport request RTT      p50 {t50:8.3f} ms   (fresh transports, bench/transport.py)")
    print(f"member connection RTT      p50 {p50:8.3f} ms   (rc.ping on the viewer's stream, same run)")
    print(f"rc keystroke echo RTT      p50 {e50:8.3f} ms   p99 {e99:8.3f} ms   "
          f"over member connection {e50 - p50:+7.3f} ms  (goal <= +5 ms)")
    print(f"transport bulk             {bulk:8.1f} MB/s  ({transport.spread()})")
    print(f"rc output (cat {size // 1_000_000} MB)    {rate:8.1f} MB/s   ratio {rate / bulk:5.2f}x of transport  "
          "(goal >= 10 MB/s)")
    print(f"rc output on alpha itself  {local_rate:8.1f} MB/s   (host, daemon, CLI: everything but QUIC)")
    row("rc keystroke echo RTT p50 over the member connection's RTT", e50 - p50, "ms", goal="<= 5",
        note=f"echo p50 {e50:.2f} ms, connection p50 {p50:.2f} ms, fresh transport p50 {t50:.2f} ms")
    row("rc output throughput (cat)", rate, "MB/s", goal=">= 10",
        note=f"{rate / bulk:.2f}x of spt's transport bulk {bulk:.1f} MB/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, a 20 MB file")
    main(parser.parse_args().quick)
