"""The relay's TCP listener (`spt relay serve --tcp-listen`, SPEC.md §3.9, §7.6): blind bulk transit.

The protocol, as a node sees it:

1. **Tickets over QUIC.** On its registered `spt-relay/1` connection a node asks
   `relay.transit {peer: <32-byte node key>}`. The relay checks that both are registered and
   answers `{ticket, peer_ticket, tcp_port}`: two single-use 16-byte tickets, one per side. The
   asker hands `peer_ticket` to the peer over their own pinned QUIC connection, so tickets never
   travel in clear and only the two matched nodes hold them.
2. **TLS to the listener.** Each side connects to `tcp_port` with TLS 1.3. The relay presents a
   certificate made from its Ed25519 key; the node checks that key against the relay URL's key
   (pinning, as on QUIC), so nobody in the path learns a ticket.
3. **Kind byte and ticket.** The node sends one kind byte and its ticket:
   `0x10 ‖ ticket` (bulk transit). Kind `0x20` (followed by 16 ignored bytes) carries the
   relay's UDP frames over this connection on networks that block UDP (`tunnel.py`).
4. **Matching.** The relay answers one status byte: `0x00` once the other side has arrived (both
   get it at the same moment), `0x01` for an unknown, expired or used ticket (then it closes).
   A side waits at most `TRANSIT_WAIT` seconds for the other.
5. **Transit.** From then on the relay copies bytes both ways until each side has ended its
   writing half; it never looks at them. What flows is the file channel's AEAD frames, keyed over
   the pinned QUIC channel between the two nodes: the relay holds no key that opens them.

Limits: `max_transits` live transits, of those not matched yet at most `MAX_WAITING_PER_NODE`
asked by one node and `MAX_WAITING_PER_SOURCE` from one address (a ticket request beyond any is
refused with `RELAY_FULL`), tickets expire after `TRANSIT_WAIT`, a connection must finish TLS and send its ticket within
`HELLO_TIMEOUT` each, and one source address has at most `MAX_PENDING_PER_SOURCE` connections
not matched yet (counted from the accept, TLS handshakes included). A source address is an
IPv4 address or an IPv6 /64 (`spt.core.net.sources.source_group`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization

from spt.core.errors import IdentityError, PeerError
from spt.core.identity import NodeId, NodeKey
from spt.core.net.pinning import make_certificate, peer_id_from_der
from spt.core.net.sources import source_group

log = logging.getLogger(__name__)

KIND_TRANSIT: Final = 0x10
KIND_UDP_FRAMES: Final = 0x20  # relay UDP frames over TCP (networks that block UDP; tunnel.py)
STATUS_MATCHED: Final = 0x00
STATUS_REFUSED: Final = 0x01
TICKET_BYTES: Final = 16
TRANSIT_WAIT: Final = 30.0  # seconds a ticket (and a connected side) waits for the other side
HELLO_TIMEOUT: Final = 10.0  # seconds a new connection has to name its ticket
# transits one node may have asked for that are not matched yet: a transit is matched within a
# round trip when both sides are well, so a few cover every transfer a node starts at once, and
# one node cannot take the relay's `max_transits` for itself
MAX_WAITING_PER_NODE: Final = 16
# and asked from one source address: keys cost nothing, and the relay registers MAX_PER_SOURCE
# (16) of them per address, 16 x 16 = the default `max_transits`; a quarter of it is the most
# one address (a household behind one NAT, or one stranger) may have waiting
MAX_WAITING_PER_SOURCE: Final = 64
# connections from one source address that have not named a ticket or been matched yet (anyone
# may connect): beyond it the relay closes a new one at once, so a stranger cannot hold them
# by the thousand; the TLS handshake before that gets HELLO_TIMEOUT too
MAX_PENDING_PER_SOURCE: Final = 64
COPY_BYTES: Final = 256 * 1024


class TransitError(PeerError):
    """The relay refused the transit, or is not the relay we pinned."""

    token = "RELAY_TRANSIT"


@dataclass(eq=False)
class _Side:
    node: NodeId
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None


@dataclass(eq=False)
class _Transit:
    sides: dict[bytes, _Side]  # ticket -> side
    expires: float
    source: str  # the address the asker asked from
    matched: asyncio.Event = field(default_factory=asyncio.Event)
    bytes: int = 0


class TcpListener:
    """TLS listener with single-use tickets that pair two registered nodes into a byte pipe.

    `observe`, when given, sees every chunk the relay copies (a test hook: it is the relay
    operator's view of the transit).
    """

    def __init__(
        self,
        key: NodeKey,
        host: str,
        port: int,
        *,
        max_transits: int = 256,
        observe: Callable[[bytes], None] | None = None,
    ) -> None:
        self.key = key
        self.host = host
        self.port = port
        self.max_transits = max_transits
        self.observe = observe
        # the relay's handler for kind 0x20 connections (None: refused)
        self.on_tunnel: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | None = None
        self._transits: dict[bytes, _Transit] = {}  # ticket -> transit (two tickets each)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[str, int] = {}  # source address -> its connections not matched yet
        self._tls = _server_context(key)
        self.stats: dict[str, int] = {"transits": 0, "transit_bytes": 0, "refused": 0}

    async def start(self) -> None:
        # TLS starts in `_handle`, once the connection is counted: with ssl= here the server
        # calls it only after the handshake, and connections that never send a ClientHello
        # would each hold a socket for HELLO_TIMEOUT, uncounted
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("relay TCP listener open", extra={"addr": f"{self.host}:{self.port}"})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    # --- tickets -------------------------------------------------------------------------------

    def live(self) -> int:
        now = time.monotonic()
        for ticket, transit in list(self._transits.items()):
            if transit.expires < now and not transit.matched.is_set():
                del self._transits[ticket]
        return len({id(t) for t in self._transits.values()})

    def waiting(self, asker: NodeId, source: str) -> tuple[int, int]:
        """Live transits not matched yet that `asker` asked for, and that were asked from `source`."""
        self.live()  # drops the expired ones
        waiting = {id(t): t for t in self._transits.values() if not t.matched.is_set()}.values()
        return (
            sum(1 for t in waiting if next(iter(t.sides.values())).node == asker),
            sum(1 for t in waiting if t.source == source),
        )

    def issue(self, asker: NodeId, peer: NodeId, source: str) -> tuple[bytes, bytes] | None:
        """(asker's ticket, peer's ticket), or None when `max_transits` are live, or the asker
        has MAX_WAITING_PER_NODE waiting, or its `source` (a `source_group`) MAX_WAITING_PER_SOURCE."""
        if self.live() >= self.max_transits:
            return None
        of_asker, of_source = self.waiting(asker, source)
        if of_asker >= MAX_WAITING_PER_NODE or of_source >= MAX_WAITING_PER_SOURCE:
            return None
        mine, theirs = os.urandom(TICKET_BYTES), os.urandom(TICKET_BYTES)
        transit = _Transit({mine: _Side(asker), theirs: _Side(peer)}, time.monotonic() + TRANSIT_WAIT, source)
        self._transits[mine] = self._transits[theirs] = transit
        return mine, theirs

    # --- connections ---------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = source_group(str(peer[0])) if peer else ""
        if self._pending.get(source, 0) >= MAX_PENDING_PER_SOURCE:
            self.stats["refused"] += 1
            writer.close()
            return
        self._pending[source] = self._pending.get(source, 0) + 1
        pending = [source]  # emptied once this connection stops counting

        def settled() -> None:
            if pending:
                pending.clear()
                left = self._pending.get(source, 1) - 1
                if left > 0:
                    self._pending[source] = left
                else:
                    self._pending.pop(source, None)

        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await writer.start_tls(self._tls, ssl_handshake_timeout=HELLO_TIMEOUT)
            await self._serve(reader, writer, settled)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            settled()
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, settled: Callable[[], None]) -> None:
        hello = await asyncio.wait_for(reader.readexactly(1 + TICKET_BYTES), HELLO_TIMEOUT)
        if hello[0] == KIND_UDP_FRAMES and self.on_tunnel is not None:
            settled()  # a tunnel is counted and bounded by the relay (MAX_PER_SOURCE)
            writer.write(bytes((STATUS_MATCHED,)))
            await writer.drain()
            await self.on_tunnel(reader, writer)
            return
        ticket = hello[1:]
        transit = self._transits.get(ticket) if hello[0] == KIND_TRANSIT else None
        side = transit.sides.get(ticket) if transit is not None else None
        if transit is None or side is None or side.writer is not None or transit.expires < time.monotonic():
            self.stats["refused"] += 1
            writer.write(bytes((STATUS_REFUSED,)))
            await writer.drain()
            return
        del self._transits[ticket]  # single use
        side.reader, side.writer = reader, writer
        if all(s.writer is not None for s in transit.sides.values()):
            transit.matched.set()
        try:
            await asyncio.wait_for(transit.matched.wait(), max(0.0, transit.expires - time.monotonic()))
        except TimeoutError:
            self.stats["refused"] += 1
            writer.write(bytes((STATUS_REFUSED,)))
            await writer.drain()
            return
        settled()
        other = next(s for s in transit.sides.values() if s is not side)
        assert other.writer is not None and other.reader is not None
        writer.write(bytes((STATUS_MATCHED,)))
        await writer.drain()
        if next(iter(transit.sides.values())) is side:  # one of the two counts the transit
            self.stats["transits"] += 1
            log.info("transit matched", extra={"a": side.node.short, "b": other.node.short})
        await self._copy(reader, other.writer, transit)

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, transit: _Transit) -> None:
        """One direction, until the writing side ends; then end the other side's reading half."""
        try:
            while data := await reader.read(COPY_BYTES):
                if self.observe is not None:
                    self.observe(data)
                transit.bytes += len(data)
                self.stats["transit_bytes"] += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(OSError, RuntimeError, ssl.SSLError):
                if writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()  # TLS has no half-close: the other side sees the end


def _server_context(key: NodeKey) -> ssl.SSLContext:
    """TLS 1.3 with a certificate made from the relay's key (what nodes pin)."""
    cert = make_certificate(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory(prefix="spt-relay-tls-") as tmp:  # ssl loads keys from files only
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                key.crypto_key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


# --- the node's side (blocking: the file service runs its data path on threads) ------------------


def client_context() -> ssl.SSLContext:
    """TLS 1.3 with no CA: the relay's key is pinned by `check_relay_key`, as on QUIC."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_relay_key(der: bytes | None, relay: NodeId) -> None:
    """TransitError unless the listener's certificate carries the relay's pinned key."""
    try:
        seen = peer_id_from_der(der) if der else None
    except IdentityError:
        seen = None
    if seen != relay:
        raise TransitError(relay.short, "the relay's TCP listener presented another key")


def dial_transit(host: str, port: int, relay: NodeId, ticket: bytes, timeout: float = TRANSIT_WAIT) -> ssl.SSLSocket:
    """A TLS socket to the relay's listener, matched with the ticket's other side.

    Raises TransitError when the relay is not `relay` (pinning) or refuses the ticket, OSError
    when it cannot be reached. The socket is blocking with no timeout set.
    """
    raw = socket.create_connection((host, port), timeout=min(timeout, 10.0))
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = client_context().wrap_socket(raw)
    except BaseException:
        raw.close()
        raise
    try:
        check_relay_key(sock.getpeercert(binary_form=True), relay)
        sock.settimeout(timeout)
        sock.sendall(bytes((KIND_TRANSIT,)) + ticket)
        status = sock.recv(1)
        if status != bytes((STATUS_MATCHED,)):
            raise TransitError(relay.short, "the relay refused the transit (unknown, used or expired ticket)")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise
