"""The relay's UDP frames over its TLS/TCP listener, for networks that block UDP (SPEC.md §7.6).

A node whose UDP datagrams never reach the relay opens a TLS connection to the relay's TCP
listener (pinned to the relay's key, `tcp.py`), says kind `0x20`, and from then on both ends
carry, length-prefixed, exactly the datagrams they would have sent each other by UDP: the
node's QUIC packets to the relay (registration, rendezvous) and the relay's forwarding frames
(`0x01`/`0x02`, §7.6) with the QUIC packets of the node's member connections inside. Each end
plugs the tunnel into its transport (`Transport.set_tunnel` / `tunnel_received`) in place of
the UDP socket for that one address, so every protocol above runs unchanged, and what the relay
sees is still QUIC ciphertext it cannot open.

Framing: `u16 length ‖ datagram`, 1 ≤ length ≤ MAX_DATAGRAM. A datagram that does not fit in the
send buffer is dropped, as UDP would drop it; QUIC retransmits what matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from collections.abc import Callable
from typing import Final

from spt.core.identity import NodeId
from spt_relay_fallback.tcp import (
    KIND_UDP_FRAMES,
    STATUS_MATCHED,
    TICKET_BYTES,
    TransitError,
    check_relay_key,
    client_context,
)

log = logging.getLogger(__name__)

HEADER: Final = struct.Struct("!H")
MAX_DATAGRAM: Final = 65535
SEND_BUFFER_LIMIT: Final = 4 * 1024 * 1024  # bytes queued on the TLS connection before we drop
CONNECT_TIMEOUT: Final = 5.0


def sender(writer: asyncio.StreamWriter) -> Callable[[bytes], None]:
    """A `send(datagram)` for `Transport.set_tunnel` that frames onto `writer`, dropping when full."""

    def send(data: bytes) -> None:
        if not 0 < len(data) <= MAX_DATAGRAM or writer.is_closing():
            return
        if writer.transport.get_write_buffer_size() > SEND_BUFFER_LIMIT:
            return  # congested: lost, like a UDP datagram
        writer.write(HEADER.pack(len(data)) + data)

    return send


async def pump(reader: asyncio.StreamReader, deliver: Callable[[bytes], None]) -> None:
    """Hand each framed datagram to `deliver` until the connection ends (or breaks the framing)."""
    while True:
        try:
            (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
            if length == 0:
                raise ValueError("an empty datagram frame")
            data = await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ValueError):
            return
        try:
            deliver(data)
        except Exception:  # one bad datagram costs itself, never the tunnel
            log.exception("a tunnelled datagram could not be handled")


class NodeTunnel:
    """The node's end: a pinned TLS connection to the relay's listener carrying our datagrams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, host: str, port: int, relay: NodeId) -> NodeTunnel:
        """Connect, check the relay's key, ask for kind 0x20; TransitError or OSError on failure."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=client_context()), CONNECT_TIMEOUT
        )
        try:
            check_relay_key(writer.get_extra_info("ssl_object").getpeercert(binary_form=True), relay)
            writer.write(bytes((KIND_UDP_FRAMES,)) + bytes(TICKET_BYTES))
            await writer.drain()
            status = await asyncio.wait_for(reader.readexactly(1), CONNECT_TIMEOUT)
            if status != bytes((STATUS_MATCHED,)):
                raise TransitError(relay.short, "the relay refused to carry UDP frames over TCP")
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer)

    def start(self, deliver: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """Begin handing received datagrams to `deliver`; returns the `send` for the transport."""
        self.task = asyncio.get_running_loop().create_task(pump(self.reader, deliver), name="relay tunnel")
        return sender(self.writer)

    @property
    def closed(self) -> bool:
        return self.writer.is_closing() or (self.task is not None and self.task.done())

    async def close(self) -> None:
        self.writer.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
