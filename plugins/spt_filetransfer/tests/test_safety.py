"""A hostile member crafts offers and chunks directly (SPEC.md §9.19): nothing lands outside the inbox.

The test speaks as alpha (with alpha's key, alpha's daemon stopped) over a member connection
of its own, so the sender's own checks are bypassed.
"""

from __future__ import annotations

import asyncio
import os

import blake3
import pytest
from ft_helpers import inbox, make_pair

from spt.core.identity import NodeId
from spt.core.net.connections import RequestError
from spt.core.net.transport import AllowKeys, Transport
from spt.core.paths import StatePaths
from spt.core.store import load_or_create_key
from spt.core.types import parse_hostport

pytestmark = [pytest.mark.slow, pytest.mark.root]  # creates subnets (elevated)


def offer(tid: str, path: str, data: bytes = b"pwned\n", name: str | None = None) -> dict:
    digest = blake3.blake3(data).digest()
    return {
        "tid": tid, "subnet": "home", "to": "bob", "from": "mallory", "label": "alpha", "message": "",
        "manifest": {"name": name or path.split("/")[0], "files": [[path, len(data), digest, digest if data else b""]]},
    }


async def speak_as(home, b_key: str, b_addr: str, script):
    key, _ = load_or_create_key(StatePaths(home).key_file)
    peer = NodeId.from_hex(b_key)
    transport = Transport(key, host="127.0.0.1", port=0, accept=AllowKeys([peer]))
    await transport.start()
    try:
        conn = await transport.connect(peer, [parse_hostport(b_addr)], timeout=5)
        return await script(conn)
    finally:
        await transport.close()


async def ask(conn, type_name, body):
    try:
        reply = await conn.request(type_name, body, timeout=10)
    except RequestError as exc:
        return exc.code, exc.remote_message
    return "ok", reply.body


def test_crafted_offers_are_refused_and_nothing_is_written_outside(spt_nodes, tmp_path):
    a, b = make_pair(spt_nodes)
    b_key, b_addr = b.key, b.address
    a.stop()
    outside = tmp_path / "outside"
    outside.mkdir()
    box = inbox(b)
    tids = [os.urandom(16).hex() for _ in range(8)]

    async def script(conn):
        results = {}
        for label, body in [
            ("dotdot", offer(tids[0], "x/../../etc/x", name="x")),
            ("dotdot-top", offer(tids[1], "../../etc/x", name="x")),
            ("absolute", offer(tids[2], "/etc/x", name="x")),
            ("drive", offer(tids[3], "C:/x", name="x")),
            ("backslash", offer(tids[3], "x\\..\\y", name="x")),
        ]:
            results[label] = await ask(conn, "file.offer", body)
        box.mkdir(parents=True, exist_ok=True)
        (box / tids[4]).symlink_to(outside)  # a symlink out of the inbox where the transfer would go
        results["symlinked transfer folder"] = await ask(conn, "file.offer", offer(tids[4], "x"))
        (box / tids[4]).unlink()
        box.rmdir()
        box.symlink_to(outside)  # the inbox itself points elsewhere
        results["symlinked inbox"] = await ask(conn, "file.offer", offer(tids[5], "x"))
        box.unlink()
        # a well-formed offer works, and a forged chunk is refused and never written as good
        good = b"good data\n"
        results["good"] = await ask(conn, "file.offer", offer(tids[6], "ok.txt", good))
        results["bad chunk"] = await ask(conn, "file.chunk", {"tid": tids[6], "subnet": "home", "f": 0, "c": 0, "d": b"evil data\n"})
        results["partial after bad"] = (box / tids[6] / "ok.txt.partial").exists() and (
            box / tids[6] / "ok.txt.partial"
        ).read_bytes()
        results["good chunk"] = await ask(conn, "file.chunk", {"tid": tids[6], "subnet": "home", "f": 0, "c": 0, "d": good})
        return results

    results = asyncio.run(speak_as(a.home, b_key, b_addr, script))
    for label in ("dotdot", "dotdot-top", "absolute", "drive", "backslash", "symlinked transfer folder", "symlinked inbox"):
        code, message = results[label]
        assert code == "FILE_REFUSED", (label, code, message)
        assert "unsafe path" in message, (label, message)
    assert "'..' component" in results["dotdot"][1] and "absolute path" in results["absolute"][1]
    assert "symlink" in results["symlinked inbox"][1]
    assert results["good"] == ("ok", {"state": "offered", "bitmaps": [b"\x00"]})
    assert results["bad chunk"] == ("ok", {"ok": False})
    assert results["partial after bad"] in (False, b"\0" * 10)
    assert results["good chunk"] == ("ok", {"ok": True})
    assert (box / tids[6] / "ok.txt").read_bytes() == b"good data\n"
    assert list(outside.iterdir()) == []
    assert not os.path.exists("/etc/x")
    written = [p for p in b.home.rglob("*") if p.is_file() and p.name in ("x", "y", "etc")]
    assert written == []
