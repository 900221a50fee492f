"""Subnets end to end: real daemons on loopback joined by static `--peer`, no mDNS (SPEC.md §3.5,
§4.8, §5, §6, §9.1–9.10).

`subnet create`, `join`, `prune`… are elevated; CI runs as root. Without root these tests skip.
"""

import asyncio
import base64
import json
import re
import sqlite3
import time

import pytest

from spt.testing.nodes import dial_as_member
from spt.testing.wait import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,  # spt subnet create/join need an elevated caller
]

WAIT = 15.0  # seconds any eventually-true condition gets


def code_of(stdout):
    """(code, seconds left) from a `CODE:<name> <dddddd> <n>s` line."""
    m = re.search(r"^CODE:\S+ (\d{6}) (\d+)s$", stdout, re.M)
    assert m, stdout
    return m.group(1), int(m.group(2))


def seed_of(stdout):
    m = re.search(r"^otpauth://totp/spt:[^?]+\?secret=([A-Z2-7]+)&issuer=spt$", stdout, re.M)
    assert m, stdout
    b32 = m.group(1)
    return b32, base64.b32decode(b32 + "=" * (-len(b32) % 8))


def totp(seed, step):
    from spt.core.proto.totp import Secret, code_at

    return code_at(Secret(seed), step).reveal()


def fresh_code(node, name="home", margin=4):
    """The current code with at least `margin` seconds left (a code typed at the end of its step
    would be checked against the next one)."""
    for _ in range(3):
        shown = node.cli("subnet", "show-code", name, "--no-qr", check=True).stdout
        code, left = code_of(shown)
        if left >= margin:
            return code
        time.sleep(left + 0.2)
    raise AssertionError("no code with time left")


def wrong(code):
    return f"{(int(code) + 500_000) % 1_000_000:06d}"


def create(node, name="home"):
    made = node.cli("subnet", "create", name)
    assert made.returncode == 0, made.stderr
    return made.stdout


def join(node, via, name="home", code=None, *extra, timeout="10"):
    code = code or fresh_code(via, name)
    return node.cli("subnet", "join", name, "--code", code, "--peer", via.address, "--timeout", timeout, *extra)


