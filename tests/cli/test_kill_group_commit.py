"""kill -9 of either daemon amid group commits (issue 14): messages that arrive together are
committed together (one writer, one fsync per batch), and none is answered before its batch
committed, so exactly-once holds with many senders at once."""

from __future__ import annotations

import signal

import pytest

from spt.testing.nodes import DEFAULT_CONFIG
from spt.testing.traffic import Stream, check_stream, drain, listed
from spt.testing.wait import wait_for

pytestmark = pytest.mark.slow

CONFIG = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 1.0\n"


def test_kill_9_amid_group_commits_of_concurrent_senders_loses_and_duplicates_nothing(spt_nodes):
    """Issue 14: messages arriving together are committed together (one writer, one fsync per
    batch). Four senders at once to a perch on gamma, no listener, so every message goes
    through gamma's group commit (or alpha's, queued while gamma is down); gamma is killed
    mid-stream, then alpha. Each answer comes only after its batch committed, so afterwards
    bob holds every message of every stream exactly once, in each stream's order.

    Two of the senders send 8 messages per `msg.send_many` call, so the kills also land amid
    batches (several messages per `msg.deliver_batch` request, one group commit on gamma);
    a batch that failed is sent again whole with the same ids."""
    alpha, gamma = spt_nodes.subnet(["alpha", "gamma"], config=CONFIG)
    gamma.cli("ready", "bob", "--once", "--timeout", "0.1", check=True)
    wait_for(lambda: listed(alpha, "bob"), 15, "bob's row on alpha")
    retry = frozenset({"DAEMON_DOWN", "NO_PERCH"})
    # open-ended streams at full speed (batches form); stopped once both kills are behind them
    streams = [Stream(alpha, "bob", f"sender{k}", tag, 1_000_000, retry_on=retry, batch=1 if k < 2 else 8).start()
               for k, tag in enumerate("abcd")]

    def sent() -> int:
        return sum(len(s.sent) for s in streams)

    wait_for(lambda: sent() >= 200, 60, "messages before the receiver's kill")
    gamma.kill(signal.SIGKILL)
    gamma.start()
    at_gamma_kill = sent()
    wait_for(lambda: sent() >= at_gamma_kill + 200, 60, "sends after the receiver's restart")
    alpha.kill(signal.SIGKILL)
    wait_for(lambda: any(s.errors for s in streams) or any(s.failure for s in streams), 20, "a sender to see alpha down")
    alpha.start()
    at_alpha_kill = sent()
    wait_for(lambda: sent() >= at_alpha_kill + 100, 60, "sends after the sender's restart")
    for s in streams:
        s.stop()
    for s in streams:
        s.join(60)
    assert not [s.failure for s in streams if s.failure], [s.failure for s in streams]
    assert {x.token for s in streams for x in s.sent} <= {"SENT", "QUEUED"}
    wait_for(lambda: not [c for c in alpha.json("doctor")["checks"] if c["name"] == "outgoing-spool"], 120,
             "alpha's outgoing spool to drain")
    bodies = [r.body for r in drain(gamma, "bob")]
    for s in streams:  # every answered message, once, in its stream's order
        check_stream(bodies, s.tag, range(len(s.sent)))
