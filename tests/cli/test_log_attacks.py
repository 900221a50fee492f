"""The membership log against a hostile stranger and a pruned member, over real daemons on
loopback (issue 10; docs/design/membership-validity.md). Each test plays the attacker with its own
QUIC endpoint and keys."""

from __future__ import annotations

import asyncio
import os
import re

import pytest
from test_subnets import WAIT, all_online, create, db_rows, joined, members, notif_kinds

from spt.core.identity import NodeId, NodeKey
from spt.core.net.connections import RequestError
from spt.core.net.transport import ALPN_JOIN, AllowKeys, Transport
from spt.core.proto.hlc import Hlc
from spt.core.proto.membership import (
    Entry,
    countersign_join,
    make_label,
    make_prune,
    propose_join,
)
from spt.core.store import load_or_create_key
from spt.testing.nodes import dial_as_member, stored_log
from spt.testing.wait import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="spt subnet create/join need an elevated caller"),
]


@pytest.fixture
def trio(spt_nodes):
    """alpha created `home`; beta joined via alpha, gamma via beta; everyone sees everyone online."""
    a = spt_nodes("a", label="alpha")
    b = spt_nodes("b", label="beta")
    c = spt_nodes("c", label="gamma")
    created = create(a)
    joined(b, a)
    joined(c, b)
    for node in (a, b, c):
        wait_for(lambda node=node: all_online(node, {"alpha", "beta", "gamma"}), WAIT, f"{node.name} to see all three")
    return a, b, c, created


async def offer(key: NodeKey, target, entries: list[Entry], subnet_id: bytes) -> str:
    """Offer entries on the join ALPN from a fresh socket; the answer's type or the error code."""
    host, port = target.address.rsplit(":", 1)
    transport = Transport(key, host="127.0.0.1", port=0, accept=AllowKeys())
    await transport.start()
    try:
        conn = await transport.connect(NodeId.from_hex(target.key), [(host, int(port))], alpn=ALPN_JOIN, timeout=5)
        try:
            reply = await conn.request("log.offer", {"subnet": subnet_id.hex(), "entries": [e.to_dict() for e in entries]}, timeout=10)
        except RequestError as exc:
            return f"error {exc.code}"
        return reply.type
    finally:
        await transport.close()


def truthful(node) -> None:
    """doctor and daemon status still answer during the attack."""
    doctor = node.cli("doctor")
    assert doctor.returncode in (0, 1) and "OK" in doctor.stdout, doctor.stderr
    status = node.cli("daemon", "status")
    assert status.returncode == 0 and node.key[:8] in status.stdout, status.stderr


