"""Replicated records, written as the attacker (SPEC.md §9.13–15), over real sockets.

Mallory is a member of `home` (it joined honestly) and talks to beta with its own key from a
throwaway socket, pushing records directly. Beta must store only what a kind accepts: nothing
signed by one node in another's name, nothing for a subnet other than the one the request names,
and no mind entry of an endpoint beta hides there.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time

import pytest

from spt.testing.nodes import fresh_code, request_as_member

pytestmark = pytest.mark.slow


def held(node, kind):
    con = sqlite3.connect(f"file:{node.home / 'spt.db'}?mode=ro", uri=True, timeout=5)
    try:
        return [r[0] for r in con.execute("SELECT id FROM replicated WHERE kind=?", (kind,))]
    finally:
        con.close()


async def push_as(attacker, target, subnet_hex, records):
    """Push `records` to `target` as `attacker` (its key, a fresh socket); the reply or the error."""
    from spt.core.net.connections import RequestError

    try:
        return await request_as_member(attacker, target, "rep.push", {"subnet": subnet_hex, "records": [r.to_dict() for r in records]})
    except RequestError as exc:
        return f"error: {exc.code} {exc}"


def signed(key, kind, part, data, *, author_hex=None):
    from spt.core.proto.hlc import Hlc
    from spt.core.proto.replicated import SignedRecord, sign_record

    record = sign_record(key, kind=kind, record_id=os.urandom(16).hex(), part=part,
                         hlc=Hlc(key.node_id).now(int(time.time() * 1000)), data=data)
    if author_hex is None:
        return record
    forged = {**record.to_dict(), "author": author_hex, "hlc": [record.hlc.wall_ms, 0, author_hex]}
    return SignedRecord.from_dict(forged)


def test_a_member_cannot_place_records_where_they_do_not_belong(spt_nodes, tmp_path):
    from spt.core.store import load_or_create_key

    a, b, m = (spt_nodes(n, label=n) for n in ("alpha", "beta", "mallory"))
    a.cli("subnet", "create", "home", check=True)
    for n in (b, m):
        n.cli("subnet", "join", "home", "--code", fresh_code(a, "home"), "--peer", a.address, check=True)
    b.cli("ready", "bob", "--once", "--timeout", "0.1", check=True)
    b.cli("endpoint", "visibility", "hide", "bob", "home", check=True)
    b.cli("ready", "carol", "--once", "--timeout", "0.1", check=True)
    subnet_hex = b.json("subnet", "status")["subnets"][0]["id"]
    m.stop()
    key, _ = load_or_create_key(m.home / "node.key")
    note = {"t": "notif", "kind": "user", "title": "t", "body": "b", "endpoint": None}

    # another member's name on mallory's signature: refused as a protocol error, nothing stored
    forged = signed(key, "notif", "home", note, author_hex=a.key)
    answer = asyncio.run(push_as(m, b, subnet_hex, [forged]))
    assert isinstance(answer, str) and "does not verify" in answer, answer
    # a record for a subnet other than the one the request names: dropped
    elsewhere = signed(key, "notif", "work", note)
    # a mind entry for bob, whom beta hides in home: dropped
    entry = {"home": "home", "endpoint": "bob", "tier": "live", "project": None, "body": "x", "forked_from": None}
    hidden = signed(key, "mind", "live/home/bob", entry)
    # a mind entry for an endpoint beta does not host at all: dropped
    nobody = signed(key, "mind", "live/home/nobody", {**entry, "endpoint": "nobody"})
    answer = asyncio.run(push_as(m, b, subnet_hex, [elsewhere, hidden, nobody]))
    assert answer == {"new": 0}, answer
    assert held(b, "notif") == [] and held(b, "mind") == []
    # the same channel does carry what belongs: mallory's own notification and carol's entry
    fine = signed(key, "notif", "home", note)
    carol = signed(key, "mind", "live/home/carol", {**entry, "endpoint": "carol"})
    answer = asyncio.run(push_as(m, b, subnet_hex, [fine, carol]))
    assert answer == {"new": 2}, answer
    assert held(b, "notif") == [fine.id] and held(b, "mind") == [carol.id]
