"""Crafted bodies for every request a node answers, sent over real QUIC as an attacker would
(issue 10): from a member of the subnet (past the dispatcher's membership check, so each
handler judges the body itself) and from a stranger on the join ALPN.

A handler may accept a body or refuse it with a token; it must never fail. A failing handler
costs the node a traceback in its log per request (a member could fill the log) and hides
what was wrong from the sender. So after every crafted body the daemon's log holds no
"handler failed" and no traceback, and the node still answers its members.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import pytest

from spt.core.identity import NodeId, NodeKey
from spt.core.net.transport import ALPN_JOIN, AllowKeys, RequestError, Transport

pytestmark = pytest.mark.slow

# Each member request type a node answers (core and the built-in plugins), with the fields its
# handler reads. tests/security/test_crafted_requests.py::test_the_list_names_every_request
# keeps this complete.
MEMBER_REQUESTS: dict[str, tuple[str, ...]] = {
    "log.sync": ("heads", "full"),
    "log.push": ("entries",),
    "seed.fetch": ("epoch",),
    "seed.install": ("epoch", "seed"),
    "join.record": ("kind", "record"),
    "join.records": ("entries", "kind"),
    "msg.deliver": ("payload",),
    "msg.deliver_batch": ("payloads",),
    "endpoint.request": ("kind", "args", "id", "grace"),
    "registry.push": ("records", "digest"),
    "registry.sync": ("digest", "digest_hash"),
    "rep.push": ("kind", "records", "part"),
    "rep.digest": ("kind", "kinds", "buckets", "part"),
    "rep.reconcile": ("kind", "ids", "part", "records"),
    "clock": ("label", "level"),
    "payload": ("type", "value", "perch", "from", "address"),
    "relay.punch": ("nonce", "addrs", "mapping"),
    "update.offer": ("version",),
    "update.chunk": ("version", "file", "offset", "length"),
    "file.offer": ("tid", "to", "from", "label", "message", "manifest"),
    "file.open": ("tid", "tcp", "seen"),
    "file.chunk": ("tid", "f", "c", "d"),
    "file.need": ("tid",),
    "file.cancel": ("tid",),
    "file.transit": ("tid", "via", "invitation"),
    "file.punch": ("tid", "port", "udp_port", "seen"),
    "rc.attach": ("id", "offset", "replay", "read_only", "rows", "cols", "viewer", "run"),  # a stream (rc)
}
JOIN_REQUESTS: dict[str, tuple[str, ...]] = {
    "log.offer": ("subnet", "entries"),
    "key.claim": ("subnet", "old", "new", "sig", "oldsig", "entry"),
    "key.countersign": ("subnet", "old", "new", "sig", "entry"),
}
BODIES_PER_TYPE = 24


def wrong(rng: random.Random, depth: int = 0) -> Any:
    """A value of the wrong type, shape or size, or a plausible one (so handlers get past their
    first check now and then)."""
    pool: list[Any] = [
        None, True, 0, -1, 5, 2**63 - 1, -(2**63), 1.5, float("nan"), "", "zz", "ab" * 16, "AB" * 16, "ab" * 32,
        "zz" * 32, "x" * 300, FORGED, "1.2.3.4:5", "127.0.0.1:99999", ":", b"", b"\xff" * 3, os.urandom(16),
        os.urandom(32), [], {}, ["zz"], [5], [None], [[]], [{}], {"zz": "zz"}, {"": None},
    ]
    if depth < 2:
        pool += [
            [wrong(rng, depth + 1) for _ in range(rng.randrange(1, 4))],
            {k: wrong(rng, depth + 1) for k in rng.sample(MESSAGE_FIELDS, rng.randrange(1, len(MESSAGE_FIELDS)))},
        ]
    return rng.choice(pool)


FORGED = "x\n2026-01-01 00:00:00,000 ERROR FORGED-LINE\r\x1b[2K"  # a log line of the sender's making
MESSAGE_FIELDS = ["id", "to", "from", "body", "attrs", "window", "reply_to", "type", "name", "files", "sig", "t"]


def bodies(rng: random.Random, fields: tuple[str, ...], subnet: str | None) -> list[dict[str, Any]]:
    out = []
    for _ in range(BODIES_PER_TYPE):
        body: dict[str, Any] = {} if subnet is None else {"subnet": subnet}
        for name in fields:
            if rng.random() < 0.8:
                body[name] = wrong(rng)
        out.append(body)
    return out


async def ask_all(conn, requests: list[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """Send every request (16 at a time); how many were answered, refused, or cut."""
    counts = {"answered": 0, "refused": 0, "cut": 0}
    gate = asyncio.Semaphore(16)

    async def one(type_name: str, body: dict[str, Any]) -> None:
        async with gate:
            try:
                reply = await conn.request(type_name, body, timeout=5)
            except RequestError:
                counts["refused"] += 1
            except Exception as exc:  # reset, timed out, or not encodable here (a lone surrogate)
                counts["cut"] += 1
                counts.setdefault(type(exc).__name__, 0)
                counts[type(exc).__name__] += 1
            else:
                counts["answered" if reply.type != "error" else "refused"] += 1

    await asyncio.gather(*(one(t, b) for t, b in requests))
    return counts


FAILED = ("handler failed", "Traceback", "never retrieved", "a batched message failed")


def crashes(log: str) -> set[str]:
    """Each distinct failure in a daemon log: its innermost frame and its exception line."""
    out: set[str] = set()
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if not any(mark in line for mark in FAILED):
            continue
        if "Traceback" not in line:
            out.add(line.split(": ", 1)[-1][:120]) if i + 1 >= len(lines) or "Traceback" not in lines[i + 1] else None
            continue
        frame = error = ""
        for later in lines[i + 1 : i + 200]:
            if later.startswith("  File "):
                frame = later.strip()
            elif not later.startswith(" ") and later.strip():
                error = later.strip()
                break
        out.add(f"{frame} -> {error[:160]}")
    return out


def test_crafted_bodies_are_refused_never_crash_a_handler(spt_nodes):
    alpha, beta = spt_nodes.subnet(["alpha", "beta"], name="home", env={"SPT_LOG_LEVEL": "DEBUG"})
    subnet = alpha.json("subnet", "status")["subnets"][0]["id"]
    beta_key = NodeKey.from_private_bytes((beta.home / "node.key").read_bytes())
    beta.stop()  # the test speaks as beta from here
    host, port = alpha.address.split(":")
    target, alpha_id = (host, int(port)), NodeId.from_hex(alpha.key)
    rng = random.Random(os.environ.get("SPT_FUZZ_SEED", "crafted"))
    member = [(t, b) for t, fields in MEMBER_REQUESTS.items() for b in bodies(rng, fields, subnet)]
    stranger = [(t, b) for t, fields in JOIN_REQUESTS.items() for b in bodies(rng, fields, None)]
    stranger += [(t, {**b, "subnet": subnet}) for t, b in list(stranger) if "subnet" not in b]
    member += [(FORGED, {"subnet": subnet}), ("log.sync" + FORGED, {"subnet": subnet})]  # as type names too
    stranger += [(FORGED, {}), ("key.claim" + FORGED, {})]

    async def scenario():
        t = Transport(beta_key, host="127.0.0.1", accept=AllowKeys())
        s = Transport(NodeKey.generate(), host="127.0.0.1", accept=AllowKeys(), alpns=(ALPN_JOIN,))
        await t.start()
        await s.start()
        try:
            conn = await t.connect(alpha_id, [target], timeout=5)
            as_member = await ask_all(conn, member)
            join_conn = await s.connect(alpha_id, [target], alpn=ALPN_JOIN, timeout=5)
            as_stranger = await ask_all(join_conn, stranger)
            # the node still answers its member
            after = await conn.request("log.sync", {"subnet": subnet, "heads": []}, timeout=5)
            return as_member, as_stranger, after.type
        finally:
            await t.close()
            await s.close()

    as_member, as_stranger, after = asyncio.run(scenario())
    print(f"member: {as_member}; stranger: {as_stranger}")
    assert after == "log.entries"
    assert alpha.proc is not None and alpha.proc.poll() is None
    log = alpha.log()
    failures = crashes(log)
    assert failures == set(), "\n".join(sorted(failures))
    # a peer's strings never start a line of the log (nor rewrite one on a terminal)
    forged = [line for line in log.splitlines() if "FORGED-LINE" in line and not line.startswith(alpha_log_prefix(line))]
    assert forged == [], forged[:5]
    assert as_member["refused"] >= len(member) // 2, as_member  # the bodies were mostly wrong


def alpha_log_prefix(line: str) -> str:
    """The start of a log line the daemon wrote itself: its own time stamp (never 2026-01-01)."""
    return line[:4] if line[:4].isdigit() and not line.startswith("2026-01-01 00:00:00,000") else "\0"


def test_the_list_names_every_request():
    """MEMBER_REQUESTS and JOIN_REQUESTS name every request type the sources register."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    found: set[str] = set()
    for path in [*root.glob("spt/**/*.py"), *root.glob("plugins/*/spt_*/*.py")]:
        text = path.read_text()
        found |= set(re.findall(r'handlers\["([a-z._]+)"\]\s*=', text))
        found |= set(re.findall(r'add_member_(?:request|stream)\("([a-z._]+)"', text))
        found |= set(re.findall(r'^\s+"([a-z]+\.[a-z_]+)": self\.[a-z_.]+,$', text, re.M)) if "join_handlers" in text else set()
    from spt.core.proto.deliver import BATCH_TYPE
    from spt.plugins.rc.service import STREAM_TYPE

    found |= {BATCH_TYPE, STREAM_TYPE}  # registered by constant
    assert found == set(MEMBER_REQUESTS) | set(JOIN_REQUESTS)
