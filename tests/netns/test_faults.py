"""Faults in the netns lab: partitions, path changes, daemons killed mid-stream (SPEC §9.17, §4.2).

Daemons run in lab hosts with shortened timing knobs (presence every 0.5 s, offline after 3 s);
the test drives them over their control sockets. Every stream is numbered, so the receivers'
sequences can be checked for loss, duplication and order (`spt.testing.traffic`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from spt.testing.netns import Lab
from spt.testing.nodes import LabNode, LabNodes
from spt.testing.traffic import Listener, Stream, check_stream, drain
from spt.testing.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow]

OFFLINE_AFTER = 3.0


@pytest.fixture
def lab_nodes(netns_lab: Callable[..., Lab]) -> Iterator[Callable[..., LabNodes]]:
    made: list[LabNodes] = []

    def make(lab: Lab, **kwargs: Any) -> LabNodes:
        nodes = LabNodes(lab, **kwargs)
        made.append(nodes)
        return nodes

    yield make
    for nodes in made:
        nodes.close()


def row_state(node: LabNode, endpoint_id: str) -> str | None:
    doc = node.json("endpoint", "list")
    states = [e["state"] for s in doc["subnets"] for e in s["endpoints"] if e["id"] == endpoint_id]
    return states[0] if states else None


def peer_online(node: LabNode) -> bool | None:
    members = node.members()
    return members[0]["online"] if len(members) == 1 else None


def plan(i: int) -> tuple[str, str]:
    """Mostly plain sends, every 100th a ring, every 10th `--active-only`."""
    if i % 100 == 50:
        return "ring", "default"
    if i % 10 == 3:
        return "send", "active"
    return "send", "default"


def split(listener: Listener, drained: list[Any], ringer: Stream, tag: str) -> tuple[list[str], list[str], list[str]]:
    """One sender's messages as (pushed to the listener, drained, handed to a ring). A message
    sent while the receiver rings the sender is that ring's reply (§4.3): it goes to the waiting
    `ringer`, not to the listener, so it leaves the listener's sequence."""
    return ([r.body for r in listener.received if r.body.startswith(tag)],
            [r.body for r in drained if r.body.startswith(tag)],
            [r.body for r in ringer.replies if r.body.startswith(tag)])


def test_a_partition_longer_than_the_offline_ttl_loses_and_duplicates_nothing(netns_lab, lab_nodes):
    lab = netns_lab()
    lab.lan(2)
    nodes = lab_nodes(lab, presence=0.5, offline=OFFLINE_AFTER)
    a, b = nodes.subnet(["h1", "h2"])
    listen_a, listen_b = Listener(a, "alice"), Listener(b, "bob")
    wait_for(lambda: row_state(a, "bob") == "active" and row_state(b, "alice") == "active", 20, "rows")
    count = 1000
    ab = Stream(a, "bob", "alice", "ab", count, plan, rate=100).start()
    ba = Stream(b, "alice", "bob", "ba", count, plan, rate=100).start()
    wait_for(lambda: len(ab.sent) > 100 and len(ba.sent) > 100, 20,
             f"traffic before the cut {ab.sent[-1:]} {ba.sent[-1:]} {ab.failure} {ba.failure}")

    cut_at = time.monotonic()
    with lab.cut("h1", "h2"):
        # the rows go OFFLINE on both sides and doctor names the peer and the reason
        wait_for(lambda: row_state(a, "bob") == "offline" and row_state(b, "alice") == "offline",
                 OFFLINE_AFTER * 4, "rows offline during the cut")
        assert peer_online(a) is False and peer_online(b) is False
        doctor = a.json("doctor")
        peers = [c for c in doctor["checks"] if c["name"].startswith("peer ") and "h2" in c["name"]]
        assert len(peers) == 1, doctor
        assert peers[0]["level"] == "WARN" and "none" in peers[0]["detail"], peers
        assert "(peer-offline)" in peers[0]["detail"], peers
        sent_during = (len(ab.sent), len(ba.sent))
        wait_for(lambda: time.monotonic() - cut_at > OFFLINE_AFTER * 2.5, 30, "the cut to last")
        assert len(ab.sent) > sent_during[0] and len(ba.sent) > sent_during[1], "senders stalled in the cut"
        queued_after_cut = sum(1 for s in ab.sent if s.token == "QUEUED" and s.started > cut_at)
    healed_at = time.monotonic()
    wait_for(lambda: row_state(a, "bob") == "active" and row_state(b, "alice") == "active", 30,
             "rows back after the heal")
    ab.join(120)
    ba.join(120)
    assert queued_after_cut > 0
    # a send to a node known offline, or behind queued ones, is queued at once: only the one
    # in flight at the cut waits for its dial to fail
    slow = [(s.index, s.token, round(s.started - cut_at, 1), round(s.took, 1)) for s in ab.sent + ba.sent if s.took > 1.0]
    assert len(slow) <= 2 and all(took < 5 for *_, took in slow), slow
    assert ab.errors == [] and ba.errors == []
    assert {s.token for s in ab.sent + ba.sent} <= {"SENT", "QUEUED"}

    # every message arrives: pushed ones live, `--active-only` ones at the next drain
    pushed = [i for i in range(count) if plan(i)[1] == "default"]
    held = [i for i in range(count) if plan(i)[1] == "active"]
    def all_pushed() -> bool:
        return (len(listen_b.bodies("ab")) + len(ba.replies) >= len(pushed)
                and len(listen_a.bodies("ba")) + len(ab.replies) >= len(pushed))

    deadline = time.monotonic() + 60
    while not all_pushed() and time.monotonic() < deadline:
        time.sleep(0.2)
    listen_a.close()
    listen_b.close()
    drained_a, drained_b = drain(a, "alice"), drain(b, "bob")
    for listener, drained, ringer, tag in ((listen_b, drained_b, ba, "ab"), (listen_a, drained_a, ab, "ba")):
        live, late, replies = split(listener, drained, ringer, tag)
        check_stream(live + late + replies, tag, range(count), ordered=False)  # exactly once
        as_replies = {int(r[len(tag):]) for r in replies}
        check_stream(live, tag, [i for i in pushed if i not in as_replies])  # in order
        check_stream(late, tag, [i for i in held if i not in as_replies])
    print(f"partition: healed after {healed_at - cut_at:.1f} s; {queued_after_cut} a->b queued from the cut on")


