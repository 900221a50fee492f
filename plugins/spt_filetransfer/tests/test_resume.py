"""kill -9 of the receiving daemon mid-transfer: it resumes from what was verified (SPEC.md §8.5)."""

from __future__ import annotations

import pytest
from ft_helpers import file_hash, inbox, make_pair, one, random_file, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.root]  # creates subnets (elevated)

MIB = 1 << 20


def test_receiver_killed_at_half_resumes_and_status_shows_progress(spt_nodes, tmp_path):
    # the sender is capped at 25 MiB/s so that "about half" can be caught from outside, even when
    # a loaded machine takes a second or more per CLI call
    a, b = make_pair(spt_nodes, a_env={"SPT_FILE_MAX_RATE": str(25 * MIB)})
    size = 300 * MIB
    src = random_file(tmp_path / "big.bin", 300)
    queued = a.cli("file", "send", str(src), "bob")
    assert queued.returncode == 0 and queued.stdout.startswith("FILE_QUEUED:"), queued.stderr
    tid = queued.stdout.strip().split(":", 1)[1]

    # mid-flight, both sides show progress
    sending = wait_for(lambda: (t := one(a, tid)) and t["done"] >= 0.2 * size and t, every=0.02, what="20 %")
    assert sending["state"] == "transferring" and sending["done"] < size and sending["rate"] > 0
    assert sending["path"] == "tcp" and sending["eta_s"] is not None
    line = a.cli("file", "status", tid).stdout
    assert line.startswith(f"TRANSFER:{tid} transferring ") and " outgoing beta tcp" in line
    mid = wait_for(lambda: (t := one(b, tid)) and t["done"] >= 0.5 * size and t, every=0.02, what="half")
    assert mid["state"] in ("transferring", "verifying") and mid["done"] < size
    assert mid["rate"] > 0 and mid["eta_s"] is not None and mid["path"] == "tcp"

    b.kill()  # SIGKILL: no chance to record anything more
    sent_at_kill = one(a, tid)["sent"]
    assert sent_at_kill < size
    b.start()

    done = wait_for(lambda: (t := one(a, tid)).get("state") == "complete" and t, timeout=60, what="completion")
    resent = done["sent"] - sent_at_kill
    print(f"killed at {mid['done'] / size:.0%} (receiver), resent {resent / size:.0%} of the file")
    assert resent < 0.6 * size, f"{resent} bytes sent after the restart"
    assert file_hash(inbox(b) / tid / "big.bin") == file_hash(src)
    assert one(b, tid)["state"] == "complete"
