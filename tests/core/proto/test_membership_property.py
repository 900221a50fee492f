"""Property tests of the membership log (docs/design/membership-validity.md): random histories of
honest members with forks, entries by strangers and by removed keys, delivered in random orders and
batches, with replays, to several replicas."""

from __future__ import annotations

import os
import time

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from spt.core.identity import NodeKey
from spt.core.proto.hlc import Hlc
from spt.core.proto.membership import (
    Entry,
    MembershipLog,
    countersign_join,
    make_create,
    make_label,
    make_leave,
    make_prune,
    make_seed_rotate,
    propose_join,
)
from spt.core.proto.totp import new_seed, seed_commitment

NONCE = bytes(range(16))
KEYS = [NodeKey.generate() for _ in range(9)]  # KEYS[0] creates; the last two are strangers
STRANGERS = KEYS[7:]


class World:
    def __init__(self) -> None:
        self.wall = 1_000
        self.clocks = {k.node_id: Hlc(k.node_id) for k in KEYS}
        create = make_create(KEYS[0], name="Home", label="k0", nonce=NONCE, seed=new_seed(b"\0" * 20), hlc=self.hlc(KEYS[0]))
        self.views: dict[int, MembershipLog] = {0: MembershipLog.from_create(create)}
        self.universe: list[Entry] = [create]
        self.snapshots: list[MembershipLog] = [self.views[0].copy()]

    def hlc(self, key: NodeKey):
        self.wall += 7
        return self.clocks[key.node_id].now(self.wall)

    def members(self, who: int) -> list[int]:
        st_ = self.views[who].state()
        return [i for i, k in enumerate(KEYS) if k.node_id in st_.members]

    def acting(self) -> list[int]:
        return [i for i, v in self.views.items() if KEYS[i].node_id in v.state().members]

    def record(self, who: int, entry: Entry) -> None:
        self.views[who].merge([entry])
        self.universe.append(entry)
        self.snapshots.append(self.views[who].copy())


def rotate_entry(key: NodeKey, log: MembershipLog, hlc) -> Entry:
    epoch = log.state().epoch + 1
    c = seed_commitment(NONCE, epoch, new_seed(bytes([epoch % 256]) * 20))
    return make_seed_rotate(key, parents=log.valid_heads(), epoch=epoch, commitment=c, hlc=hlc)


