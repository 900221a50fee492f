"""kill -9 during a 10,000-message stream, honestly (SPEC §4.2, §9.17; issue 11 must-show 3).

Four numbered streams of 2,500 from alice on alpha to bob on gamma, sent side by side (one
sender alone spends ~2 minutes on 10,000 durable round trips; four keep the daemons busy in a
quarter of that, and the kills land with several messages in flight). Mid-stream the receiving daemon is
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
TAGS = ("a", "b", "c", "d")


def test_kill_9_of_either_daemon_mid_stream_loses_and_duplicates_nothing(spt_nodes):
    alpha, gamma = spt_nodes.subnet(["alpha", "gamma"], config=CONFIG)
    listeners = [Listener(gamma, "bob")]
    wait_for(lambda: listed(alpha, "bob"), 15, "bob's row on alpha")
    streams = [Stream(alpha, "bob", "alice", tag, TOTAL // len(TAGS), retry_on=frozenset({"DAEMON_DOWN", "NO_PERCH"}))
               for tag in TAGS]
    for stream in streams:
        stream.start()

    def sent() -> int:
        return sum(len(stream.sent) for stream in streams)

    # 1. the receiver, with bob's listener attached
    wait_for(lambda: len(listeners[0].received) >= TOTAL // 10, 120, "the stream to reach bob")
    before = len(listeners[0].received)
    sent_at_kill = sent()
    gamma.kill(signal.SIGKILL)
    gamma.start()  # the same `spt ready` reconnects to the new daemon (no second READY)
    wait_for(lambda: sent() > sent_at_kill + TOTAL // 10, 120, "sends after the receiver's restart")
    wait_for(lambda: len(listeners[0].received) > before, 120, "the listener to receive after the restart")
    assert listeners[0].alive()
    for stream in streams:
        assert not stream.errors, f"the receiver's death must not show at the sender: {stream.errors[:5]}"

    # 2. the sender, mid-stream
    wait_for(lambda: sent() >= TOTAL // 2, 300, "half the stream")
    killed_at = {stream.tag: len(stream.sent) for stream in streams}
    alpha.kill(signal.SIGKILL)
    # a stream may finish a message between the count above and the kill: the one in flight at
    # the kill lies between the counts taken before and after it
    after_kill = {stream.tag: len(stream.sent) for stream in streams}
    wait_for(lambda: all(len(stream.errors) >= 3 or stream.failure for stream in streams), 20,
             "every sender to see its daemon down")
    for stream in streams:
        assert stream.failure is None, stream.failure.status_line()
    alpha.start()
    kinds: set[str] = set()
    for stream in streams:
        stream.join(600)
        at = killed_at[stream.tag]
        assert 0 < at < TOTAL // len(TAGS) and len(stream.sent) == TOTAL // len(TAGS)
        kinds |= {token for _, token in stream.errors}
        failed = sorted({i for i, _ in stream.errors})
        # every error belongs to the message in flight at the kill or the one just after it
        assert failed and failed[0] >= at and failed[-1] <= after_kill[stream.tag] + 1, (stream.tag, at, failed[:10])
        assert failed[-1] - failed[0] <= 1, (stream.tag, failed[:10])
        assert {s.token for s in stream.sent} <= {"SENT", "QUEUED"}
    assert "DAEMON_DOWN" in kinds and kinds <= {"DAEMON_DOWN", "NO_PERCH"}, kinds

    # 3. bob got everything: pushed live before and after the kills, the rest drained
    wait_for(lambda: sum(len(lst.received) for lst in listeners) >= TOTAL or not alpha.json("doctor")["checks"],
             300, "the stream to arrive")
    wait_for(lambda: not [c for c in alpha.json("doctor")["checks"] if c["name"] == "outgoing-spool"], 300,
             "alpha's outgoing spool to drain")
    for listener in listeners:
        listener.close()
    bodies = [r.body for lst in listeners for r in lst.received] + [r.body for r in drain(gamma, "bob")]
    assert 0 < before < TOTAL, "the kill did not land mid-stream"
    for tag in TAGS:
        check_stream(bodies, tag, range(TOTAL // len(TAGS)))
    errors = [token for stream in streams for _, token in stream.errors]
    print(f"kill: receiver killed after {sent_at_kill} sent ({before} read), sender after {killed_at}; "
          f"errors retried: {dict((k, errors.count(k)) for k in kinds)}")
