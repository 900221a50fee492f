"""A member's file.punch requests cannot start simultaneous opens without limit on the receiver
(each holds a thread and a bound port for up to PUNCH_SECONDS). Written as the member, over real
sockets: its own member connection, its key, a transfer of its own in progress."""

from __future__ import annotations

import asyncio
import socket

import pytest
from ft_helpers import make_pair, one, random_file, wait_for
from spt_filetransfer.dataserver import MAX_PER_OWNER

from spt.core.identity import NodeId
from spt.core.net.connections import RequestError
from spt.core.net.transport import ALPN_MEMBER, AllowKeys, Transport
from spt.core.store import load_or_create_key

MIB = 1 << 20


async def punch_many(a, b, tid: str, n: int) -> list[str]:
    """`n` concurrent file.punch requests to `b` as `a`, from a socket of our own: each answer."""
    key, _ = load_or_create_key(a.home / "node.key")
    host, port = b.address.rsplit(":", 1)
    transport = Transport(key, host="127.0.0.1", port=0, accept=AllowKeys())
    await transport.start()
    closed = socket.socket()  # a port nobody listens on: each open is refused and retried
    closed.bind(("127.0.0.1", 0))
    try:
        conn = await transport.connect(NodeId.from_hex(b.key), [(host, int(port))], alpn=ALPN_MEMBER, timeout=5)
        body = {"tid": tid, "subnet": "home", "port": closed.getsockname()[1],
                "udp_port": transport.sockname[1],  # b sees us at it: no NAT changed it
                "seen": f"{host}:{port}"}

        async def one_punch() -> str:
            try:
                reply = await conn.request("file.punch", body, timeout=10)
            except RequestError as exc:
                return exc.code
            return "ok" if reply.body.get("ok") else f"declined: {reply.body.get('reason')}"

        return list(await asyncio.gather(*(one_punch() for _ in range(n))))
    finally:
        closed.close()
        await transport.close()


@pytest.mark.slow
@pytest.mark.root  # creates subnets (elevated)
def test_a_members_punch_requests_are_bounded(spt_nodes, tmp_path):
    a, b = make_pair(spt_nodes, a_env={"SPT_FILE_MAX_RATE": str(4 * MIB)})
    src = random_file(tmp_path / "f.bin", 24)  # ~6 s at the capped rate: the session is live meanwhile
    tid = a.cli("file", "send", str(src), "bob").stdout.strip().split(":", 1)[1]
    wait_for(lambda: one(a, tid).get("state") == "transferring", timeout=60, what="the data connection")
    answers = asyncio.run(punch_many(a, b, tid, MAX_PER_OWNER + 24))
    assert answers.count("ok") <= MAX_PER_OWNER, answers  # the member's share, its transfer's connection included
    assert answers.count("ok") >= 1, answers  # the requests were well-formed: some opens started
    assert "FILE_BUSY" in answers, answers
