"""The node's one UDP socket, and every QUIC connection on it (SPEC.md §7.1–7.2).

`Transport` owns the socket and demultiplexes what arrives: a first byte without the QUIC fixed
bit (0x40) is a non-QUIC datagram (probes, relay frames) for `set_datagram_handler`; QUIC packets
go to the connection owning their destination connection id, and a new Initial starts a server
connection. It dials (`connect`), keeps one live connection per (peer key, ALPN), and settles
simultaneous dials the same way on both sides: the connection dialled by the lower key survives.

Relayed and punched paths live in `spt.core.net.paths` (`Transport.paths`): packets for a
virtual relay address go there instead of onto the wire, and `upgrade` moves a peer from a
relayed connection to a direct one once punching found a path.

Policy enters as `AcceptPolicy` (who may connect on which ALPN); the keys themselves are checked
inside the TLS handshake by `spt.core.net.pinning`. What must not live here: frame parsing
(`spt.core.proto.frames`), per-connection stream state (`spt.core.net.connections`), aioquic
private names (`pinning`), and addresses of anything but the peers we are asked to dial.

Never run this under uvloop: aioquic's timers spin on its 1 ms clock (DESIGN.md §3).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # public, re-exported from _buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from cryptography import x509

from spt.core.errors import LocalProtocolError, PeerError, UnreachableError
from spt.core.identity import NodeId, NodeKey
from spt.core.net.connections import (
    CloseCode,
    Connection,
    ConnectionClosedError,
    PeerTimeoutError,
    RequestError,
    RequestHandler,
    Stream,
    StreamHandler,
    StreamResetError,
    UnknownFrameTypeError,
    serve_requests,
)
from spt.core.net.paths import VIRTUAL_PREFIXES, Paths
from spt.core.net.pinning import (
    ALPN_JOIN,
    ALPN_MEMBER,
    JOIN_EXPORTER_LABEL,
    PeerCheck,
    PinnedQuicConnection,
    make_certificate,
    make_configuration,
)
from spt.core.net.sources import source_group

__all__ = [
    "ALPN_JOIN",
    "ALPN_MEMBER",
    "ALPN_RELAY",
    "JOIN_EXPORTER_LABEL",
    "AcceptPolicy",
    "AllowKeys",
    "CloseCode",
    "Connection",
    "ConnectionClosedError",
    "DatagramHandler",
    "HandshakeRefusedError",
    "PeerTimeoutError",
    "RequestError",
    "RequestHandler",
    "Stream",
    "StreamHandler",
    "StreamResetError",
    "Transport",
    "UnknownFrameTypeError",
    "serve_requests",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]
DatagramHandler = Callable[[bytes, Address], None]

ALPN_RELAY: Final = "spt-relay/1"  # node to relay (SPEC.md §7.1); dialled, never served by nodes
SOCKET_BUFFER: Final = 4 * 1024 * 1024
QUIC_FIXED_BIT: Final = 0x40
CID_LENGTH: Final = 8
SMALLEST_INITIAL: Final = 1200
RECV_BURST: Final = 32  # datagrams read per readiness of the socket at most (see Transport._read_burst)
MAX_DATAGRAM: Final = 65536
SUPERSEDED: Final = "superseded: simultaneous dial; keeping the connection dialled by the lower key"
DEFAULT_KEEPALIVE: Final = 15.0
DEFAULT_IDLE_TIMEOUT: Final = 60.0
DEFAULT_STREAM_WINDOW: Final = 1024 * 1024
DEFAULT_CONNECTION_WINDOW: Final = 4 * 1024 * 1024
UNPROVED_PER_SOURCE: Final = 4
"""Incoming connections one source (an IPv4 address, an IPv6 /64: `source_group`) may have open
that proved no membership (join and relay connections, see `Connection.unproved`); the same
number again of handshakes in progress."""
MAX_UNPROVED: Final = 256
"""Such connections from all sources together: members keep the rest of `max_connections`."""
MAX_HANDSHAKING: Final = 256
"""Incoming handshakes in progress from all sources together."""


class AcceptPolicy(Protocol):
    """Decides incoming connections, inside the handshake, after the key was proved."""

    def accept(self, peer: NodeId, alpn: str, addr: Address) -> str | None:
        """None accepts; a string refuses, and is the reason both sides see."""
        ...


class AllowKeys:
    """Members from a fixed key set on `spt/1`; anyone on `spt-join/1`. For tests and tools."""

    def __init__(self, keys: Iterable[NodeId] = ()) -> None:
        self.keys = set(keys)

    def accept(self, peer: NodeId, alpn: str, addr: Address) -> str | None:
        if alpn == ALPN_JOIN or peer in self.keys:
            return None
        return f"key {peer.short} is not a member here"


class HandshakeRefusedError(PeerError):
    """A dial reached a node that refused us, or that presented a key other than the one dialled."""

    token = "REFUSED"


@dataclass(eq=False)
class _Dial:
    peer: NodeId
    alpn: str
    future: asyncio.Future[Connection]
    started_at: float
    targets: set[Address] = field(default_factory=set)
    attempts: list[Connection] = field(default_factory=list)
    outcomes: dict[Address, str] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None

    def resolve(self, conn: Connection) -> None:
        if not self.future.done():
            self.future.set_result(conn)

    def close_attempts(self, reason: str, *, keep: Connection | None = None) -> None:
        for attempt in self.attempts:
            if attempt is not keep and attempt.is_open:
                attempt.close(reason, code=CloseCode.SUPERSEDED)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, transport: Transport) -> None:
        self._owner = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, Any]) -> None:
        self._owner._read_burst(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable…) surface here; QUIC's own timers decide what they mean.
        log.debug("socket error", extra={"reason": str(exc)})


class Transport:
    """One UDP socket for QUIC server, QUIC clients and non-QUIC datagrams.

    `idle_timeout` (s) closes a connection that heard nothing for that long; `keepalive` (s)
    pings an otherwise quiet connection so NAT mappings and the idle timer stay fresh.
    `stream_window` / `connection_window` bound received-but-unconsumed bytes (flow control).
    `dial_stagger` (s) is the head start each address gets before the next one is tried.
    `dial_alpns` are ALPNs this transport may dial without serving them (the relay's).
    `unproved_per_source` caps a source's (`source_group`) incoming join or relay connections, and
    separately its handshakes in progress: Initials beyond it are dropped, an established
    connection beyond it is closed. Members, once proved, do not count. `max_unproved` and
    `max_handshaking` cap the same two across all sources, well under `max_connections`, so
    strangers on the join port can never take the connection slots members need.
    """

    def __init__(
        self,
        key: NodeKey,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        accept: AcceptPolicy,
        on_stream: StreamHandler | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        keepalive: float = DEFAULT_KEEPALIVE,
        alpns: Sequence[str] = (ALPN_MEMBER, ALPN_JOIN),
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
        dial_stagger: float = 0.25,
        handshake_timeout: float = 10.0,
        max_connections: int = 1024,
        dial_alpns: Sequence[str] = (ALPN_RELAY,),
        unproved_per_source: int = UNPROVED_PER_SOURCE,
        max_unproved: int = MAX_UNPROVED,
        max_handshaking: int = MAX_HANDSHAKING,
    ) -> None:
        self._key = key
        self._host = host
        self._port = port
        self._accept = accept
        self._on_stream = on_stream
        self._idle_timeout = idle_timeout
        self._keepalive = keepalive
        self._alpns = tuple(alpns)
        self._dial_alpns = frozenset((*alpns, *dial_alpns))
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._dial_stagger = dial_stagger
        self._handshake_timeout = handshake_timeout
        self._max_connections = max_connections
        self._unproved_per_source = unproved_per_source
        self._max_unproved = max_unproved
        self._max_handshaking = max_handshaking
        self._unproved: dict[str, set[Connection]] = {}  # established join/relay, by source_group
        self._handshaking: dict[str, set[Connection]] = {}  # incoming, by source_group
        self._certificate: x509.Certificate = make_certificate(key)
        self._udp: asyncio.DatagramTransport | None = None
        self._sockname: Address | None = None
        self._routes: dict[bytes, Connection] = {}
        self._all: set[Connection] = set()
        self._live: dict[tuple[NodeId, str], list[Connection]] = {}
        self._dials: dict[tuple[NodeId, str], _Dial] = {}
        self._unpinned: set[Connection] = set()
        self._datagram_handler: DatagramHandler | None = None
        self._tunnels: dict[Address, Callable[[bytes], None]] = {}  # addr -> send, where UDP is blocked
        self._sock: socket.socket | None = None
        self._burst: dict[Connection, None] | None = None  # connections that received in this read burst
        self._default_ttl: int | None = None
        self._upgrades: dict[Connection, float] = {}  # upgrade dial -> grace before older ones close
        self.paths = Paths(self)
        self._closing = False
        self._supported_versions = QuicConfiguration(is_client=False).supported_versions

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return self._key.node_id

    @property
    def sockname(self) -> Address:
        """The bound (host, port); LocalProtocolError before `start`."""
        if self._sockname is None:
            raise LocalProtocolError("", "transport not started")
        return self._sockname

    async def start(self) -> None:
        """Bind the socket. Raises OSError when the port is taken."""
        if self._udp is not None:
            raise LocalProtocolError("", "transport already started")
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                except OSError as exc:  # best effort: the kernel may cap or refuse it
                    log.debug("socket buffer not set", extra={"reason": str(exc)})
            sock.setblocking(False)
            sock.bind((self._host, self._port))
        except BaseException:
            sock.close()
            raise
        udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=sock)
        self._udp = udp
        self._sock = sock
        name = sock.getsockname()
        self._sockname = (str(name[0]), int(name[1]))
        log.info("transport listening", extra={"addr": f"{self._sockname[0]}:{self._sockname[1]}"})
        self.paths.started()

    async def close(self) -> None:
        """Close every connection (telling peers), stop handlers and release the socket."""
        if self._closing:
            return
        self._closing = True
        for dial in list(self._dials.values()):
            if not dial.future.done():
                dial.future.set_exception(UnreachableError(dial.peer.short, "transport closed"))
                dial.future.exception()  # retrieved here; waiters re-raise their own copy
            if dial.task is not None:
                dial.task.cancel()
        conns = list(self._all)
        for conn in conns:
            conn.close("node shutting down", code=CloseCode.SHUTDOWN)
            conn.flush()
        tasks = [task for conn in conns for task in conn._tasks]
        for task in tasks:
            task.cancel()
        dial_tasks = [d.task for d in self._dials.values() if d.task is not None]
        if tasks or dial_tasks:
            await asyncio.wait([*tasks, *dial_tasks], timeout=2.0)
        self._shutdown("node shut down")

    def abort(self) -> None:
        """Drop the socket and all state without telling anyone (a crash, for tests)."""
        self._closing = True
        for dial in list(self._dials.values()):
            if dial.task is not None:
                dial.task.cancel()
        for conn in list(self._all):
            for task in conn._tasks:
                task.cancel()
        self._shutdown("transport aborted")

    def _shutdown(self, reason: str) -> None:
        for conn in list(self._all):
            conn.finalize(reason)
        self._routes.clear()
        self._all.clear()
        self._live.clear()
        self._unproved.clear()
        self._handshaking.clear()
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    # --- non-QUIC datagrams ---------------------------------------------------------------------

    def set_datagram_handler(self, handler: DatagramHandler | None) -> None:
        """Receive datagrams whose first byte lacks the QUIC fixed bit (probes, relay frames)."""
        self._datagram_handler = handler

    def send_datagram(self, data: bytes, addr: Address) -> None:
        """Send a non-QUIC datagram; its first byte must be below 0x40 (SPEC.md §7.2)."""
        if not data or data[0] >= QUIC_FIXED_BIT:
            raise LocalProtocolError(data[:1].hex(), "a non-QUIC datagram starts with a byte below 0x40")
        self._sendto(data, addr)

    def send_probe(self, data: bytes, addr: Address, *, ttl: int | None = None) -> None:
        """Send a non-QUIC datagram now, with IP TTL `ttl` when given (punching, SPEC.md §7.4).

        The TTL is set on the one socket for this send only and restored at once; the datagram
        goes out synchronously so no other packet leaves with the low TTL.
        """
        if not data or data[0] >= QUIC_FIXED_BIT:
            raise LocalProtocolError(data[:1].hex(), "a non-QUIC datagram starts with a byte below 0x40")
        sock = self._sock
        if sock is None or self._udp is None or addr[0].startswith(VIRTUAL_PREFIXES) or addr in self._tunnels:
            return
        if ttl is None or sock.family != socket.AF_INET:
            self._udp.sendto(data, addr)
            return
        if self._default_ttl is None:
            self._default_ttl = sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            sock.sendto(data, addr)
        except OSError as exc:  # a full buffer or no route: a lost probe, like any other
            log.debug("probe not sent", extra={"addr": f"{addr[0]}:{addr[1]}", "reason": str(exc)})
        finally:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, self._default_ttl)

    def set_tunnel(self, addr: Address, send: Callable[[bytes], None] | None) -> None:
        """Send what this transport would send to `addr` through `send` instead of the UDP
        socket (a datagram tunnel over TCP, where UDP is blocked); None ends the detour."""
        if send is None:
            self._tunnels.pop(addr, None)
        else:
            self._tunnels[addr] = send

    def tunnel_received(self, data: bytes, addr: Address) -> None:
        """A datagram that arrived through a tunnel, handled as if `addr` had sent it by UDP."""
        self._datagram_received(data, addr)

    def feed_datagram(self, data: bytes, addr: Address) -> None:
        """A QUIC packet that arrived over another path (a relay), as if it came from `addr`."""
        if data and data[0] & QUIC_FIXED_BIT:
            self._datagram_received(data, addr)

    # --- connections ----------------------------------------------------------------------------

    def connection(self, peer: NodeId, alpn: str = ALPN_MEMBER) -> Connection | None:
        """The live connection to `peer` on `alpn`, if any (the newest when duplicates linger)."""
        for conn in reversed(self._live.get((peer, alpn), ())):
            if conn.is_open:
                return conn
        return None

    def connections(self) -> list[Connection]:
        """Every live, established connection."""
        return [conn for conns in self._live.values() for conn in conns if conn.is_open]

    async def connect(
        self, peer: NodeId, addrs: Sequence[Address], *, alpn: str = ALPN_MEMBER, timeout: float = 5.0
    ) -> Connection:
        """A live connection to `peer`, reusing one if it exists, else dialling `addrs`.

        Addresses are raced with a stagger; the first whose handshake proves `peer`'s key wins.
        Concurrent calls share one dial. If the peer dials us at the same time, the caller gets
        whichever connection survives the tie-break. Raises HandshakeRefusedError when every
        address refused us or showed another key, UnreachableError otherwise (reasons inside).
        Retrying with backoff is the caller's choice: call again.
        """
        if self._udp is None or self._closing:
            raise LocalProtocolError("", "transport is not running")
        if peer == self.node_id:
            raise LocalProtocolError(peer.short, "cannot dial this node's own key")
        if alpn not in self._dial_alpns:
            raise LocalProtocolError(alpn, f"ALPN not enabled on this transport: {', '.join(sorted(self._dial_alpns))}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(3):  # a dial's result can lose a tie-break right after; look again
            live = self.connection(peer, alpn)
            if live is not None:
                return live
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            key = (peer, alpn)
            dial = self._dials.get(key)
            if dial is None or dial.future.done():
                targets = self._usable(addrs)
                if not targets:
                    raise UnreachableError(peer.short, f"no usable address among {list(addrs)!r}")
                dial = _Dial(peer, alpn, loop.create_future(), loop.time())
                self._dials[key] = dial
                dial.task = loop.create_task(self._run_dial(dial, targets, remaining))
            try:
                conn = await asyncio.wait_for(asyncio.shield(dial.future), remaining)
            except TimeoutError:
                raise UnreachableError(
                    peer.short, f"no connection within {timeout:g} s{_outcomes(dial)}"
                ) from None
            if conn.is_open:
                return conn
        raise UnreachableError(peer.short, f"no connection survived within {timeout:g} s")

    def _usable(self, addrs: Sequence[Address]) -> list[Address]:
        family = 6 if ":" in self._host else 4
        usable: list[Address] = []
        for host, port in addrs:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                log.debug("skipping a non-literal address", extra={"addr": f"{host}:{port}"})
                continue
            if str(ip).startswith(VIRTUAL_PREFIXES) and not self.paths.has_route((str(ip), port)):
                continue  # a relayed path whose relay is not registered: nothing to send to
            if ip.version == family and 0 < port < 65536 and (host, port) not in usable:
                usable.append((str(ip), port))
        return usable

    async def _run_dial(self, dial: _Dial, targets: list[Address], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            for index, addr in enumerate(targets):
                if dial.future.done():
                    break
                self._start_attempt(dial, addr)
                if index + 1 < len(targets):
                    await self._wait_attempts(dial, min(deadline, loop.time() + self._dial_stagger))
            await self._wait_attempts(dial, deadline)
            if not dial.future.done():
                live = self.connection(dial.peer, dial.alpn)  # e.g. the peer's dial we held
                if live is not None:
                    dial.resolve(live)
                elif any(
                    outcome.startswith("refused by peer: superseded") for outcome in dial.outcomes.values()
                ):
                    # the peer's own dial wins the tie-break; its registration resolves us
                    await asyncio.wait([dial.future], timeout=max(0.0, deadline - loop.time()))
            if not dial.future.done():
                refused = [o for o in dial.outcomes.values() if o.startswith("refused")]
                error: PeerError
                if refused and len(refused) == len(dial.outcomes):
                    error = HandshakeRefusedError(dial.peer.short, f"handshake refused{_outcomes(dial)}")
                else:
                    error = UnreachableError(dial.peer.short, f"could not connect{_outcomes(dial)}")
                dial.future.set_exception(error)
                dial.future.exception()  # retrieved: callers re-raise it through their shield
        finally:
            future = dial.future
            winner = (
                future.result()
                if future.done() and not future.cancelled() and future.exception() is None
                else None
            )
            for attempt in dial.attempts:
                if attempt is not winner and attempt.is_open:
                    attempt.close("dial finished without this attempt", code=CloseCode.SUPERSEDED)
            if self._dials.get((dial.peer, dial.alpn)) is dial:
                del self._dials[(dial.peer, dial.alpn)]

    async def _wait_attempts(self, dial: _Dial, until: float) -> None:
        """Wait until the dial is resolved, every attempt ended, or `until` (loop time)."""
        loop = asyncio.get_running_loop()
        while not dial.future.done():
            pending = [a.closed for a in dial.attempts if a.is_open]
            remaining = until - loop.time()
            if not pending or remaining <= 0:
                return
            waitables: list[asyncio.Future[Any]] = [dial.future, *pending]
            await asyncio.wait(waitables, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)

    def _start_attempt(self, dial: _Dial, addr: Address) -> None:
        peer, alpn = dial.peer, dial.alpn

        def check(found: NodeId, negotiated: str) -> str | None:
            if found != peer:
                return f"wrong key: dialled {peer.short} at {addr[0]}:{addr[1]}, it presented {found.short}"
            if negotiated != alpn:
                return f"ALPN mismatch: asked for {alpn}, got {negotiated or 'none'}"
            return None

        conn = self._dial_address(addr, alpn, check, expected_peer=peer)
        dial.targets.add(addr)
        dial.attempts.append(conn)
        conn.closed.add_done_callback(lambda fut: dial.outcomes.__setitem__(addr, fut.result()))

    def _dial_address(
        self, addr: Address, alpn: str, check: PeerCheck, *, expected_peer: NodeId | None
    ) -> Connection:
        config = make_configuration(
            self._key,
            self._certificate,
            is_client=True,
            alpns=[alpn],
            idle_timeout=self._idle_timeout,
            stream_window=self._stream_window,
            connection_window=self._connection_window,
        )
        quic = PinnedQuicConnection(configuration=config, check_peer=check)
        conn = self._new_connection(quic, addr, is_outgoing=True, expected_peer=expected_peer)
        self._route(quic.host_cid, conn)
        conn.start_dial(addr)
        return conn

    async def upgrade(
        self, peer: NodeId, addr: Address, *, alpn: str = ALPN_MEMBER, timeout: float = 5.0, grace: float = 2.0
    ) -> Connection:
        """Dial `peer` at `addr` although a connection exists, and move to the new one (§7.3).

        Once the new connection is confirmed it is what `connection()` returns; older ones to the
        peer on `alpn` are closed `grace` seconds later, so requests in flight on them finish.
        Raises HandshakeRefusedError or UnreachableError as `connect` does.
        """
        if self._udp is None or self._closing:
            raise LocalProtocolError("", "transport is not running")
        if alpn not in self._alpns:
            raise LocalProtocolError(alpn, f"ALPN not enabled on this transport: {', '.join(self._alpns)}")
        targets = self._usable([addr])
        if not targets or peer == self.node_id:
            raise UnreachableError(peer.short, f"not a usable address: {addr[0]}:{addr[1]}")
        target = targets[0]

        def check(found: NodeId, negotiated: str) -> str | None:
            if found != peer:
                return f"wrong key: dialled {peer.short} at {target[0]}:{target[1]}, it presented {found.short}"
            return None if negotiated == alpn else f"ALPN mismatch: asked for {alpn}, got {negotiated or 'none'}"

        conn = self._dial_address(target, alpn, check, expected_peer=peer)
        self._upgrades[conn] = grace
        try:
            waitables: list[asyncio.Future[Any]] = [conn.established, conn.closed]
            await asyncio.wait(waitables, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._upgrades.pop(conn, None)
        label = f"{target[0]}:{target[1]}"
        if conn.is_established:
            return conn
        if conn.is_open:
            conn.close(f"no answer within {timeout:g} s", code=CloseCode.PROTOCOL)
            raise UnreachableError(peer.short, f"{label}: no connection within {timeout:g} s")
        reason = conn.close_reason or ""
        if reason.startswith("refused"):
            raise HandshakeRefusedError(peer.short, f"{label}: {reason}")
        raise UnreachableError(peer.short, f"{label}: {reason}")

    def _supersede_later(self, conn: Connection, older: Sequence[Connection], grace: float) -> None:
        """Register `conn` as the peer's connection; close `older` after `grace` seconds."""
        self._register(conn)
        loop = asyncio.get_running_loop()
        for other in older:
            if other is not conn and other.is_open:
                loop.call_later(grace, _close_moved, other)
        log.info(
            "peer moved to a new path",
            extra={"peer": conn.peer.short, "addr": f"{conn.remote_addr[0]}:{conn.remote_addr[1]}"},
        )

    async def connect_any(self, addr: Address, *, alpn: str = ALPN_JOIN, timeout: float = 5.0) -> Connection:
        """Dial one address and accept whichever key it proves; the join ALPN only.

        For a joiner that found a member's address but not its key (SPEC.md §5.2): nothing is
        pinned, so the caller must bind the connection itself (the join ceremony does, through
        the exporter). Raises HandshakeRefusedError or UnreachableError with the reason.
        """
        if alpn != ALPN_JOIN:
            raise LocalProtocolError(alpn, f"only {ALPN_JOIN} may dial without knowing the peer's key")
        if self._udp is None or self._closing:
            raise LocalProtocolError("", "transport is not running")
        targets = self._usable([addr])
        if not targets:
            raise UnreachableError(f"{addr[0]}:{addr[1]}", "not a usable address")
        target = targets[0]

        def check(found: NodeId, negotiated: str) -> str | None:
            if found == self.node_id:
                return "that is this node's own key"
            return (
                None if negotiated == alpn else f"ALPN mismatch: asked for {alpn}, got {negotiated or 'none'}"
            )

        conn = self._dial_address(target, alpn, check, expected_peer=None)
        self._unpinned.add(conn)
        label = f"{target[0]}:{target[1]}"
        try:
            waitables: list[asyncio.Future[Any]] = [conn.established, conn.closed]
            await asyncio.wait(waitables, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._unpinned.discard(conn)
        if conn.is_established:
            return conn
        if conn.is_open:
            conn.close(f"no answer within {timeout:g} s", code=CloseCode.PROTOCOL)
            raise UnreachableError(label, f"no connection within {timeout:g} s")
        reason = conn.close_reason or ""
        if reason.startswith("refused"):
            raise HandshakeRefusedError(label, reason)
        raise UnreachableError(label, reason)

    def _new_connection(
        self, quic: PinnedQuicConnection, addr: Address, *, is_outgoing: bool, expected_peer: NodeId | None
    ) -> Connection:
        conn = Connection(
            self,
            quic,
            local_id=self.node_id,
            remote_addr=addr,
            is_outgoing=is_outgoing,
            expected_peer=expected_peer,
            keepalive=self._keepalive,
            idle_timeout=self._idle_timeout,
            on_stream=self._on_stream,
        )
        self._all.add(conn)
        return conn

    # --- the incoming side ----------------------------------------------------------------------

    def _check_incoming(self, peer: NodeId, alpn: str, addr: Address) -> str | None:
        if peer == self.node_id:
            return "that is this node's own key"
        dial = self._dials.get((peer, alpn))
        if dial is not None and not dial.future.done() and peer > self.node_id and addr in dial.targets:
            # We are dialling this very address and our key is lower: our dial wins. Refusing
            # here, inside the handshake, means the peer never hands its loser to a caller.
            return SUPERSEDED
        try:
            return self._accept.accept(peer, alpn, addr)
        except Exception:
            log.exception("accept policy failed", extra={"peer": peer.short, "alpn": alpn})
            return "internal error in the accept policy"

    def _read_burst(self, data: bytes, addr: Address) -> None:
        """The socket is readable: asyncio read one datagram, and takes one per turn of the loop.
        Read what else has arrived (at most RECV_BURST in all), then let each connection that
        received transmit once: one pass of aioquic's packet building (its ACKs, its answers)
        per burst instead of one per datagram, and one turn of the loop for the lot. A request
        of a few datagrams then costs its receiver one transmit pass instead of one each."""
        burst: dict[Connection, None] = {}
        self._burst = burst
        try:
            self._datagram_received(data, addr)
            for _ in range(RECV_BURST - 1):
                if self._sock is None or self._udp is None:
                    break
                try:
                    data, raw = self._sock.recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # an ICMP error, as asyncio would hand to error_received
                    log.debug("socket error", extra={"reason": str(exc)})
                    break
                self._datagram_received(data, (str(raw[0]), int(raw[1])))
        finally:
            self._burst = None
            for conn in burst:
                conn.flush()

    def _to_connection(self, conn: Connection, data: bytes, addr: Address) -> None:
        if self._burst is None:
            conn.datagram_received(data, addr)
        else:  # it transmits at the end of the burst
            conn.receive_datagram(data, addr)
            self._burst[conn] = None

    def _datagram_received(self, data: bytes, addr: Address) -> None:
        if not data:
            return
        if not data[0] & QUIC_FIXED_BIT:
            try:
                if not self.paths.receive(data, addr) and self._datagram_handler is not None:
                    self._datagram_handler(data, addr)
            except Exception:
                log.exception("datagram handler failed", extra={"addr": f"{addr[0]}:{addr[1]}"})
            return
        if not data[0] & 0x80:
            # short header: the destination connection id (ours, fixed length) follows at once
            conn = self._routes.get(data[1 : 1 + CID_LENGTH])
            if conn is not None:
                self._to_connection(conn, data, addr)
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            return
        conn = self._routes.get(header.destination_cid)
        if conn is not None:
            self._to_connection(conn, data, addr)
            return
        if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_INITIAL or self._closing:
            return
        if header.version is not None and header.version not in self._supported_versions:
            self._sendto(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=self._supported_versions,
                ),
                addr,
            )
            return
        if len(self._all) >= self._max_connections:
            log.warning(
                "connection limit reached; dropping a new handshake", extra={"addr": f"{addr[0]}:{addr[1]}"}
            )
            return
        if sum(map(len, self._handshaking.values())) >= self._max_handshaking:
            log.debug("handshakes in progress at their cap; dropping one", extra={"addr": addr[0]})
            return
        handshaking = self._handshaking.setdefault(source_group(addr[0]), set())
        if len(handshaking) >= self._unproved_per_source:
            log.debug("handshakes per source reached; dropping one", extra={"addr": addr[0]})
            return
        handshaking.add(self._accept_initial(header.destination_cid, data, addr))

    def _accept_initial(self, original_cid: bytes, data: bytes, addr: Address) -> Connection:
        config = make_configuration(
            self._key,
            self._certificate,
            is_client=False,
            alpns=self._alpns,
            idle_timeout=self._idle_timeout,
            stream_window=self._stream_window,
            connection_window=self._connection_window,
        )
        quic = PinnedQuicConnection(
            configuration=config,
            check_peer=lambda peer, alpn: self._check_incoming(peer, alpn, addr),
            original_destination_connection_id=original_cid,
        )
        conn = self._new_connection(quic, addr, is_outgoing=False, expected_peer=None)
        self._route(original_cid, conn)
        self._route(quic.host_cid, conn)
        loop = asyncio.get_running_loop()
        handle = loop.call_later(self._handshake_timeout, self._handshake_deadline, conn)
        conn.closed.add_done_callback(lambda _: handle.cancel())
        conn.established.add_done_callback(lambda _: handle.cancel())
        conn.datagram_received(data, addr)
        return conn

    def _uncount(self, conn: Connection, budget: dict[str, set[Connection]]) -> None:
        source = source_group(conn._remote_addr[0])
        conns = budget.get(source)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del budget[source]

    def _handshake_deadline(self, conn: Connection) -> None:
        if not conn.established.done():
            conn.close(
                f"handshake did not finish within {self._handshake_timeout:g} s", code=CloseCode.PROTOCOL
            )

    # --- callbacks from connections (the _Host protocol) ----------------------------------------

    def _sendto(self, data: bytes, addr: Address) -> None:
        if self._udp is None:
            return
        tunnel = self._tunnels.get(addr)
        if tunnel is not None:
            tunnel(data)
            return
        if addr[0].startswith(VIRTUAL_PREFIXES):
            self.paths.send_virtual(data, addr)  # relayed, or dropped: never onto the wire as is
            return
        self._udp.sendto(data, addr)

    def _route(self, cid: bytes, conn: Connection) -> None:
        self._routes[cid] = conn
        conn.cids.add(cid)

    def _cid_issued(self, cid: bytes, conn: Connection) -> None:
        self._routes[cid] = conn

    def _cid_retired(self, cid: bytes) -> None:
        self._routes.pop(cid, None)

    def _terminated(self, conn: Connection) -> None:
        for cid in conn.cids:
            if self._routes.get(cid) is conn:
                del self._routes[cid]
        conn.cids.clear()
        self._all.discard(conn)
        self._uncount(conn, self._handshaking)
        self._uncount(conn, self._unproved)

    def _closed(self, conn: Connection) -> None:
        reason = conn.close_reason or ""
        if conn.registered_at is not None:
            key = (conn.peer, conn.alpn)
            conns = self._live.get(key)
            if conns is not None and conn in conns:
                conns.remove(conn)
                if not conns:
                    del self._live[key]
            log.info(
                "connection closed", extra={"peer": conn.peer.short, "alpn": conn.alpn, "reason": reason}
            )
        elif not conn.is_outgoing and not self._closing:
            offered = conn._quic.offered_peer
            log.info(
                "incoming handshake failed",
                extra={
                    "peer": offered.short if offered else "?",
                    "addr": f"{conn.remote_addr[0]}:{conn.remote_addr[1]}",
                    "reason": reason,
                },
            )
        elif conn.is_outgoing and reason.startswith("refused: wrong key"):
            log.warning("dialled address presented another key", extra={"reason": reason})

    def _established(self, conn: Connection) -> None:
        """A handshake finished (server) or was confirmed (client): settle duplicates, register."""
        if self._closing:
            conn.close("node shutting down", code=CloseCode.SHUTDOWN)
            return
        self._uncount(conn, self._handshaking)
        if conn.unproved:
            unproved = self._unproved.setdefault(source_group(conn._remote_addr[0]), set())
            if len(unproved) >= self._unproved_per_source:
                conn.close("too many connections from this address", code=CloseCode.REFUSED)
                return
            if sum(map(len, self._unproved.values())) >= self._max_unproved:
                conn.close("too many join and relay connections", code=CloseCode.REFUSED)
                return
            unproved.add(conn)
        if conn in self._unpinned:  # connect_any: a join dial to a key we did not know
            self._register(conn)
            return
        me = self.node_id
        key = (conn.peer, conn.alpn)
        live = [c for c in self._live.get(key, ()) if c.is_open]
        if conn.is_outgoing and conn in self._upgrades:
            self._supersede_later(conn, live, self._upgrades[conn])
            return
        if not conn.is_outgoing and live and self.paths.is_punched(conn.peer, conn.remote_addr):
            self._supersede_later(conn, live, 2.0)  # the peer's upgrade to the path we punched
            return
        dial = self._dials.get(key)
        pending = dial if dial is not None and not dial.future.done() else None
        if conn.is_outgoing:
            if pending is None or conn not in pending.attempts:
                conn.close("dial already finished", code=CloseCode.SUPERSEDED)
                return
            for other in live:
                if other.dialer != me:  # the peer's dial, held while ours was pending
                    if me < conn.peer:
                        other.close(SUPERSEDED, code=CloseCode.SUPERSEDED)
                    else:
                        conn.close(SUPERSEDED, code=CloseCode.SUPERSEDED)
                        pending.resolve(other)
                        return
            self._register(conn)
            pending.resolve(conn)
            pending.close_attempts("another address answered first", keep=conn)
            return
        if pending is not None:
            self._register(conn)
            if conn.peer < me or not any(a.heard_back for a in pending.attempts if a.is_open):
                # The peer's dial is the one dialled by the lower key: it wins, ours is dropped.
                # So does a peer that dialled from an address we are not dialling (a same-address
                # race is refused in the handshake) while ours has heard nothing: the peer came
                # back on a new port, and ours would wait out its timeout at the old one.
                pending.close_attempts(SUPERSEDED)
                pending.resolve(conn)
            # else: held; our own dial, which the peer answers, decides (the outgoing branch, _run_dial)
            return
        for other in live:
            if other.dialer != me:
                continue  # the same peer dialled twice (address race): the dialler drops its loser
            overlapped = other.registered_at is not None and other.registered_at >= conn.started_at
            if overlapped and me < conn.peer:
                conn.close(SUPERSEDED, code=CloseCode.SUPERSEDED)
                return
            other.close(
                SUPERSEDED
                if overlapped
                else "replaced: the peer dialled again, so it had lost this connection",
                code=CloseCode.SUPERSEDED,
            )
        self._register(conn)

    def _register(self, conn: Connection) -> None:
        conn.registered_at = asyncio.get_running_loop().time()
        self._live.setdefault((conn.peer, conn.alpn), []).append(conn)


def _close_moved(conn: Connection) -> None:
    conn.close("moved to a direct path", code=CloseCode.SUPERSEDED)


def _outcomes(dial: _Dial) -> str:
    if not dial.outcomes:
        return ""
    return ": " + "; ".join(f"{host}:{port}: {why}" for (host, port), why in dial.outcomes.items())
