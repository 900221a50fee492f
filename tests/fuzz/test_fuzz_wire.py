"""Hypothesis fuzzing of every decoder that reads bytes from the network (membership and join
messages excepted: tests/fuzz/test_fuzz_membership.py and test_fuzz_join.py cover those).

10,000 examples, each given to every target: so each target gets 10,000 inputs, and hypothesis's
per-example cost (most of the time here) is paid once for all of them. The strategy is plain
bytes; `shaped` turns them, per target, into raw bytes, a valid input with edits, or a msgpack
value of any shape, so structure is covered without hypothesis building nested values. A target
may only succeed or raise its documented error (see _targets.py); anything else fails the test,
naming the target, with the input that caused it.
"""

from __future__ import annotations

import pytest
from _targets import TARGETS, shaped
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

FUZZ = settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
)


class TargetFailed(AssertionError):
    pass


def feed(names: list[str], data: bytes) -> None:
    for name in names:
        try:
            TARGETS[name](shaped(name, data))
        except Exception as exc:
            raise TargetFailed(f"fuzz target {name} failed on {data!r}: {type(exc).__name__}: {exc}") from exc


RELAY = [name for name in TARGETS if name.startswith("relay_")]  # the relay distribution's decoders


@FUZZ
@given(st.binary(max_size=600))
def test_every_network_decoder_takes_any_bytes(data: bytes) -> None:
    feed([name for name in TARGETS if name not in RELAY], data)


@pytest.mark.relay
@FUZZ
@given(st.binary(max_size=600))
def test_every_relay_decoder_takes_any_bytes(data: bytes) -> None:
    feed(RELAY, data)
