"""Replicated records (spt.core.proto.replicated) and the pure parts of the notify and mind plugins."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spt.core.errors import RemoteProtocolError
from spt.core.identity import NodeKey
from spt.core.proto.hlc import Hlc
from spt.core.proto.replicated import (
    BUCKETS,
    SignedRecord,
    bucket_digests,
    check_digest_map,
    check_ids,
    differing_buckets,
    digest_of,
    sign_record,
)
from spt.plugins.mind_sync import CommuneRejected, normalise_origin, split_commune
from spt.plugins.notify import check_data

KEY = NodeKey.generate()
OTHER = NodeKey.generate()


def record(key: NodeKey = KEY, data: dict | None = None, part: str = "home") -> SignedRecord:
    hlc = Hlc(key.node_id).now(1_000)
    return sign_record(key, kind="notif", record_id=os.urandom(16).hex(), part=part, hlc=hlc,
                       data=data or {"t": "ack", "notif": "0" * 32})


def test_a_record_round_trips_and_verifies():
    r = record()
    back = SignedRecord.from_dict(r.to_dict())
    assert back == r and back.verify()


def test_a_changed_field_or_a_foreign_signature_does_not_verify():
    r = record()
    for name, value in (("part", "work"), ("data", {"t": "ack", "notif": "1" * 32}), ("id", "f" * 32)):
        forged = SignedRecord.from_dict({**r.to_dict(), name: value})
        assert not forged.verify(), name
    # another node signing a record that claims KEY as author
    theirs = record(OTHER)
    claimed = {**theirs.to_dict(), "author": KEY.node_id.hex, "hlc": [1000, 0, KEY.node_id.hex]}
    assert not SignedRecord.from_dict(claimed).verify()


def test_malformed_records_are_refused():
    good = record().to_dict()
    for broken in (
        {**good, "extra": 1},
        {**good, "id": "XYZ"},
        {**good, "kind": "Bad Kind"},
        {**good, "hlc": [1, 0, OTHER.node_id.hex]},  # stamped by someone else
        {**good, "data": [1, 2]},
        {**good, "part": "has space"},
        {**good, "data": {"x": 1.5}},  # floats are not canonical
        {**good, "data": {"body": "x" * 200_000}},
        "not a map",
    ):
        with pytest.raises(RemoteProtocolError):
            SignedRecord.from_dict(broken)


@settings(max_examples=300)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=8),
    max_leaves=30,
))
def test_fuzz_from_dict_raises_only_protocol_errors(value):
    with contextlib.suppress(RemoteProtocolError):
        SignedRecord.from_dict(value)


@settings(max_examples=200)
@given(st.dictionaries(
    st.sampled_from(["kind", "id", "part", "author", "hlc", "data", "sig", "x"]),
    st.none() | st.integers() | st.text(max_size=70) | st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
))
def test_fuzz_record_shaped_garbage(value):
    base = record().to_dict()
    with contextlib.suppress(RemoteProtocolError):
        SignedRecord.from_dict({**base, **value})


@given(st.sets(st.text("0123456789abcdef", min_size=32, max_size=32), max_size=60),
       st.sets(st.text("0123456789abcdef", min_size=32, max_size=32), max_size=60))
def test_digests_find_exactly_the_differing_buckets(mine, theirs):
    assert (digest_of(mine) == digest_of(theirs)) == (mine == theirs)
    buckets = differing_buckets(bucket_digests(mine), bucket_digests(theirs))
    for rid in mine ^ theirs:
        assert rid[:2] in buckets
    for b in buckets:
        assert {i for i in mine if i[:2] == b} != {i for i in theirs if i[:2] == b}


def test_a_digest_is_the_same_size_for_ten_or_ten_thousand_ids():
    small = [os.urandom(16).hex() for _ in range(10)]
    large = [os.urandom(16).hex() for _ in range(10_000)]
    assert len(digest_of(small)) == len(digest_of(large)) == 32
    assert len(bucket_digests(large)) <= BUCKETS


def test_peer_digest_maps_and_id_lists_are_checked():
    assert check_digest_map({"home": "a" * 32}, "d", limit=4) == {"home": "a" * 32}
    for bad in ({"home": "zz"}, {"": "a" * 32}, ["x"], {f"p{i}": "a" * 32 for i in range(5)}):
        with pytest.raises(RemoteProtocolError):
            check_digest_map(bad, "d", limit=4)
    with pytest.raises(RemoteProtocolError):
        check_ids(["nothex"], limit=5)
    with pytest.raises(RemoteProtocolError):
        check_ids(["a" * 32] * 6, limit=5)


def test_notification_data_is_checked():
    assert check_data({"t": "notif", "kind": "user", "title": "t", "body": "b", "endpoint": None}) == "notif"
    assert check_data({"t": "ack", "notif": "a" * 32}) == "ack"
    for bad in (
        {"t": "notif", "kind": "made-up", "title": "t", "body": "b", "endpoint": None},
        {"t": "notif", "kind": "user", "title": "t" * 300, "body": "b", "endpoint": None},
        {"t": "ack", "notif": "short"},
        {"t": "other"},
    ):
        with pytest.raises(RemoteProtocolError):
            check_data(bad)


def test_commune_split_and_rejections():
    assert split_commune(b"intro\n# live\nnow\n# project\nplan\n\n# live\n\n", has_project=True) == [
        ("project", "intro"), ("live", "now"), ("project", "plan"),
    ]
    assert split_commune(b"just text", has_project=False) == [("live", "just text")]
    for raw, why in ((b"\xff", "UTF-8"), (b"a\x00b", "NUL"), (b"# live\n\n", "no text"),
                     (b"x" * (64 * 1024 + 1), "at most"), (b"x" * (2 * 1024 * 1024), "limit")):
        with pytest.raises(CommuneRejected, match=why):
            split_commune(raw, has_project=False)


def test_git_origins_normalise_to_one_form():
    forms = ["git@GitHub.com:acme/tool.git", "https://github.com/acme/tool", "ssh://git@github.com/acme/tool.git/",
             "https://user@github.com/acme/tool.git"]
    assert {normalise_origin(f) for f in forms} == {"github.com/acme/tool"}
