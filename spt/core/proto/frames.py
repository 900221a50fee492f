"""The frame codec: how spt messages are cut out of a QUIC stream's bytes. Sans-IO.

A frame on the wire is a big-endian u32 payload length, then that many bytes of msgpack: a map
with the protocol version `v`, the type name `t`, an optional request id `id` and the body `b`
(any msgpack value). `encode_frame` builds one; `FrameDecoder` is fed bytes in whatever pieces
the stream delivers and hands back whole `Frame`s.

Rules of this module:

1. No sockets, clocks, asyncio or threads; feed bytes in, take frames out.
2. Everything the peer can send is validated here, and the only exception a bad peer can provoke
   is `FrameError` (a `RemoteProtocolError`). Our own bad input raises `LocalProtocolError`.
3. Type names are opaque: whether a type is known is the dispatcher's business, not the codec's.
4. A decoder that raised is poisoned: every later call raises the same error, so a caller that
   forgets to stop cannot resynchronise on garbage.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from spt.core.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["MAX_FRAME", "PROTOCOL_VERSION", "Frame", "FrameDecoder", "FrameError", "encode_frame"]

PROTOCOL_VERSION: Final = 1
MAX_FRAME: Final = 16 * 1024 * 1024
"""Largest payload (the bytes after the length prefix) either side may send, in bytes."""
MAX_TYPE_NAME: Final = 128
HEADER: Final = 4

_LENGTH = struct.Struct(">I")


class FrameError(RemoteProtocolError):
    """The peer sent bytes that are not a valid frame; close what carried them."""

    token = "BAD_FRAME"


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded message. `size` is the bytes it took on the wire (0 for frames built locally)."""

    type: str
    body: Any = None
    req_id: int | None = None
    size: int = field(default=0, compare=False, repr=False)


class _Wire(msgspec.Struct, omit_defaults=True):
    v: int
    t: str
    id: int | None = None
    b: Any = None


def _refuse_ext(code: int, data: memoryview) -> Any:
    # msgpack extension types carry nothing spt defines; accepting them would hand handlers
    # objects they never asked for.
    raise ValueError(f"msgpack extension type {code} is not allowed in frames")


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(_Wire, ext_hook=_refuse_ext)


def encode_frame(type_name: str, body: Any = None, *, req_id: int | None = None) -> bytes:
    """The wire bytes of one frame. Raises LocalProtocolError for a bad name or oversized body."""
    if not type_name or len(type_name) > MAX_TYPE_NAME:
        raise LocalProtocolError(type_name, f"a frame type name is 1–{MAX_TYPE_NAME} characters")
    if req_id is not None and req_id < 0:
        raise LocalProtocolError(str(req_id), "a request id is a non-negative integer")
    buf = bytearray(HEADER)
    try:
        _ENCODER.encode_into(_Wire(PROTOCOL_VERSION, type_name, req_id, body), buf, HEADER)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(type_name, f"frame body cannot be encoded as msgpack: {exc}") from exc
    size = len(buf) - HEADER
    if size > MAX_FRAME:
        raise LocalProtocolError(
            type_name, f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit; split it"
        )
    _LENGTH.pack_into(buf, 0, size)
    return bytes(buf)


class FrameDecoder:
    """Incremental decoder for one byte stream. Not thread-safe; one per QUIC stream."""

    __slots__ = ("_buf", "_error", "_max_frame", "_need")

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._error: FrameError | None = None
        self._max_frame = max_frame
        self._need = HEADER  # bytes the buffer must hold before parsing is worth trying

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every frame they complete, in order. Raises FrameError only."""
        if self._error is not None:
            raise self._error
        try:
            if not self._buf and len(data) >= HEADER:
                # common case: exactly one whole frame in one piece; decode it without copying
                (size,) = _LENGTH.unpack_from(data, 0)
                if size + HEADER == len(data) and 0 < size <= self._max_frame:
                    with memoryview(data) as view, view[HEADER:] as payload:
                        return [_decode(payload, len(data))]
            self._buf += data
            if len(self._buf) < self._need:
                return []
            return self._drain()
        except FrameError as exc:
            self._error = exc
            self._buf = bytearray()
            raise

    def eof(self) -> None:
        """The stream ended; raises FrameError if it ended inside a frame."""
        if self._error is not None:
            raise self._error
        if self._buf:
            self._error = FrameError(
                "", f"stream ended inside a frame ({len(self._buf)} bytes of an incomplete frame)"
            )
            self._buf = bytearray()
            raise self._error

    def _drain(self) -> list[Frame]:
        frames: list[Frame] = []
        buf = self._buf
        end = len(buf)
        pos = 0
        with memoryview(buf) as view:
            while end - pos >= HEADER:
                (size,) = _LENGTH.unpack_from(buf, pos)
                if size > self._max_frame:
                    raise FrameError(
                        str(size), f"frame length {size} exceeds the {self._max_frame}-byte limit"
                    )
                if size == 0:
                    raise FrameError("0", "frame length 0 leaves no room for the header map")
                if end - pos - HEADER < size:
                    break
                start = pos + HEADER
                # released explicitly: a traceback holding the slice would pin the buffer's size
                with view[start : start + size] as payload:
                    frames.append(_decode(payload, size + HEADER))
                pos = start + size
        if pos:
            del buf[:pos]
        remaining = len(buf)
        if remaining >= HEADER:
            (size,) = _LENGTH.unpack_from(buf, 0)
            self._need = HEADER + size
        else:
            self._need = HEADER
        return frames


def _decode(payload: memoryview, wire_size: int) -> Frame:
    problem = ""
    try:
        wire = _DECODER.decode(payload)
    except msgspec.ValidationError as exc:
        problem = f"frame header map is malformed: {exc}"
    except (msgspec.MsgspecError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        problem = f"frame is not valid msgpack: {exc}"
    if problem:
        # raised outside the handler on purpose: a chained exception's traceback would keep a
        # view of the decoder's buffer alive
        raise FrameError("", problem)
    if wire.v != PROTOCOL_VERSION:
        raise FrameError(
            str(wire.v), f"unsupported frame version {wire.v}; this node speaks {PROTOCOL_VERSION}"
        )
    if not wire.t or len(wire.t) > MAX_TYPE_NAME:
        raise FrameError(wire.t[:MAX_TYPE_NAME], f"frame type name must be 1–{MAX_TYPE_NAME} characters")
    if wire.id is not None and wire.id < 0:
        raise FrameError(str(wire.id), "request id must be non-negative")
    return Frame(wire.t, wire.b, wire.id, wire_size)
