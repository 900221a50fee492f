"""The relay on loopback: registration, refusals, rendezvous, relayed QUIC, restarts, limits."""

import asyncio
import os

import pytest
from spt_relay_fallback.config import read_urls, write_urls
from spt_relay_fallback.server import RelayServer
from spt_relay_fallback.url import RelayUrl, token_proof

from spt.core.errors import ConfigError
from spt.core.identity import NodeKey
from spt.core.net.paths import MAPPING_ASK, RELAY_SEND, is_virtual, virtual_address
from spt.core.net.transport import (
    ALPN_RELAY,
    AllowKeys,
    HandshakeRefusedError,
    PeerTimeoutError,
    RequestError,
    Transport,
    UnreachableError,
    serve_requests,
)


async def echo(conn, frame):
    return ("echo", frame.body)


@pytest.fixture
async def make():
    made = []

    async def factory(key=None, *, members=()):
        key = key or NodeKey.generate()
        transport = Transport(
            key, host="127.0.0.1", accept=AllowKeys(members), on_stream=serve_requests(echo),
            idle_timeout=5.0, keepalive=1.0,
        )
        await transport.start()
        made.append(transport)
        return transport

    yield factory
    for transport in made:
        await transport.close()


@pytest.fixture
async def relay():
    servers = []

    async def factory(key=None, **kwargs):
        server = RelayServer(key or NodeKey.generate(), host="127.0.0.1", port=0, **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()


async def register(transport, server, token=None):
    """Register `transport` at `server` by hand, as the relay client does; returns the reply body."""
    conn = await transport.connect(server.key.node_id, [("127.0.0.1", server.port)], alpn=ALPN_RELAY)
    body = {"port": transport.sockname[1]}
    if token is not None:
        body["proof"] = token_proof(token, conn)
    reply = await conn.request("relay.register", body)
    transport.paths.set_relay(server.key.node_id, ("127.0.0.1", server.port), reply.body["token"])
    return conn, reply.body


async def linked_pair(make, relay, **relay_kwargs):
    ka, kb = NodeKey.generate(), NodeKey.generate()
    a = await make(ka, members=[kb.node_id])
    b = await make(kb, members=[ka.node_id])
    server = await relay(**relay_kwargs)
    await register(a, server)
    await register(b, server)
    return a, b, server


def test_relay_urls_round_trip_and_bad_ones_name_the_form():
    key = NodeKey.generate().node_id
    url = RelayUrl.parse(f"spt-relay://s3cret@10.0.0.1:5000#{key.hex}")
    assert (url.host, url.port, url.key, url.token) == ("10.0.0.1", 5000, key, "s3cret")
    assert RelayUrl.parse(str(url)) == url
    assert "s3cret" not in url.public
    for bad in ("http://x:1#00", f"spt-relay://h:1#{key.hex[:10]}", "spt-relay://:1#aa"):
        with pytest.raises(ConfigError, match="spt-relay://HOST:PORT#RELAYKEYHEX"):
            RelayUrl.parse(bad)


def test_relay_urls_are_edited_in_place_keeping_other_settings(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[net]\nport = 0 # mine\n\n[relay]\nurls = [\n  "a",\n  "b",\n]\n\n[discovery]\nmdns = false\n')
    write_urls(config, ["x"])
    assert read_urls(config) == ["x"]
    text = config.read_text()
    assert "port = 0 # mine" in text and "mdns = false" in text
    empty = tmp_path / "new.toml"
    write_urls(empty, ["y", "z"])
    assert read_urls(empty) == ["y", "z"]
    assert oct(empty.stat().st_mode & 0o777) == "0o600"


def test_virtual_addresses_are_reserved_stable_and_distinct():
    r, p, q = (NodeKey.generate().node_id for _ in range(3))
    assert virtual_address(r, p) == virtual_address(r, p)
    assert virtual_address(r, p) != virtual_address(r, q)
    assert is_virtual(virtual_address(r, p)[0])


async def test_registration_returns_a_token_and_the_reflexive_address(make, relay):
    a = await make()
    server = await relay()
    _conn, body = await register(a, server)
    assert len(body["token"]) == 16
    assert body["addr"] == f"127.0.0.1:{a.sockname[1]}"
    assert body["alt_port"] == server.port + 1 or body["alt_port"] is None
    assert server.registered == [a.node_id]


async def test_quic_rides_the_relay_end_to_end(make, relay):
    a, b, server = await linked_pair(make, relay)
    virtual = a.paths.relay_path(server.key.node_id, b.node_id)
    conn = await a.connect(b.node_id, [virtual])
    assert conn.remote_addr == virtual
    reply = await conn.request("ping", {"n": 1, "blob": os.urandom(20000)})
    assert reply.body["n"] == 1
    assert server.stats["forwarded"] > 10
    incoming = b.connection(a.node_id)
    assert incoming is not None and is_virtual(incoming.remote_addr[0])
    info = a.paths.describe(b.node_id, virtual)
    assert info is not None and info.kind == f"relayed 127.0.0.1:{server.port}"


async def test_a_virtual_address_without_a_registered_relay_is_never_dialled(make):
    a, b = await make(), await make()
    virtual = virtual_address(NodeKey.generate().node_id, b.node_id)
    with pytest.raises(UnreachableError, match="no usable address"):
        await a.connect(b.node_id, [virtual], timeout=1.0)


async def test_rendezvous_finds_registered_tags_and_not_the_asker(make, relay):
    a, b, c = await make(), await make(), await make()
    server = await relay()
    tag = os.urandom(16)
    conn_a, _ = await register(a, server)
    conn_b, _ = await register(b, server)
    conn_c, _ = await register(c, server)
    await conn_a.request("relay.tags", {"tags": [tag], "port": 47470})
    await conn_b.request("relay.tags", {"tags": [os.urandom(16)], "port": 1})
    found = (await conn_c.request("relay.lookup", {"tag": tag})).body["nodes"]
    assert [(n["key"], n["port"]) for n in found] == [(a.node_id.hex, 47470)]
    assert (await conn_a.request("relay.lookup", {"tag": tag})).body["nodes"] == []


async def test_an_allow_list_refuses_unknown_keys_inside_the_handshake(make, relay):
    a, b = await make(), await make()
    server = await relay(allow=[a.node_id])
    await register(a, server)
    with pytest.raises(HandshakeRefusedError, match="allow-list"):
        await b.connect(server.key.node_id, [("127.0.0.1", server.port)], alpn=ALPN_RELAY, timeout=3.0)
    assert server.registered == [a.node_id]


async def test_a_token_relay_refuses_registration_without_the_token(make, relay):
    a, b = await make(), await make()
    server = await relay(token="s3cret")
    with pytest.raises(RequestError, match="REFUSED"):
        await register(a, server, token="wrong")
    await register(b, server, token="s3cret")
    assert server.registered == [b.node_id]


async def test_the_access_token_never_travels_and_a_proof_does_not_replay(make, relay):
    a, b = await make(), await make()
    server = await relay(token="s3cret")
    conn = await a.connect(server.key.node_id, [("127.0.0.1", server.port)], alpn=ALPN_RELAY)
    with pytest.raises(RequestError, match="REFUSED"):  # the token in clear is not accepted any more
        await conn.request("relay.register", {"token": "s3cret", "port": 1})
    other = await b.connect(server.key.node_id, [("127.0.0.1", server.port)], alpn=ALPN_RELAY)
    stolen = token_proof("s3cret", other)  # a proof seen on one connection is bound to it
    (conn2,) = [c for c in server.transport.connections() if c.peer == b.node_id]
    assert token_proof("s3cret", conn2) == stolen  # both ends compute the same value
    fresh = await make()
    third = await fresh.connect(server.key.node_id, [("127.0.0.1", server.port)], alpn=ALPN_RELAY)
    with pytest.raises(RequestError, match="REFUSED"):
        await third.request("relay.register", {"proof": stolen, "port": 1})
    assert (await other.request("relay.register", {"proof": stolen, "port": 1})).type == "relay.registered"


async def test_registrations_and_mapping_answers_are_limited_per_source(make, relay):
    from spt_relay_fallback.server import MAPPING_PER_SECOND, REGISTER_BURST

    server = await relay(max_per_source=2)
    nodes = [await make() for _ in range(3)]
    for node in nodes[:2]:
        await register(node, server)
    with pytest.raises(RequestError, match="RELAY_FULL"):
        await register(nodes[2], server)
    # registering again and again from one address runs out of allowance
    conn = await nodes[0].connect(server.key.node_id, [("127.0.0.1", server.port)], alpn=ALPN_RELAY)
    codes = []
    for _ in range(REGISTER_BURST + 2):
        try:
            await conn.request("relay.register", {"port": 1})
            codes.append("ok")
        except RequestError as exc:
            codes.append(exc.code)
    assert "RATE_LIMITED" in codes
    # the mapping port answers an address a few times a second, however fast it asks
    loop = asyncio.get_running_loop()
    answers = []

    class Asker(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            answers.append(data)

    udp, _ = await loop.create_datagram_endpoint(Asker, local_addr=("127.0.0.1", 0))
    try:
        for _ in range(50):
            udp.sendto(bytes((MAPPING_ASK,)) + os.urandom(8), ("127.0.0.1", server.alt_port))
        await asyncio.sleep(0.3)
    finally:
        udp.close()
    assert 1 <= len(answers) <= MAPPING_PER_SECOND + 1


async def test_rate_caps_are_on_by_default(relay):
    from spt_relay_fallback.server import DEFAULT_RATE

    server = await relay()
    assert server.rate == DEFAULT_RATE


async def test_a_node_that_does_not_prove_its_key_cannot_send_through_the_relay(make, relay):
    """Frames with a forged token, or a real token from another address, are dropped."""
    a, b, server = await linked_pair(make, relay)
    mallory = await make()
    relay_addr = ("127.0.0.1", server.port)
    got = asyncio.get_running_loop().create_future()
    b.set_datagram_handler(lambda data, addr: got.done() or got.set_result(data))
    token_a = a.paths._relays[server.key.node_id].token
    for token in (os.urandom(16), token_a):  # a guess, then a's token sent from mallory's socket
        mallory.send_datagram(bytes((RELAY_SEND,)) + b.node_id.raw + token + b"\x40" * 100, relay_addr)
    await asyncio.sleep(0.3)
    assert not got.done()
    assert server.stats["dropped_token"] == 2 and server.stats["forwarded"] == 0


async def test_the_rate_cap_drops_beyond_the_allowance(make, relay):
    a, b, server = await linked_pair(make, relay, rate=1)
    virtual = a.paths.relay_path(server.key.node_id, b.node_id)
    conn = await a.connect(b.node_id, [virtual], timeout=2.0)  # the handshake fits the burst
    with pytest.raises(PeerTimeoutError):
        await conn.request("ping", os.urandom(200_000), timeout=1.0)
    assert server.stats["dropped_rate"] > 0


async def test_nodes_register_again_after_the_relay_restarts(make, relay):
    key = NodeKey.generate()
    a, b, server = await linked_pair(make, relay, key=key)
    virtual = a.paths.relay_path(server.key.node_id, b.node_id)
    conn = await a.connect(b.node_id, [virtual])
    port = server.port
    await server.close()
    again = RelayServer(key, host="127.0.0.1", port=port)
    await again.start()
    try:
        # the client re-registers when told (0x03); here by hand, as RelayLink does
        for t in (a, b):
            t.paths.set_relay(key.node_id, ("127.0.0.1", port), None)
            old = t.connection(key.node_id, ALPN_RELAY)
            if old is not None:
                old.close("relay restarted")
            await register(t, again)
        reply = await conn.request("ping", "after restart", timeout=5.0)
        assert reply.body == "after restart"
    finally:
        await again.close()


async def test_punching_finds_the_direct_path_and_the_connection_moves_to_it(make, relay):
    a, b, server = await linked_pair(make, relay)
    virtual = a.paths.relay_path(server.key.node_id, b.node_id)
    relayed = await a.connect(b.node_id, [virtual])
    nonce = os.urandom(16)
    found_a, found_b = await asyncio.gather(
        a.paths.punch(b.node_id, nonce, [b.sockname], timeout=2.0),
        b.paths.punch(a.node_id, nonce, [a.sockname], active=False, timeout=2.0),
    )
    assert found_a == b.sockname and found_b == a.sockname
    direct = await a.upgrade(b.node_id, found_a, grace=0.3)
    assert a.connection(b.node_id) is direct
    assert (await direct.request("ping", "direct")).body == "direct"
    assert await asyncio.wait_for(relayed.wait_closed(), 2.0) == "moved to a direct path"
    incoming = b.connection(a.node_id)
    assert incoming is not None and incoming.remote_addr == a.sockname
    assert a.paths.describe(b.node_id, direct.remote_addr).kind == "direct punched"
    assert b.paths.describe(a.node_id, incoming.remote_addr).kind == "direct punched"


async def test_a_punch_towards_nobody_times_out(make):
    a = await make()
    assert await a.paths.punch(NodeKey.generate().node_id, os.urandom(16), [("127.0.0.1", 9)], timeout=0.3) is None


class _Nat:
    """A NAT in front of one node, towards one server: the node sends to `inside`, the server sees
    the NAT's outside port, which `rebind()` replaces (the NAT forgot the mapping)."""

    def __init__(self, server_addr):
        self.server_addr = server_addr
        self.node_addr = None
        self.inside = None
        self.outside = None

    class _Side(asyncio.DatagramProtocol):
        def __init__(self, received):
            self.received = received

        def datagram_received(self, data, addr):
            self.received(data, addr)

    async def start(self):
        loop = asyncio.get_running_loop()
        self.inside, _ = await loop.create_datagram_endpoint(
            lambda: self._Side(self._from_node), local_addr=("127.0.0.1", 0))
        await self.rebind()
        return self.inside.get_extra_info("sockname")

    async def rebind(self):
        old = self.outside
        self.outside, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: self._Side(self._from_server), local_addr=("127.0.0.1", 0))
        if old is not None:
            old.close()

    def _from_node(self, data, addr):
        self.node_addr = addr
        self.outside.sendto(data, self.server_addr)

    def _from_server(self, data, addr):
        if self.node_addr is not None:
            self.inside.sendto(data, self.node_addr)

    def close(self):
        for side in (self.inside, self.outside):
            if side is not None:
                side.close()


async def test_relaying_follows_a_node_whose_nat_gave_it_another_port(make, relay):
    """A NAT that forgot its mapping gives the node a new public port. Once the node's relay
    connection has been seen there (QUIC validates the new path), frames go to and come from that
    port, without a new registration (it once needed a notice and a re-registration each way,
    and registrations are rate-limited per address)."""
    ka, kb = NodeKey.generate(), NodeKey.generate()
    a = await make(ka, members=[kb.node_id])
    b = await make(kb, members=[ka.node_id])
    server = await relay()
    await register(a, server)
    nat = _Nat(("127.0.0.1", server.port))
    inside = await nat.start()
    try:
        to_relay = await b.connect(server.key.node_id, [inside], alpn=ALPN_RELAY)
        reply = await to_relay.request("relay.register", {"port": b.sockname[1]})
        b.paths.set_relay(server.key.node_id, inside, reply.body["token"])
        conn = await a.connect(b.node_id, [a.paths.relay_path(server.key.node_id, b.node_id)])
        assert (await conn.request("ping", "before")).body == "before"
        await nat.rebind()
        await to_relay.request("relay.lookup", {"tag": bytes(16)})  # the relay hears b's new port
        assert (await conn.request("ping", "after", timeout=3.0)).body == "after"
        assert server.registered == [a.node_id, b.node_id] and server.stats["registrations"] == 2
    finally:
        nat.close()
