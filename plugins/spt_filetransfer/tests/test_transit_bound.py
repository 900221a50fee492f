"""A member's file.transit requests cannot make the receiver hold relay connections without limit.

Each file.transit the receiver accepts starts a thread that dials the relay's TCP listener and
waits there up to TRANSIT_WAIT (30 s) for the other side. Written as the member, over real
sockets: a transfer of its own in progress, and valid tickets naming the receiver, asked at the
receiver's own relay by keys the member registered there (it never joins its side of them).
The receiver must hold at most MAX_CONNECTIONS such connections at once, like its simultaneous
opens (test_punch_bound.py), and refuse the rest FILE_BUSY.
"""

from __future__ import annotations

import asyncio
import json
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ft_helpers import CONFIG, join_pair, one, random_file, wait_for
from spt_filetransfer.dataserver import MAX_CONNECTIONS
from spt_relay_fallback.url import RelayUrl

from spt.core.identity import NodeId, NodeKey
from spt.core.net.connections import RequestError
from spt.core.net.transport import ALPN_MEMBER, ALPN_RELAY, AllowKeys, Transport
from spt.core.store import load_or_create_key

pytestmark = [pytest.mark.slow, pytest.mark.relay, pytest.mark.root]  # creates subnets (elevated)

MIB = 1 << 20
ASKERS, TICKETS_EACH = 8, 6  # 48 valid tickets naming the receiver, more than MAX_CONNECTIONS


@pytest.fixture
def tcp_relay(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "spt", "relay", "serve", "--listen", "127.0.0.1:0", "--tcp-listen", "127.0.0.1:0",
         "--key-file", str(tmp_path / "relay.key")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        env={"SPT_HOME": str(tmp_path), "PATH": ""},
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline().strip() if ready else ""
        assert line.startswith("RELAY_LISTENING:"), line
        yield line.split(":", 1)[1]
    finally:
        proc.terminate()
        proc.wait(10)


def connections_to(port: int) -> int:
    """Established TCP connections to `port` on loopback, as the kernel lists them."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[3] == "01":
            count += 1
    return count


async def transit_many(a, b, tid: str, url: str) -> tuple[list[str], int]:
    """Tickets naming `b` from ASKERS registered keys, then one file.transit per ticket to `b`
    as `a` (concurrently): each answer, and how many connections `b` then holds at the relay."""
    parsed = RelayUrl.parse(url)
    relay, (host, port) = parsed.key, parsed.address
    made = []
    try:
        async def asker() -> list[dict]:
            t = Transport(NodeKey.generate(), host="127.0.0.1", accept=AllowKeys())
            await t.start()
            made.append(t)
            conn = await t.connect(relay, [(host, int(port))], alpn=ALPN_RELAY, timeout=5)
            await conn.request("relay.register", {"port": t.sockname[1]}, timeout=5)
            return [(await conn.request("relay.transit", {"peer": peer}, timeout=5)).body for _ in range(TICKETS_EACH)]

        peer = bytes.fromhex(b.key)
        replies = [r for rs in await asyncio.gather(*(asker() for _ in range(ASKERS))) for r in rs]
        tickets, tcp_port = [r["peer_ticket"] for r in replies], replies[0]["tcp_port"]
        key, _ = load_or_create_key(a.home / "node.key")
        member = Transport(key, host="127.0.0.1", accept=AllowKeys())
        await member.start()
        made.append(member)
        b_host, b_port = b.address.rsplit(":", 1)
        conn = await member.connect(NodeId.from_hex(b.key), [(b_host, int(b_port))], alpn=ALPN_MEMBER, timeout=5)
        before = connections_to(tcp_port)

        async def invite(ticket: bytes) -> str:
            body = {"tid": tid, "subnet": "home", "via": "relay", "invitation": {"relay": relay.raw, "ticket": ticket}}
            try:
                await conn.request("file.transit", body, timeout=10)
            except RequestError as exc:
                return f"{exc.code} {exc.remote_message}" if exc.code != "FILE_BUSY" else exc.code
            return "ok"

        answers = list(await asyncio.gather(*(invite(t) for t in tickets)))
        await asyncio.sleep(1.0)  # the receiver's threads dial the relay and wait there
        return answers, connections_to(tcp_port) - before
    finally:
        for t in made:
            await t.close()


def test_a_members_transit_invitations_are_bounded(spt_nodes, tcp_relay, tmp_path):
    a = spt_nodes("a", label="alpha", config=CONFIG, env={"SPT_FILE_MAX_RATE": str(MIB), "SPT_FILE_DATA_PATH": "tcp"})
    b = spt_nodes("b", label="beta", config=CONFIG + f"\n[relay]\nurls = {json.dumps([tcp_relay])}\n")
    wait_for(lambda: (r := b.json("relay", "list")["relays"]) and r[0]["reachable"], timeout=30, what="b registered")
    join_pair(a, b)
    src = random_file(tmp_path / "f.bin", 30)  # ~30 s at the capped rate: the transfer is live meanwhile
    tid = a.cli("file", "send", str(src), "bob").stdout.strip().split(":", 1)[1]
    wait_for(lambda: one(a, tid).get("state") == "transferring", timeout=60, what="the data connection")
    started = time.monotonic()
    answers, held = asyncio.run(transit_many(a, b, tid, tcp_relay))
    print(f"answers {sorted(set(answers))}, ok {answers.count('ok')}, connections held {held}, "
          f"{time.monotonic() - started:.1f} s")
    # each connection shows twice in /proc/net/tcp only when both ends are local: b's end here
    assert held <= MAX_CONNECTIONS, (held, answers)
    assert answers.count("ok") <= MAX_CONNECTIONS, answers
    assert "FILE_BUSY" in answers, answers
    assert held >= 1  # the invitations were valid: b did join some
