"""Perch ids that differ only in case name one perch (issue 10): one folder, one inbox quota.

The perch store compares ids without case; the file plugin used the id as the peer wrote it for
its rows, its folder and its quota sum, so `BOB` got a second folder and a second quota.
"""

from __future__ import annotations

import asyncio
import os

import blake3
import pytest
from ft_helpers import CONFIG, join_pair
from test_safety import ask, speak_as

pytestmark = pytest.mark.slow

QUOTA = 1000


def offer(tid: str, to: str, size: int) -> dict:
    digest = blake3.blake3(b"\0" * size).digest()
    return {
        "tid": tid, "subnet": "home", "to": to, "from": "mallory", "label": "alpha", "message": "",
        "manifest": {"name": "f", "files": [["f", size, digest, digest]]},
    }


def test_case_variants_of_a_perch_id_share_one_folder_and_one_quota(spt_nodes):
    a = spt_nodes("a", label="alpha", config=CONFIG)
    b = spt_nodes("b", label="beta", config=CONFIG + f"\n[file]\ninbox_quota_bytes = {QUOTA}\n")
    join_pair(a, b)
    b_key, b_addr = b.key, b.address
    a.stop()  # the test speaks as alpha, straight to beta's daemon
    tids = [os.urandom(16).hex() for _ in range(3)]

    async def script(conn):
        return [
            await ask(conn, "file.offer", offer(tids[0], "bob", 600)),
            await ask(conn, "file.offer", offer(tids[1], "BOB", 600)),
            await ask(conn, "file.offer", offer(tids[2], "Bob", 300)),
        ]

    first, upper, mixed = asyncio.run(speak_as(a.home, b_key, b_addr, script))
    assert first[0] == "ok", first
    assert upper[0] != "ok" and "quota" in upper[1], upper  # 600 pending + 600 > 1000
    assert mixed[0] == "ok", mixed  # 600 + 300 fits
    folders = sorted(p.name for p in (b.home / "endpoints").iterdir())
    assert [f.lower() for f in folders] == sorted(set(f.lower() for f in folders)), folders
    assert "BOB" not in folders and "Bob" not in folders
    rows = b.json("file", "list", "--all")
    perches = {t.get("perch") or t.get("to") for t in rows.get("transfers", rows if isinstance(rows, list) else [])}
    assert perches <= {"bob", None}, perches
