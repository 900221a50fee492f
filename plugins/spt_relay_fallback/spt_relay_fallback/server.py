"""`spt relay serve`: a standalone asyncio UDP relay with its own Ed25519 key (SPEC.md §7.6).

The protocol, as a node sees it (our design where the spec leaves it open):

1. **Registration.** The node dials the relay's UDP port over QUIC with ALPN `spt-relay/1`,
   from its one socket. Both sides present certificates made from their Ed25519 keys, so the
   TLS handshake itself is the signed challenge: the node proves its key by signing the
   handshake transcript (CertificateVerify), and pins the relay's key from the URL. A relay
   with `--allow` refuses other keys inside that handshake. On the connection the node sends
   `relay.register {proof?, port}`; the reply is `{token: 16 bytes, addr: "ip:port", alt_port}`:
   the registration token and the node's reflexive address as the relay sees it. A relay with
   `--token` refuses a registration without a valid `proof`: HMAC-SHA256 keyed with the access
   token over this connection's TLS exporter value (label `EXPORTER-spt-relay-token`), so the
   token itself never travels and a proof is worthless on any other connection.
2. **Rendezvous.** `relay.tags {tags: [16-byte tags], port}` registers (and refreshes) tags for
   5 minutes; `relay.lookup {tag}` answers `{nodes: [{key, addr, port}]}`, at most 32, not
   counting the asker. The connection staying open is what keeps a registration alive.
3. **Forwarding.** Plain datagrams on the same port: `0x01 ‖ dest key ‖ token ‖ packet` from
   the registered (key, address) becomes `0x02 ‖ source key ‖ packet` to the destination's
   registered address. The packet is opaque QUIC; the relay holds no key that opens it.
   "Registered address" follows the node's relay connection: once QUIC has validated a new
   address for it (its NAT forgot the mapping and gave it another port), frames come from and
   go to that one, without a new registration.
   A frame with an unknown token or from another address is dropped and answered
   `0x03 ‖ 1` ("register again"), one to an unknown destination `0x03 ‖ 2`.
4. **Mapping check.** A second UDP port (the listen port + 1, when free) answers
   `0x06 ‖ nonce` with `0x07 ‖ nonce ‖ IPv4 ‖ port`, the source it saw; a node that sees two
   different ports for itself is behind an endpoint-dependent (symmetric) NAT.

5. **TCP listener** (`tcp_listen`, off by default): TLS with the relay's key, offering a blind
   byte transit between two registered nodes it has matched (`relay.transit`); see `tcp.py`.
   The registration reply carries its port as `tcp_port` (null when off). The same listener
   carries UDP frames over TLS for nodes whose networks block UDP (`tunnel.py`).

Limits (all on by default): per-node byte-rate caps (token bucket, drops beyond it;
`DEFAULT_RATE`), a node count, at most `MAX_PER_SOURCE` registered nodes and `REGISTER_BURST`
registrations a minute per source address (an IPv6 /64 counts as one: `source_group`), the
mapping port answering each address at most
`MAPPING_PER_SECOND` times a second, the allow-list and the token. Forwarding goes only to an
address QUIC has validated for the destination's connection (a migrated, unvalidated path is not
followed). Frames on `spt-relay/1` get the open limits of `spt.core.proto.frames`. The relay
keeps nothing on disk but its key: after a restart nodes notice (`0x03`, or a failed refresh)
and register again.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, cast

from spt.core.errors import Refusal, RemoteProtocolError
from spt.core.identity import NodeId, NodeKey
from spt.core.net.connections import Connection
from spt.core.net.paths import (
    KEY_BYTES,
    MAPPING_ASK,
    MAPPING_SEEN,
    RELAY_DELIVER,
    RELAY_NOTICE,
    RELAY_SEND,
    TOKEN_BYTES,
)
from spt.core.net.sources import source_group
from spt.core.net.transport import ALPN_RELAY, Transport, serve_requests
from spt.core.proto.frames import Frame
from spt_relay_fallback.tcp import TcpListener
from spt_relay_fallback.tunnel import pump as tunnel_pump
from spt_relay_fallback.tunnel import sender as tunnel_sender
from spt_relay_fallback.url import RelayUrl, token_proof

log = logging.getLogger(__name__)

Address = tuple[str, int]

TAG_TTL: Final = 300.0  # seconds a rendezvous registration lives unless refreshed (§7.6)
TAG_BYTES: Final = 16
MAX_TAGS: Final = 64  # per node
MAX_LOOKUP: Final = 32
NOTICE_REREGISTER: Final = 1
NOTICE_UNKNOWN_DEST: Final = 2
NOTICE_INTERVAL: Final = 1.0  # seconds between notices to one source address
MIN_BURST: Final = 16 * 1500  # bytes a rate-capped node may send at once
DEFAULT_RATE: Final = 4 * 1024 * 1024  # bytes/s a node may send through the relay unless told otherwise
MAX_PER_SOURCE: Final = 16  # registered nodes (and UDP-over-TCP tunnels) behind one source address
TUNNEL_REGISTER_WAIT: Final = 10.0  # seconds a tunnel may carry no registered node
REGISTER_BURST: Final = 10  # registrations one source address may make at once…
REGISTER_PER_MINUTE: Final = 10  # …refilled at this rate
MAPPING_PER_SECOND: Final = 4  # mapping-check answers per source address


class _Buckets:
    """Token buckets by key (a source address), `burst` deep, refilled `per_second`; bounded in size."""

    def __init__(self, burst: float, per_second: float, max_keys: int = 65536) -> None:
        self.burst = burst
        self.per_second = per_second
        self.max_keys = max_keys
        self._level: dict[Any, tuple[float, float]] = {}

    def take(self, key: Any, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        level, at = self._level.get(key, (self.burst, now))
        level = min(self.burst, level + (now - at) * self.per_second)
        if level < 1.0:
            self._level[key] = (level, now)
            return False
        if key not in self._level and len(self._level) >= self.max_keys:
            # forget the full buckets first: they hold no debt
            full = [k for k, (lv, t) in self._level.items() if lv + (now - t) * self.per_second >= self.burst]
            for k in full:
                del self._level[k]
            if len(self._level) >= self.max_keys:
                return False
        self._level[key] = (level - 1.0, now)
        return True


@dataclass(eq=False)
class _Node:
    key: NodeId
    addr: Address
    token: bytes
    conn: Connection
    port_hint: int = 0
    tags: dict[bytes, float] = field(default_factory=dict)  # tag -> expiry (monotonic)
    allowance: float = 0.0
    refilled: float = 0.0


class _Policy:
    def __init__(self, server: RelayServer) -> None:
        self.server = server

    def accept(self, peer: NodeId, alpn: str, addr: Address) -> str | None:
        if alpn != ALPN_RELAY:
            return f"this is a relay; it speaks {ALPN_RELAY} only"
        allow = self.server.allow
        if allow is not None and peer not in allow:
            return "not on this relay's allow-list"
        return None


class _AltPort(asyncio.DatagramProtocol):
    """The second port: tells a node which address and port it came from, a few times a second
    at most per address (its answer is larger than the question: no reflector for floods)."""

    def __init__(self) -> None:
        self.udp: asyncio.DatagramTransport | None = None
        self.buckets = _Buckets(MAPPING_PER_SECOND, MAPPING_PER_SECOND)
        self.answered = 0
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.udp = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) == 9 and data[0] == MAPPING_ASK and self.udp is not None:
            if not self.buckets.take(source_group(addr[0])):
                self.dropped += 1
                return
            self.answered += 1
            try:
                packed = socket.inet_aton(str(addr[0]))
            except OSError:
                return
            self.udp.sendto(bytes((MAPPING_SEEN,)) + data[1:9] + packed + struct.pack("!H", addr[1]), addr)


class RelayServer:
    """Forwards opaque QUIC packets between registered node keys; rendezvous by tag.

    `rate` is bytes per second per node (`DEFAULT_RATE` unless given; 0 turns the cap off);
    `allow` the keys that may register (None: any); `token` the access token nodes must prove
    (None: none); `max_per_source` registered nodes per source address.
    """

    def __init__(
        self,
        key: NodeKey,
        *,
        host: str = "0.0.0.0",
        port: int = 47471,
        allow: Iterable[NodeId] | None = None,
        token: str | None = None,
        rate: int | None = DEFAULT_RATE,
        max_nodes: int = 1024,
        max_per_source: int = MAX_PER_SOURCE,
        alt_port: bool = True,
        idle_timeout: float = 60.0,
        tcp_listen: Address | None = None,
    ) -> None:
        self.key = key
        self.tcp = TcpListener(key, tcp_listen[0], tcp_listen[1]) if tcp_listen is not None else None
        if self.tcp is not None:
            self.tcp.on_tunnel = self._tunnel
        self._tunnels: set[Address] = set()
        self.host = host
        self.port = port
        self.allow = frozenset(allow) if allow is not None else None
        self.token = token
        self.rate = rate or None
        self.max_nodes = max_nodes
        self.max_per_source = max_per_source
        self._registrations = _Buckets(REGISTER_BURST, REGISTER_PER_MINUTE / 60.0)
        self._want_alt = alt_port
        self.alt_port: int | None = None
        self._alt: asyncio.DatagramTransport | None = None
        self._nodes: dict[NodeId, _Node] = {}
        self._by_token: dict[bytes, _Node] = {}
        self._noticed: dict[Address, float] = {}
        self.stats: dict[str, int] = {
            "forwarded": 0, "forwarded_bytes": 0, "dropped_token": 0, "dropped_dest": 0,
            "dropped_rate": 0, "registrations": 0, "refused": 0,
        }
        self.transport = Transport(
            key,
            host=host,
            port=port,
            accept=_Policy(self),
            on_stream=serve_requests({
                "relay.register": self._register,
                "relay.tags": self._tags,
                "relay.lookup": self._lookup,
                "relay.transit": self._transit,
            }),
            alpns=(ALPN_RELAY,),
            dial_alpns=(),
            idle_timeout=idle_timeout,
            max_connections=max_nodes + 64,
            unproved_per_source=max_per_source + 4,  # every relay connection is unproved; a few spare
        )

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.transport.start()
        self.transport.set_datagram_handler(self._datagram)
        self.port = self.transport.sockname[1]
        if self._want_alt:
            loop = asyncio.get_running_loop()
            try:
                alt, _ = await loop.create_datagram_endpoint(
                    _AltPort, local_addr=(self.host, self.port + 1), family=socket.AF_INET
                )
            except OSError as exc:  # best effort: without it nodes cannot judge their NAT
                log.warning("mapping-check port not bound", extra={"port": self.port + 1, "reason": str(exc)})
            else:
                self._alt = alt
                self.alt_port = self.port + 1
        if self.tcp is not None:
            await self.tcp.start()
        log.info("relay listening", extra={"addr": f"{self.host}:{self.port}", "alt_port": self.alt_port})

    @property
    def tcp_port(self) -> int | None:
        return self.tcp.port if self.tcp is not None else None

    async def close(self) -> None:
        if self.tcp is not None:
            await self.tcp.close()
        if self._alt is not None:
            self._alt.close()
            self._alt = None
        await self.transport.close()
        await asyncio.sleep(0)  # asyncio releases the sockets on the next loop turn

    def url(self, host: str | None = None) -> RelayUrl:
        return RelayUrl(host or self.host, self.port, self.key.node_id, tcp_port=self.tcp_port)

    @property
    def registered(self) -> list[NodeId]:
        return list(self._nodes)

    # --- requests on spt-relay/1 ---------------------------------------------------------------

    async def _register(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = frame.body if isinstance(frame.body, dict) else {}
        host = conn.remote_addr[0]
        source = source_group(host)
        if not self._registrations.take(source):
            self.stats["refused"] += 1
            raise Refusal("RATE_LIMITED", host, f"at most {REGISTER_PER_MINUTE} registrations a minute from one address")
        if self.token is not None:
            offered = body.get("proof")
            if not isinstance(offered, bytes) or not hmac.compare_digest(offered, token_proof(self.token, conn)):
                self.stats["refused"] += 1
                log.info("registration refused: bad token", extra={"node": conn.peer.short})
                # close after the refusal reply has gone out
                asyncio.get_running_loop().call_later(0.5, conn.close, "refused: bad access token")
                raise Refusal("REFUSED", conn.peer.short, "this relay needs its access token")
        old = self._nodes.get(conn.peer)
        if old is None and len(self._nodes) >= self.max_nodes:
            self.stats["refused"] += 1
            raise Refusal("RELAY_FULL", conn.peer.short, f"this relay serves at most {self.max_nodes} nodes")
        if old is None and sum(1 for n in self._nodes.values() if source_group(n.addr[0]) == source) >= self.max_per_source:
            self.stats["refused"] += 1
            raise Refusal("RELAY_FULL", host, f"this relay serves at most {self.max_per_source} nodes per address")
        if old is not None:
            self._forget(old)
            if old.conn is not conn:
                old.conn.close("registered again on another connection")
        port_hint = body.get("port")
        node = _Node(
            conn.peer, conn.validated_remote_addr, os.urandom(TOKEN_BYTES), conn,
            port_hint=port_hint if isinstance(port_hint, int) else 0,
            allowance=float(self._burst), refilled=time.monotonic(),
        )
        if old is not None and old.conn is conn:
            node.tags = old.tags
        self._nodes[node.key] = node
        self._by_token[node.token] = node
        self.stats["registrations"] += 1
        conn.closed.add_done_callback(lambda _f: self._gone(node))
        log.info("node registered", extra={"node": node.key.short, "addr": f"{node.addr[0]}:{node.addr[1]}"})
        return "relay.registered", {
            "token": node.token, "addr": f"{node.addr[0]}:{node.addr[1]}", "alt_port": self.alt_port,
            "tcp_port": self.tcp_port,
        }

    def _require(self, conn: Connection) -> _Node:
        node = self._nodes.get(conn.peer)
        if node is None or node.conn is not conn:
            raise Refusal("NOT_REGISTERED", conn.peer.short, "send relay.register first")
        return node

    async def _tags(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        node = self._require(conn)
        body = frame.body if isinstance(frame.body, dict) else {}
        tags = body.get("tags", [])
        if not isinstance(tags, list) or len(tags) > MAX_TAGS or not all(
            isinstance(t, bytes) and len(t) == TAG_BYTES for t in tags
        ):
            raise RemoteProtocolError("tags", f"tags are at most {MAX_TAGS} values of {TAG_BYTES} bytes")
        if isinstance(body.get("port"), int):
            node.port_hint = body["port"]
        expires = time.monotonic() + TAG_TTL
        node.tags = {t: expires for t in tags}
        # QUIC follows a NAT rebinding; forwarding follows QUIC, but only to a path QUIC validated
        # (a packet with a rewritten source must not turn the relay into a reflector)
        node.addr = conn.validated_remote_addr
        return "ok", {"expires_s": TAG_TTL}

    async def _lookup(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        self._require(conn)
        body = frame.body if isinstance(frame.body, dict) else {}
        tag = body.get("tag")
        if not isinstance(tag, bytes) or len(tag) != TAG_BYTES:
            raise RemoteProtocolError("tag", f"a rendezvous tag is {TAG_BYTES} bytes")
        now = time.monotonic()
        found = []
        for node in self._nodes.values():
            if node.key == conn.peer or node.tags.get(tag, 0.0) <= now:
                continue
            found.append({"key": node.key.hex, "addr": f"{node.addr[0]}:{node.addr[1]}", "port": node.port_hint})
            if len(found) >= MAX_LOOKUP:
                break
        return "relay.found", {"nodes": found}

    async def _transit(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        """Two single-use tickets pairing the asker with a registered peer on the TCP listener."""
        self._require(conn)
        body = frame.body if isinstance(frame.body, dict) else {}
        raw = body.get("peer")
        if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
            raise RemoteProtocolError("peer", f"a transit names the peer's {KEY_BYTES}-byte key")
        if self.tcp is None:
            raise Refusal("NO_TRANSIT", conn.peer.short, "this relay has no TCP listener")
        peer = NodeId(raw)
        if peer == conn.peer or peer not in self._nodes:
            raise Refusal("NOT_REGISTERED", peer.short, "the peer is not registered at this relay")
        tickets = self.tcp.issue(conn.peer, peer, source_group(conn.remote_addr[0]))
        if tickets is None:
            raise Refusal("RELAY_FULL", conn.peer.short, "too many transits are open at this relay, or waiting for this node's peers")
        return "relay.transit", {"ticket": tickets[0], "peer_ticket": tickets[1], "tcp_port": self.tcp.port}

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A node behind a UDP block: its datagrams arrive framed on this TLS connection, and
        ours to it leave the same way; everything else (registration, tokens, rates) as by UDP."""
        peer = writer.get_extra_info("peername")
        addr: Address = (str(peer[0]), int(peer[1]))
        in_use = addr in self._tunnels or any(n.addr == addr for n in self._nodes.values())
        source = source_group(addr[0])
        same_source = sum(1 for a in self._tunnels if source_group(a[0]) == source)
        if in_use or same_source >= MAX_PER_SOURCE or len(self._tunnels) >= self.max_nodes:
            log.info("UDP-over-TCP tunnel refused", extra={"addr": f"{addr[0]}:{addr[1]}"})
            return
        self._tunnels.add(addr)
        self.transport.set_tunnel(addr, tunnel_sender(writer))
        log.info("UDP-over-TCP tunnel open", extra={"addr": f"{addr[0]}:{addr[1]}"})
        pump = asyncio.ensure_future(tunnel_pump(reader, lambda data: self.transport.tunnel_received(data, addr)))
        try:
            # A tunnel serves one registered node: one that registers nobody within the wait, or
            # whose node is gone, is closed, so idle tunnels cannot crowd out real ones.
            while not pump.done():
                await asyncio.wait([pump], timeout=TUNNEL_REGISTER_WAIT)
                if not pump.done() and not any(n.addr == addr for n in self._nodes.values()):
                    log.info("UDP-over-TCP tunnel closed: no node registered through it",
                             extra={"addr": f"{addr[0]}:{addr[1]}"})
                    break
        finally:
            pump.cancel()
            self.transport.set_tunnel(addr, None)
            self._tunnels.discard(addr)
            log.info("UDP-over-TCP tunnel closed", extra={"addr": f"{addr[0]}:{addr[1]}"})

    def _forget(self, node: _Node) -> None:
        if self._by_token.get(node.token) is node:
            del self._by_token[node.token]
        if self._nodes.get(node.key) is node:
            del self._nodes[node.key]

    def _gone(self, node: _Node) -> None:
        if self._nodes.get(node.key) is node:
            log.info("node unregistered", extra={"node": node.key.short, "reason": node.conn.close_reason})
        self._forget(node)

    # --- forwarding ----------------------------------------------------------------------------

    @property
    def _burst(self) -> int:
        return max(self.rate or 0, MIN_BURST)

    def _datagram(self, data: bytes, addr: Address) -> None:
        if data[0] != RELAY_SEND or len(data) <= 1 + KEY_BYTES + TOKEN_BYTES:
            return
        token = data[1 + KEY_BYTES : 1 + KEY_BYTES + TOKEN_BYTES]
        source = self._by_token.get(token)
        if source is None or (addr != source.addr and addr != source.conn.validated_remote_addr):
            self.stats["dropped_token"] += 1
            self._notice(addr, NOTICE_REREGISTER)
            return
        dest = self._nodes.get(NodeId(data[1 : 1 + KEY_BYTES]))
        if dest is None:
            self.stats["dropped_dest"] += 1
            self._notice(addr, NOTICE_UNKNOWN_DEST)
            return

        inner = data[1 + KEY_BYTES + TOKEN_BYTES :]
        if self.rate is not None:
            now = time.monotonic()
            source.allowance = min(float(self._burst), source.allowance + (now - source.refilled) * self.rate)
            source.refilled = now
            if source.allowance < len(inner):
                self.stats["dropped_rate"] += 1
                return
            source.allowance -= len(inner)
        self.stats["forwarded"] += 1
        self.stats["forwarded_bytes"] += len(inner)
        # where QUIC last validated the destination: a NAT that forgot its mapping gives the
        # node a new public port, which its keepalives on the relay connection prove at once
        self.transport.send_datagram(bytes((RELAY_DELIVER,)) + source.key.raw + inner, dest.conn.validated_remote_addr)

    def _notice(self, addr: Address, code: int) -> None:
        now = time.monotonic()
        if now - self._noticed.get(addr, 0.0) < NOTICE_INTERVAL:
            return
        if len(self._noticed) > 4096:
            self._noticed = {a: t for a, t in self._noticed.items() if now - t < NOTICE_INTERVAL}
        self._noticed[addr] = now
        self.transport.send_datagram(bytes((RELAY_NOTICE, code)), addr)
