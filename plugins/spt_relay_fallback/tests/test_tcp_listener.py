"""The relay's TCP listener on loopback: blind transit between two matched, registered nodes.

Written as the attacker where it matters: the relay operator (the `observe` tap is what the
relay process sees after TLS) finds no plaintext marker in a file channel carried through it;
a wrong, reused or foreign ticket gets nothing; an impostor listener is refused by pinning.
"""

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest
from spt_filetransfer import channel
from spt_relay_fallback.server import RelayServer
from spt_relay_fallback.tcp import TICKET_BYTES, TransitError, dial_transit
from test_relay import echo, register

from spt.core.identity import NodeKey
from spt.core.net.transport import AllowKeys, RequestError, Transport, serve_requests

MARKER = b"PLAINTEXT-MARKER-7f3a"


@pytest.fixture
async def nodes():
    made = []

    async def factory():
        t = Transport(NodeKey.generate(), host="127.0.0.1", accept=AllowKeys([]), on_stream=serve_requests(echo),
                      idle_timeout=5.0, keepalive=1.0)
        await t.start()
        made.append(t)
        return t

    yield factory
    for t in made:
        await t.close()


@pytest.fixture
async def tcp_relay():
    seen: list[bytes] = []
    server = RelayServer(NodeKey.generate(), host="127.0.0.1", port=0, tcp_listen=("127.0.0.1", 0))
    await server.start()
    assert server.tcp is not None
    server.tcp.observe = seen.append
    yield server, seen
    await server.close()


async def tickets(a, b, server):
    conn_a, reply = await register(a, server)
    await register(b, server)
    assert reply["tcp_port"] == server.tcp_port
    answer = await conn_a.request("relay.transit", {"peer": b.node_id.raw})
    return answer.body


async def a_transit_is_matched(nodes, server) -> None:
    """Two new nodes ask for a transit and both dial it: matched (else dial_transit raises)."""
    body = await tickets(await nodes(), await nodes(), server)
    socks = await asyncio.gather(*(
        asyncio.to_thread(dial_transit, "127.0.0.1", server.tcp_port, server.key.node_id, t, 10)
        for t in (body["ticket"], body["peer_ticket"])
    ))
    for sock in socks:
        sock.close()


async def test_a_transit_carries_sealed_frames_and_the_relay_sees_no_plaintext(nodes, tcp_relay):
    server, seen = tcp_relay
    a, b = await nodes(), await nodes()
    body = await tickets(a, b, server)
    relay_id, port = server.key.node_id, body["tcp_port"]
    # the file channel's keys come over pinned QUIC between a and b; the relay never has them
    c2s, _ = channel.derive_keys(channel.new_key(), os.urandom(16), b"c" * 16, b"s" * 16)
    payloads = [MARKER * 50 + os.urandom(1000) for _ in range(20)]

    def receiver() -> list[bytes]:
        sock = dial_transit("127.0.0.1", port, relay_id, body["peer_ticket"], timeout=10)
        with sock:
            rx = channel.Receiver(c2s, channel.C2S)
            return [bytes(rx.recv(sock)[2]) for _ in payloads]

    def sender() -> None:
        sock = dial_transit("127.0.0.1", port, relay_id, body["ticket"], timeout=10)
        with sock:
            tx = channel.Sender(c2s, channel.C2S)
            for i, payload in enumerate(payloads):
                tx.send(sock, 0, i, payload)
            time.sleep(0.2)

    got, _ = await asyncio.gather(asyncio.to_thread(receiver), asyncio.to_thread(sender))
    assert got == payloads
    relayed = b"".join(seen)
    assert len(relayed) >= sum(len(p) for p in payloads)
    assert MARKER not in relayed  # the relay moved the bytes and could not read them
    assert server.tcp.stats["transits"] == 1


async def test_tickets_are_single_use_and_unknown_ones_get_nothing(nodes, tcp_relay):
    server, seen = tcp_relay
    a, b = await nodes(), await nodes()
    body = await tickets(a, b, server)
    relay_id, port = server.key.node_id, body["tcp_port"]

    def attempt(ticket: bytes) -> str:
        try:
            dial_transit("127.0.0.1", port, relay_id, ticket, timeout=5).close()
            return "matched"
        except TransitError:
            return "refused"

    assert await asyncio.to_thread(attempt, os.urandom(TICKET_BYTES)) == "refused"
    results = await asyncio.gather(
        asyncio.to_thread(attempt, body["ticket"]), asyncio.to_thread(attempt, body["peer_ticket"])
    )
    assert results == ["matched", "matched"]
    assert await asyncio.to_thread(attempt, body["ticket"]) == "refused"  # used
    assert server.tcp.stats["refused"] == 2
    assert seen == []


