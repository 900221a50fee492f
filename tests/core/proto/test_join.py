"""The join ceremony as two in-memory state machines, plus failure records and the lockout."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from spt.core.errors import LocalProtocolError, RemoteProtocolError, UsageError
from spt.core.identity import NodeKey
from spt.core.proto.hlc import Hlc
from spt.core.proto.join import (
    AlreadyMember,
    AttemptFailed,
    CodeExpired,
    Contact,
    FailureRecord,
    HelloRefused,
    Interference,
    Joined,
    JoinerSession,
    JoinerState,
    JoinLimiter,
    JoinStatus,
    Locked,
    MemberAdmitted,
    MemberHello,
    NotHere,
    Rejected,
    ResponderSession,
    ResponderState,
    ResponderSubnet,
    SkewRetry,
    SubnetFull,
    UnlockRecord,
)
from spt.core.proto.membership import (
    MembershipLog,
    countersign_join,
    make_create,
    make_label,
    make_prune,
    propose_join,
)
from spt.core.proto.totp import Secret, code_at, new_seed, step_of

SEED = new_seed(bytes(range(100, 120)))
NOW = 1_700_000_020.0  # 10 s into a 30-s step, so small offsets stay in it
E1 = b"\x11" * 32
E2 = b"\x22" * 32
OPEN = JoinStatus()


@dataclass
class Subnet:
    creator: NodeKey
    other: NodeKey
    log: MembershipLog
    contacts: dict = field(default_factory=dict)

    def ctx(self, *, seed=SEED, epoch=0) -> ResponderSubnet:
        return ResponderSubnet(self.log, seed, epoch, "alpha", self.contacts)

    @property
    def id(self) -> bytes:
        return self.log.subnet_id


def make_subnet() -> Subnet:
    a, b = NodeKey.generate(), NodeKey.generate()
    clock = Hlc(a.node_id)
    create = make_create(a, name="Home", label="alpha", nonce=b"\x07" * 16, seed=SEED, hlc=clock.now(1))
    log = MembershipLog.from_create(create)
    j = propose_join(a, parents=log.heads(), joiner=b.node_id, label="beta", epoch=0, hlc=clock.now(2))
    log.add(countersign_join(j, b))
    contacts = {a.node_id: Contact(("192.0.2.1:47470",), ()), b.node_id: Contact(("192.0.2.2:47470",), ())}
    return Subnet(a, b, log, contacts)


def code_now(wall: float = NOW - 1.0, seed=SEED) -> Secret[str]:
    """The code shown at `wall` (by default when the joiner typed it, 1 s before NOW)."""
    return code_at(seed, step_of(wall))


def wrong_code(wall: float = NOW - 1.0) -> Secret[str]:
    right = code_now(wall).reveal()
    return Secret(f"{(int(right) + 1) % 1_000_000:06d}")


@dataclass
class Run:
    joiner_events: list = field(default_factory=list)
    responder_events: list = field(default_factory=list)
    to_member: list = field(default_factory=list)
    to_joiner: list = field(default_factory=list)
    failures: list = field(default_factory=list)


def pump(
    joiner: JoinerSession,
    responder: ResponderSession,
    *,
    wall_j: float = NOW,
    wall_m: float = NOW,
    entered_ago: float = 1.0,
    lock=None,
    limiter: JoinLimiter | None = None,
    proceed: bool = True,
) -> Run:
    """Carry messages both ways until both sides are quiet. `limiter` recomputes the lock view
    from the failure records the responder emitted, as the shell would."""
    run = Run()

    def locks():
        if limiter is not None:
            return {k: limiter.status(run.failures, [], round(wall_m * 1000)) for k in SUBNET_IDS}
        return {k: lock or OPEN for k in SUBNET_IDS}

    out = joiner.start(wall=wall_j, mono=100.0 + entered_ago)
    pending = list(out.messages)
    while pending:
        msg = pending.pop(0)
        run.to_member.append(msg)
        m_out = responder.receive(msg, wall=wall_m, locks=locks())
        run.responder_events += m_out.events
        run.failures += [e.record for e in m_out.events if isinstance(e, AttemptFailed)]
        for reply in m_out.messages:
            run.to_joiner.append(reply)
            j_out = joiner.receive(reply)
            run.joiner_events += j_out.events
            pending += j_out.messages
            if proceed and any(isinstance(e, MemberHello) for e in j_out.events):
                pending += joiner.proceed().messages
    return run


SUBNET_IDS: list[bytes] = []


@pytest.fixture
def subnet():
    s = make_subnet()
    SUBNET_IDS[:] = [s.id]
    return s


def sessions(subnet: Subnet, *, code=None, joiner_key=None, e_j=E1, e_m=E1, name="home", rtt=0.0, ctx=None):
    jk = joiner_key or NodeKey.generate()
    member = subnet.creator
    joiner = JoinerSession(
        jk, member.node_id, e_j, name=name, label="gamma", code=code or code_now(), entered_at=100.0
    )
    responder = ResponderSession(
        member,
        jk.node_id,
        e_m,
        subnets={"home": ctx or subnet.ctx()},
        source="198.51.100.7:5555",
        rtt=rtt,
    )
    return jk, joiner, responder


def only(events, kind):
    found = [e for e in events if isinstance(e, kind)]
    assert len(found) == 1, events
    return found[0]


def walk(value):
    """Every leaf of a message (dicts, lists, bytes, str, int)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from walk(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from walk(v)
    else:
        yield value


# ---- the happy path -----------------------------------------------------------------------------


def test_right_code_joins_and_both_sides_agree(subnet):
    jk, joiner, responder = sessions(subnet)
    run = pump(joiner, responder)
    hello = only(run.joiner_events, MemberHello)
    assert hello.subnet_id == subnet.id and hello.name == "Home" and hello.member_label == "alpha"
    joined = only(run.joiner_events, Joined)
    admitted = only(run.responder_events, MemberAdmitted)
    assert joiner.state is JoinerState.JOINED and responder.state is ResponderState.ADMITTED
    bundle = joined.bundle
    assert bundle.seed == SEED and bundle.epoch == 0 and bundle.name == "Home"
    assert bundle.subnet_id == subnet.id == bundle.log.create_entry.hash[:16]
    assert bundle.join_entry == admitted.entry
    assert admitted.joiner == jk.node_id and admitted.label == "gamma"
    # M appends the entry; both logs then agree exactly
    subnet.log.add(admitted.entry)
    assert subnet.log.state() == bundle.log.state()
    assert subnet.log.ordered_hashes() == bundle.log.ordered_hashes()
    members = bundle.log.state().members
    assert members == {subnet.creator.node_id: "alpha", subnet.other.node_id: "beta", jk.node_id: "gamma"}
    assert bundle.contacts[subnet.other.node_id].addresses == ("192.0.2.2:47470",)


def test_name_is_matched_without_case(subnet):
    _, joiner, responder = sessions(subnet, name="HOME")
    run = pump(joiner, responder)
    assert only(run.joiner_events, Joined).bundle.name == "Home"


# ---- wrong code -----------------------------------------------------------------------------


def test_wrong_code_fails_both_sides_and_sends_nothing_secret(subnet):
    jk, joiner, responder = sessions(subnet, code=wrong_code())
    run = pump(joiner, responder)
    rejected = only(run.joiner_events, Rejected)
    assert rejected.error().status_line() == "JOIN_REJECTED:Home code did not match"
    failed = only(run.responder_events, AttemptFailed)
    assert failed.retry_step is None
    record = failed.record
    assert record.verify() and record.joiner == jk.node_id and record.responder == subnet.creator.node_id
    assert record.subnet_id == subnet.id and record.source == "198.51.100.7:5555"
    assert record.step == step_of(NOW - 1.0) and record.time_ms == round(NOW * 1000)
    assert joiner.state is JoinerState.FAILED and responder.state is ResponderState.CLOSED
    assert not any(isinstance(e, MemberAdmitted) for e in run.responder_events)
    # nothing secret in anything M emitted: no seed, no code, no member keys, no log
    assert [m["type"] for m in run.to_joiner] == ["hello", "pake", "fail"]
    secrets = [SEED.reveal(), SEED.reveal().hex(), subnet.other.node_id.raw, subnet.other.node_id.hex]
    secrets += [subnet.creator.node_id.raw, subnet.creator.node_id.hex, "beta"]
    real_code = code_now().reveal()
    for leaf in walk(run.to_joiner):
        for s in secrets:
            if isinstance(leaf, type(s)):
                assert s not in leaf
        assert leaf != real_code and leaf != int(real_code)
    blob = repr(run.to_joiner)
    assert SEED.reveal().hex() not in blob and subnet.other.node_id.hex not in blob


def test_failure_record_round_trips_and_detects_tampering(subnet):
    _, joiner, responder = sessions(subnet, code=wrong_code())
    record = only(pump(joiner, responder).responder_events, AttemptFailed).record
    assert FailureRecord.from_dict(record.to_dict()) == record
    with pytest.raises(RemoteProtocolError):
        FailureRecord.from_dict({**record.to_dict(), "step": record.step + 1})


# ---- channel binding and interference ---------------------------------------------------------


def test_mitm_with_different_exporters_fails_key_confirmation(subnet):
    _, joiner, responder = sessions(subnet, e_j=E1, e_m=E2)
    run = pump(joiner, responder)
    only(run.joiner_events, Rejected)
    only(run.responder_events, AttemptFailed)
    assert not any(m["type"] == "bundle" for m in run.to_joiner)


def test_member_confirm_mismatch_is_interference(subnet):
    _, joiner, responder = sessions(subnet)
    joiner.start(wall=NOW, mono=101.0)
    locks = {subnet.id: OPEN}
    hello = responder.receive(
        {
            "type": "hello",
            "version": 1,
            "name": "home",
            "label": "gamma",
            "entered_ago_ms": 1000,
            "wall_ms": round(NOW * 1000),
        },
        wall=NOW,
        locks=locks,
    )
    # feed the joiner's real flow, but corrupt M's confirmation on the way back
    joiner.receive(hello.messages[0])
    pake_a = joiner.proceed().messages[0]
    pake_b = responder.receive(pake_a, wall=NOW, locks=locks).messages[0]
    confirm_j = joiner.receive(pake_b).messages[0]
    confirm_m, admit = responder.receive(confirm_j, wall=NOW, locks=locks).messages
    bad = {**confirm_m, "mac": bytes(32)}
    events = joiner.receive(bad).events
    assert isinstance(events[0], Interference) and joiner.state is JoinerState.FAILED
    with pytest.raises(RemoteProtocolError):
        joiner.receive(admit)


# ---- clock skew -------------------------------------------------------------------------------


def test_skewed_joiner_gets_one_retry_at_its_own_step(subnet):
    # J's clock is 25 s ahead: M at 10 s into step s, J at 5 s into step s+1; J typed J's code
    wall_j = NOW + 25
    _, joiner, responder = sessions(subnet, code=code_now(wall_j - 1.0))
    run = pump(joiner, responder, wall_j=wall_j, wall_m=NOW)
    retry = only(run.joiner_events, SkewRetry)
    assert retry.step == step_of(wall_j - 1.0) == step_of(NOW) + 1
    assert retry.skew_ms == 25_000
    failed = only(run.responder_events, AttemptFailed)  # the first run is counted
    assert failed.retry_step == retry.step
    joined = only(run.joiner_events, Joined)
    assert joined.skew_ms == 25_000
    only(run.responder_events, MemberAdmitted)


def test_skew_retry_that_fails_is_counted_again_and_ends(subnet):
    wall_j = NOW + 25
    _, joiner, responder = sessions(subnet, code=wrong_code(wall_j - 1.0))
    run = pump(joiner, responder, wall_j=wall_j, wall_m=NOW)
    failures = [e for e in run.responder_events if isinstance(e, AttemptFailed)]
    assert [f.retry_step is not None for f in failures] == [True, False]
    assert failures[0].record.step != failures[1].record.step
    only(run.joiner_events, Rejected)
    assert [m["type"] for m in run.to_joiner].count("pake") == 2


def test_no_retry_when_clocks_agree_within_two_seconds(subnet):
    # J's clock is 1.5 s ahead and the code was typed just across a step boundary: by J's clock
    # in step s+1, by M's in step s. The skew is not shown (|δ| <= 2 s), so there is no retry.
    boundary = 1_700_000_010.0
    wall_m, wall_j = boundary + 0.2, boundary + 1.7
    _, joiner, responder = sessions(subnet, code=code_now(wall_j - 1.0))
    run = pump(joiner, responder, wall_j=wall_j, wall_m=wall_m)
    assert step_of(wall_j - 1.0) == step_of(wall_m - 1.0) + 1
    assert only(run.responder_events, AttemptFailed).retry_step is None
    assert not any(isinstance(e, SkewRetry) for e in run.joiner_events)
    assert only(run.joiner_events, Rejected).skew_ms == 1500


def test_no_retry_when_skew_is_more_than_one_step(subnet):
    wall_j = NOW + 65
    _, joiner, responder = sessions(subnet, code=code_now(wall_j - 1.0))
    run = pump(joiner, responder, wall_j=wall_j, wall_m=NOW)
    assert only(run.responder_events, AttemptFailed).retry_step is None
    only(run.joiner_events, Rejected)


def test_half_rtt_corrects_measured_skew(subnet):
    _, joiner, responder = sessions(subnet, rtt=0.2)
    run = pump(joiner, responder, wall_j=NOW, wall_m=NOW)
    assert only(run.joiner_events, MemberHello).skew_ms == 100


# ---- refusals before SPAKE2 ---------------------------------------------------------------------


def test_code_entered_over_thirty_seconds_ago_is_expired_and_not_counted(subnet):
    _, joiner, responder = sessions(subnet)
    run = pump(joiner, responder, entered_ago=31.0)
    expired = only(run.joiner_events, CodeExpired)
    assert expired.error().status_line().startswith("JOIN_CODE_EXPIRED:Home")
    assert not any(isinstance(e, AttemptFailed) for e in run.responder_events)
    assert [m["type"] for m in run.to_joiner] == ["hello"]
    assert responder.is_finished and joiner.is_finished


def test_locked_subnet_refuses_before_any_guess(subnet):
    until = round(NOW * 1000) + 1_800_000
    _, joiner, responder = sessions(subnet)
    run = pump(joiner, responder, lock=JoinStatus("locked", 10, until))
    locked = only(run.joiner_events, Locked)
    assert locked.until_ms == until
    assert locked.error().status_line() == "JOIN_LOCKED:Home until 2023-11-14T22:43:40+00:00"
    assert [m["type"] for m in run.to_joiner] == ["hello"]
    assert "pake" not in [m["type"] for m in run.to_member]
    only(run.responder_events, HelloRefused)


def test_lockout_reached_between_attempts_stops_the_retry(subnet):
    wall_j = NOW + 25
    _, joiner, responder = sessions(subnet, code=wrong_code(wall_j - 1.0))
    run = pump(joiner, responder, wall_j=wall_j, wall_m=NOW, limiter=JoinLimiter(max_failures=1))
    assert len([e for e in run.responder_events if isinstance(e, AttemptFailed)]) == 1
    assert only(run.joiner_events, Locked).until_ms == round(NOW * 1000) + 3_600_000
    assert [m["type"] for m in run.to_joiner] == ["hello", "pake", "fail", "fail"]


def test_unknown_name_is_not_here(subnet):
    _, joiner, responder = sessions(subnet, name="work")
    run = pump(joiner, responder)
    only(run.joiner_events, NotHere)
    assert run.to_joiner == [{"type": "hello", "version": 1, "state": "not-here"}]


def test_pruned_member_does_not_answer(subnet):
    b = subnet.other
    subnet.log.add(
        make_prune(b, parents=subnet.log.heads(), target=subnet.creator.node_id, hlc=Hlc(b.node_id).now(5))
    )
    _, joiner, responder = sessions(subnet)
    only(pump(joiner, responder).joiner_events, NotHere)


def test_member_with_stale_seed_does_not_answer(subnet):
    _, joiner, responder = sessions(subnet, ctx=subnet.ctx(seed=new_seed(b"\x09" * 20)))
    only(pump(joiner, responder).joiner_events, NotHere)


def test_existing_member_is_told(subnet):
    _, joiner, responder = sessions(subnet, joiner_key=subnet.other)
    event = only(pump(joiner, responder).joiner_events, AlreadyMember)
    assert event.error().status_line().startswith("ALREADY_MEMBER:Home")
    assert responder.is_finished


def test_full_subnet_refuses_before_any_guess_with_a_clear_error():
    """A subnet at its member cap (MAX_MEMBERS; 2 in a 32-entry log) would drop the join entry on
    arrival: the member says so at hello, nothing is counted, and the joiner gets a reason (it got
    a ceremony that ended without one: the member's own join entry did not take effect)."""
    small = make_subnet()
    log = MembershipLog(small.id, max_entries=32)
    for entry in small.log.entries():
        log.add(entry)
    assert len(log.state().members) == log.max_members == 2
    full = Subnet(small.creator, small.other, log, small.contacts)
    SUBNET_IDS[:] = [full.id]
    _, joiner, responder = sessions(full)
    run = pump(joiner, responder)
    event = only(run.joiner_events, SubnetFull)
    assert event.error().status_line().startswith("JOIN_REJECTED:Home the subnet is full")
    assert [m["type"] for m in run.to_joiner] == ["hello"]
    assert "pake" not in [m["type"] for m in run.to_member]
    assert not any(isinstance(e, AttemptFailed) for e in run.responder_events)
    assert only(run.responder_events, HelloRefused).state == "full"
    assert responder.is_finished and joiner.is_finished


def test_a_member_whose_budget_is_spent_leaves_the_join_to_another(subnet, monkeypatch):
    """The join entry is charged to the member that signs it; once its ordinary budget is spent
    (here: 2, its create and beta's join), the log would drop the entry, so it answers not-here
    and the joiner asks the other members."""
    from spt.core.proto import join as join_module

    assert subnet.log.spent(subnet.creator.node_id)[0] == 2
    monkeypatch.setattr(join_module, "MAX_ENTRIES_PER_AUTHOR", 2)
    _, joiner, responder = sessions(subnet)
    only(pump(joiner, responder).joiner_events, NotHere)


def test_a_member_whose_log_holds_an_entry_without_its_ancestry_leaves_the_join_to_another(subnet):
    """A log that stored a removal without the ancestry it had no room for (while its ordinary
    part is not full) would hand the joiner a log that does not reach back to its create entry,
    and the ceremony would end without the joiner's join: the member answers not-here."""
    other = subnet.other
    hidden = make_label(other, parents=subnet.log.valid_heads(), label="hidden", hlc=Hlc(other.node_id).now(10**6))
    on_top = make_label(other, parents=[hidden.hash, *subnet.log.valid_heads()], label="top", hlc=Hlc(other.node_id).now(10**6 + 5))
    log = MembershipLog.from_entries(subnet.id, [*subnet.log.entries(), on_top], stored=True)
    assert on_top.hash in log and not log.is_whole()
    partial = Subnet(subnet.creator, subnet.other, log, subnet.contacts)
    _, joiner, responder = sessions(partial)
    only(pump(joiner, responder).joiner_events, NotHere)


def test_joiner_may_abort_after_hello(subnet):
    _, joiner, responder = sessions(subnet)
    run = pump(joiner, responder, proceed=False)
    only(run.joiner_events, MemberHello)
    joiner.abort()
    responder.abort()
    assert joiner.state is JoinerState.FAILED and responder.state is ResponderState.CLOSED
    with pytest.raises(LocalProtocolError):
        joiner.proceed()


# ---- protocol errors ------------------------------------------------------------------------------


def test_out_of_order_and_malformed_messages_are_remote_errors(subnet):
    _, joiner, responder = sessions(subnet)
    locks = {subnet.id: OPEN}
    with pytest.raises(RemoteProtocolError):
        responder.receive({"type": "confirm", "mac": bytes(32)}, wall=NOW, locks=locks)
    assert responder.state is ResponderState.CLOSED
    _, joiner, responder = sessions(subnet)
    with pytest.raises(RemoteProtocolError):
        responder.receive({"type": "hello", "version": 1, "name": "home"}, wall=NOW, locks=locks)
    _, joiner, responder = sessions(subnet)
    out = joiner.start(wall=NOW, mono=101.0)
    hello = responder.receive(out.messages[0], wall=NOW, locks=locks).messages[0]
    joiner.receive(hello)
    responder.receive(joiner.proceed().messages[0], wall=NOW, locks=locks)
    with pytest.raises(RemoteProtocolError):
        joiner.receive({"type": "pake", "msg": b"B" + bytes(32)})  # not a group element
    with pytest.raises(RemoteProtocolError):
        JoinerSession(
            NodeKey.generate(),
            subnet.creator.node_id,
            E1,
            name="home",
            label="x",
            code=code_now(),
            entered_at=0,
        ).receive({"type": "bundle", "sealed": b""})
    with pytest.raises(RemoteProtocolError):
        joiner.receive("not a map")


def test_missing_lock_view_is_a_local_error(subnet):
    _, joiner, responder = sessions(subnet)
    with pytest.raises(LocalProtocolError):
        responder.receive(joiner.start(wall=NOW, mono=101.0).messages[0], wall=NOW, locks={})


def test_bad_code_is_refused_without_echo():
    with pytest.raises(UsageError) as info:
        JoinerSession(
            NodeKey.generate(),
            NodeKey.generate().node_id,
            E1,
            name="home",
            label="x",
            code=Secret("12a456"),
            entered_at=0,
        )
    assert "12a456" not in info.value.status_line()


# ---- the lockout ---------------------------------------------------------------------------------

MIN = 60_000


def failures_at(key: NodeKey, subnet_id: bytes, *minutes: float) -> list[FailureRecord]:
    joiner = NodeKey.generate().node_id
    return [
        FailureRecord.sign(
            key, subnet_id=subnet_id, joiner=joiner, source="x", time_ms=round(m * MIN), step=i
        )
        for i, m in enumerate(minutes)
    ]


def test_tenth_failure_in_an_hour_locks_for_an_hour():
    key, sid = NodeKey.generate(), b"\x01" * 16
    limiter = JoinLimiter()
    fs = failures_at(key, sid, *range(0, 90, 10))  # 9 failures, minutes 0..80
    assert limiter.status(fs, [], 85 * MIN) == JoinStatus("open", 6, None)
    fs += failures_at(key, sid, 86)  # 10th, but minute 0..20 fell out of the window: 7 in window
    assert limiter.status(fs, [], 87 * MIN).state == "open"
    burst = failures_at(key, sid, *[100 + i / 10 for i in range(10)])
    status = limiter.status(fs + burst, [], 101 * MIN)
    assert status.state == "locked"
    # the 10th inside the window is the 5th of the burst (50, 60, 70, 80, 86 still count)
    assert status.locked_until_ms == round(100.4 * MIN) + 60 * MIN
    assert status.failed_last_hour == 15
    # after the hour, counting restarts from zero
    after = limiter.status(fs + burst, [], 161 * MIN)
    assert after == JoinStatus("open", 0, None)


def test_duplicates_are_counted_once_and_thresholds_shrink():
    key, sid = NodeKey.generate(), b"\x01" * 16
    fs = failures_at(key, sid, 1, 2)
    limiter = JoinLimiter(max_failures=3, window_ms=10 * MIN, lockout_ms=5 * MIN)
    assert limiter.status(fs + fs, [], 3 * MIN).failed_last_hour == 2
    more = failures_at(key, sid, 3)
    s = limiter.status(fs + more, [], 3 * MIN)
    assert s.is_locked and s.locked_until_ms == 8 * MIN
    # failures during the lockout belong to it; counting restarts at its end
    during = failures_at(key, sid, 4, 5)
    assert limiter.status(fs + more + during, [], 9 * MIN) == JoinStatus("open", 0, None)


def test_unlock_clears_the_lockout_and_the_count():
    key, sid = NodeKey.generate(), b"\x01" * 16
    limiter = JoinLimiter(max_failures=2)
    fs = failures_at(key, sid, 1, 2)
    assert limiter.status(fs, [], 3 * MIN).is_locked
    unlock = UnlockRecord.sign(key, subnet_id=sid, time_ms=3 * MIN)
    assert UnlockRecord.from_dict(unlock.to_dict()) == unlock
    assert limiter.status(fs, [unlock], 4 * MIN) == JoinStatus("open", 0, None)
    later = failures_at(key, sid, 5)
    assert limiter.status(fs + later, [unlock], 6 * MIN) == JoinStatus("open", 1, None)
