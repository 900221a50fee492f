"""A member's relay.punch requests cannot make a node spray probes without limit (issue 10).

relay.punch carries the asker's candidate addresses (up to 16), which the node primes at once:
three short-TTL probes to each. Nothing proves the addresses are the asker's, so a member could
point them anywhere (here: 16 UDP sockets of the test, a third party on the node's network) and
repeat the request. Written as the member over real QUIC with its own key: 20 requests at once
make the node probe as for one punch, not twenty, while that punch runs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from spt.core.identity import NodeId, NodeKey
from spt.core.net.paths import NONCE_BYTES
from spt.core.net.transport import AllowKeys, Transport

pytestmark = [pytest.mark.slow, pytest.mark.relay, pytest.mark.root]  # creates subnets (elevated)

REQUESTS, TARGETS, PRIMES = 20, 16, 3


def test_repeated_punch_requests_probe_third_parties_as_one_punch(spt_nodes):
    alpha, beta = spt_nodes.subnet(["alpha", "beta"], name="home")
    subnet = alpha.json("subnet", "status")["subnets"][0]["id"]
    beta_key = NodeKey.from_private_bytes((beta.home / "node.key").read_bytes())
    beta.stop()  # the test speaks as beta from here
    host, port = alpha.address.split(":")
    third = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(TARGETS)]
    for s in third:
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    addrs = [f"127.0.0.1:{s.getsockname()[1]}" for s in third]

    async def scenario() -> list[str]:
        t = Transport(beta_key, host="127.0.0.1", accept=AllowKeys())
        await t.start()
        try:
            conn = await t.connect(NodeId.from_hex(alpha.key), [(host, int(port))], timeout=5)

            async def ask() -> str:
                body = {"subnet": subnet, "nonce": os.urandom(NONCE_BYTES), "addrs": addrs, "mapping": "unknown"}
                reply = await conn.request("relay.punch", body, timeout=5)
                return reply.type

            return list(await asyncio.gather(*(ask() for _ in range(REQUESTS))))
        finally:
            await t.close()

    try:
        answers = asyncio.run(scenario())
        probes, deadline = 0, time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for s in third:
                try:
                    while s.recv(64):
                        probes += 1
                except BlockingIOError:
                    pass
            time.sleep(0.02)
    finally:
        for s in third:
            s.close()
    print(f"answers {set(answers)}, probes at the third party {probes}")
    assert answers == ["relay.punch"] * REQUESTS  # answered (the candidates), never refused
    assert 0 < probes <= PRIMES * TARGETS, probes
