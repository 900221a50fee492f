"""Fuzz targets: every message of the join ceremony as the other side receives it, at the state
where it is expected (sessions advanced with a real exchange, then copied per input), the signed
failure and unlock records members gossip, the bundle a joiner opens, and the key-claim fields.
Every input is either handled or raises RemoteProtocolError. 10,000 inputs per target by default
(see _mutate.py)."""

from __future__ import annotations

import copy
import random

import pytest
from _mutate import EXAMPLES, PER_EXAMPLE, mutate, random_value
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spt.core.errors import RemoteProtocolError
from spt.core.identity import NodeKey
from spt.core.key_claims import node_field, sig_field
from spt.core.proto import join as jp
from spt.core.proto.canonical import parse_canonical
from spt.core.proto.hlc import Hlc
from spt.core.proto.membership import MembershipLog, countersign_join, make_create, propose_join
from spt.core.proto.totp import code_at, new_seed, step_of

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
SEED = new_seed(bytes(range(100, 120)))
NOW = 1_700_000_020.0
EXPORTER = b"\x11" * 32

MEMBER, OTHER, JOINER = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
_clock = Hlc(MEMBER.node_id)
_create = make_create(MEMBER, name="Home", label="alpha", nonce=b"\x07" * 16, seed=SEED, hlc=_clock.now(1))
LOG = MembershipLog.from_create(_create)
LOG.add(countersign_join(propose_join(MEMBER, parents=LOG.heads(), joiner=OTHER.node_id, label="beta", epoch=0, hlc=_clock.now(2)), OTHER))
SUBNET_ID = LOG.subnet_id
LOCKS = {SUBNET_ID: jp.JoinStatus()}


def clone(session):
    """A copy whose `receive` cannot disturb the original: sessions rebind their fields, except
    the SPAKE2 object, which is copied too (secrets are shared, never pickled)."""
    other = copy.copy(session)
    spake = getattr(session, "_spake", None)
    if spake is not None:
        other._spake = copy.copy(spake)
    return other


def responder() -> jp.ResponderSession:
    ctx = jp.ResponderSubnet(LOG, SEED, 0, "alpha", {MEMBER.node_id: jp.Contact(("192.0.2.1:47470",), ())})
    return jp.ResponderSession(MEMBER, JOINER.node_id, EXPORTER, subnets={"home": ctx}, source="198.51.100.7:5555")


def joiner() -> jp.JoinerSession:
    code = code_at(SEED, step_of(NOW - 1.0))
    return jp.JoinerSession(JOINER, MEMBER.node_id, EXPORTER, name="home", label="gamma", code=code, entered_at=100.0)


def run_exchange():
    """One successful exchange: the sessions before each message, and the messages."""
    j, m = joiner(), responder()
    snaps_m, snaps_j, to_m, to_j = [], [], [], []
    out_j = list(j.start(wall=NOW, mono=101.0).messages)
    pending = [("m", msg) for msg in out_j]
    proceeded = False
    while pending:
        side, msg = pending.pop(0)
        if side == "m":
            snaps_m.append(clone(m))
            to_m.append(msg)
            pending += [("j", x) for x in m.receive(msg, wall=NOW, locks=LOCKS).messages]
        else:
            snaps_j.append(clone(j))
            to_j.append(msg)
            out = j.receive(msg)
            pending += [("m", x) for x in out.messages]
            if not proceeded and any(isinstance(e, jp.MemberHello) for e in out.events):
                proceeded = True
                pending += [("m", x) for x in j.proceed().messages]
    assert j.is_finished and m.is_finished, (j.state, m.state)
    return snaps_m, to_m, snaps_j, to_j


SNAPS_M, TO_M, SNAPS_J, TO_J = run_exchange()
MESSAGE_KEYS = tuple(sorted({k for msg in TO_M + TO_J for k in msg}))


def feed(session, msg, to_member: bool) -> None:
    try:
        if to_member:
            session.receive(msg, wall=NOW, locks=LOCKS)
        else:
            session.receive(msg)
    except RemoteProtocolError:
        pass


