"""Fuzz target: membership-log entries as they arrive from the network (frames carry the dict
form, the store and bundles the canonical bytes). Every input either decodes to a well-formed
entry that re-encodes to itself or raises RemoteProtocolError; merging what decodes never breaks
the log. 10,000 inputs per target by default (see _mutate.py)."""

from __future__ import annotations

import random

from _mutate import EXAMPLES, PER_EXAMPLE, mutate, random_value
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spt.core.errors import RemoteProtocolError
from spt.core.identity import NodeKey
from spt.core.proto.hlc import Hlc
from spt.core.proto.membership import (
    Entry,
    MembershipLog,
    countersign_join,
    make_create,
    make_label,
    make_prune,
    propose_join,
)
from spt.core.proto.totp import new_seed

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))

A, B = NodeKey.generate(), NodeKey.generate()
_clock = Hlc(A.node_id)
CREATE = make_create(A, name="Home", label="alpha", nonce=b"\x01" * 16, seed=new_seed(b"\x02" * 20), hlc=_clock.now(1))
JOIN = countersign_join(propose_join(A, parents=[CREATE.hash], joiner=B.node_id, label="beta", epoch=0, hlc=_clock.now(2)), B)
LABEL = make_label(B, parents=[JOIN.hash], label="bee", hlc=Hlc(B.node_id).now(3))
PRUNE = make_prune(A, parents=[LABEL.hash], target=B.node_id, reason="gone", hlc=_clock.now(4))
ENTRIES = (CREATE, JOIN, LABEL, PRUNE)
SAMPLES = [e.to_dict() for e in ENTRIES]
KEYS = tuple(sorted({k for d in SAMPLES for k in d} | {k for d in SAMPLES for k in d["body"]}))
BASE = MembershipLog.from_entries(CREATE.hash[:16], [CREATE, JOIN, LABEL])


def check(data: object) -> None:
    try:
        entry = Entry.from_dict(data, proposal=True)
    except RemoteProtocolError:
        return
    assert entry.shape_problem(proposal=True) == ""
    assert Entry.from_dict(entry.to_dict(), proposal=True) == entry
    log = BASE.copy()
    result = log.merge([entry])
    assert len(result.added) + len(result.refused) + len(result.dropped) + len(result.pending) <= 1
    log.state()  # evaluation never fails on what was accepted


@FUZZ
@given(st.integers(0, 2**64))
def test_entry_dicts_decode_or_refuse_cleanly(seed):
    rng = random.Random(seed)
    for _ in range(PER_EXAMPLE):
        data = mutate(rng, rng.choice(SAMPLES), KEYS) if rng.random() < 0.85 else random_value(rng, 0, KEYS)
        check(data)


@FUZZ
@given(st.integers(0, 2**64))
def test_stored_entry_bytes_decode_or_refuse_cleanly(seed):
    rng = random.Random(seed)
    for _ in range(PER_EXAMPLE):
        raw = bytearray(rng.choice(ENTRIES).to_bytes())
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(raw))
            raw[i:i + rng.randrange(0, 4)] = rng.randbytes(rng.randrange(0, 4))
        try:
            entry = Entry.from_bytes(bytes(raw))
        except RemoteProtocolError:
            continue
        assert Entry.from_bytes(entry.to_bytes()) == entry
