"""kill -9 during a 10,000-message stream, honestly (SPEC §4.2, §9.17; issue 11 must-show 3).

One numbered stream from alice on alpha to bob on gamma. Mid-stream the receiving daemon is
killed while bob's `spt ready` listener is attached (it reconnects to the restarted daemon); later the sending daemon is
killed and restarted. The sender counts every error reply and retries it explicitly with the
same message id: each must be DAEMON_DOWN (its own daemon gone) or, just after its restart,
NO_PERCH (the restarted daemon keeps registry rows in memory only, so it knows bob again only
once its registry has re-synced: a known gap, reported). Afterwards bob has every message
exactly once, in order.
"""

from __future__ import annotations

import signal

import pytest

from spt.testing.nodes import DEFAULT_CONFIG
from spt.testing.traffic import Listener, Stream, check_stream, drain, listed
from spt.testing.wait import wait_for

pytestmark = pytest.mark.slow

CONFIG = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 1.0\n"

TOTAL = 10_000


def test_kill_9_of_either_daemon_mid_stream_loses_and_duplicates_nothing(spt_nodes):
    alpha, gamma = spt_nodes.subnet(["alpha", "gamma"], config=CONFIG)
    listeners = [Listener(gamma, "bob")]
    wait_for(lambda: listed(alpha, "bob"), 15, "bob's row on alpha")
    stream = Stream(alpha, "bob", "alice", "m", TOTAL, retry_on=frozenset({"DAEMON_DOWN", "NO_PERCH"})).start()

    # 1. the receiver, with bob's listener attached
    wait_for(lambda: len(listeners[0].received) >= TOTAL // 10, 120, "the stream to reach bob")
    before = len(listeners[0].received)
    sent_at_kill = len(stream.sent)
    gamma.kill(signal.SIGKILL)
    gamma.start()  # the same `spt ready` reconnects to the new daemon (no second READY)
    wait_for(lambda: len(stream.sent) > sent_at_kill + TOTAL // 10, 120, "sends after the receiver's restart")
    wait_for(lambda: len(listeners[0].received) > before, 120, "the listener to receive after the restart")
    assert listeners[0].alive()
    assert not stream.errors, f"the receiver's death must not show at the sender: {stream.errors[:5]}"

    # 2. the sender, mid-stream
    wait_for(lambda: len(stream.sent) >= TOTAL // 2, 300, "half the stream")
    killed_at = len(stream.sent)
    alpha.kill(signal.SIGKILL)
    wait_for(lambda: len(stream.errors) >= 3 or stream.failure, 20, "the sender to see its daemon down")
    assert stream.failure is None, stream.failure.status_line()
    alpha.start()
    stream.join(600)
    assert 0 < killed_at < TOTAL and len(stream.sent) == TOTAL
    kinds = {token for _, token in stream.errors}
    assert "DAEMON_DOWN" in kinds and kinds <= {"DAEMON_DOWN", "NO_PERCH"}, kinds
    failed = sorted({i for i, _ in stream.errors})
    # every error belongs to the message in flight at the kill or those just after it
    assert failed and failed[0] >= killed_at and failed[-1] <= killed_at + 1, failed[:10]
    assert {s.token for s in stream.sent} <= {"SENT", "QUEUED"}

    # 3. bob got everything: pushed live before and after the kills, the rest drained
    wait_for(lambda: sum(len(lst.received) for lst in listeners) >= TOTAL or not alpha.json("doctor")["checks"],
             300, "the stream to arrive")
    wait_for(lambda: not [c for c in alpha.json("doctor")["checks"] if c["name"] == "outgoing-spool"], 300,
             "alpha's outgoing spool to drain")
    for listener in listeners:
        listener.close()
    bodies = [r.body for lst in listeners for r in lst.received] + [r.body for r in drain(gamma, "bob")]
    assert 0 < before < TOTAL, "the kill did not land mid-stream"
    check_stream(bodies, "m", range(TOTAL))
    print(f"kill: receiver killed after {sent_at_kill} sent ({before} read), sender after {killed_at}; "
          f"errors retried: {dict((k, sum(1 for _, t in stream.errors if t == k)) for k in kinds)}")