def path_kind(node: LabNode) -> str:
    members = node.members()
    return str(members[0]["path"]["kind"]) if len(members) == 1 and members[0].get("path") else "?"


@pytest.mark.relay
def test_the_path_moves_under_load_relayed_to_direct_and_back_without_loss(netns_lab, lab_nodes):
    """Relayed -> direct when the punch succeeds mid-stream; direct -> relayed when the NATs forget
    their mappings and the direct path stays blocked. Exactly once, in order, no stall > 2 s.

    Timing knobs: an idle timeout of 1 s (offline 1.5 s) is what bounds noticing that the direct
    path died; the move back to the relay takes that plus one dial, well under the 2 s. The
    stream stops 200 messages after the move back, so the test lasts ~20 s unless the first
    punch round ends before the block lifts (the next is 30 s later)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_reach import ReachLab

    lab = netns_lab()
    rl = ReachLab(lab, "eim", "eim")
    try:
        url = rl.start_relay()
        nodes = lab_nodes(lab, presence=0.25, offline=1.5, config=f'\n[relay]\nurls = ["{url}"]\n')
        t = rl.topo
        # the direct path is blocked at first, so the pair starts relayed
        blocked = lab.cut(t.a, t.b)
        a, b = nodes(t.a), nodes(t.b)
        created = a.cli("subnet", "create", "home", check=True).stdout
        code = next(line.split()[1] for line in created.splitlines() if line.startswith("CODE:home "))
        b.cli("subnet", "join", "home", "--code", code, "--timeout", "20", check=True)
        wait_for(lambda: path_kind(a).startswith("relayed"), 20, "a relayed path")
        listener = Listener(b, "bob")
        wait_for(lambda: row_state(a, "bob") == "active", 20, "bob's row")
        stream = Stream(a, "bob", "alice", "pm", 3000, rate=40).start()
        began = time.monotonic()
        kinds: list[tuple[float, str]] = []

        def watch(until: Callable[[], bool], timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not until() and time.monotonic() < deadline:
                kinds.append((time.monotonic(), path_kind(a)))
                time.sleep(0.3)

        watch(lambda: len(stream.sent) > 100, 30)
        # No conntrack flush here: flushing a Linux MASQUERADE while relayed packets keep arriving
        # makes it give the host another port towards the relay (the relay's packet took the old
        # one first), so its mapping is no longer endpoint-independent and whether a punch can
        # still work depends on which side's key is lower. The punch only needs the block lifted.
        blocked.heal()  # the next punch round succeeds: relayed -> direct, mid-stream
        watch(lambda: path_kind(a) == "direct punched", 60)
        assert path_kind(a) == "direct punched", kinds[-5:]
        moved_direct = len(stream.sent)
        print(f"direct after {time.monotonic() - began:.1f} s at {moved_direct}")
        watch(lambda: len(stream.sent) > moved_direct + 100, 30)
        # one move: the relayed connection lingering in its grace is not punched and moved again
        assert a.log().count("moved to a punched path") + b.log().count("moved to a punched path") == 1
        lab.flush_conntrack(t.nat_a)  # direct -> relayed: the NATs forget, the direct path stays cut
        lab.flush_conntrack(t.nat_b)
        cut = lab.cut(t.a, t.b)
        watch(lambda: path_kind(a).startswith("relayed"), 30)
        moved_relayed = len(stream.sent)
        print(f"relayed after {time.monotonic() - began:.1f} s at {moved_relayed}")
        watch(lambda: len(stream.sent) > moved_relayed + 200, 30)  # queued and sent over the relay
        stream.stop()
        stream.join(60)
        count = len(stream.sent)
        cut.heal()
        deadline = time.monotonic() + 30
        while len(listener.bodies("pm")) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        arrivals = [r.at for r in listener.received if r.body.startswith("pm")]
        listener.close()
        check_stream(listener.bodies("pm") + [r.body for r in drain(b, "bob")], "pm", range(count))
        assert 100 < moved_direct < moved_relayed < count - 200, (moved_direct, moved_relayed, count)
        gaps = sorted((b2 - b1 for b1, b2 in itertools.pairwise(arrivals)), reverse=True)
        print(f"path moves: {count} messages, longest stalls {[round(g, 2) for g in gaps[:3]]} s")
        assert gaps[0] <= 2.0, f"stalls: {gaps[:5]}"
    finally:
        rl.close()