@pytest.mark.parametrize("step", range(len(TO_M)), ids=lambda i: f"to-member-{TO_M[i]['type']}")
def test_member_side_messages(step):
    @FUZZ
    @given(st.integers(0, 2**64))
    def target(seed):
        rng = random.Random(seed)
        for _ in range(PER_EXAMPLE):
            msg = mutate(rng, TO_M[step], MESSAGE_KEYS) if rng.random() < 0.9 else random_value(rng, 0, MESSAGE_KEYS)
            feed(clone(SNAPS_M[step]), msg, True)

    target()


@pytest.mark.parametrize("step", range(len(TO_J)), ids=lambda i: f"to-joiner-{TO_J[i]['type']}")
def test_joiner_side_messages(step):
    @FUZZ
    @given(st.integers(0, 2**64))
    def target(seed):
        rng = random.Random(seed)
        for _ in range(PER_EXAMPLE):
            msg = mutate(rng, TO_J[step], MESSAGE_KEYS) if rng.random() < 0.9 else random_value(rng, 0, MESSAGE_KEYS)
            feed(clone(SNAPS_J[step]), msg, False)

    target()


FAILURE = jp.FailureRecord.sign(MEMBER, subnet_id=SUBNET_ID, joiner=JOINER.node_id, source="198.51.100.7:5555",
                                time_ms=1, step=2).to_dict()
UNLOCK = jp.UnlockRecord.sign(MEMBER, subnet_id=SUBNET_ID, time_ms=1).to_dict()


@FUZZ
@given(st.integers(0, 2**64))
def test_gossiped_failure_and_unlock_records(seed):
    rng = random.Random(seed)
    keys = tuple(sorted(set(FAILURE) | set(UNLOCK)))
    for _ in range(PER_EXAMPLE):
        for decode, sample in ((jp.FailureRecord.from_dict, FAILURE), (jp.UnlockRecord.from_dict, UNLOCK)):
            try:
                record = decode(mutate(rng, sample, keys))
            except RemoteProtocolError:
                continue
            assert record.verify()


def _bundle_sample():
    """The plain bundle of the exchange above, as the joiner parses it once it opens the seal."""
    m = SNAPS_M[-1]
    out = clone(m).receive(TO_M[-1], wall=NOW, locks=LOCKS)
    admitted = next(e for e in out.events if isinstance(e, jp.MemberAdmitted))
    log = LOG.copy()
    log.add(admitted.entry)
    bundle = {
        "subnet": {"id": SUBNET_ID.hex(), "name": "Home"}, "seed": SEED.reveal().hex(), "epoch": 0,
        "members": [{"key": k.hex, "label": v, "addresses": ["192.0.2.1:47470"], "relays": []} for k, v in log.state().members.items()],
        "log": [e.to_dict() for e in log.entries()],
    }
    return bundle, admitted.entry


BUNDLE, JOIN_ENTRY = _bundle_sample()
BUNDLE_KEYS = tuple(sorted(set(BUNDLE) | {"id", "name", "key", "label", "addresses", "relays", "parents", "body", "sig"}))


def test_the_bundle_sample_opens():
    assert jp._open_bundle(parse_canonical(__import__("spt.core.proto.canonical", fromlist=["x"]).canonical_bytes(BUNDLE)),
                           SUBNET_ID, JOIN_ENTRY, me=JOINER.node_id).log.state().is_member(JOINER.node_id)


@FUZZ
@given(st.integers(0, 2**64))
def test_bundles(seed):
    rng = random.Random(seed)
    for _ in range(PER_EXAMPLE):
        try:
            jp._open_bundle(mutate(rng, BUNDLE, BUNDLE_KEYS), SUBNET_ID, JOIN_ENTRY, me=JOINER.node_id)
        except RemoteProtocolError:
            continue


@FUZZ
@given(st.integers(0, 2**64))
def test_key_claim_fields(seed):
    rng = random.Random(seed)
    for _ in range(PER_EXAMPLE):
        for decode, sample in ((node_field, MEMBER.node_id.hex), (sig_field, "ab" * 64)):
            value = mutate(rng, sample, ()) if rng.random() < 0.5 else rng.choice([sample[:-1], sample.upper(), sample + "0", random_value(rng)])
            try:
                decode(value)
            except RemoteProtocolError:
                continue
