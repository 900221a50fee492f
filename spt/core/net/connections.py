"""One pinned QUIC connection and its streams, driven from asyncio.

`Connection` wraps a `PinnedQuicConnection`: the transport feeds it datagrams, it drains QUIC
events, transmits and re-arms one timer (the shape of aioquic's `asyncio/protocol.py`). `Stream`
carries spt frames (`spt.core.proto.frames`) in both directions with bounded buffers:

- sending: a writer awaits while more than `STREAM_SEND_BUFFER` bytes of its stream, or
  `CONNECTION_SEND_BUFFER` bytes of the whole connection, are written but not yet transmitted;
  transmission advances as the peer acknowledges and grants flow-control credit;
- receiving: whole frames wait in the stream's queue as undecoded bytes and count as held; QUIC
  flow control only grants the peer new credit as the application takes frames out
  (`PinnedQuicConnection.hold`). A frame is decoded when taken, so what a peer can make us hold is
  bytes under flow control, not the objects they decode to;
- peers that proved nothing (incoming connections on an ALPN other than `spt/1`) get the small
  `OPEN_LIMITS` frames, their partial frames count against flow control too, and at most
  `OPEN_STREAMS` of their streams are open at once (more are refused). Members' partial frames
  are not held (a 16 MiB frame is bigger than any window) but are bounded per connection by
  `MEMBER_PARTIAL_BYTES`.

What must not live here: the socket, routing by connection id, dialing and the choice between
duplicate connections (all in `spt.core.net.transport`), and aioquic private names (only in
`spt.core.net.pinning`). Nothing here logs a frame body.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

from aioquic.quic import events
from aioquic.quic.packet import QuicErrorCode

from spt.core import trace
from spt.core.errors import (
    LocalProtocolError,
    PeerError,
    RemoteProtocolError,
    SptError,
)
from spt.core.identity import NodeId
from spt.core.net.pinning import ALPN_MEMBER, PinnedQuicConnection
from spt.core.proto.frames import (
    HEADER,
    MEMBER_LIMITS,
    OPEN_LIMITS,
    Frame,
    FrameDecoder,
    FrameError,
    FrameLimits,
    decode_payload,
    encode_frame,
)

__all__ = [
    "CONNECTION_SEND_BUFFER",
    "ERROR_TYPE",
    "OPEN_STREAMS",
    "STREAM_SEND_BUFFER",
    "CloseCode",
    "Connection",
    "ConnectionClosedError",
    "PeerTimeoutError",
    "RequestError",
    "RequestHandler",
    "Stream",
    "StreamHandler",
    "StreamResetError",
    "UnknownFrameTypeError",
    "serve_requests",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]

STREAM_SEND_BUFFER: Final = 1024 * 1024
CONNECTION_SEND_BUFFER: Final = 8 * 1024 * 1024
ERROR_TYPE: Final = "error"
OPEN_STREAMS: Final = 8  # concurrent peer streams on a connection from a peer that proved nothing
MEMBER_PARTIAL_BYTES: Final = 64 * 1024 * 1024  # unheld partial-frame bytes per member connection
_MAX_REASON: Final = 200  # bytes of close reason put on the wire
SILENT_KEEPALIVES: Final = 2.5  # keepalive periods of silence (two unanswered pings) that close
KEEPALIVES_PER_IDLE: Final = 3.0  # keepalive periods at least within the idle timeout in force


class CloseCode(enum.IntEnum):
    """Application error codes in CONNECTION_CLOSE and RESET_STREAM / STOP_SENDING frames."""

    NORMAL = 0x0
    PROTOCOL = 0x1  # the peer broke the frame protocol
    SUPERSEDED = 0x2  # a duplicate connection lost the tie-break
    SHUTDOWN = 0x3
    HANDLER_FAILED = 0x10
    REFUSED = 0x11  # no handler for peer-initiated streams
    CANCELLED = 0x12
    DONE = 0x13  # the application stopped reading a stream it had finished with


class ConnectionClosedError(PeerError):
    """The connection closed; `reason` says why (idle timeout, closed by peer, refused…)."""

    token = "CONNECTION_CLOSED"

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(peer, reason)
        self.reason = reason


class StreamResetError(PeerError):
    """The peer abandoned the stream (RESET_STREAM or STOP_SENDING), with its error code."""

    token = "STREAM_RESET"

    def __init__(self, peer: str, message: str, code: int) -> None:
        super().__init__(peer, message)
        self.code = code


class PeerTimeoutError(PeerError):
    """The peer did not answer, or did not make room for our data, before the deadline."""

    token = "TIMEOUT"


class RequestError(PeerError):
    """The peer answered a request with an `error` frame; `code` is its token."""

    def __init__(self, peer: str, code: str, message: str) -> None:
        super().__init__(peer, f"{code}: {message}" if message else code)
        self.code = code
        self.remote_message = message


class UnknownFrameTypeError(RemoteProtocolError):
    """Raised by a request handler for a frame type it does not serve."""

    token = "UNKNOWN_TYPE"


StreamHandler = Callable[["Connection", "Stream"], Awaitable[None]]
RequestHandler = Callable[["Connection", Frame], Awaitable[tuple[str, Any]]]


class _Host(Protocol):
    """What a connection needs from the transport that owns the socket."""

    def _sendto(self, data: bytes, addr: Address) -> None: ...
    def _cid_issued(self, cid: bytes, conn: Connection) -> None: ...
    def _cid_retired(self, cid: bytes) -> None: ...
    def _established(self, conn: Connection) -> None: ...
    def _closed(self, conn: Connection) -> None: ...
    def _terminated(self, conn: Connection) -> None: ...


class Connection:
    """A mutually authenticated QUIC connection to one peer key.

    Made by `Transport`; callers get one from `Transport.connect`, `Transport.connection` or
    the `on_stream` callback, always after both keys were proved and accepted.
    `closed` resolves to the close reason (never raises); `close_reason` is None while open.
    """

    def __init__(
        self,
        host: _Host,
        quic: PinnedQuicConnection,
        *,
        local_id: NodeId,
        remote_addr: Address,
        is_outgoing: bool,
        expected_peer: NodeId | None,
        keepalive: float,
        idle_timeout: float,
        on_stream: StreamHandler | None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._host = host
        self._quic = quic
        self._local_id = local_id
        self._peer = expected_peer
        self._remote_addr = remote_addr
        self.is_outgoing = is_outgoing
        self._keepalive = keepalive
        self._idle_timeout = idle_timeout
        self._on_stream = on_stream
        self.started_at = self._loop.time()
        self.registered_at: float | None = None
        self.established: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[str] = self._loop.create_future()
        self._close_reason: str | None = None
        self._terminated = False
        self._streams: dict[int, Stream] = {}
        self._pending_streams: list[Stream] = []
        self._peer_next = {0: 0, 2: 0}  # next unseen peer stream index, per kind (bidi 0, uni 2)
        self._peer_gaps: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._transmit_handle: asyncio.Handle | None = None
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._last_rx = self.started_at
        self.heard_back = False
        """Anything arrived since this connection started: a dial to a dead address never hears."""
        self._sending: set[Stream] = set()
        self._unsent_estimate = 0
        self._blocked: set[Stream] = set()
        self._limits: FrameLimits | None = None
        self._partial = 0  # bytes of incomplete frames buffered on all streams (members only)
        self.cids: set[bytes] = set()

    # --- what callers see -----------------------------------------------------------------------

    @property
    def peer(self) -> NodeId:
        if self._peer is None:
            raise LocalProtocolError("", "the peer's key is not known before the handshake accepted it")
        return self._peer

    @property
    def alpn(self) -> str:
        return self._quic.alpn or ""

    @property
    def dialer(self) -> NodeId:
        """The key of the node that dialled this connection (the simultaneous-dial tie-break)."""
        return self._local_id if self.is_outgoing else self.peer

    @property
    def remote_addr(self) -> Address:
        addr = self._quic.get_peer_address()
        return (str(addr[0]), int(addr[1])) if addr else self._remote_addr

    @property
    def validated_remote_addr(self) -> Address:
        """The peer's address as far as QUIC has validated it: what may safely be sent to on the
        peer's behalf (a relay forwarding, say). Differs from `remote_addr` mid-migration."""
        addr = self._quic.validated_peer_address()
        return (str(addr[0]), int(addr[1])) if addr else self._remote_addr

    @property
    def rtt_ms(self) -> float | None:
        """QUIC's smoothed round-trip time in milliseconds; None before the first sample."""
        rtt = self._quic.smoothed_rtt
        return None if rtt is None else rtt * 1000.0

    @property
    def unproved(self) -> bool:
        """True for an incoming connection on an ALPN open to anyone (join, relay): the peer has
        proved a key but not that it belongs anywhere, so it gets the small limits."""
        return not self.is_outgoing and self.alpn != ALPN_MEMBER

    @property
    def frame_limits(self) -> FrameLimits:
        """What one frame from the peer may cost. Known once the ALPN is (before any stream)."""
        if self._limits is None:
            self._limits = OPEN_LIMITS if self.unproved else MEMBER_LIMITS
        return self._limits

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    @property
    def is_open(self) -> bool:
        return self._close_reason is None

    @property
    def is_established(self) -> bool:
        return self.established.done() and self._close_reason is None

    def export_keying_material(self, label: bytes, length: int, context: bytes = b"") -> bytes:
        """RFC 8446 §7.5 exporter output; the same bytes on both ends of this connection only."""
        return self._quic.export_keying_material(label, length, context)

    def open_stream(self) -> Stream:
        """A new bidirectional stream. Use it as `async with` so it is released when done."""
        self._check_usable()
        stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(stream_id, b"")  # creates it now so the next id moves on
        stream = Stream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    async def request(self, type_name: str, body: Any = None, *, timeout: float = 10.0) -> Frame:
        """Send one frame on a new stream and return the one reply frame.

        Raises RequestError for an `error` reply, PeerTimeoutError after `timeout` seconds,
        ConnectionClosedError / StreamResetError when the peer goes away, RemoteProtocolError
        when the stream ends without a reply. Cancelling resets the stream.
        """
        stream = self.open_stream()
        deadline = self._loop.time() + timeout
        trace.mark("quic", type_name, "out")
        try:
            await stream.send(type_name, body, end=True, timeout=timeout)
            reply = await stream.recv(timeout=max(0.0, deadline - self._loop.time()))
            trace.mark("quic", type_name, "reply")
        except PeerTimeoutError:
            stream.reset(CloseCode.CANCELLED)
            raise PeerTimeoutError(
                self._peer_label, f"no reply to {type_name!r} within {timeout:g} s"
            ) from None
        except BaseException:
            stream.reset(CloseCode.CANCELLED)
            raise
        stream.discard()
        if reply is None:
            raise RemoteProtocolError(self._peer_label, f"stream ended without a reply to {type_name!r}")
        if reply.type == ERROR_TYPE:
            code, message = _error_fields(reply.body)
            raise RequestError(self._peer_label, code, message)
        return reply

    def close(self, reason: str = "closed", *, code: int = CloseCode.NORMAL) -> None:
        """Close with `reason` (sent to the peer, shown as `close_reason` on both sides)."""
        if self._close_reason is not None:
            return
        self._quic.close(error_code=int(code), reason_phrase=_clip(reason))
        self._mark_closed(reason)
        self._transmit_soon()

    async def wait_closed(self) -> str:
        """Wait until the connection closes; returns the reason."""
        return await asyncio.shield(self.closed)

    def __repr__(self) -> str:
        direction = "out" if self.is_outgoing else "in"
        state = "open" if self.is_open else f"closed: {self._close_reason}"
        return f"Connection({self._peer_label}, {self.alpn or '?'}, {direction}, {state})"

    # --- driven by the transport ----------------------------------------------------------------

    def start_dial(self, addr: Address) -> None:
        self._quic.connect(addr, now=self._loop.time())
        self._transmit()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.receive_datagram(data, addr)
        self._transmit()

    def receive_datagram(self, data: bytes, addr: Address) -> None:
        """`datagram_received` without the transmit: the caller calls `flush` after a burst."""
        now = self._loop.time()
        self._last_rx = now
        self.heard_back = True
        try:
            self._quic.receive_datagram(data, addr, now=now)
        except Exception:
            # aioquic let through an error it should have made a connection error (a crafted
            # packet reaching one of its gaps): it costs this connection, never the listener.
            log.exception("QUIC failed on a received packet", extra={"addr": f"{addr[0]}:{addr[1]}"})
            self.close("internal error on a received packet", code=CloseCode.PROTOCOL)
            return
        self._process()

    def flush(self) -> None:
        """Transmit now (at the end of a read burst, and before the socket closes)."""
        self._transmit()

    def finalize(self, reason: str) -> None:
        """Drop all state without telling the peer (the socket is gone)."""
        self._mark_closed(reason)
        self._finish()

    # --- internals ------------------------------------------------------------------------------

    @property
    def _peer_label(self) -> str:
        return (
            self._peer.short if self._peer is not None else f"{self._remote_addr[0]}:{self._remote_addr[1]}"
        )

    def _check_usable(self) -> None:
        if self._close_reason is not None:
            raise ConnectionClosedError(self._peer_label, self._close_reason)
        if not self.established.done():
            raise LocalProtocolError(self._peer_label, "connection is not established yet")

    def _process(self) -> None:
        quic = self._quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                self._stream_data(event)
            elif isinstance(event, events.StreamReset):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_reset(event.error_code)
            elif isinstance(event, events.StopSendingReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_stop_sending(event.error_code)
            elif isinstance(event, events.HandshakeCompleted):
                if not self.is_outgoing:
                    self._on_confirmed()
            elif isinstance(event, events.ConnectionIdIssued):
                self.cids.add(event.connection_id)
                self._host._cid_issued(event.connection_id, self)
            elif isinstance(event, events.ConnectionIdRetired):
                self.cids.discard(event.connection_id)
                self._host._cid_retired(event.connection_id)
            elif isinstance(event, events.ConnectionTerminated):
                self._check_close()
                self._finish()
                return
        if self.is_outgoing and not self.established.done() and quic.handshake_confirmed:
            self._on_confirmed()
        if quic.close_event is not None and self._close_reason is None:
            self._check_close()

    def _on_confirmed(self) -> None:
        if self.established.done() or self._close_reason is not None:
            return
        peer = self._quic.peer_id
        if peer is None:  # cannot happen: the handshake does not finish without a checked key
            self.close("handshake finished without a checked peer key", code=CloseCode.PROTOCOL)
            return
        self._peer = peer
        self.established.set_result(None)
        self._host._established(self)
        if self._close_reason is not None:  # lost a tie-break
            return
        log.info(
            "peer connected",
            extra={
                "peer": peer.short,
                "alpn": self.alpn,
                "addr": f"{self.remote_addr[0]}:{self.remote_addr[1]}",
                "direction": "out" if self.is_outgoing else "in",
            },
        )
        self._arm_keepalive()
        pending, self._pending_streams = self._pending_streams, []
        for stream in pending:
            self._spawn_handler(stream)

    def _check_close(self) -> None:
        if self._close_reason is not None:
            return
        event = self._quic.close_event
        if event is None:
            return
        phrase = event.reason_phrase or "no reason given"
        refusal = self._quic.refusal
        crypto = QuicErrorCode.CRYPTO_ERROR <= event.error_code <= QuicErrorCode.CRYPTO_ERROR + 0xFF
        if refusal is not None:
            reason = f"refused: {refusal}"
        elif self._quic.closed_locally:
            reason = f"protocol error detected here: {phrase} (code 0x{event.error_code:x})"
        elif event.reason_phrase == "Idle timeout" and event.error_code == QuicErrorCode.INTERNAL_ERROR:
            if self.established.done():
                reason = f"idle timeout: nothing heard from the peer for {self._quic.idle_timeout:g} s"
            else:
                reason = "no answer: the handshake timed out"
        elif crypto and not self.established.done():
            reason = f"refused by peer: {phrase}"
        else:
            reason = f"closed by peer: {phrase}"
        self._mark_closed(reason)

    def _mark_closed(self, reason: str) -> None:
        if self._close_reason is not None:
            return
        self._close_reason = reason
        self.closed.set_result(reason)
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        error = ConnectionClosedError(self._peer_label, reason)
        for stream in list(self._streams.values()):
            stream._on_connection_closed(error)
        self._pending_streams.clear()
        self._host._closed(self)

    def _finish(self) -> None:
        if self._terminated:
            return
        self._terminated = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transmit_handle is not None:
            self._transmit_handle.cancel()
            self._transmit_handle = None
        self._mark_closed("connection terminated")
        self._host._terminated(self)

    def _transmit_soon(self) -> None:
        if self._transmit_handle is None and not self._terminated:
            self._transmit_handle = self._loop.call_soon(self._transmit)

    def _transmit(self) -> None:
        if self._transmit_handle is not None:
            self._transmit_handle.cancel()
            self._transmit_handle = None
        if self._terminated:
            return
        sendto = self._host._sendto
        for data, addr in self._quic.datagrams_to_send(now=self._loop.time()):
            sendto(data, addr)
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at
        if self._blocked:
            self._wake_writers()

    def _handle_timer(self) -> None:
        now = max(self._timer_at or 0.0, self._loop.time())
        self._timer = None
        self._timer_at = None
        self._quic.handle_timer(now=now)
        self._process()
        self._transmit()

    @property
    def keepalive_period(self) -> float:
        """Seconds between keepalive looks: the configured period, shortened to a third of the
        idle timeout in force (ours or the peer's, whichever is smaller). A connection that
        carries nothing of its own for longer (a relay registration between refreshes) must
        still not idle out, whatever idle timeout either side configured."""
        return min(self._keepalive, self._quic.idle_timeout / KEEPALIVES_PER_IDLE)

    def _arm_keepalive(self) -> None:
        if self._keepalive > 0 and self._close_reason is None:
            self._keepalive_handle = self._loop.call_later(self.keepalive_period, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        self._keepalive_handle = None
        if self._close_reason is not None:
            return
        period = self.keepalive_period
        silent = self._loop.time() - self._last_rx
        if silent >= period * SILENT_KEEPALIVES:
            # Two pings went unanswered: the peer moved, slept or vanished. Closing now (not at
            # the idle timeout) lets the member keeper dial every path again, the relay included.
            self.close(f"peer silent for {silent:.1f} s (no answer to keepalives)")
            return
        if silent >= period * 0.9:
            self._quic.send_ping(0)
            self._transmit()
        self._arm_keepalive()

    # streams

    def _is_new_peer_stream(self, stream_id: int) -> bool:
        client_initiated = not stream_id & 1
        if client_initiated == self.is_outgoing:
            return False  # ours, already forgotten
        kind = stream_id & 2
        index = stream_id >> 2
        first_unseen = self._peer_next[kind]
        if index >= first_unseen:
            # aioquic enforces MAX_STREAMS, so the gap of implicitly opened ids is bounded
            self._peer_gaps.update((i << 2) | (stream_id & 3) for i in range(first_unseen, index))
            self._peer_next[kind] = index + 1
            return True
        if stream_id in self._peer_gaps:
            self._peer_gaps.discard(stream_id)
            return True
        return False

    def _stream_data(self, event: events.StreamDataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            if self._close_reason is not None or not self._is_new_peer_stream(event.stream_id):
                return
            if event.stream_id & 2:  # spt uses bidirectional streams only
                self._quic.stop_stream(event.stream_id, CloseCode.REFUSED)
                self._transmit_soon()
                return
            if self.unproved and len(self._streams) >= OPEN_STREAMS:
                # what it sends on the refused stream is dropped (never held or decoded)
                self._quic.stop_stream(event.stream_id, CloseCode.REFUSED)
                self._quic.reset_stream(event.stream_id, CloseCode.REFUSED)
                self._transmit_soon()
                return
            stream = Stream(self, event.stream_id)
            self._streams[event.stream_id] = stream
            if self._on_stream is None:
                stream.reset(CloseCode.REFUSED)
                return
            if self.established.done():
                self._spawn_handler(stream)
            else:
                self._pending_streams.append(stream)
        stream._on_data(event.data, event.end_stream)

    def _spawn_handler(self, stream: Stream) -> None:
        task = self._loop.create_task(self._run_handler(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, stream: Stream) -> None:
        handler = self._on_stream
        assert handler is not None
        try:
            await handler(self, stream)
        except asyncio.CancelledError:
            stream.reset(CloseCode.CANCELLED)
            raise
        except (ConnectionClosedError, StreamResetError) as exc:
            # the peer went away mid-exchange: nothing is wrong here
            log.debug("stream handler ended by the peer", extra={"reason": exc.message})
        except Exception:
            # per-handler guard (STYLE.md §7): log with traceback, reset the stream, keep running
            log.exception(
                "stream handler failed", extra={"peer": self._peer_label, "stream_id": stream.stream_id}
            )
            stream.reset(CloseCode.HANDLER_FAILED)
        else:
            stream.discard()

    def _protocol_error(self, stream: Stream, exc: FrameError) -> None:
        log.warning(
            "peer broke the frame protocol; closing the connection",
            extra={"peer": self._peer_label, "stream_id": stream.stream_id, "reason": exc.message},
        )
        self.close(f"protocol error: {exc.message}", code=CloseCode.PROTOCOL)

    def _forget(self, stream: Stream) -> None:
        self._streams.pop(stream.stream_id, None)
        self._sending.discard(stream)
        self._blocked.discard(stream)

    # send-side backpressure

    def _write(self, stream: Stream, data: bytes, end: bool) -> None:
        self._quic.send_stream_data(stream.stream_id, data, end_stream=end)
        stream._written += len(data)
        self._unsent_estimate += len(data)
        self._sending.add(stream)
        self._transmit_soon()

    def _recount_unsent(self) -> int:
        total = 0
        for stream in list(self._sending):
            unsent = self._quic.unsent(stream.stream_id, stream._written)
            if unsent:
                total += unsent
            else:
                self._sending.discard(stream)
        self._unsent_estimate = total
        return total

    def _must_wait(self, stream: Stream) -> bool:
        if stream._written <= STREAM_SEND_BUFFER and self._unsent_estimate <= CONNECTION_SEND_BUFFER:
            return False  # cannot be over either bound yet; skip asking aioquic
        if self._quic.unsent(stream.stream_id, stream._written) > STREAM_SEND_BUFFER:
            return True
        return (
            self._unsent_estimate > CONNECTION_SEND_BUFFER and self._recount_unsent() > CONNECTION_SEND_BUFFER
        )

    def _wake_writers(self) -> None:
        total = self._recount_unsent()
        for stream in list(self._blocked):
            if stream._send_error is not None or (
                total <= CONNECTION_SEND_BUFFER
                and self._quic.unsent(stream.stream_id, stream._written) <= STREAM_SEND_BUFFER
            ):
                self._blocked.discard(stream)
                stream._wake_writer()

    def _consumed(self, stream: Stream, size: int) -> None:
        if self._quic.release(stream.stream_id, size):
            self._transmit_soon()


class Stream:
    """A bidirectional stream of frames. `recv` returns None at a clean end of stream."""

    __slots__ = (
        "_decoder",
        "_eof",
        "_frames",
        "_partial",
        "_reader",
        "_recv_error",
        "_recv_stopped",
        "_send_ended",
        "_send_error",
        "_writer",
        "_written",
        "connection",
        "stream_id",
    )

    def __init__(self, connection: Connection, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self._decoder = FrameDecoder(connection.frame_limits)
        self._frames: deque[bytes | memoryview] = deque()  # whole frames' payloads, undecoded
        self._eof = False
        self._recv_error: SptError | None = None
        self._recv_stopped = False
        self._reader: asyncio.Future[None] | None = None
        self._send_ended = False
        self._send_error: SptError | None = None
        self._writer: asyncio.Future[None] | None = None
        self._written = 0
        self._partial = 0  # bytes of an incomplete frame, as last counted

    # --- API ------------------------------------------------------------------------------------

    async def send(
        self,
        type_name: str,
        body: Any = None,
        *,
        req_id: int | None = None,
        end: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Queue one frame; `end` also closes our sending side.

        Returns once the frame is queued and the stream's unsent backlog is within bounds, waiting
        for the peer to make room if needed (PeerTimeoutError after `timeout` seconds).
        """
        self._check_sendable()
        data = encode_frame(type_name, body, req_id=req_id)
        conn = self.connection
        conn._write(self, data, end)
        if end:
            self._send_ended = True
            self._maybe_forget()
        if conn._must_wait(self):
            await self._wait_writable(timeout)

    async def recv(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or None once the peer ended the stream cleanly.

        Raises StreamResetError / ConnectionClosedError when the peer abandoned the stream or
        connection, and PeerTimeoutError when nothing arrived within `timeout` seconds.
        """
        while not self._frames:
            if self._recv_error is not None:
                raise self._recv_error
            if self._eof or self._recv_stopped:
                return None
            waiter = self._reader = asyncio.get_running_loop().create_future()
            try:
                await _wait(waiter, timeout)
            except TimeoutError:
                raise PeerTimeoutError(
                    self.connection._peer_label,
                    f"nothing received on stream {self.stream_id} within {timeout:g} s",
                ) from None
            finally:
                self._reader = None
        payload = self._frames.popleft()
        conn = self.connection
        conn._consumed(self, len(payload) + HEADER)
        try:
            return decode_payload(payload, conn.frame_limits)
        except FrameError as exc:
            conn._protocol_error(self, exc)
            raise ConnectionClosedError(conn._peer_label, conn.close_reason or exc.message) from None

    async def end(self) -> None:
        """Close our sending side (FIN) after everything queued."""
        if self._send_ended or self._send_error is not None:
            return
        self.connection._write(self, b"", True)
        self._send_ended = True
        self._maybe_forget()

    def reset(self, code: int = CloseCode.CANCELLED) -> None:
        """Abandon the stream in both directions; queued frames are dropped."""
        conn = self.connection
        if conn._close_reason is None:
            if not self._send_ended and self._send_error is None:
                conn._quic.reset_stream(self.stream_id, int(code))
            self._stop_receiving(code)
            conn._transmit_soon()
        self._send_ended = True
        if self._send_error is None:
            self._send_error = StreamResetError(conn._peer_label, "stream was reset here", int(code))
        self._drop_received()
        self._recv_stopped = True
        self._wake_writer()
        self._wake_reader()
        self._maybe_forget()

    def discard(self) -> None:
        """We are done: end our side if still open and stop reading what the peer still sends."""
        conn = self.connection
        if conn._close_reason is None:
            if not self._send_ended and self._send_error is None:
                conn._write(self, b"", True)
            if not self._eof and self._recv_error is None:
                self._stop_receiving(CloseCode.DONE)
                conn._transmit_soon()
        self._send_ended = True
        self._drop_received()
        self._recv_stopped = True
        self._maybe_forget()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.discard()
        else:
            self.reset(CloseCode.CANCELLED)

    async def __aiter__(self) -> AsyncIterator[Frame]:
        while (frame := await self.recv()) is not None:
            yield frame

    def __repr__(self) -> str:
        return f"Stream({self.stream_id}, {self.connection._peer_label})"

    # --- internals ------------------------------------------------------------------------------

    def _check_sendable(self) -> None:
        if self._send_error is not None:
            raise self._send_error
        if self.connection._close_reason is not None:
            raise ConnectionClosedError(self.connection._peer_label, self.connection._close_reason)
        if self._send_ended:
            raise LocalProtocolError(str(self.stream_id), "cannot send after the stream was ended")

    async def _wait_writable(self, timeout: float | None) -> None:
        conn = self.connection
        loop = asyncio.get_running_loop()
        waiter = self._writer = loop.create_future()
        conn._blocked.add(self)
        try:
            await _wait(waiter, timeout)
        except TimeoutError:
            raise PeerTimeoutError(
                conn._peer_label, f"the peer took no data on stream {self.stream_id} within {timeout:g} s"
            ) from None
        finally:
            self._writer = None
            conn._blocked.discard(self)
        if self._send_error is not None:
            raise self._send_error
        if conn._close_reason is not None:
            raise ConnectionClosedError(conn._peer_label, conn._close_reason)

    def _wake_writer(self) -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.set_result(None)

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _on_data(self, data: bytes, end: bool) -> None:
        if self._recv_stopped or self._recv_error is not None:
            return
        conn = self.connection
        try:
            frames = self._decoder.cut(data) if data else []
            if end:
                self._decoder.eof()
        except FrameError as exc:
            conn._protocol_error(self, exc)  # closing fails this stream's reader too
            return
        if conn.unproved:
            # every byte is held, partial frames included, until the application takes it
            if data:
                conn._quic.hold(self.stream_id, len(data))
        else:
            hold = conn._quic.hold
            for payload in frames:
                hold(self.stream_id, len(payload) + HEADER)
            partial = self._decoder.buffered
            conn._partial += partial - self._partial
            self._partial = partial
            if conn._partial > MEMBER_PARTIAL_BYTES:
                conn._protocol_error(
                    self,
                    FrameError(
                        str(conn._partial),
                        f"more than {MEMBER_PARTIAL_BYTES} bytes of incomplete frames on one connection",
                    ),
                )
                return
        if frames:
            self._frames.extend(frames)
        if end:
            self._eof = True
            self._maybe_forget()
        if frames or end:
            self._wake_reader()

    def _on_reset(self, code: int) -> None:
        self._drop_received()
        if self._recv_error is None and not self._eof:
            self._recv_error = StreamResetError(
                self.connection._peer_label, f"the peer reset stream {self.stream_id} (code 0x{code:x})", code
            )
        self._eof = True
        self._wake_reader()
        self._maybe_forget()

    def _on_stop_sending(self, code: int) -> None:
        # aioquic has already reset our sending side in answer
        if not self._send_ended:
            self._send_error = StreamResetError(
                self.connection._peer_label,
                f"the peer stopped reading stream {self.stream_id} (code 0x{code:x})",
                code,
            )
        self._send_ended = True
        self._wake_writer()
        self._maybe_forget()

    def _on_connection_closed(self, error: ConnectionClosedError) -> None:
        if self._recv_error is None and not self._eof:
            self._recv_error = error
        if self._send_error is None and not self._send_ended:
            self._send_error = error
        self._drop_received()
        self._wake_reader()
        self._wake_writer()

    def _stop_receiving(self, code: int) -> None:
        if self._eof or self._recv_stopped:
            return
        with contextlib.suppress(ValueError):  # aioquic already discarded it: nothing to stop
            self.connection._quic.stop_stream(self.stream_id, int(code))

    def _drop_received(self) -> None:
        self._frames.clear()
        conn = self.connection
        conn._partial -= self._partial
        self._partial = 0
        conn._quic.forget_stream(self.stream_id)

    def _maybe_forget(self) -> None:
        if self._send_ended and (self._eof or self._recv_stopped or self._recv_error is not None):
            self.connection._forget(self)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def _wait(waiter: asyncio.Future[None], timeout: float | None) -> None:
    """Await `waiter`, raising TimeoutError after `timeout` s.

    Cheaper than `asyncio.timeout()` (one timer handle, no task cancellation), which matters on
    the per-request path.
    """
    if timeout is None:
        await waiter
        return
    handle = asyncio.get_running_loop().call_later(timeout, _expire, waiter)
    try:
        await waiter
    finally:
        handle.cancel()


def _clip(reason: str) -> str:
    data = reason.encode("utf-8")[:_MAX_REASON]
    return data.decode("utf-8", errors="ignore")


def _error_fields(body: Any) -> tuple[str, str]:
    if isinstance(body, Mapping):
        return str(body.get("code", "ERROR")), str(body.get("message", ""))
    return "ERROR", ""


def error_body(code: str, message: str) -> dict[str, str]:
    """The body of an `error` reply frame."""
    return {"code": code, "message": message}


def serve_requests(
    handler: RequestHandler | Mapping[str, RequestHandler], *, timeout: float = 30.0
) -> StreamHandler:
    """Adapt a request handler (or a map of type name → handler) to an `on_stream` callback.

    Each peer stream carries one request frame and gets one reply frame, then ends. An unknown
    type, or a handler raising an SptError, gets an `error` reply with a clear message; any other
    exception is logged with its traceback and answered with a generic `error`. Malformed framing
    never reaches the handler: the connection is closed for it (see `Connection`).
    """
    table: Mapping[str, RequestHandler] | None = None
    single: RequestHandler | None = None
    if isinstance(handler, Mapping):
        table = handler
    else:
        single = handler

    async def on_stream(conn: Connection, stream: Stream) -> None:
        try:
            frame = await stream.recv(timeout=timeout)
        except (ConnectionClosedError, StreamResetError):
            return  # the peer gave up on the request; nothing to answer
        except PeerTimeoutError:
            log.info(
                "no request arrived on a peer stream",
                extra={"peer": conn._peer_label, "stream_id": stream.stream_id},
            )
            stream.reset(CloseCode.CANCELLED)
            return
        if frame is None:
            return
        trace.mark("quic", frame.type, "in")
        reply: tuple[str, Any]
        try:
            chosen = single if table is None else table.get(frame.type)
            if chosen is None:
                known = ", ".join(sorted(table or ())) or "none"
                raise UnknownFrameTypeError(
                    frame.type, f"unknown frame type {frame.type!r}; this node serves: {known}"
                )
            reply = await chosen(conn, frame)
        except UnknownFrameTypeError as exc:
            log.info(
                "refused a request of unknown type",
                extra={"peer": conn._peer_label, "type": frame.type[:64], "reason": exc.message},
            )
            reply = (
                ERROR_TYPE,
                error_body(exc.instance_token, exc.message or f"unknown frame type {frame.type!r}"),
            )
        except SptError as exc:
            log.info(
                "request refused",
                extra={"peer": conn._peer_label, "type": frame.type, "reason": exc.status_line()},
            )
            reply = (ERROR_TYPE, error_body(exc.instance_token, exc.message or exc.subject))
        except Exception:
            log.exception("request handler failed", extra={"peer": conn._peer_label, "type": frame.type})
            reply = (ERROR_TYPE, error_body("INTERNAL", f"the node failed while handling {frame.type!r}"))
        await stream.send(reply[0], reply[1], req_id=frame.req_id, end=True)
        trace.mark("quic", frame.type, "answered")

    return on_stream
