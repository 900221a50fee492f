"""A member whose clock is 90 s off (issue 11 must-show 7, SPEC §5.4, §2.10).

beta's daemon runs with its wall clock moved +90 s (`spt.testing.skew`, a fault point in the
test kit). It still answers a join with the code it shows (the step is taken by its own clock),
and the hybrid logical clocks keep order: an entry alpha makes after hearing beta's is stamped
after it, although alpha's own clock is 90 s behind.
"""

from __future__ import annotations

import sqlite3
import sys
import time

import pytest

from spt.core.proto.membership import Entry
from spt.testing.nodes import DEFAULT_CONFIG, fresh_code

pytestmark = [pytest.mark.slow, pytest.mark.root]  # subnet create/join are elevated

CONFIG = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 0.5\n"

SKEW = 90.0


def log_entries(node) -> list[Entry]:
    conn = sqlite3.connect(f"file:{node.home / 'spt.db'}?mode=ro", uri=True, timeout=5)
    try:
        return [Entry.from_bytes(bytes(row[0])) for row in conn.execute("SELECT data FROM log_entries")]
    finally:
        conn.close()


def test_a_member_90_s_off_answers_joins_and_hlc_order_holds(spt_nodes):
    alpha = spt_nodes("alpha", label="alpha", config=CONFIG)
    beta = spt_nodes("beta", label="beta", config=CONFIG, start=False)
    beta.daemon_argv = [sys.executable, "-m", "spt.testing.skew", str(SKEW), "daemon", "run"]
    beta.start()
    gamma = spt_nodes("gamma", label="gamma", config=CONFIG)
    alpha.cli("subnet", "create", "home", check=True)
    # the skewed member joins through alpha, then answers gamma's join with its own code
    beta.cli("subnet", "join", "home", "--code", fresh_code(alpha, "home"), "--peer", alpha.address, check=True)
    joined = gamma.cli("subnet", "join", "home", "--code", fresh_code(beta, "home"), "--peer", beta.address)
    assert joined.returncode == 0 and "JOINED:home" in joined.stdout, joined.stdout + joined.stderr + beta.log()[-3000:]
    # alpha hears beta's rows (stamped 90 s ahead), then makes its own entry
    for _ in range(100):
        doc = alpha.json("subnet", "status", "--nodes")
        if len(doc["subnets"][0]["members"]) >= 3:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # a few presence rounds from beta
    assert alpha.cli("node", "label", "set", "alpha2").returncode == 0
    entries = log_entries(alpha)
    [label] = [e for e in entries if e.type == "label" and e.author.hex == alpha.key]
    earlier = [e for e in entries if e is not label]
    ahead = max(e.hlc for e in earlier)
    assert ahead.wall_ms > (time.time() + SKEW / 2) * 1000, "beta's clock does not show in the log"
    assert label.hlc > ahead, (label.hlc, ahead)  # made later by alpha, ordered later by HLC