def step(world: World, data) -> None:
    op = data.draw(st.sampled_from(["join", "join", "label", "prune", "leave", "sync", "sync", "stranger", "removed", "offer"]))
    acting = world.acting()
    if op in ("join", "label", "prune", "leave") and acting:
        who = data.draw(st.sampled_from(acting))
        view, key = world.views[who], KEYS[who]
        st_ = view.state()
        if op == "join":
            candidates = [i for i in range(7) if KEYS[i].node_id not in st_.members]
            if not candidates:
                return
            new = data.draw(st.sampled_from(candidates))
            proposal = propose_join(key, parents=view.valid_heads(), joiner=KEYS[new].node_id, label=f"k{new}",
                                    epoch=st_.epoch, hlc=world.hlc(key))
            world.record(who, countersign_join(proposal, KEYS[new]))
            world.views[new] = world.views[who].copy()
        elif op == "label":
            world.record(who, make_label(key, parents=view.valid_heads(), label=f"l{data.draw(st.integers(0, 9))}", hlc=world.hlc(key)))
        elif op == "prune":
            targets = [i for i in world.members(who) if i != who]
            if not targets:
                return
            target = data.draw(st.sampled_from(targets))
            world.record(who, make_prune(key, parents=view.valid_heads(), target=KEYS[target].node_id, hlc=world.hlc(key)))
            world.record(who, rotate_entry(key, world.views[who], world.hlc(key)))
        elif op == "leave" and who != 0:
            world.record(who, make_leave(key, parents=view.valid_heads(), hlc=world.hlc(key)))
    elif op == "sync" and len(world.views) > 1:
        a, b = data.draw(st.lists(st.sampled_from(sorted(world.views)), min_size=2, max_size=2, unique=True))
        world.views[b].merge(world.views[a].entries())
    elif op == "stranger":
        key = data.draw(st.sampled_from(STRANGERS))
        parents = data.draw(st.lists(st.sampled_from(world.universe), min_size=1, max_size=3, unique=True))
        world.universe.append(make_label(key, parents=[e.hash for e in parents], label="x", hlc=world.hlc(key)))
    elif op == "removed":
        # a key removed somewhere signs entries on a snapshot from when it was a member
        snap = data.draw(st.sampled_from(world.snapshots))
        removed = [i for i in range(7) if any(KEYS[i].node_id in v.state().former for v in world.views.values())]
        then = [i for i in removed if KEYS[i].node_id in snap.state().members]
        if not then:
            return
        who = data.draw(st.sampled_from(then))
        key = KEYS[who]
        others = [i for i in range(7) if i != who and KEYS[i].node_id in snap.state().members]
        kind = data.draw(st.sampled_from(["label", "prune", "join"]))
        if kind == "prune" and others:
            entry = make_prune(key, parents=snap.valid_heads(), target=KEYS[data.draw(st.sampled_from(others))].node_id, hlc=world.hlc(key))
        elif kind == "join":
            stranger = STRANGERS[0]
            proposal = propose_join(key, parents=snap.valid_heads(), joiner=stranger.node_id, label="x",
                                    epoch=snap.state().epoch, hlc=world.hlc(key))
            entry = countersign_join(proposal, stranger)
        else:
            entry = make_label(key, parents=snap.valid_heads(), label="ghost", hlc=world.hlc(key))
        world.universe.append(entry)
    elif op == "offer" and len(world.universe) > 1:
        # any entry may be offered to any honest view; arrival decides
        who = data.draw(st.sampled_from(sorted(world.views)))
        world.views[who].merge([data.draw(st.sampled_from(world.universe))])


def deliver(data, universe: list[Entry], log: MembershipLog) -> list:
    order = data.draw(st.permutations(universe))
    conflicts = []
    i = 0
    while i < len(order):
        n = data.draw(st.integers(1, 6))
        conflicts += log.merge(order[i:i + n]).conflicts
        if data.draw(st.booleans()):
            conflicts += log.merge(order[max(0, i - 3):i + 1]).conflicts  # replays
        i += n
    return conflicts


def effect(s):
    return (dict(s.members), dict(s.former), s.epoch, s.commitment, s.conflicts)


def settle(logs: list[MembershipLog], universe: list[Entry]) -> list:
    """Anti-entropy as sync does it: each replica offers what it stores, until nothing changes."""
    conflicts = []
    for _ in range(8):
        changed = False
        for x in logs:
            for y in logs:
                if x is not y:
                    result = y.merge(x.entries())
                    conflicts += result.conflicts
                    changed |= bool(result.added)
        if not changed:
            return conflicts
    raise AssertionError("replicas did not settle")


def removed_entries_have_no_effect(log: MembershipLog) -> None:
    """No valid entry by a key is concurrent with a valid removal of that key (conflicts aside)."""
    s = log.state()
    entries = {e.hash: e for e in log.entries()}
    removals = [e for e in entries.values() if e.type in ("prune", "leave", "rekey") and log.is_valid(e.hash)
                and e.hash not in s.conflicts]
    admissions = [e for e in entries.values() if e.type in ("create", "join", "rekey") and log.is_valid(e.hash)]
    anc = {h: {a.hash for a in log.ancestry(h)} for h in entries}
    for e in entries.values():
        if not log.is_valid(e.hash) or e.hash in s.conflicts:
            continue
        for r in removals:
            gone = r.key("old") if r.type == "rekey" else r.key()
            if gone != e.author or r.hash == e.hash or e.hash in anc[r.hash]:
                continue
            readmitted = any(a.subject() == e.author and a.hash in anc[e.hash] and r.hash in anc[a.hash] for a in admissions)
            assert readmitted, f"{e} by a removed key counts"


