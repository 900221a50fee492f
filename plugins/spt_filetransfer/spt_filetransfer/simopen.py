"""A direct TCP connection through two NATs by simultaneous open (docs/design/tcp-simultaneous-open.md).

Each end reserves a TCP port, and the two exchange ports over their member connection; each
knows the other's public address (where that connection comes from) and predicts the other's
public port to be the one it reserved (a NAT that kept the node's UDP port keeps a free TCP port
too: Linux `MASQUERADE` and most home routers preserve the source port). Then both connect from
their port to the other's. The first SYN to leave opens its own NAT and is dropped at the other
NAT, which has no mapping yet; the other end's SYN then finds the first NAT open, and the kernel
that is still in SYN_SENT takes it as a simultaneous open: one connection results, as soon as
the later end has connected (its SYN is what completes it; the earlier end need not retransmit).

A connect that is refused or reset (a NAT that answers an unmapped SYN with a reset from its own
stack, as the lab's Linux routers do unless told to drop) is tried again from the same port, at
most `MAX_TRIES` times, within the deadline. What authenticates the connection is the keyed
handshake of `channel.py` that runs next: a stranger who wins the race has no key and gets
nothing.

Blocking; run it on a thread. Bounded by `deadline` (time.monotonic) and `MAX_TRIES` connects.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from typing import Final

__all__ = ["MAX_TRIES", "open_direct", "reserve"]

MAX_TRIES: Final = 3
RETRY_PAUSE: Final = 0.1
_RETRY_ERRORS: Final = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH}


def _bound(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def reserve(host: str = "") -> socket.socket:
    """A TCP socket bound to a fresh port (its number goes to the peer), for `open_direct`."""
    return _bound(host, 0)


def _connected(conn: socket.socket, deadline: float) -> int:
    """The outcome of `conn`'s connect in progress (0, an errno, or ETIMEDOUT at `deadline`).
    A selector, not select.select, which refuses descriptors past 1023 with ValueError."""
    with selectors.DefaultSelector() as selector:
        selector.register(conn, selectors.EVENT_WRITE)
        ready = selector.select(max(0.0, deadline - time.monotonic()))
    return conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if ready else errno.ETIMEDOUT


def open_direct(sock: socket.socket, peer: tuple[str, int], *, deadline: float) -> socket.socket:
    """The direct TCP connection with `peer` (blocking; a connected blocking socket), or
    TimeoutError at `deadline` / OSError when refused `MAX_TRIES` times. `sock` comes from
    `reserve()`; it is used or closed here."""
    host, port = sock.getsockname()[:2]
    fresh: socket.socket | None = sock
    code = errno.ETIMEDOUT
    try:
        for _ in range(MAX_TRIES):
            if time.monotonic() >= deadline:
                break
            conn: socket.socket | None = fresh if fresh is not None else _bound(host, port)
            fresh = None
            try:
                assert conn is not None
                conn.setblocking(False)
                code = conn.connect_ex(peer)
                if code == errno.EINPROGRESS:
                    code = _connected(conn, deadline)
                if code == 0:
                    conn.setblocking(True)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    good, conn = conn, None
                    return good
            finally:
                if conn is not None:
                    conn.close()
            if code not in _RETRY_ERRORS:
                break
            time.sleep(min(RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
        if code == errno.ETIMEDOUT:
            raise TimeoutError(f"no direct TCP connection with {peer[0]}:{peer[1]} in time")
        raise OSError(code, f"no direct TCP connection with {peer[0]}:{peer[1]}: {errno.errorcode.get(code, code)}")
    finally:
        if fresh is not None:
            fresh.close()
