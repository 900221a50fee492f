"""A stranger attacking a real daemon's unauthenticated ALPNs over real QUIC (issue 10, High 4).

The attacker proves a throw-away key on `spt-join/1` (anyone may) and then sends what the frame
codec must survive: a 16 MiB frame of empty msgpack maps (one byte each on the wire, a 64-byte
dict each once decoded), 128 streams of them, frames of the largest allowed length full of empty
maps, and half-sent frames that never finish. A member keeps asking the daemon for its log the
whole time and must get answers within a second; the daemon's peak RSS must stay under 150 MB.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from spt.core.identity import NodeId, NodeKey
from spt.core.net.transport import ALPN_JOIN, ALPN_RELAY, AllowKeys, Transport
from spt.core.proto.frames import OPEN_LIMITS

pytestmark = pytest.mark.slow

RSS_LIMIT_KB = 150 * 1024
BIG = 16 * 1024 * 1024


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def empty_maps_frame(payload_size: int) -> bytes:
    """A frame of `payload_size` bytes: a valid header map whose body is an array of empty maps."""
    head = msgspec.msgpack.encode({"v": 1, "t": "join"})
    head = bytes((head[0] + 1,)) + head[1:]  # one more key: "b"
    count = payload_size - len(head) - 2 - 5
    body = b"\xa1b" + b"\xdd" + struct.pack(">I", count) + b"\x80" * count
    payload = head + body
    return struct.pack(">I", len(payload)) + payload


def raw_write(stream, data: bytes, end: bool = False) -> None:
    stream.connection._write(stream, data, end)  # the attacker sends bytes, not frames


async def raw_send(stream, data: bytes) -> None:
    """Send all of `data` as fast as the daemon's flow control lets it in; stop when cut off."""
    conn = stream.connection
    piece = 256 * 1024
    try:
        for i in range(0, len(data), piece):
            conn._write(stream, data[i : i + piece], False)
            if conn._must_wait(stream):
                await stream._wait_writable(5.0)
    except Exception:
        return  # refused, reset or closed: what the daemon should do


async def attack(target: tuple[str, int], alpn: str = ALPN_JOIN, peer: NodeId | None = None) -> dict[str, int]:
    """Every variant from one stranger; returns how many connections the daemon let it keep."""
    outcome = {"connected": 0, "dropped": 0}
    attackers = []
    big = empty_maps_frame(BIG)
    legal = empty_maps_frame(OPEN_LIMITS.max_frame)
    try:
        for variant in ("big", "many-big", "many-legal", "partial", "partial", "partial", "partial", "partial"):
            t = Transport(NodeKey.generate(), host="127.0.0.1", accept=AllowKeys(), alpns=(ALPN_JOIN,))
            await t.start()
            attackers.append(t)
            try:
                if peer is None:
                    conn = await t.connect_any(target, alpn=alpn, timeout=3)
                else:
                    conn = await t.connect(peer, [target], alpn=alpn, timeout=3)
            except Exception:
                outcome["dropped"] += 1
                continue
            outcome["connected"] += 1
            if variant in ("big", "many-big"):
                streams = [conn.open_stream() for _ in range(1 if variant == "big" else 128)]
                sends = [asyncio.create_task(raw_send(stream, big)) for stream in streams]
                await asyncio.wait(sends, timeout=15)
                for task in sends:
                    task.cancel()
                continue
            for _ in range(128):
                if not conn.is_open:
                    break
                stream = conn.open_stream()
                if variant == "many-legal":
                    raw_write(stream, legal, end=True)
                else:
                    raw_write(stream, legal[:-100])  # never finished
            await asyncio.sleep(0.3)
    finally:
        await asyncio.sleep(0.5)
        for t in attackers:
            await t.close()
    return outcome


async def member_round_trips(
    key: NodeKey, peer: NodeId, target: tuple[str, int], subnet: str, stop: asyncio.Event
) -> list[float]:
    """A member asking the daemon for its log, again and again; the time of each answer."""
    t = Transport(key, host="127.0.0.1", accept=AllowKeys())
    await t.start()
    times = []
    try:
        while not stop.is_set():
            started = time.monotonic()
            conn = await t.connect(peer, [target], timeout=5)
            reply = await conn.request("log.sync", {"subnet": subnet, "heads": []}, timeout=5)
            assert reply.type != "error", reply.body
            times.append(time.monotonic() - started)
            await asyncio.sleep(0.05)
    finally:
        await t.close()
    return times


