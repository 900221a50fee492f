"""HLC timestamps and clock (SPEC.md §2.10)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spt.core.errors import LocalProtocolError, RemoteProtocolError
from spt.core.identity import NodeId
from spt.core.proto.hlc import Hlc, HlcTimestamp

NODE_A = NodeId(bytes.fromhex("aa" * 32))
NODE_B = NodeId(bytes.fromhex("bb" * 32))


def ts(wall: int, counter: int, node: NodeId = NODE_A) -> HlcTimestamp:
    return HlcTimestamp(wall, counter, node.hex)


def test_order_is_wall_then_counter_then_node() -> None:
    stamps = [ts(2, 0, NODE_A), ts(1, 5, NODE_B), ts(1, 5, NODE_A), ts(1, 9, NODE_A), ts(0, 99, NODE_B)]
    assert sorted(stamps) == [
        ts(0, 99, NODE_B),
        ts(1, 5, NODE_A),
        ts(1, 5, NODE_B),
        ts(1, 9, NODE_A),
        ts(2, 0),
    ]


def test_now_follows_wall_time_and_resets_counter() -> None:
    clock = Hlc(NODE_A)
    assert clock.now(1000) == ts(1000, 0)
    assert clock.now(2000) == ts(2000, 0)


def test_now_counts_when_wall_time_stands_still_or_steps_back() -> None:
    clock = Hlc(NODE_A)
    clock.now(1000)
    assert clock.now(1000) == ts(1000, 1)
    assert clock.now(500) == ts(1000, 2)


def test_update_adopts_a_later_remote_time() -> None:
    clock = Hlc(NODE_A)
    clock.now(1000)
    assert clock.update(ts(5000, 7, NODE_B), 1200) == ts(5000, 8)


def test_update_with_equal_walls_takes_the_larger_counter() -> None:
    clock = Hlc(NODE_A)
    clock.now(1000)
    clock.now(1000)  # counter 1
    assert clock.update(ts(1000, 4, NODE_B), 900) == ts(1000, 5)
    assert clock.update(ts(1000, 0, NODE_B), 900) == ts(1000, 6)


def test_update_when_own_wall_time_is_ahead() -> None:
    clock = Hlc(NODE_A)
    clock.now(1000)
    assert clock.update(ts(10, 3, NODE_B), 3000) == ts(3000, 0)
    clock.update(ts(10, 3, NODE_B), 2000)
    assert clock.last == ts(3000, 1)


def test_clock_resumes_after_restart_from_the_stored_last() -> None:
    clock = Hlc(NODE_A, last=ts(9000, 3))
    assert clock.now(100) == ts(9000, 4)


def test_drift_limit_refuses_timestamps_far_in_the_future() -> None:
    clock = Hlc(NODE_A, max_drift_ms=60_000)
    with pytest.raises(RemoteProtocolError):
        clock.update(ts(1_000_000, 0, NODE_B), 1000)
    assert clock.update(ts(50_000, 0, NODE_B), 1000) == ts(50_000, 1)


def test_wire_form_round_trips() -> None:
    stamp = ts(1234, 5)
    assert stamp.to_wire() == [1234, 5, NODE_A.hex]
    assert HlcTimestamp.from_wire(stamp.to_wire()) == stamp


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [1, 2],
        [-1, 0, "aa" * 32],
        [1, True, "aa" * 32],
        [1, 0, "AA" * 32],
        [1, 0, "aa"],
        [1.5, 0, "aa" * 32],
    ],
)
def test_malformed_wire_timestamps_are_remote_errors(bad: object) -> None:
    with pytest.raises(RemoteProtocolError):
        HlcTimestamp.from_wire(bad)


def test_constructing_a_bad_timestamp_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        HlcTimestamp(-1, 0, NODE_A.hex)


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 5)),
        max_size=60,
    )
)
def test_every_stamp_exceeds_everything_seen_before(ops: list[tuple[bool, int, int, int]]) -> None:
    clock = Hlc(NODE_A)
    seen: list[HlcTimestamp] = []
    for is_local, wall, remote_wall, remote_counter in ops:
        if is_local:
            stamp = clock.now(wall)
        else:
            received = ts(remote_wall, remote_counter, NODE_B)
            stamp = clock.update(received, wall)
            assert stamp > received
        assert all(stamp > earlier for earlier in seen)
        assert stamp.wall_ms >= wall
        seen.append(stamp)
