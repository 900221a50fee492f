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
5. What a frame may cost is bounded by its `FrameLimits`: the payload length, and the number of
   msgpack items in it (every map, array, key and value counts one). Decoding to Python objects
   costs up to ~80 bytes per wire byte (an empty map is one byte on the wire and a 64-byte dict),
   so a limit on bytes alone does not bound memory; the item count does. Peers that proved
   nothing get `OPEN_LIMITS`, members `MEMBER_LIMITS` (DESIGN note: docs/design/wire-limits.md).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from spt.core.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_FRAME",
    "MEMBER_LIMITS",
    "OPEN_LIMITS",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameLimits",
    "decode_payload",
    "encode_frame",
]

PROTOCOL_VERSION: Final = 1
MAX_FRAME: Final = 16 * 1024 * 1024
"""Largest payload (the bytes after the length prefix) either side may send, in bytes."""
MAX_TYPE_NAME: Final = 128
HEADER: Final = 4


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """What one frame may cost: `max_frame` payload bytes, `max_items` msgpack items."""

    max_frame: int
    max_items: int


MEMBER_LIMITS: Final = FrameLimits(MAX_FRAME, 1 << 20)
"""Proved members (and peers we chose to dial): 1 MiB file chunks, manifests of 100,000 files.
At most ~80 MB of objects per frame."""
OPEN_LIMITS: Final = FrameLimits(64 * 1024, 8192)
"""Peers that proved nothing yet (incoming `spt-join/1`, `spt-relay/1`): under 1 MB of objects."""

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

    __slots__ = ("_buf", "_error", "_limits", "_max_frame", "_need")

    def __init__(self, limits: FrameLimits = MEMBER_LIMITS, *, max_frame: int | None = None) -> None:
        if max_frame is not None:
            limits = FrameLimits(max_frame, limits.max_items)
        self._buf = bytearray()
        self._error: FrameError | None = None
        self._limits = limits
        self._max_frame = limits.max_frame
        self._need = HEADER  # bytes the buffer must hold before parsing is worth trying

    @property
    def limits(self) -> FrameLimits:
        return self._limits

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every frame they complete, in order. Raises FrameError only."""
        payloads = self.cut(data)
        try:
            return [decode_payload(p, self._limits) for p in payloads]
        except FrameError as exc:
            self._error = exc
            raise

    def cut(self, data: bytes) -> list[bytes | memoryview]:
        """Add bytes; return the payload (header map and body, undecoded) of every frame they
        complete, in order. Only lengths are checked here; `decode_payload` does the rest, so a
        caller can keep frames as compact bytes until it takes them. Raises FrameError only."""
        if self._error is not None:
            raise self._error
        try:
            if not self._buf and len(data) >= HEADER:
                # common case: exactly one whole frame in one piece; no copy into the buffer
                (size,) = _LENGTH.unpack_from(data, 0)
                if size + HEADER == len(data) and 0 < size <= self._max_frame:
                    # a view of the peer's immutable bytes: the frame's own memory, no copy
                    return [memoryview(data)[HEADER:] if isinstance(data, bytes) else bytes(data[HEADER:])]
            self._buf += data
            if len(self._buf) < self._need:
                self._check_length()
                return []
            return self._drain()
        except FrameError as exc:
            self._error = exc
            self._buf = bytearray()
            raise

    def _check_length(self) -> None:
        # refuse an oversized length as soon as the prefix is in, not after the body
        if len(self._buf) >= HEADER:
            (size,) = _LENGTH.unpack_from(self._buf, 0)
            if size > self._max_frame:
                raise FrameError(str(size), f"frame length {size} exceeds the {self._max_frame}-byte limit")

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

    def _drain(self) -> list[bytes | memoryview]:
        frames: list[bytes | memoryview] = []
        buf = self._buf
        end = len(buf)
        pos = 0
        while end - pos >= HEADER:
            (size,) = _LENGTH.unpack_from(buf, pos)
            if size > self._max_frame:
                raise FrameError(str(size), f"frame length {size} exceeds the {self._max_frame}-byte limit")
            if size == 0:
                raise FrameError("0", "frame length 0 leaves no room for the header map")
            if end - pos - HEADER < size:
                break
            start = pos + HEADER
            frames.append(bytes(buf[start : start + size]))
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


def decode_payload(payload: bytes | memoryview, limits: FrameLimits = MEMBER_LIMITS) -> Frame:
    """One frame from its payload (the bytes after the length prefix). Raises FrameError only."""
    size = len(payload)
    if size == 0:
        raise FrameError("0", "frame length 0 leaves no room for the header map")
    if size > limits.max_frame:
        raise FrameError(str(size), f"frame length {size} exceeds the {limits.max_frame}-byte limit")
    # every item takes at least one byte, so only a payload longer than the item limit can hold
    # too many; the common small frame skips the count
    if size > limits.max_items and _count_items(payload, limits.max_items) > limits.max_items:
        raise FrameError(
            str(size), f"frame holds more than {limits.max_items} msgpack items (maps, arrays, keys, values)"
        )
    return _decode(payload, size + HEADER)


# bytes that follow a msgpack type byte before the next item, for the fixed-size types (0xc0–0xdf)
_FIXED_TAIL: Final = {
    0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,
}
# types whose byte-length follows in 1, 2 or 4 bytes (bin, ext, str); ext adds a type byte
_SIZED: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xC7: 1, 0xC8: 2, 0xC9: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_COUNTED: Final = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # (length bytes, items per entry)


def _count_items(data: bytes | memoryview, limit: int) -> int:
    """msgpack items in `data`, counted without building them; stops once past `limit`.

    Strings and binaries are skipped by their length, so the cost is one step per item. Malformed
    input is not judged here (msgspec does that next): a truncated or invalid byte ends the count.
    """
    end = len(data)
    pos = 0
    pending = 1  # items still expected
    items = 0
    while pending and pos < end:
        b = data[pos]
        pos += 1
        pending -= 1
        items += 1
        if items > limit:
            break
        if b < 0x80 or b >= 0xE0:
            continue  # fixint
        if b < 0x90:
            pending += 2 * (b & 0x0F)
        elif b < 0xA0:
            pending += b & 0x0F
        elif b < 0xC0:
            pos += b & 0x1F
        elif b in _FIXED_TAIL:
            pos += _FIXED_TAIL[b]
        elif b in _SIZED:
            width = _SIZED[b]
            pos += width + int.from_bytes(data[pos : pos + width], "big") + (1 if b in (0xC7, 0xC8, 0xC9) else 0)
        elif b in _COUNTED:
            width, per = _COUNTED[b]
            pending += per * int.from_bytes(data[pos : pos + width], "big")
            pos += width
        else:
            break  # 0xc1 is never used: msgspec refuses it
    return items


def _decode(payload: bytes | memoryview, wire_size: int) -> Frame:
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
