"""A member of one subnet asking, on `spt/1`, for things in a subnet it is not in (issue 10).

gamma shares subnet `work` with alpha, so alpha lets it connect on `spt/1`; it is not in `home`.
Every member request, the core's and the plugins' alike, names its subnet and is refused unless
the sender is a member of that subnet now (the daemon's dispatcher checks, once, for all).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest

from spt.core.identity import NodeId, NodeKey
from spt.core.net.transport import AllowKeys, RequestError, Transport
from spt.testing.nodes import fresh_code

RELAY = importlib.util.find_spec("spt_relay_fallback") is not None

pytestmark = pytest.mark.slow


def test_a_member_request_naming_a_subnet_the_sender_is_not_in_is_refused(spt_nodes):
    alpha, beta = spt_nodes.subnet(["alpha", "beta"], name="home")
    gamma = spt_nodes("gamma", label="gamma")
    alpha.cli("subnet", "create", "work", check=True)
    gamma.cli("subnet", "join", "work", "--code", fresh_code(alpha, "work"), "--peer", alpha.address, check=True)
    subnets = {s["name"]: s["id"] for s in alpha.json("subnet", "status")["subnets"]}
    gamma_key = NodeKey.from_private_bytes((gamma.home / "node.key").read_bytes())
    gamma.stop()  # the test speaks as gamma from here
    host, port = alpha.address.split(":")
    alpha_id = NodeId.from_hex(alpha.key)
    tid = os.urandom(16).hex()

    async def ask(conn, type_name, body):
        try:
            reply = await conn.request(type_name, body, timeout=5)
        except RequestError as exc:
            return exc.code
        return reply.type

    async def scenario():
        t = Transport(gamma_key, host="127.0.0.1", accept=AllowKeys())
        await t.start()
        try:
            conn = await t.connect(alpha_id, [(host, int(port))], timeout=5)
            out = {}
            for where, subnet in (("home-name", "home"), ("home-id", subnets["home"]), ("none", None)):
                body = {} if subnet is None else {"subnet": subnet}
                out[where] = {
                    "log.sync": await ask(conn, "log.sync", {**body, "heads": []}),
                    "registry.sync": await ask(conn, "registry.sync", {**body, "digest": {}}),
                    "registry.sync (hash)": await ask(conn, "registry.sync", {**body, "digest_hash": "00" * 16}),
                    "msg.deliver": await ask(conn, "msg.deliver", {**body, "payload": {}}),
                    "file.offer": await ask(conn, "file.offer", {**body, "tid": tid, "to": "x"}),
                    "file.chunk": await ask(conn, "file.chunk", {**body, "tid": tid, "f": 0, "c": 0, "d": b"x"}),
                }
                if RELAY:  # a request type of the relay plugin (not in the air-gapped build)
                    out[where]["relay.punch"] = await ask(conn, "relay.punch", {**body, "nonce": os.urandom(16)})
            # its own subnet passes the dispatcher; the handlers then judge the request itself
            out["work"] = {"log.sync": await ask(conn, "log.sync", {"subnet": "work", "heads": []})}
            return out
        finally:
            await t.close()

    out = asyncio.run(scenario())
    for where in ("home-name", "home-id"):
        assert set(out[where].values()) == {"NOT_A_MEMBER"}, (where, out[where])
    assert set(out["none"].values()) == {"PROTOCOL_ERROR"}, out["none"]
    assert out["work"]["log.sync"] != "NOT_A_MEMBER"
    assert beta.proc is not None and beta.proc.poll() is None
