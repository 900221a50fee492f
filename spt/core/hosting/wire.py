"""Frames on a host process's Unix socket: a 4-byte big-endian length, then a msgpack map.

Every map has `t`, its type. A client's first frame says what the connection is for:
- `attach` {offset|None, replay, read_only, rows, cols, viewer, run}: a viewer (`run`: the `pid`
  of the hello it had before; offsets of another run are not resumed). The host answers
  `hello` {start, end, pid}, then `lost` {from, to} when `offset` fell out of the buffer, then
  `out` {off, data} frames in order, and `ended` {exit, end} once the process ended and every
  byte was sent. The viewer may send `input` {seq, data} (acknowledged by `ack` {seq}; applied
  once per viewer id whatever is resent; the ack may instead ride the next `out` frame as its
  `ack` field) and `resize` {rows, cols}.
- `watch`: the daemon's watcher; answered `status`, then `ended` {exit, end} when the process ends.
- `signal` {sig}: signal the hosted process group; answered `status`.
- `status`: answered `status` {pid, host_pid, end, exit|None, stopped}.

A host socket is 0600 in a 0700 folder of the state folder: only the node's own user reaches it.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Final

import msgspec

MAX_FRAME: Final = 1024 * 1024
CHUNK: Final = 64 * 1024  # output bytes per `out` frame

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict[str, Any])


class WireError(Exception):
    """A malformed or oversized frame: the connection is dropped."""


def encode(msg: dict[str, Any]) -> bytes:
    body = _encoder.encode(msg)
    return struct.pack(">I", len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next frame, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise WireError("truncated frame header") from None
        return None
    (size,) = struct.unpack(">I", head)
    if size > MAX_FRAME:
        raise WireError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise WireError("truncated frame") from None
    try:
        msg = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise WireError(f"undecodable frame: {exc}") from None
    if not isinstance(msg.get("t"), str):
        raise WireError("a frame names its type in 't'")
    return msg