def joined(node, via, name="home"):
    result = join(node, via, name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"JOINED:{name}"
    return result


def status(node, *args):
    return node.json("subnet", "status", *args)


def members(node, name="home"):
    """{label: member doc} of `name` as `node` sees it (with --nodes)."""
    for sub in status(node, "--nodes")["subnets"]:
        if sub["name"] == name and "members" in sub:
            return {m["label"]: m for m in sub["members"]}
    return {}


def sub_doc(node, name="home"):
    return next((s for s in status(node)["subnets"] if s["name"] == name), None)


def all_online(node, labels, name="home"):
    found = members(node, name)
    return set(found) == set(labels) and all(m["online"] for m in found.values())


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


def notif_kinds(node):
    """Kinds of every notification the node holds, acknowledged ones included (`notif list`)."""
    return sorted(n["kind"] for n in node.json("notif", "list", "--all")["notifications"])


def db_rows(node, sql, params=()):
    """Read the node's store directly, read-only (there is no CLI view of notifications yet)."""
    con = sqlite3.connect(f"file:{node.home / 'spt.db'}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


# ------------------------------------------------------------------------------------------


def test_three_nodes_join_and_each_lists_all_three(trio):
    a, b, c, _ = trio
    keys = {"alpha": a.key, "beta": b.key, "gamma": c.key}
    for node, me in ((a, "alpha"), (b, "beta"), (c, "gamma")):
        [sub] = status(node, "--nodes")["subnets"]
        assert sub["name"] == "home" and sub["nodes"] == 3 and sub["attached"] is True
        assert sub["joins"] == {"state": "open", "failed_last_hour": 0, "locked_until": None}
        by_label = {m["label"]: m for m in sub["members"]}
        assert {k: m["key"] for k, m in by_label.items()} == keys
        assert [m["label"] for m in sub["members"] if m["self"]] == [me]
        assert set(by_label[me]) >= {"label", "key", "online", "detached", "self", "version", "last_seen", "path"}
        human = node.cli("subnet", "status", "--nodes", check=True).stdout
        assert human.splitlines()[0].split() == ["SUBNET", "NODES", "ENDPOINTS"]
        for label, key in keys.items():
            assert f"{label} ({key[:8]}\u2026)" in human
        assert f"{me} ({keys[me][:8]}\u2026)  online" in human and "(this node)" in human
    assert sub_doc(a)["id"] == sub_doc(c)["id"]


def test_already_member_and_not_found(trio, spt_nodes):
    a, b, _, _ = trio
    again = join(b, a)
    assert again.returncode == 1 and again.stderr.startswith("ALREADY_MEMBER:home")
    loner = spt_nodes("d", label="delta")
    t0 = time.monotonic()
    lost = loner.cli("subnet", "join", "home", "--code", "123456", "--peer", "127.0.0.1:9", "--timeout", "1.5")
    assert lost.returncode == 1 and lost.stderr.startswith("JOIN_NOT_FOUND:home"), lost.stderr
    assert time.monotonic() - t0 < 5  # --timeout bounds the dials too
    assert status(loner)["subnets"] == []


def test_wrong_code_fails_on_both_sides_with_nothing_pinned(trio, spt_nodes):
    a, b, c, _ = trio
    d = spt_nodes("d", label="delta")
    before = {n.name: members(n) for n in (a, b, c)}
    bad = join(d, b, code=wrong(fresh_code(b)))
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[0] == "JOIN_REJECTED:home code did not match"
    assert "JOINED" not in bad.stdout
    assert status(d)["subnets"] == [] and d.cli("subnet", "status", check=True).stdout == "no subnets\n"
    assert db_rows(d, "SELECT count(*) FROM log_entries") == [(0,)]
    assert sub_doc(b)["joins"]["failed_last_hour"] == 1
    assert "joins-failed-1h=1" in b.cli("subnet", "status", check=True).stdout
    assert "WARN joins home: 1 failed attempt in the last hour" in b.cli("doctor").stdout.splitlines()
    # the failure record is gossiped: the other members count it too
    wait_for(lambda: sub_doc(a)["joins"]["failed_last_hour"] == 1, WAIT, "alpha to count the failure")
    for n in (a, b, c):
        assert {k: v["key"] for k, v in members(n).items()} == {k: v["key"] for k, v in before[n.name].items()}
    # §8.4: raised where it happened, replicated to every member, and to a member that joins later
    for n in (a, b, c):
        wait_for(lambda n=n: notif_kinds(n) == ["join-failed"], WAIT, f"{n.name} to hold the join-failed notification")
    joined(d, b)
    wait_for(lambda: notif_kinds(d) == ["join-failed"], WAIT, "the later joiner to receive the join-failed notification")


LOCKOUT_CONFIG = """\
[net]
port = 0
bind = "127.0.0.1"

[discovery]
mdns = false

[join]
max_failures = 3
lockout_seconds = {seconds}
"""


def test_lockout_refuses_the_right_code_until_the_window_passes(spt_nodes):
    # 10 s: long enough that the locked attempt (whose fresh code may wait up to ~3 s for the
    # next 30-s step) always falls inside the window, even on a slow machine
    a = spt_nodes("a", label="alpha", config=LOCKOUT_CONFIG.format(seconds=10))
    d = spt_nodes("d", label="delta")
    create(a)
    for _ in range(3):
        bad = join(d, a, code=wrong(fresh_code(a)))
        assert bad.stderr.startswith("JOIN_REJECTED:home"), bad.stderr
    locked = join(d, a)
    assert locked.returncode == 1
    assert re.fullmatch(r"JOIN_LOCKED:home until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)\n", locked.stderr.splitlines(True)[0]), locked.stderr
    joins = sub_doc(a)["joins"]
    assert joins["state"] == "locked" and joins["locked_until"] and joins["failed_last_hour"] == 3
    assert notif_kinds(a).count("join-lockout") == 1
    wait_for(lambda: sub_doc(a)["joins"]["state"] == "open", 20, "the lockout to pass")
    joined(d, a)
    wait_for(lambda: "join-lockout" in notif_kinds(d), WAIT, "the later joiner to receive the lockout notification")


def test_unlock_ends_a_lockout_subnet_wide(spt_nodes):
    config = LOCKOUT_CONFIG.format(seconds=600)
    a = spt_nodes("a", label="alpha", config=config)
    b = spt_nodes("b", label="beta", config=config)
    d = spt_nodes("d", label="delta")
    create(a)
    joined(b, a)
    wait_for(lambda: all_online(a, {"alpha", "beta"}), WAIT, "alpha and beta connected")
    for _ in range(3):
        assert join(d, a, code=wrong(fresh_code(a))).stderr.startswith("JOIN_REJECTED:home")
    assert join(d, a).stderr.startswith("JOIN_LOCKED:home until ")
    # the records reached beta: it is locked too, and shows it
    wait_for(lambda: sub_doc(b)["joins"]["state"] == "locked", WAIT, "beta to see the lockout")
    human = b.cli("subnet", "status", check=True).stdout
    assert re.search(r"joins-failed-1h=3 joins-locked-until=\d\d:\d\d", human), human
    assert join(d, b).stderr.startswith("JOIN_LOCKED:home until ")
    assert notif_kinds(a).count("join-lockout") == 1
    wait_for(lambda: "join-lockout" in notif_kinds(b), WAIT, "beta to receive the lockout notification")

    assert a.cli("subnet", "unlock", "home").stdout == "UNLOCKED:home\n"
    assert sub_doc(a)["joins"] == {"state": "open", "failed_last_hour": 0, "locked_until": None}
    wait_for(lambda: sub_doc(b)["joins"]["state"] == "open", WAIT, "the unlock to reach beta")
    joined(d, b)


def test_prune_sticks_and_a_fresh_code_readmits(trio, spt_nodes):
    from spt.core.proto.totp import step_of

    a, b, c, created = trio
    _, old_seed = seed_of(created)
    c_key = c.key
    pruned = a.cli("subnet", "prune", "gamma", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    lines = pruned.stdout.splitlines()
    assert lines[0] == f"PRUNED:gamma ({c_key[:8]}\u2026) home"
    code_of(pruned.stdout)  # the seed rotated: a new code, URI and QR follow
    _, new_seed = seed_of(pruned.stdout)
    assert new_seed != old_seed

    wait_for(lambda: "pruned" in c.cli("subnet", "status").stdout, WAIT, "gamma to learn it was pruned")
    assert re.search(r"^home\s+-\s+-\s+pruned$", c.cli("subnet", "status", check=True).stdout, re.M)
    for n in (a, b):
        wait_for(lambda n=n: set(members(n)) == {"alpha", "beta"}, WAIT, f"{n.name} to drop gamma")
        former = {m["label"]: m for m in status(n, "--all")["subnets"][0]["members"]}
        assert former["gamma"]["standing"] == "pruned" and former["gamma"]["key"] == c_key

    # a raw member dial with gamma's key is refused by both, with the reason
    for n in (a, b):
        refusal = asyncio.run(dial_as_member(c, n))
        assert "pruned" in refusal and "accepted" not in refusal, refusal

    # the old seed's code is dead everywhere the rotation arrived
    old_code = totp(old_seed, step_of(time.time()))
    stale = join(c, b, code=old_code)
    assert stale.returncode == 1 and stale.stderr.startswith("JOIN_REJECTED:home"), stale.stderr
    assert status(c, "--nodes")["subnets"][0].get("standing") == "pruned"

    # a fresh code from the new seed lets a new node in, and gamma too (a fresh join)
    d = spt_nodes("d", label="delta")
    joined(d, b)
    joined(c, a)
    for n in (a, b, c, d):
        wait_for(lambda n=n: all_online(n, {"alpha", "beta", "gamma", "delta"}), WAIT, f"{n.name} to see four")


def test_leave_makes_a_former_member(trio):
    a, b, c, _ = trio
    b_key = b.key
    left = b.cli("subnet", "leave", "home", "--yes")
    assert left.returncode == 0, left.stderr
    assert left.stdout.splitlines()[0] == "LEFT:home"
    for n in (a, c):
        wait_for(lambda n=n: set(members(n)) == {"alpha", "gamma"}, WAIT, f"{n.name} to drop beta")
        former = {m["label"]: m for m in status(n, "--all")["subnets"][0]["members"]}
        assert former["beta"]["standing"] == "left" and former["beta"]["key"] == b_key
    assert re.search(r"^home\s+-\s+-\s+left$", b.cli("subnet", "status", check=True).stdout, re.M)
    # §8.4: the members that stay are told once; the leaver keeps no notification of home
    for n in (a, c):
        wait_for(lambda n=n: notif_kinds(n) == ["member-left"], WAIT, f"{n.name} to hold the member-left notification")
    assert notif_kinds(b) == []
    refusal = asyncio.run(dial_as_member(b, a))
    assert "left" in refusal and "accepted" not in refusal, refusal
    # only a fresh join brings it back
    joined(b, c)
    wait_for(lambda: all_online(a, {"alpha", "beta", "gamma"}), WAIT, "beta back")


def test_detach_stops_answering_joins_until_attach(trio, spt_nodes):
    a, b, _, _ = trio
    detached = a.cli("subnet", "detach", "home")
    assert detached.stdout == "DETACHED:home\n"
    doc = sub_doc(a)
    assert doc["attached"] is False
    assert re.search(r"^home\s+3\s+\d+\s+detached$", a.cli("subnet", "status", check=True).stdout, re.M)
    d = spt_nodes("d", label="delta")
    code = fresh_code(b)
    refused = d.cli("subnet", "join", "home", "--code", code, "--peer", a.address, "--timeout", "2")
    assert refused.returncode == 1 and refused.stderr.startswith("JOIN_NOT_FOUND:home"), refused.stderr
    # members stop serving each other: beta shows alpha without a path, reason detached
    wait_for(lambda: members(b)["alpha"]["path"]["reason"] == "detached", WAIT, "beta to see alpha detached")
    # detach survives a restart
    a.stop()
    a.start()
    assert sub_doc(a)["attached"] is False
    assert a.cli("subnet", "attach", "home").stdout == "ATTACHED:home\n"
    assert sub_doc(a)["attached"] is True
    wait_for(lambda: members(b)["alpha"]["path"]["kind"] != "none", WAIT, "alpha and beta connected again")
    joined(d, a)


def test_a_changed_key_is_refused_until_a_member_accepts_it(trio):
    a, b, c, _ = trio
    old_key = c.key
    c.stop()
    (c.home / "node.key").unlink()
    c.start()
    new_key = c.key
    assert new_key != old_key

    # every member records the claim, refuses the new key, and warns
    for n in (a, b):
        pending = wait_for(lambda n=n: n.json("node", "trust", "list")["pending"], WAIT, f"{n.name} to record the claim")
        assert pending == [
            {"subnet": "home", "old": old_key, "new": new_key, "since": pending[0]["since"], "old_key_signed": False}
        ]
        human = n.cli("node", "trust", "list", check=True).stdout
        assert re.search(
            rf"^PENDING gamma \({old_key[:8]}\u2026\) -> {new_key[:8]}\u2026 home since \S+$", human, re.M
        ), human
        # both members saw the claim; the user gets one notification for it, everywhere
        wait_for(lambda n=n: notif_kinds(n) == ["key-change"], WAIT, f"{n.name} to hold one key-change notification")
        refusal = asyncio.run(dial_as_member(c, n))
        assert "not-a-member" in refusal and "accepted" not in refusal, refusal
        gamma = members(n)["gamma"]
        assert gamma["key"] == old_key and gamma["path"]["kind"] == "none"  # no member connection
    pins = a.json("node", "trust", "list")["pins"]
    assert {(p["subnet"], p["label"], p["key"]) for p in pins} == {
        ("home", "alpha", a.key), ("home", "beta", b.key), ("home", "gamma", old_key)
    }

    # only `trust accept` re-pins; it needs --yes without a terminal
    assert a.cli("node", "trust", "accept", "gamma").returncode == 2
    accepted = a.cli("node", "trust", "accept", "gamma", "--yes")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout == f"TRUSTED:gamma ({new_key[:8]}\u2026)\n"
    assert old_key[:8] in accepted.stderr and "fingerprint" in accepted.stderr
    for n in (a, b, c):
        wait_for(lambda n=n: all_online(n, {"alpha", "beta", "gamma"}) and members(n)["gamma"]["key"] == new_key, WAIT, f"{n.name} to see gamma online with its new key")
    assert a.json("node", "trust", "list")["pending"] == []
    wait_for(lambda: b.json("node", "trust", "list")["pending"] == [], WAIT, "beta to drop the settled claim")
    assert f"gamma ({new_key[:8]}\u2026)  online" in a.cli("subnet", "status", "--nodes", check=True).stdout
    former = {m["key"]: m for m in status(a, "--all")["subnets"][0]["members"]}
    assert former[old_key]["standing"] == "rekeyed"
    # the node under its new key is a member it was not before: the notification reaches it too
    wait_for(lambda: notif_kinds(c) == ["key-change"], WAIT, "gamma's new key to receive the key-change notification")


def test_trust_reject_drops_the_claim(trio):
    a, _, c, _ = trio
    c.stop()
    (c.home / "node.key").unlink()
    c.start()
    wait_for(lambda: a.json("node", "trust", "list")["pending"], WAIT, "alpha to record the claim")
    assert a.cli("node", "trust", "reject", "gamma").stdout == "REJECTED:gamma\n"
    assert a.json("node", "trust", "list")["pending"] == []
    missing = a.cli("node", "trust", "accept", "gamma", "--yes")
    assert missing.returncode == 1 and missing.stderr.startswith("NO_SUCH_CLAIM:gamma")


def test_no_secret_in_any_ungated_output_or_log(spt_nodes):
    """§9.6: after a full scenario under DEBUG logging, neither the seeds (base32 or hex), nor any
    code they gave during the run, nor a private key appears in an ungated command's output or in
    any daemon log."""
    from spt.core.proto.totp import step_of

    debug = {"SPT_LOG_LEVEL": "DEBUG"}
    a, b, c, d = (spt_nodes(n, label=label, env=debug) for n, label in
                  (("a", "alpha"), ("b", "beta"), ("c", "gamma"), ("d", "delta")))
    started = time.time()
    outputs = []

    def ungated(node, *args):
        result = node.cli(*args)
        outputs.append(result.stdout + result.stderr)
        return result

    gated = [create(a)]
    seeds = [seed_of(gated[0])]
    for node, via in ((b, a), (c, b)):
        code = fresh_code(via)
        outputs.append(join(node, via, code=code).stdout)
    refused = join(d, b, code=wrong(fresh_code(b)))
    assert refused.returncode == 1
    outputs.append(refused.stderr)  # refusals are output too
    wait_for(lambda: all_online(a, {"alpha", "beta", "gamma"}), WAIT, "three online")
    for node in (a, b, c, d):
        for args in (("subnet", "status"), ("subnet", "status", "--nodes", "--all"), ("node", "show"),
                     ("node", "trust", "list"), ("daemon", "status"), ("endpoint", "list")):
            ungated(node, *args)
            ungated(node, "--json", *args)
    pruned = a.cli("subnet", "prune", "gamma", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    seeds.append(seed_of(pruned.stdout))
    gated.append(pruned.stdout)
    outputs.append(pruned.stderr)
    ungated(a, "subnet", "detach", "home")
    ungated(a, "subnet", "attach", "home")
    outputs.append(join(d, b).stdout)
    wait_for(lambda: "pruned" in c.cli("subnet", "status").stdout, WAIT, "gamma to learn it was pruned")
    for node in (a, b, c, d):
        ungated(node, "--json", "subnet", "status", "--nodes", "--all")
        ungated(node, "subnet", "status", "--nodes", "--all")
    left = b.cli("subnet", "leave", "home", "--yes")
    outputs.append(left.stdout + left.stderr)
    time.sleep(0.5)  # let the last pushes be logged
    for node in (a, b, c, d):
        node.stop()

    steps = range(step_of(started) - 1, step_of(time.time()) + 2)
    secrets = {}
    for b32, raw in seeds:
        secrets[f"seed {b32[:4]}… base32"] = re.escape(b32)
        secrets[f"seed {b32[:4]}… hex"] = "(?i)" + raw.hex()
        for step in steps:
            secrets[f"code at step {step}"] = rf"(?<![0-9A-Za-z]){totp(raw, step)}(?![0-9A-Za-z])"
    for node in (a, b, c, d):
        key = (node.home / "node.key").read_bytes()
        secrets[f"{node.name}'s private key"] = "(?i)" + key.hex()
    logs = {f"{n.name}/daemon.log": n.log() for n in (a, b, c, d)}
    assert all("DEBUG" in text for text in logs.values())
    texts = {**{f"output {i}": text for i, text in enumerate(outputs)}, **logs}
    leaks = [(what, where) for what, pattern in secrets.items() for where, text in texts.items() if re.search(pattern, text)]
    assert leaks == []
    # the patterns do find what they look for: the gated commands print the seed and the code
    for (b32, raw), shown in zip(seeds, gated, strict=True):
        code, _ = code_of(shown)
        assert re.search(secrets[f"seed {b32[:4]}… base32"], shown)
        assert any(re.search(rf"(?<![0-9A-Za-z]){totp(raw, step)}(?![0-9A-Za-z])", shown) for step in steps)


def test_rekey_is_signed_by_the_old_key_and_still_needs_a_human(trio):
    a, b, c, _ = trio
    old_key = c.key
    assert c.cli("node", "rekey").returncode == 2  # no terminal to confirm
    rekeyed = c.cli("node", "rekey", "--yes")
    assert rekeyed.returncode == 0, rekeyed.stderr
    assert re.fullmatch(r"REKEYED:gamma \([0-9a-f]{8}\u2026\)\n", rekeyed.stdout), rekeyed.stdout
    assert c.proc.wait(10) == 0  # the daemon stopped to come back under the new key
    c.start()
    new_key = c.key
    assert new_key != old_key and rekeyed.stdout.startswith(f"REKEYED:gamma ({new_key[:8]}")
    assert (c.home / "node.key.old").exists()

    # §9.10: the old key's signature on the claim changes nothing until someone accepts
    pending = wait_for(lambda: b.json("node", "trust", "list")["pending"], WAIT, "beta to record the claim")
    assert [(p["old"], p["new"], p["old_key_signed"]) for p in pending] == [(old_key, new_key, True)]
    assert b.cli("node", "trust", "list", check=True).stdout.rstrip().endswith("old-key-signed")
    refusal = asyncio.run(dial_as_member(c, b))
    assert "not-a-member" in refusal and "accepted" not in refusal, refusal
    again = c.cli("node", "rekey", "--yes")
    assert again.returncode == 1 and again.stderr.startswith("REKEY_PENDING:")

    trusted = b.cli("node", "trust", "accept", new_key[:10], "--subnet", "home", "--yes")
    assert trusted.stdout == f"TRUSTED:gamma ({new_key[:8]}\u2026)\n", trusted.stderr
    for n in (a, b, c):
        wait_for(lambda n=n: all_online(n, {"alpha", "beta", "gamma"}) and members(n)["gamma"]["key"] == new_key, WAIT, f"{n.name} to see gamma online with its new key")
    rekeys = [json.loads(raw) for (raw,) in db_rows(a, "SELECT data FROM log_entries")]
    [entry] = [e for e in rekeys if e["type"] == "rekey"]
    assert entry["body"] == {"old": old_key, "new": new_key} and entry["oldsig"] and entry["countersig"]
    wait_for(lambda: not (c.home / "node.key.old").exists(), WAIT, "gamma to delete its old key")


def test_two_subnets_of_one_name_are_ambiguous_until_id_chooses(spt_nodes):
    a = spt_nodes("a", label="alpha")
    x = spt_nodes("x", label="xeno")
    d = spt_nodes("d", label="delta")
    create(a)
    create(x)
    ids = {n.name: sub_doc(n)["id"] for n in (a, x)}
    code = fresh_code(a)
    both = d.cli("subnet", "join", "home", "--code", code, "--peer", a.address, "--peer", x.address, "--timeout", "5")
    assert both.returncode == 1
    lines = both.stderr.splitlines()
    assert lines[0].startswith("JOIN_AMBIGUOUS:home")
    assert sorted(lines[1:]) == sorted(f"  {i[:8]}  1" for i in ids.values())
    assert status(d)["subnets"] == []
    assert sub_doc(a)["joins"]["failed_last_hour"] == 0 and sub_doc(x)["joins"]["failed_last_hour"] == 0  # no code tried
    chosen = d.cli("subnet", "join", "home", "--code", fresh_code(a), "--peer", a.address, "--peer", x.address,
                   "--id", ids["a"][:6], "--timeout", "5")
    assert chosen.returncode == 0, chosen.stderr
    assert sub_doc(d)["id"] == ids["a"]