def test_junk_heads_then_prune_reaches_every_member(trio, spt_nodes):
    a, b, c, _ = trio
    log = stored_log(a)
    known = log.heads()  # the attacker holds one entry hash: that is enough to try
    stored_before = db_rows(a, "SELECT count(*) FROM log_entries")
    # 64 entries signed by throw-away keys on the known hash, and a join admitting the attacker
    # that names all of them as parents: the offer is shaped as the protocol wants it
    junk = []
    for i in range(64):
        k = NodeKey.generate()
        junk.append(make_label(k, parents=known, label=f"junk{i}", hlc=Hlc(k.node_id).now(10**13)))
    mallory, admitter = NodeKey.generate(), NodeKey.generate()
    fake = countersign_join(
        propose_join(admitter, parents=[j.hash for j in junk], joiner=mallory.node_id, label="mallory", epoch=0,
                     hlc=Hlc(admitter.node_id).now(10**13)),
        mallory,
    )
    small = countersign_join(
        propose_join(admitter, parents=[j.hash for j in junk[:40]], joiner=mallory.node_id, label="mallory", epoch=0,
                     hlc=Hlc(admitter.node_id).now(10**13)),
        mallory,
    )
    for target in (a, b):
        # more than an offer may carry, or junk without the offerer's own join: refused outright
        assert asyncio.run(offer(mallory, target, [*junk, fake], log.subnet_id)).startswith("error")
        assert asyncio.run(offer(mallory, target, junk[:3], log.subnet_id)).startswith("error")
        # shaped as the protocol wants it: answered like any offer, and nothing of it is kept
        assert asyncio.run(offer(mallory, target, [*junk[:40], small], log.subnet_id)) == "ok"
    # nothing was stored, so nothing is relayed or built on
    assert db_rows(a, "SELECT count(*) FROM log_entries") == stored_before
    truthful(a)

    # a later prune and seed rotation reach every member; joins still work
    pruned = a.cli("subnet", "prune", "gamma", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    wait_for(lambda: set(members(b)) == {"alpha", "beta"}, WAIT, "beta to drop gamma")
    wait_for(lambda: "pruned" in c.cli("subnet", "status").stdout, WAIT, "gamma to learn it was pruned")
    assert stored_log(b).state().epoch == 1 == stored_log(a).state().epoch
    # gamma gets no seed: members refuse its key at the handshake, so seed.fetch cannot even be asked
    for n in (a, b):
        refusal = asyncio.run(dial_as_member(c, n))
        assert "pruned" in refusal and "accepted" not in refusal, refusal
    d = spt_nodes("d", label="delta")
    joined(d, b)
    wait_for(lambda: set(members(a)) == {"alpha", "beta", "delta"}, WAIT, "alpha to see delta")
    truthful(b)


def test_counter_prune_by_a_pruned_creator_has_no_effect(trio):
    a, b, c, _ = trio
    before = stored_log(a)
    heads = before.valid_heads()  # the creator keeps its pre-prune view
    creator, _ = load_or_create_key(a.home / "node.key")
    a_key = a.key
    pruned = b.cli("subnet", "prune", "alpha", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    for n in (b, c):
        wait_for(lambda n=n: set(members(n)) == {"beta", "gamma"}, WAIT, f"{n.name} to drop alpha")
    a.stop()

    # back-dated prunes of everyone, carried by a join the creator signs for a fresh key
    clock = Hlc(creator.node_id)
    counter = [make_prune(creator, parents=heads, target=NodeId.from_hex(n.key), hlc=clock.now(1)) for n in (b, c)]
    sock = NodeKey.generate()
    carrier = countersign_join(
        propose_join(creator, parents=[p.hash for p in counter], joiner=sock.node_id, label="x", epoch=0, hlc=clock.now(2)),
        sock,
    )
    for target in (b, c):
        assert asyncio.run(offer(sock, target, [*counter, carrier], before.subnet_id)) == "ok"
    # and over the member ALPN with the creator's own key: refused at the handshake
    for target in (b, c):
        refusal = asyncio.run(dial_as_member(a, target))
        assert "pruned" in refusal and "accepted" not in refusal, refusal

    # no effect anywhere: both keep each other, the creator stays pruned, epoch 1 stands
    for n in (b, c):
        log = stored_log(n)
        assert all(p.hash not in log for p in counter) and carrier.hash not in log
        s = log.state()
        assert {m.hex for m in s.members} == {b.key, c.key} and s.standing(creator.node_id) == "pruned"
        assert s.epoch == 1
        assert set(members(n)) == {"beta", "gamma"}
        # surfaced for a human, once, never silently picked
        doc = n.json("subnet", "status")["subnets"][0]
        assert {(x["author"], x["target"]) for x in doc["conflicts"]} == {(a_key, b.key), (a_key, c.key)}
        assert "prune-conflict" in n.cli("subnet", "status").stdout
        assert "prune conflicts" in n.cli("doctor").stdout
        wait_for(lambda n=n: "prune-conflict" in notif_kinds(n), WAIT, f"{n.name} to hold the prune-conflict notification")
        truthful(n)


# -- key-change claims ---------------------------------------------------------------------------


async def claim(key: NodeKey, target, subnet_id: bytes, old: str, repeat: int = 1, source: str = "127.0.0.1") -> list[str]:
    """Claim, as `key`, that `old` is now `key` (on the join ALPN, from `source`); the answers."""
    from spt.core.key_claims import claim_bytes

    host, port = target.address.rsplit(":", 1)
    body = {"subnet": subnet_id.hex(), "old": old, "new": key.node_id.hex}
    body["sig"] = key.sign(claim_bytes(body)).hex()
    transport = Transport(key, host=source, port=0, accept=AllowKeys())
    await transport.start()
    answers = []
    try:
        conn = await transport.connect(NodeId.from_hex(target.key), [(host, int(port))], alpn=ALPN_JOIN, timeout=5)
        for _ in range(repeat):
            try:
                answers.append((await conn.request("key.claim", body, timeout=10)).type)
            except RequestError as exc:
                answers.append(f"error {exc.code}")
    except Exception as exc:  # refused at the transport (per-address caps): a claim that did not land
        answers.append(f"unreached {type(exc).__name__}")
    finally:
        await transport.close()
    return answers


def daemon_op(node, op: str, args: dict):
    """Call a control operation directly (what the CLI does in two steps for trust accept)."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from spt.cli._state import daemon_call\n"
        "from spt.core.errors import SptError\n"
        "try:\n"
        f"    print(json.dumps(daemon_call({op!r}, json.loads(sys.argv[1]), timeout=60)))\n"
        "except SptError as exc:\n"
        "    print(exc.status_line(), file=sys.stderr); sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=node.env, capture_output=True, text=True, timeout=90)
    return done.returncode, (json.loads(done.stdout) if done.returncode == 0 else done.stderr)


def test_an_outsiders_claim_during_trust_accept_is_never_the_one_accepted(trio):
    a, b, c, _ = trio
    subnet_id = stored_log(a).subnet_id
    old = c.key
    c.stop()
    (c.home / "node.key").unlink()
    c.start()
    real_new = c.key
    wait_for(lambda: a.json("node", "trust", "list")["pending"], WAIT, "alpha to record gamma's claim")

    # the human previews gamma's claim and compares the fingerprint...
    code, preview = daemon_op(a, "node.trust.accept", {"node": "gamma", "subnet": None, "preview": True})
    assert code == 0 and preview["new_key"] == real_new
    # ...while an outsider claims gamma's old key with its own
    mallory = NodeKey.generate()
    assert asyncio.run(claim(mallory, a, subnet_id, old)) == ["ok"]
    pending = a.json("node", "trust", "list")["pending"]
    assert {p["new"] for p in pending} == {real_new, mallory.node_id.hex}  # kept side by side, both shown
    human = a.cli("node", "trust", "list", check=True).stdout
    assert real_new[:8] in human and mallory.node_id.hex[:8] in human

    # an accept must name the key it previewed; by label alone it is now ambiguous: refused
    assert daemon_op(a, "node.trust.accept", {"node": "gamma", "subnet": None})[0] == 1
    ambiguous = a.cli("node", "trust", "accept", "gamma", "--yes")
    assert ambiguous.returncode == 1 and ambiguous.stderr.startswith("AMBIGUOUS_NODE:gamma"), ambiguous.stderr
    # the human's previewed key: refused if that claim is gone by now, accepted while it stands
    daemon_op(a, "node.trust.reject", {"node": real_new[:12], "subnet": None})
    code, refused = daemon_op(a, "node.trust.accept", {"node": "gamma", "subnet": None, "new": real_new})
    assert code == 1 and refused.startswith("CLAIM_CHANGED:gamma"), refused
    assert all(m["key"] != mallory.node_id.hex for m in members(a).values())
    c.stop()
    c.start()  # gamma claims again
    wait_for(lambda: len(a.json("node", "trust", "list")["pending"]) == 2, WAIT, "gamma's claim again")
    code, done = daemon_op(a, "node.trust.accept", {"node": "gamma", "subnet": None, "new": real_new})
    assert code == 0 and done["trusted"].startswith("gamma"), done
    for n in (a, b):
        wait_for(lambda n=n: members(n).get("gamma", {}).get("key") == real_new, WAIT, f"{n.name} to pin gamma's new key")
    assert all(m["key"] != mallory.node_id.hex for m in members(a).values())
    # mallory never gets member traffic
    refusal = asyncio.run(dial_as_member(mallory, a))
    assert "accepted" not in refusal, refusal
    assert a.json("node", "trust", "list")["pending"] == []  # the old key is gone: its claims are moot


def test_a_claim_flood_makes_one_notification_and_bounded_rows(trio):
    a, _, c, _ = trio
    subnet_id = stored_log(a).subnet_id
    target_old = c.key
    addr_rows = db_rows(a, "SELECT count(*) FROM peer_addrs")[0][0]

    async def flood() -> list[str]:
        answers = await claim(NodeKey.generate(), a, subnet_id, target_old, repeat=100)  # one key, again and again
        sources = [f"127.0.0.{i}" for i in range(2, 12)]
        for _ in range(5):  # then fresh keys, one connection each, 20 at a time from 10 addresses
            batch = [claim(NodeKey.generate(), a, subnet_id, target_old, source=src) for src in sources for _ in range(2)]
            for got in await asyncio.gather(*batch):
                answers += got
        return answers

    answers = asyncio.run(flood())
    assert len(answers) == 200 and answers[0] == "ok"
    assert any(x == "error too-many" for x in answers)
    assert notif_kinds(a).count("key-change") == 1
    rows = db_rows(a, "SELECT count(*) FROM key_changes")[0][0]
    assert 1 <= rows <= 4
    assert db_rows(a, "SELECT count(*) FROM peer_addrs")[0][0] <= addr_rows + 4
    assert len(a.json("node", "trust", "list")["pending"]) == rows
    # the daemon still answers and reports the pending claims truthfully
    truthful(a)
    assert f"WARN key-changes: {rows} pending" in a.cli("doctor").stdout
    assert f"{rows} key-change claims pending" in a.cli("daemon", "status").stdout


# -- failed joins ----------------------------------------------------------------------------------


def test_failed_join_records_reach_a_member_that_joins_later(spt_nodes):
    from test_subnets import fresh_code, join, sub_doc, wrong

    a = spt_nodes("a", label="alpha")
    x = spt_nodes("x", label="guesser")
    create(a)
    for _ in range(2):
        bad = join(x, a, code=wrong(fresh_code(a)))
        assert bad.stderr.startswith("JOIN_REJECTED:home"), bad.stderr
        # stored before the refusal went out: counted the moment the guesser hears it
    assert db_rows(a, "SELECT count(*) FROM join_records WHERE kind='failure'") == [(2,)]
    assert sub_doc(a)["joins"]["failed_last_hour"] == 2
    b = spt_nodes("b", label="beta")
    joined(b, a)
    # beta was not a member when the guesses were made; it counts them from its first sync on
    wait_for(lambda: sub_doc(b)["joins"]["failed_last_hour"] == 2, WAIT, "beta to count the earlier failures")
    assert "joins-failed-1h=2" in b.cli("subnet", "status", check=True).stdout
    truthful(b)


# -- a member filling the log ---------------------------------------------------------------------


async def push_as_member(key: NodeKey, target, subnet_id: bytes, batches: list[list[Entry]]) -> list[str]:
    """Push each batch of entries to `target` with `log.push` as `key` (a member's key, from a
    fresh socket on the member ALPN); each answer's type or error code."""
    from spt.core.net.transport import ALPN_MEMBER

    host, port = target.address.rsplit(":", 1)
    transport = Transport(key, host="127.0.0.1", port=0, accept=AllowKeys())
    await transport.start()
    answers = []
    try:
        conn = await transport.connect(NodeId.from_hex(target.key), [(host, int(port))], alpn=ALPN_MEMBER, timeout=5)
        for batch in batches:
            try:
                reply = await conn.request("log.push", {"subnet": subnet_id.hex(), "entries": [e.to_dict() for e in batch]}, timeout=120)
                answers.append(reply.type)
            except RequestError as exc:
                answers.append(f"error {exc.code}")
    finally:
        await transport.close()
    return answers


def test_a_member_stores_no_more_than_its_budget_however_it_shapes_its_entries(trio):
    """gamma, a member, crafts entries that counted against nobody's cap and pushes them to alpha
    over its own member connection: rotations, a chain signed by throw-away keys with its own
    entry on top, a sybil rekeyed again and again, and prunes of a key already gone (its own label
    chain past its cap: in memory, tests/core/proto/test_membership.py). Whatever the shape, everything alpha stores on gamma's account fits gamma's
    budget (docs/design/membership-validity.md), and the others' prunes and labels still get in."""
    from spt.core.proto.membership import (
        MAX_ENTRIES_PER_AUTHOR,
        MAX_ESSENTIAL_PER_AUTHOR,
        countersign_rekey,
        make_seed_rotate,
        propose_rekey,
    )

    a, b, c, _ = trio
    log = stored_log(a)
    mallory, _ = load_or_create_key(c.home / "node.key")
    c.stop()  # gamma's own daemon would answer for it: the attacker speaks with its key alone
    clock, wall = Hlc(mallory.node_id), [10**12]

    def hlc():
        wall[0] += 1
        return clock.now(wall[0])

    def chain(n, make, parents):
        out = []
        for i in range(n):
            out.append(make(i, parents))
            parents = [out[-1].hash]
        return out

    over_essential, over_ordinary = MAX_ESSENTIAL_PER_AUTHOR + 40, MAX_ENTRIES_PER_AUTHOR + 60
    heads = list(log.valid_heads())
    rotations = chain(over_essential, lambda i, ps: make_seed_rotate(
        mallory, parents=ps, epoch=i + 1, commitment=os.urandom(32), hlc=hlc()), heads)
    strangers = []
    for i in range(over_ordinary):  # each link signed by a key nobody admitted
        k = NodeKey.generate()
        strangers.append(make_label(k, parents=[strangers[-1].hash] if strangers else heads, label=f"s{i}",
                                    hlc=Hlc(k.node_id).now(wall[0] + i)))
    on_top = make_label(mallory, parents=[strangers[-1].hash], label="top", hlc=hlc())
    sybil = NodeKey.generate()
    admit = countersign_join(propose_join(mallory, parents=heads, joiner=sybil.node_id, label="sybil", epoch=0, hlc=hlc()), sybil)
    rekeys, old = [], sybil
    for _ in range(over_essential):
        new = NodeKey.generate()
        rekeys.append(countersign_rekey(propose_rekey(
            mallory, parents=[(rekeys[-1] if rekeys else admit).hash], old=old.node_id, new=new.node_id, hlc=hlc()), new))
        old = new
    reprunes = chain(over_essential, lambda i, ps: make_prune(
        mallory, parents=ps, target=sybil.node_id, reason=f"again {i}", hlc=hlc()), [rekeys[0].hash])
    batches = [rotations, [*strangers, on_top], [admit, *rekeys], reprunes]
    answers = asyncio.run(push_as_member(mallory, a, log.subnet_id, batches))
    assert answers == ["ok"] * len(batches), answers

    stored = stored_log(a)
    honest = {NodeId.from_hex(a.key), NodeId.from_hex(b.key)}
    # everything alpha stored that alpha and beta did not sign is charged to gamma (before the
    # fix: 1,974 entries, on nobody's account or past every cap)
    mine = [e for e in stored.entries() if e.author not in honest]  # gamma's, its sybils', strangers'
    assert len(mine) <= MAX_ENTRIES_PER_AUTHOR + MAX_ESSENTIAL_PER_AUTHOR, len(mine)
    ordinary, essential = stored.spent(mallory.node_id)
    assert ordinary <= MAX_ENTRIES_PER_AUTHOR and essential <= MAX_ESSENTIAL_PER_AUTHOR
    truthful(a)

    # the others are not locked out: beta prunes gamma (with its rotation), alpha relabels
    pruned = b.cli("subnet", "prune", mallory.node_id.hex[:12], "--yes")  # its label is "top" now
    assert pruned.returncode == 0, pruned.stderr
    wait_for(lambda: stored_log(a).state().standing(mallory.node_id) == "pruned", WAIT, "alpha to hold gamma's prune")
    relabel = a.cli("node", "label", "set", "alpha2")
    assert relabel.returncode == 0, relabel.stderr
    wait_for(lambda: "alpha2" in members(b), WAIT, "beta to see alpha's new label")


def test_an_honest_prune_reaches_a_member_whose_log_another_branch_filled(spt_nodes):
    """gamma, a member, admits twelve sybils, which fill alpha's ordinary part (12,288 entries)
    with one branch of labels while beta is down, and beta's with another while alpha is down:
    neither has room for the other's branch. beta prunes gamma on its own heads; alpha had no room
    for the branch under the prune and dropped it, so gamma stayed a member there, for good. Now
    alpha stores the prune with the entries it rests on, also across a restart
    (docs/design/membership-validity.md, "An honest removal is taken everywhere")."""
    import socket

    from spt.core.members.wire import MAX_SYNC_ENTRIES
    from spt.testing.nodes import DEFAULT_CONFIG

    def fixed_port_config():  # alpha and beta restart below: on port 0 they lost each other
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return DEFAULT_CONFIG.replace("port = 0", f"port = {port}")

    a, b, c = (spt_nodes(n, label=label, config=fixed_port_config()) for n, label in (("a", "alpha"), ("b", "beta"), ("c", "gamma")))
    create(a)
    joined(b, a)
    joined(c, b)
    for node in (a, b, c):
        wait_for(lambda node=node: all_online(node, {"alpha", "beta", "gamma"}), WAIT, f"{node.name} to see all three")
    mallory, _ = load_or_create_key(c.home / "node.key")
    c.stop()  # gamma's own daemon would answer for it: the attacker speaks with its key alone
    clock, wall = Hlc(mallory.node_id), [10**12]
    log = stored_log(a)
    sybils = [NodeKey.generate() for _ in range(12)]
    joins = []
    for i, s in enumerate(sybils):
        joins.append(countersign_join(propose_join(
            mallory, parents=[joins[-1].hash] if joins else log.valid_heads(), joiner=s.node_id, label=f"sybil{i}",
            epoch=log.state().epoch, hlc=clock.now(wall[0] + i)), s))
    for node in (a, b):
        assert asyncio.run(push_as_member(mallory, node, log.subnet_id, [joins])) == ["ok"]
        wait_for(lambda node=node: "sybil11" in members(node), WAIT, f"{node.name} to admit the sybils")
    for e in joins:
        log.add(e)
    hostile = sybils  # (gamma keeps its label)
    clocks = {k.node_id: Hlc(k.node_id) for k in hostile}

    def branch(tag):
        out, parents = [], list(log.valid_heads())
        for i in range(log.ordinary_cap - len(log)):
            k = hostile[i % len(hostile)]
            wall[0] += 1
            out.append(make_label(k, parents=parents, label=f"{tag}{i % 1000}", hlc=clocks[k.node_id].now(wall[0])))
            parents = [out[-1].hash]
        return out

    def batches(entries):
        return [entries[i:i + MAX_SYNC_ENTRIES] for i in range(0, len(entries), MAX_SYNC_ENTRIES)]

    first, second = branch("l"), branch("r")
    b.stop()
    assert set(asyncio.run(push_as_member(mallory, a, log.subnet_id, batches(first)))) == {"ok"}
    a.stop()
    b.start(timeout=120)
    assert set(asyncio.run(push_as_member(mallory, b, log.subnet_id, batches(second)))) == {"ok"}
    a.start(timeout=120)
    assert len(stored_log(a)) == len(stored_log(b)) == log.ordinary_cap  # each full of its own branch
    wait_for(lambda: "gamma" in members(a) and "gamma" in members(b), 60, "both to list gamma")

    pruned = b.cli("subnet", "prune", mallory.node_id.hex[:12], "--yes")
    assert pruned.returncode == 0, pruned.stderr
    wait_for(lambda: "gamma" not in members(b), 60, "beta to drop gamma")
    wait_for(lambda: "gamma" not in members(a), 60, "alpha to take beta's prune")  # before: never
    b.ipc("daemon.log_level", {"level": "DEBUG"})  # "log synced" and "log sync answered" are debug lines
    a.stop()
    a.env["SPT_LOG_LEVEL"] = "DEBUG"
    marks = len(a.log()), len(b.log())
    a.start(timeout=120)
    assert "gamma" not in members(a) and "alpha" in members(a)
    assert stored_log(a).state().epoch == stored_log(b).state().epoch

    # The reconnect's log sync sends nothing: both logs say they are full, and each holds the
    # other's prunes and rotations. Before, beta's heads did not cover alpha's branch there, so
    # alpha sent its first 4,096 labels at every sync (each minute) and beta dropped them all.
    def since_restart() -> str:
        return a.log()[marks[0]:] + b.log()[marks[1]:]

    wait_for(lambda: "log synced" in since_restart(), 60, "alpha and beta to compare logs")
    lines = since_restart()
    assert "log entry not stored" not in lines
    sent = re.findall(r"log (?:synced|sync answered) .*\bsent=(\d+)", lines)
    assert sent and set(sent) == {"0"}, sent