async def test_transit_needs_both_nodes_registered(nodes, tcp_relay):
    server, _ = tcp_relay
    a, b = await nodes(), await nodes()
    conn_a, _ = await register(a, server)
    with pytest.raises(RequestError) as err:
        await conn_a.request("relay.transit", {"peer": b.node_id.raw})
    assert "NOT_REGISTERED" in str(err.value)


async def test_a_listener_with_another_key_is_refused_by_pinning(nodes, tcp_relay):
    server, _ = tcp_relay
    with pytest.raises(TransitError):
        await asyncio.to_thread(
            dial_transit, "127.0.0.1", server.tcp_port, NodeKey.generate().node_id, os.urandom(TICKET_BYTES), 5
        )


def test_relay_serve_takes_tcp_listen(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "spt", "relay", "serve", "--listen", "127.0.0.1:0", "--tcp-listen", f"127.0.0.1:{port}",
         "--key-file", str(tmp_path / "k")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={"SPT_HOME": str(tmp_path), "PATH": ""},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("RELAY_LISTENING:spt-relay://127.0.0.1:")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the TCP listener did not open")
    finally:
        proc.terminate()
        proc.wait(10)


async def test_garbage_hellos_are_refused_and_the_listener_keeps_serving(nodes, tcp_relay):
    """Fuzz the listener's only decoder (kind byte and ticket) with random and truncated hellos."""
    import random
    import ssl

    server, seen = tcp_relay
    rng = random.Random(14)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

    def poke(data: bytes) -> bytes:
        raw = socket.create_connection(("127.0.0.1", server.tcp_port), timeout=5)
        with ctx.wrap_socket(raw) as sock:
            sock.sendall(data)
            if len(data) < 1 + TICKET_BYTES:
                return b""  # a truncated hello: the relay sees the end and drops it
            try:
                return sock.recv(16)
            except (OSError, ssl.SSLError):
                return b""

    for _ in range(40):
        kind = rng.choice([0x10, 0x20, 0x00, 0xFF, rng.randrange(256)])
        data = bytes([kind]) + rng.randbytes(rng.choice([0, 1, 15, 16, 17, 64]))
        # kind 0x20 is the UDP-frames tunnel (tunnel.py): answered, then its garbage frames dropped
        allowed = (b"", b"\x01", b"\x00") if kind == 0x20 else (b"", b"\x01")
        assert await asyncio.to_thread(poke, data) in allowed
    assert seen == [] and server.tcp.stats["transits"] == 0
    await a_transit_is_matched(nodes, server)  # the listener still serves nodes


async def test_a_udp_frames_tunnel_that_registers_nobody_is_closed(tcp_relay, monkeypatch):
    """Kind 0x20 needs no ticket, so an idle tunnel must not hold a slot: the relay closes a
    tunnel through which no node registered within TUNNEL_REGISTER_WAIT."""
    from spt_relay_fallback import server as server_module
    from spt_relay_fallback.tunnel import NodeTunnel

    monkeypatch.setattr(server_module, "TUNNEL_REGISTER_WAIT", 0.3)
    server, _ = tcp_relay
    tunnel = await NodeTunnel.open("127.0.0.1", server.tcp_port, server.key.node_id)
    try:
        async with asyncio.timeout(5):
            assert await tunnel.reader.read() == b""  # the relay ended it
        assert server._tunnels == set()
    finally:
        await tunnel.close()


async def transits_until_full(conn, peer, server) -> int:
    """How many transits to `peer` the node on `conn` is given before RELAY_FULL (bounded)."""
    for got in range(server.tcp.max_transits + 1):
        try:
            await conn.request("relay.transit", {"peer": peer.node_id.raw})
        except RequestError as exc:
            assert "RELAY_FULL" in str(exc)
            return got
    raise AssertionError(f"never refused after {server.tcp.max_transits + 1} transits")


async def test_one_node_cannot_take_every_transit(nodes, tcp_relay):
    """A registered node asking for tickets again and again, never using them: once it has
    MAX_WAITING_PER_NODE waiting it is refused, and another node still gets its transit."""
    from spt_relay_fallback.tcp import MAX_WAITING_PER_NODE

    server, _ = tcp_relay
    server.tcp.max_transits = 4 * MAX_WAITING_PER_NODE
    greedy, victim, other = await nodes(), await nodes(), await nodes()
    conn_greedy, _ = await register(greedy, server)
    await register(victim, server)
    conn_other, _ = await register(other, server)
    assert await transits_until_full(conn_greedy, victim, server) == MAX_WAITING_PER_NODE
    reply = await conn_other.request("relay.transit", {"peer": victim.node_id.raw})
    assert len(reply.body["ticket"]) == TICKET_BYTES


async def test_one_address_cannot_take_every_transit_with_many_keys(nodes, tcp_relay):
    """Keys cost nothing: one address registering REGISTER_BURST of them, each asking until
    refused, gets at most MAX_WAITING_PER_SOURCE transits waiting (each key alone would get
    MAX_WAITING_PER_NODE: 160 of 256 here, all of them with 16 keys a minute later)."""
    from spt_relay_fallback.server import REGISTER_BURST
    from spt_relay_fallback.tcp import MAX_WAITING_PER_SOURCE

    server, _ = tcp_relay
    greedy = [await nodes() for _ in range(REGISTER_BURST)]
    conns = [(await register(t, server))[0] for t in greedy]
    got = [await transits_until_full(c, peer, server) for c, peer in zip(conns, greedy[1:] + greedy[:1], strict=True)]
    assert sum(got) == MAX_WAITING_PER_SOURCE, got
    # a node from another address still gets its transit
    other = Transport(NodeKey.generate(), host="127.0.0.2", accept=AllowKeys([]), on_stream=serve_requests(echo))
    await other.start()
    try:
        conn_other, _ = await register(other, server)
        reply = await conn_other.request("relay.transit", {"peer": greedy[0].node_id.raw})
        assert len(reply.body["ticket"]) == TICKET_BYTES
    finally:
        await other.close()

async def test_a_stranger_cannot_hold_connections_without_limit(nodes, tcp_relay):
    """Anyone may connect to the listener. A stranger (from 127.0.0.2) opening connections that
    never name a ticket is held to MAX_PENDING_PER_SOURCE at a time, and two registered nodes
    (from 127.0.0.1) are matched meanwhile."""
    import contextlib
    import ssl

    from spt_relay_fallback.tcp import MAX_PENDING_PER_SOURCE, client_context

    server, _ = tcp_relay
    opened = []
    try:
        for _ in range(MAX_PENDING_PER_SOURCE + 40):
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):  # refused in the handshake: closed
                opened.append(await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", server.tcp_port, ssl=client_context(), local_addr=("127.0.0.2", 0)), 5))
        await asyncio.sleep(0.5)

        async def still_open(reader) -> bool:
            try:
                return await asyncio.wait_for(reader.read(1), 0.2) != b""
            except TimeoutError:
                return True  # nothing to read and not closed: held
            except (OSError, ssl.SSLError):
                return False

        held = sum(await asyncio.gather(*(still_open(r) for r, _ in opened)))
        await a_transit_is_matched(nodes, server)  # from another address meanwhile
    finally:
        for _, writer in opened:
            writer.close()
    assert held <= MAX_PENDING_PER_SOURCE, held


async def test_a_stranger_that_never_starts_tls_is_held_to_the_same_bound(nodes, tcp_relay):
    """The bound counts a connection from its accept, not from the end of its TLS handshake: raw
    TCP connections from one stranger (127.0.0.2) that never send a ClientHello are held to
    MAX_PENDING_PER_SOURCE too. Counted only after TLS, each waited out HELLO_TIMEOUT holding a
    socket of the relay, however many the stranger opened."""
    from spt_relay_fallback.tcp import HELLO_TIMEOUT, MAX_PENDING_PER_SOURCE

    server, _ = tcp_relay
    opened = [
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.tcp_port, local_addr=("127.0.0.2", 0)), 5)
        for _ in range(MAX_PENDING_PER_SOURCE + 40)
    ]
    try:
        # the extra ones are closed at once; the rest wait for their TLS until HELLO_TIMEOUT
        deadline = time.monotonic() + HELLO_TIMEOUT / 2
        while (held := sum(not (r.at_eof() or w.transport.is_closing()) for r, w in opened)) > MAX_PENDING_PER_SOURCE:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await a_transit_is_matched(nodes, server)  # from another address meanwhile
    finally:
        for _, writer in opened:
            writer.close()
    assert held <= MAX_PENDING_PER_SOURCE, held