# In CI the same 40 histories every run (derandomize): a random search here found three
# divergences of this log, each fixed and kept as a deterministic test in test_membership.py
# (docs/design/membership-validity.md), and shrinking such a find outlasts CI's timeout.
# `SPT_PROPERTY_SEARCH=5000 pytest … -k replicas` searches 5,000 random histories instead.
SEARCH = int(os.environ.get("SPT_PROPERTY_SEARCH", "0"))


@settings(max_examples=SEARCH or 40, deadline=None, database=None, derandomize=not SEARCH,
          phases=[Phase.generate, Phase.shrink], suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_replicas_agree_and_removed_keys_have_no_effect(data):
    world = World()
    for _ in range(data.draw(st.integers(4, 28))):
        step(world, data)
    subnet = world.universe[0].hash[:16]
    replicas = [MembershipLog(subnet) for _ in range(3)]
    conflicts = []
    for log in replicas:
        conflicts += deliver(data, world.universe, log)
    conflicts += settle(replicas + list(world.views.values()), world.universe)
    for log in replicas:
        assert log.pending() == () or all(
            any(p not in log for p in (log._pending[h].parents)) for h in log.pending()
        )
        removed_entries_have_no_effect(log)
    flagged = conflicts or any(log.state().conflicts for log in replicas)
    if not flagged:
        first = effect(replicas[0].state())
        assert all(effect(log.state()) == first for log in replicas[1:])
        assert all(effect(v.state()) == first for v in world.views.values())


@settings(max_examples=SEARCH or 40, deadline=None, database=None, derandomize=not SEARCH,
          phases=[Phase.generate, Phase.shrink], suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_replicas_filled_in_different_orders_both_take_an_honest_prune(data):
    """A 64-entry log (48 ordinary). Two hostile keys flood replicas A and B with two random
    branches (chains, fans, merges), in random batches and orders, each perhaps also the other's
    branch; then an honest member prunes mallory on one replica (with its rotation) and the
    entries reach the other pushed alone, in one sync or in random batches. Wherever mallory was a
    member on both, both store the prune and its rotation and agree on the epoch. (Before the
    essential entries stood alone, a replica whose ordinary part the other branch filled dropped
    them: 195 of 200 such histories. A search of 2,000 then found a prune that took the last
    ordinary place on the other replica, whose rotation the reserve refused: see
    test_a_prune_in_the_last_ordinary_place_gets_its_rotation.)"""
    import random

    rnd = random.Random(data.draw(st.integers(0, 2**32)))
    a, b, m, s = KEYS[:4]
    clocks = {k.node_id: Hlc(k.node_id) for k in KEYS}
    wall = [1_000]

    def hlc(k):
        wall[0] += rnd.randint(1, 5)
        return clocks[k.node_id].now(wall[0])

    create = make_create(a, name="Home", label="a", nonce=NONCE, seed=new_seed(b"\0" * 20), hlc=hlc(a))
    log = MembershipLog(create.hash[:16], max_entries=64)
    log.add(create)
    for by, k in ((a, b), (a, m), (m, s)):
        log.add(countersign_join(propose_join(by, parents=log.valid_heads(), joiner=k.node_id, label="k", epoch=0, hlc=hlc(by)), k))
    for _ in range(rnd.randint(0, 10)):
        k = rnd.choice([a, b, m, s])
        log.add(make_label(k, parents=log.valid_heads(), label="c", hlc=hlc(k)))
    replica_a, replica_b = log.copy(), log.copy()

    def flood(n):
        out, pool = [], list(log.valid_heads())
        for i in range(n):
            k = rnd.choice([m, s])
            parents = [rnd.choice(pool)] if rnd.random() < 0.7 or not out else [rnd.choice(out).hash]
            if rnd.random() < 0.2 and len(pool) > 1:
                parents = rnd.sample(pool, 2)
            out.append(make_label(k, parents=parents, label=f"f{i}", hlc=hlc(k)))
            pool.append(out[-1].hash)
        return out

    def deliver(replica, entries):
        entries = list(entries)
        if rnd.random() < 0.5:
            rnd.shuffle(entries)
        for i in range(0, len(entries), n := rnd.randint(1, 20)):
            replica.merge(entries[i:i + n])

    x, y = flood(rnd.randint(20, 80)), flood(rnd.randint(20, 80))
    deliver(replica_a, x)
    deliver(replica_b, y)
    if rnd.random() < 0.5:
        deliver(replica_a, y)
    if rnd.random() < 0.5:
        deliver(replica_b, x)
    writer, other = (replica_a, replica_b) if rnd.random() < 0.5 else (replica_b, replica_a)
    if not (writer.state().is_member(m.node_id) and other.state().is_member(m.node_id)):
        return
    prune = make_prune(b, parents=writer.essential_parents(b.node_id, m.node_id), target=m.node_id, hlc=hlc(b))
    assert writer.add(prune)
    rotation = make_seed_rotate(b, parents=writer.essential_parents(b.node_id), epoch=1,
                                commitment=seed_commitment(NONCE, 1, new_seed(b"\1" * 20)), hlc=hlc(b))
    assert writer.add(rotation)
    how = rnd.choice(["push", "sync", "batches"])
    if how == "push":
        other.merge([prune, rotation])
    elif how == "sync":
        other.merge(writer.entries())
    else:
        deliver(other, writer.entries())
    settle([replica_a, replica_b], [])  # (a rotation that came before its prune is taken when offered again)
    for replica in (replica_a, replica_b):
        assert prune.hash in replica and rotation.hash in replica, how
        st_ = replica.state()
        assert st_.standing(m.node_id) == "pruned" and st_.epoch == 1 and len(replica) <= 64


def test_ten_thousand_entries_evaluate_without_a_quadratic_pass():
    keys = [NodeKey.generate() for _ in range(50)]
    clocks = {k.node_id: Hlc(k.node_id) for k in keys}
    wall = [1_000]

    def hlc(k):
        wall[0] += 1
        return clocks[k.node_id].now(wall[0])

    create = make_create(keys[0], name="Home", label="k0", nonce=NONCE, seed=new_seed(b"\0" * 20), hlc=hlc(keys[0]))
    entries = [create]
    heads = [create.hash]
    for i, k in enumerate(keys[1:], 1):
        e = countersign_join(propose_join(keys[0], parents=heads, joiner=k.node_id, label=f"k{i}", epoch=0, hlc=hlc(keys[0])), k)
        entries.append(e)
        heads = [e.hash]
    # then labels from every member, in forks of three concurrent entries
    while len(entries) < 10_000:
        fork = heads
        heads = []
        for k in keys[len(entries) % 47:][:3]:
            e = make_label(k, parents=fork, label=f"l{len(entries)}", hlc=hlc(k))
            entries.append(e)
            heads.append(e.hash)
        heads.sort()
    log = MembershipLog.from_entries(create.hash[:16], entries)
    assert len(log) >= 10_000
    log._invalidate()
    started = time.perf_counter()
    s = log.state()
    elapsed = time.perf_counter() - started
    assert len(s.members) == 50 and not s.invalid
    print(f"evaluating {len(log)} entries took {elapsed:.3f} s")
    # Speed is bench/scale.py's to report (about 0.4 s here on a quiet machine); this bound, far
    # above it so that a loaded CI machine passes, catches only a return of the quadratic pass
    # (5.6 s for 4,096 entries before issue 10).
    assert elapsed < 10.0, f"evaluating 10,000 entries took {elapsed:.2f} s"