def test_a_stranger_cannot_balloon_a_daemon_or_starve_its_members(spt_nodes):
    alpha, beta = spt_nodes.subnet(["alpha", "beta"])
    subnet = alpha.json("subnet", "status")["subnets"][0]["id"]
    beta_key = NodeKey.from_private_bytes((beta.home / "node.key").read_bytes())
    beta.stop()  # the test speaks for beta from here, with beta's key
    host, port = alpha.address.split(":")
    target = (host, int(port))
    alpha_id = NodeId.from_hex(alpha.key)
    assert alpha.proc is not None
    before = peak_rss_kb(alpha.proc.pid)

    async def scenario():
        stop = asyncio.Event()
        member = asyncio.create_task(member_round_trips(beta_key, alpha_id, target, subnet, stop))
        await asyncio.sleep(0.3)
        try:
            outcome = await asyncio.wait_for(attack(target), 60)
        finally:
            await asyncio.sleep(0.3)
            stop.set()
        return outcome, await member

    outcome, times = asyncio.run(scenario())
    peak = peak_rss_kb(alpha.proc.pid)
    print(f"peak RSS before {before} kB, after {peak} kB; member round trips {len(times)}, max {max(times):.3f} s; {outcome}")
    assert alpha.proc.poll() is None, alpha.log()
    assert peak < RSS_LIMIT_KB, f"daemon peak RSS {peak} kB"
    assert times and max(times) < 1.0, times
    assert outcome["dropped"] >= 1  # one source may not keep more than a few unproved connections
    log = alpha.log()
    assert outcome["connected"] >= 3, (outcome, log[-3000:])
    assert "exceeds the 65536-byte limit" in log or "msgpack items" in log, log[-3000:]
    status = alpha.cli("daemon", "status")
    assert status.returncode == 0, status.stderr


async def relay_round_trips(target: tuple[str, int], relay: NodeId, stop: asyncio.Event) -> list[float]:
    """A node registered at the relay, looking up a tag again and again; the time of each answer."""
    t = Transport(NodeKey.generate(), host="127.0.0.1", accept=AllowKeys())
    await t.start()
    times = []
    try:
        conn = await t.connect(relay, [target], alpn=ALPN_RELAY, timeout=5)
        await conn.request("relay.register", {"port": t.sockname[1]}, timeout=5)
        while not stop.is_set():
            started = time.monotonic()
            reply = await conn.request("relay.lookup", {"tag": bytes(16)}, timeout=5)
            assert reply.type == "relay.found", reply.body
            times.append(time.monotonic() - started)
            await asyncio.sleep(0.05)
    finally:
        await t.close()
    return times


@pytest.mark.relay
def test_a_stranger_cannot_balloon_a_relay_or_starve_its_nodes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPT_")}
    env["SPT_HOME"] = str(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "spt", "relay", "serve", "--listen", "127.0.0.1:0", "--key-file", str(tmp_path / "relay.key")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # RELAY_LISTENING:spt-relay://127.0.0.1:PORT#KEY
        assert line.startswith("RELAY_LISTENING:"), line
        hostport, _, key_hex = line.split("//", 1)[1].partition("#")
        host, _, port = hostport.rpartition(":")
        target, relay = (host, int(port)), NodeId.from_hex(key_hex)
        before = peak_rss_kb(proc.pid)

        async def scenario():
            stop = asyncio.Event()
            node = asyncio.create_task(relay_round_trips(target, relay, stop))
            await asyncio.sleep(0.3)
            try:
                await asyncio.wait_for(attack(target, ALPN_RELAY, relay), 60)
            finally:
                await asyncio.sleep(0.3)
                stop.set()
            return await node

        times = asyncio.run(scenario())
        peak = peak_rss_kb(proc.pid)
        print(f"relay peak RSS before {before} kB, after {peak} kB; lookups {len(times)}, max {max(times):.3f} s")
        assert proc.poll() is None
        assert peak < RSS_LIMIT_KB, f"relay peak RSS {peak} kB"
        assert times and max(times) < 1.0, times
    finally:
        proc.terminate()
        proc.wait(10)
