"""Registry replication (SPEC.md §4.5): signed rows, tombstones, presence, merge, anti-entropy."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from spt.core.errors import LocalProtocolError, Refusal, RemoteProtocolError, UsageError
from spt.core.identity import NodeKey
from spt.core.proto.address import parse_address
from spt.core.proto.hlc import HlcTimestamp
from spt.core.proto.registry import (
    OFFLINE_TTL_MS,
    ROW_DOMAIN,
    MergeOutcome,
    Presence,
    RegistryRow,
    RegistryView,
    digest_from_wire,
    digest_to_wire,
    record_from_dict,
    sign_presence,
    sign_row,
    sign_tombstone,
)
from spt.core.proto.resolve import NodeInfo, RemoteTarget, Snapshot, resolve

ALICE = NodeKey.generate()
BOB = NodeKey.generate()
ME = NodeKey.generate()


def stamp(key: NodeKey, wall: int = 1000, counter: int = 0) -> HlcTimestamp:
    return HlcTimestamp(wall, counter, key.node_id.hex)


def a_row(key: NodeKey = ALICE, version: int = 1, **kw) -> RegistryRow:
    values = {"subnet": "Home", "endpoint_id": "sergey", "home": "home", "state": "active", **kw}
    return sign_row(key, version=version, hlc=stamp(key, version), **values)


def a_tombstone(key: NodeKey = ALICE, version: int = 2, **kw) -> RegistryRow:
    values = {"subnet": "home", "endpoint_id": "sergey", "home": "home", **kw}
    return sign_tombstone(key, version=version, hlc=stamp(key, version), **values)


def a_presence(key: NodeKey = ALICE, version: int = 1, **kw) -> Presence:
    values = {"subnet": "home", "software_version": "0.1.0", "addresses": ["192.0.2.1:47470"], **kw}
    return sign_presence(key, version=version, **values)


# --- signing and encoding -------------------------------------------------------------------


def test_a_signed_row_verifies_and_binds_the_canonical_subnet_name() -> None:
    row = a_row(ready=True, description="yellow pages")
    assert row.verify()
    assert row.subnet == "home"
    assert row.node == ALICE.node_id
    assert row.signed_bytes().startswith(ROW_DOMAIN + b"{")


def test_the_signed_encoding_is_canonical_json() -> None:
    row = a_row(description="naïve")
    body = row.signed_bytes()[len(ROW_DOMAIN) :]
    assert b" " not in body.replace(b'"active"', b"")
    assert "naïve".encode() in body  # UTF-8, not \\u escapes
    decoded = json.loads(body)
    assert list(decoded) == sorted(decoded)
    assert body == json.dumps(decoded, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_rows_round_trip_through_plain_dicts() -> None:
    row = a_row(ready=True, alive=True, hosted=True, description="d")
    data = row.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    again = record_from_dict(data)
    assert again == row
    assert isinstance(again, RegistryRow)
    assert again.verify()


def test_tombstones_and_presence_round_trip_through_plain_dicts() -> None:
    tomb = a_tombstone()
    assert tomb.deleted
    assert tomb.verify()
    assert record_from_dict(tomb.to_dict()) == tomb
    presence = a_presence(relays=["spt-relay://r:1#ab"], last_activity_ms=5, staged_release="0.2.0")
    assert presence.verify()
    assert record_from_dict(presence.to_dict()) == presence


def test_descriptions_over_1024_bytes_are_refused() -> None:
    a_row(description="é" * 512)
    with pytest.raises(UsageError) as info:
        a_row(description="é" * 513)
    assert info.value.instance_token == "BAD_DESCRIPTION"


def test_signing_with_another_nodes_clock_or_a_bad_state_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        sign_row(
            ALICE, subnet="home", endpoint_id="x", home="home", version=1, hlc=stamp(BOB), state="active"
        )
    with pytest.raises(LocalProtocolError):
        a_row(state="offline")  # offline is computed by observers, never written
    with pytest.raises(LocalProtocolError):
        a_row(version=0)


def mutate(data: dict, **changes) -> dict:
    return {**data, **changes}


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "rowz"},
        {"subnet": "Home"},
        {"id": "bad id"},
        {"home": ""},
        {"node": "AB" * 32},
        {"version": 0},
        {"version": True},
        {"hlc": [1, 0]},
        {"state": "offline"},
        {"ready": 1},
        {"description": "x" * 1025},
        {"sig": "00"},
        {"extra": 1},
    ],
)
def test_malformed_rows_are_remote_errors(change: dict) -> None:
    with pytest.raises(RemoteProtocolError):
        record_from_dict(mutate(a_row().to_dict(), **change))


def test_a_row_missing_a_field_is_a_remote_error() -> None:
    data = a_row().to_dict()
    del data["alive"]
    with pytest.raises(RemoteProtocolError):
        record_from_dict(data)


def test_a_tombstone_with_content_is_a_remote_error() -> None:
    with pytest.raises(RemoteProtocolError):
        record_from_dict(mutate(a_tombstone().to_dict(), state="active"))


def test_a_row_stamped_by_another_nodes_clock_is_a_remote_error() -> None:
    with pytest.raises(RemoteProtocolError):
        record_from_dict(mutate(a_row().to_dict(), hlc=stamp(BOB).to_wire()))


# --- merge ----------------------------------------------------------------------------------


def view() -> RegistryView:
    return RegistryView("Home", self_node=ME.node_id)


def test_a_valid_row_is_accepted() -> None:
    v = view()
    assert v.merge(a_row()) is MergeOutcome.ACCEPTED
    assert [r.endpoint_id for r in v.rows()] == ["sergey"]


def test_a_forged_row_is_rejected() -> None:
    v = view()
    honest = a_row()
    # Bob signs a row claiming to be Alice's: the signature does not verify under Alice's key.
    forged = replace(honest, state="suspended", version=2)
    forged = replace(forged, signature=BOB.sign(forged.signed_bytes()))
    assert v.merge(forged) is MergeOutcome.BAD_SIGNATURE
    tampered = replace(honest, description="changed in transit")
    assert v.merge(tampered) is MergeOutcome.BAD_SIGNATURE
    assert v.rows() == []


def test_a_row_signed_by_the_wrong_node_arriving_through_dicts_is_rejected() -> None:
    data = a_row(BOB).to_dict()
    data["node"] = ALICE.node_id.hex
    data["hlc"] = stamp(ALICE).to_wire()
    assert view().merge(record_from_dict(data)) is MergeOutcome.BAD_SIGNATURE


def test_old_or_equal_versions_are_stale() -> None:
    v = view()
    assert v.merge(a_row(version=5, state="dormant")) is MergeOutcome.ACCEPTED
    assert v.merge(a_row(version=5, state="active")) is MergeOutcome.STALE
    assert v.merge(a_row(version=4, state="active")) is MergeOutcome.STALE
    assert v.rows()[0].state == "dormant"
    assert v.merge(a_row(version=6, state="active")) is MergeOutcome.ACCEPTED
    assert v.rows()[0].state == "active"


def test_another_subnets_record_is_never_merged() -> None:
    v = view()
    assert v.merge(a_row(subnet="work")) is MergeOutcome.WRONG_SUBNET
    assert v.merge(a_presence(subnet="work")) is MergeOutcome.WRONG_SUBNET
    assert v.records() == []


def test_rows_of_one_instance_are_keyed_without_regard_to_case() -> None:
    v = view()
    v.merge(a_row(version=1, endpoint_id="Sergey", home="HOME"))
    assert (
        v.merge(a_row(version=2, endpoint_id="sergey", home="home", state="dormant")) is MergeOutcome.ACCEPTED
    )
    assert len(v.rows()) == 1


def test_a_tombstone_hides_the_row_and_blocks_older_copies() -> None:
    v = view()
    v.merge(a_row(version=3))
    assert v.merge(a_tombstone(version=4)) is MergeOutcome.ACCEPTED
    assert v.rows() == []
    assert v.resolve_rows() == []
    assert v.merge(a_row(version=3)) is MergeOutcome.STALE  # a forwarded old copy
    assert v.merge(a_row(version=5)) is MergeOutcome.ACCEPTED  # shown again
    assert len(v.rows()) == 1


def test_a_tombstone_for_an_unseen_row_is_kept() -> None:
    v = view()
    assert v.merge(a_tombstone(version=9)) is MergeOutcome.ACCEPTED
    assert v.merge(a_row(version=8)) is MergeOutcome.STALE


def test_a_hidden_instance_resolves_to_no_perch() -> None:
    v = view()
    v.merge(a_row(version=1))
    v.merge(a_tombstone(version=2))
    snapshot = Snapshot(
        self_node=NodeInfo(ME.node_id, "me"),
        nodes_by_subnet={"Home": [NodeInfo(ALICE.node_id, "alice")]},
        attached_subnets=["Home"],
        local_perches=[],
        rows=v.resolve_rows(),
    )
    with pytest.raises(Refusal) as info:
        resolve(parse_address("sergey"), snapshot)
    assert info.value.status_line().startswith("NO_PERCH:sergey ")


def test_resolve_rows_feed_resolution_under_the_display_name() -> None:
    v = view()
    v.merge(a_row(version=1))
    (row,) = v.resolve_rows()
    assert row.subnet == "Home"
    assert row.visible
    snapshot = Snapshot(
        self_node=NodeInfo(ME.node_id, "me"),
        nodes_by_subnet={"Home": [NodeInfo(ALICE.node_id, "alice")]},
        attached_subnets=["Home"],
        local_perches=[],
        rows=v.resolve_rows(),
        offline=v.offline(now_ms=0),
    )
    target = resolve(parse_address("sergey@alice"), snapshot)
    assert isinstance(target, RemoteTarget)
    assert not target.live  # never heard from: offline


def test_presence_merges_by_version_and_rejects_forgeries() -> None:
    v = view()
    assert v.merge(a_presence(version=2), now_ms=0) is MergeOutcome.ACCEPTED
    assert v.merge(a_presence(version=2), now_ms=0) is MergeOutcome.STALE
    forged = replace(a_presence(version=3), addresses=("203.0.113.9:1",))
    assert v.merge(forged, now_ms=0) is MergeOutcome.BAD_SIGNATURE
    held = v.presence(ALICE.node_id)
    assert held is not None
    assert held.addresses == ("192.0.2.1:47470",)


# --- offline --------------------------------------------------------------------------------


def test_a_node_is_offline_without_presence_newer_than_90_seconds() -> None:
    v = view()
    v.merge(a_row())
    assert v.offline(now_ms=1_000) == {ALICE.node_id}  # never heard from
    v.merge(a_presence(version=2), now_ms=10_000)
    assert v.offline(now_ms=10_000 + OFFLINE_TTL_MS) == set()
    assert v.offline(now_ms=10_000 + OFFLINE_TTL_MS + 1) == {ALICE.node_id}
    assert v.offline_reason(ALICE.node_id, 10_000 + OFFLINE_TTL_MS + 1) == "silent"
    assert v.offline(now_ms=20_000, ttl_ms=5_000) == {ALICE.node_id}  # the TTL is a parameter


def test_a_stale_presence_does_not_refresh_liveness() -> None:
    v = view()
    v.merge(a_presence(version=2), now_ms=0)
    v.merge(a_presence(version=2), now_ms=200_000)  # forwarded again, nothing new
    assert v.is_offline(ALICE.node_id, 200_000)


def test_reloading_presence_from_storage_does_not_make_a_node_look_online() -> None:
    v = view()
    v.merge(a_presence(version=2))
    assert v.is_offline(ALICE.node_id, 0)
    v.note_heard(ALICE.node_id, 0)
    assert not v.is_offline(ALICE.node_id, 0)


def test_a_detached_presence_shows_the_node_offline_at_once() -> None:
    v = view()
    v.merge(a_presence(version=2, detached=True), now_ms=0)
    assert v.offline_reason(ALICE.node_id, 0) == "detached"


def test_this_node_is_never_offline_to_itself() -> None:
    v = view()
    v.merge(a_row(ME))
    assert v.offline(now_ms=10**9) == set()


def test_nodes_silent_for_seven_days_vanish() -> None:
    v = view()
    v.merge(a_presence(version=2), now_ms=0)
    week = 7 * 24 * 3600 * 1000
    assert v.vanished(week) == set()
    assert v.vanished(week + 1) == {ALICE.node_id}


# --- anti-entropy ---------------------------------------------------------------------------


def test_digest_is_the_highest_version_per_node() -> None:
    v = view()
    v.merge(a_row(version=3))
    v.merge(a_row(version=5, endpoint_id="other"))
    v.merge(a_presence(version=7))
    v.merge(a_tombstone(BOB, version=2))
    assert v.digest() == {ALICE.node_id: 7, BOB.node_id: 2}


def test_missing_for_sends_what_the_other_lacks_in_version_order() -> None:
    v = view()
    records = [  # as a node signs them: presence with every live row (3), then one row alone (5)
        a_row(version=3),
        a_presence(version=3),
        a_row(version=5, endpoint_id="other"),
        a_tombstone(BOB, 2),
    ]
    v.merge_all(records)
    assert v.missing_for(v.digest()) == []
    expected = sorted(records[2:], key=lambda r: (r.node, r.version))
    assert v.missing_for({ALICE.node_id: 3}) == expected
    assert v.missing_for({ALICE.node_id: 5, BOB.node_id: 2}) == []
    peer = RegistryView("home")
    for record in v.missing_for(peer.digest()):
        assert peer.merge(record_from_dict(record.to_dict())) is MergeOutcome.ACCEPTED
    assert peer.digest() == v.digest()
    assert peer.missing_for(v.digest()) == []


def test_digests_round_trip_through_plain_dicts() -> None:
    digest = {ALICE.node_id: 4, BOB.node_id: 9}
    wire = digest_to_wire(digest)
    assert wire == {k.node_id.hex: v for k, v in sorted([(ALICE, 4), (BOB, 9)], key=lambda p: p[0].node_id)}
    assert digest_from_wire(json.loads(json.dumps(wire))) == digest
    for bad in ([1], {"xyz": 1}, {ALICE.node_id.hex: 0}, {ALICE.node_id.hex: "1"}):
        with pytest.raises(RemoteProtocolError):
            digest_from_wire(bad)


def test_removing_a_node_drops_its_rows_and_refuses_old_copies() -> None:
    v = view()
    v.merge(a_row(version=3))
    v.merge(a_presence(version=4), now_ms=0)
    v.merge(a_row(BOB, version=1))
    v.remove_node(ALICE.node_id)
    assert [r.node for r in v.rows()] == [BOB.node_id]
    assert v.presence(ALICE.node_id) is None
    assert v.merge(a_row(version=3)) is MergeOutcome.STALE  # still held by a member that lags
    assert v.digest()[ALICE.node_id] == 4  # so lagging members do not resend them
    assert v.merge(a_row(version=10)) is MergeOutcome.ACCEPTED  # a later, fresh join


def test_records_list_everything_for_storage_and_reloads() -> None:
    v = view()
    v.merge_all([a_row(version=3), a_tombstone(version=2, endpoint_id="gone"), a_presence(version=3)])
    stored = [r.to_dict() for r in v.records()]
    reloaded = RegistryView("home")
    assert set(reloaded.merge_all(record_from_dict(d) for d in stored)) == {MergeOutcome.ACCEPTED}
    assert reloaded.records() == v.records()


# --- replays of deleted rows (rule 6) -------------------------------------------------------


def test_a_live_row_older_than_its_owners_presence_is_refused() -> None:
    """A member replays Alice's row from before she deleted it; the tombstone is gone (views
    are not stored), but her later presence vouches for all her live rows: the replay is refused."""
    old = a_row(version=3)
    v = view()
    v.merge_all([a_row(version=6, endpoint_id="kept"), a_presence(version=6)])
    assert v.merge(old) is MergeOutcome.STALE
    assert [r.endpoint_id for r in v.rows()] == ["kept"]
    assert v.merge(a_tombstone(version=4, endpoint_id="other")) is MergeOutcome.ACCEPTED  # harmless: kept for older peers
    assert v.merge(a_row(version=7)) is MergeOutcome.ACCEPTED  # signed after the presence: a real change


def test_a_presence_drops_the_live_rows_its_node_no_longer_signs() -> None:
    v = view()
    v.merge_all([a_row(version=3), a_row(version=3, endpoint_id="kept"), a_presence(version=3)])
    v.merge_all([a_row(version=8, endpoint_id="kept"), a_presence(version=8)])  # sergey's tombstone missed here
    assert [r.endpoint_id for r in v.rows()] == ["kept"]
    assert v.to_keep() == [v.presence(ALICE.node_id)]  # a deletion settled: the caller stores it


def test_a_kept_presence_refuses_old_rows_and_presence_after_a_restart() -> None:
    settled = a_presence(version=9)
    before = view()
    before.merge_all([a_row(version=3), a_presence(version=3)])
    before.merge_all([a_tombstone(version=9), settled])
    (stored,) = before.to_keep()
    assert stored == settled
    assert before.keep(stored) and before.to_keep() == []

    after = view()  # a restart: nothing held but what was stored
    assert after.keep(record_from_dict(json.loads(json.dumps(stored.to_dict()))))
    assert after.merge(a_row(version=3)) is MergeOutcome.STALE
    assert after.merge(a_presence(version=3)) is MergeOutcome.STALE  # an old presence does not lower it
    assert after.rows() == [] and after.presence(ALICE.node_id) is None
    assert after.records() == []  # not served: a peer taking it alone would not ask for its rows
    assert after.digest() == {ALICE.node_id: 8}  # so peers send what was signed with it, nothing older
    assert after.merge(a_row(version=9, endpoint_id="kept")) is MergeOutcome.ACCEPTED
    assert after.merge(settled) is MergeOutcome.ACCEPTED
    assert after.merge(a_row(version=10)) is MergeOutcome.ACCEPTED  # shown again later: a real change
    assert {r.endpoint_id for r in after.rows()} == {"kept", "sergey"}


def test_keep_refuses_forged_or_foreign_presence() -> None:
    v = view()
    forged = replace(a_presence(version=50), addresses=("203.0.113.9:1",))
    assert not v.keep(forged)
    assert not v.keep(a_presence(version=50, subnet="work"))
    assert v.merge(a_row(version=3)) is MergeOutcome.ACCEPTED


def test_the_own_presence_and_rows_without_a_deletion_are_not_kept() -> None:
    v = view()
    v.merge_all([a_row(version=3), a_presence(version=3), a_row(version=4), a_row(version=5), a_presence(version=5)])
    assert v.to_keep() == []  # rows only re-signed: nothing deleted, no write
    v.merge_all([a_row(ME, version=3), a_tombstone(ME, version=4), a_presence(ME, version=4)])
    assert v.to_keep() == []
