"""Per-peer limits on the receiver (SPEC §8.5, issue 11 must-show 4): a transfer over
`max_transfer_bytes`, one over `max_concurrent_per_peer`, and one that would overrun the inbox
quota are each refused before anything is written, with FILE_REFUSED naming the limit."""

from __future__ import annotations

import pytest
from ft_helpers import CONFIG, inbox, join_pair, one, random_file, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.root]  # creates subnets (elevated)

MIB = 1 << 20
LIMITS = f"\n[file]\nmax_transfer_bytes = {3 * MIB}\nmax_concurrent_per_peer = 1\ninbox_quota_bytes = {5 * MIB}\n"


def send(a, path, *extra):
    return a.cli("file", "send", str(path), "bob", "--wait", *extra, timeout=120)


def test_each_per_peer_limit_is_refused_with_its_reason(spt_nodes, tmp_path):
    # the sender capped at 256 KiB/s: the first 3 MiB transfer lasts 12 s, long enough for a
    # second send to find it under way on a loaded machine
    a = spt_nodes("a", label="alpha", config=CONFIG, env={"SPT_FILE_MAX_RATE": str(MIB // 4)})
    b = spt_nodes("b", label="beta", config=CONFIG + LIMITS)
    join_pair(a, b)

    too_big = send(a, random_file(tmp_path / "big.bin", 4))
    assert too_big.returncode == 1 and too_big.stderr.startswith("FILE_REFUSED:"), too_big.stdout + too_big.stderr
    assert "file.max_transfer_bytes" in too_big.stderr

    # one transfer in flight, then a second from the same peer
    first = a.cli("file", "send", str(random_file(tmp_path / "slow.bin", 3)), "bob")
    tid = first.stdout.strip().split(":", 1)[1]
    wait_for(lambda: one(b, tid).get("state") == "transferring", what="the first transfer under way")
    second = send(a, random_file(tmp_path / "second.bin", 1))
    assert second.returncode == 1 and "file.max_concurrent_per_peer" in second.stderr, second.stderr
    wait_for(lambda: one(a, tid).get("state") == "complete", timeout=60, what="the first transfer")

    # 3 MiB landed; 3 more would pass 5 MiB
    over = send(a, random_file(tmp_path / "third.bin", 3))
    assert over.returncode == 1 and "file.inbox_quota_bytes" in over.stderr, over.stderr
    landed = sorted(p.name for p in inbox(b).rglob("*") if p.is_file())
    assert landed == ["slow.bin"], landed  # nothing of the refused ones was written
