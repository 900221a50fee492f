"""A member pruned while its file is on the way stops getting it in (issue 10).

The data connection (TCP, keyed per transfer) is not the member connection the prune closes,
so without a check the pruned sender kept writing: the file completed and landed in the inbox
seconds after the prune. Over real daemons: beta prunes alpha mid-transfer; the transfer then
ends failed on beta within a few seconds, its partial data gone, and nothing is delivered.
"""

from __future__ import annotations

import time

import pytest
from ft_helpers import inbox, make_pair, one, random_file, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.root]  # creates subnets, prunes (elevated)

MIB = 1 << 20


def test_a_pruned_senders_transfer_is_cut(spt_nodes, tmp_path):
    a, b = make_pair(spt_nodes, a_env={"SPT_FILE_MAX_RATE": str(MIB), "SPT_FILE_DATA_PATH": "tcp"})
    src = random_file(tmp_path / "f.bin", 12)  # ~12 s at the capped rate
    tid = a.cli("file", "send", str(src), "bob").stdout.strip().split(":", 1)[1]
    wait_for(lambda: one(b, tid).get("state") == "transferring", timeout=60, what="the data connection")
    pruned = b.cli("subnet", "prune", "alpha", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    pruned_at = time.monotonic()
    wait_for(lambda: one(b, tid).get("state") != "transferring", timeout=8, what="the transfer to end on beta")
    row = one(b, tid)
    print(f"{row['state']} after {time.monotonic() - pruned_at:.1f} s at {row['done']} of {row['total']} bytes: {row['reason']}")
    assert row["state"] == "failed" and row["done"] < row["total"], row
    assert not (inbox(b) / tid).exists()
