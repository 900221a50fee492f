"""Hypothesis fuzzing of every decoder that reads bytes from the network (membership and join
messages excepted: tests/fuzz/test_fuzz_membership.py and test_fuzz_join.py cover those).

Each target gets 10,000 examples. The strategy is plain bytes (cheap to generate); `shaped` turns
them into raw bytes, a valid input with edits, or a msgpack value of any shape, so structure is
covered without hypothesis building nested values. A target may only succeed or raise its
documented error (see _targets.py); anything else fails with the input that caused it.
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


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz(name):
    target = TARGETS[name]

    @FUZZ
    @given(st.binary(max_size=600))
    def run(data: bytes) -> None:
        target(shaped(name, data))

    run()
