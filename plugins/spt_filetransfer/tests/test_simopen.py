"""simopen.open_direct on a socket whose descriptor is past 1023 (a busy daemon's): select.select
refused such a descriptor with ValueError, which failed the transfer instead of falling back.
Real sockets on loopback."""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Iterator

import pytest
from spt_filetransfer import simopen

HIGH_FD = 1500


@pytest.fixture
def high_fd_room() -> Iterator[None]:
    """Room for descriptor HIGH_FD: the soft limit raised within the hard one, restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft > HIGH_FD + 10:
        yield
        return
    want = HIGH_FD + 100
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the hard descriptor limit {hard} leaves no room for fd {HIGH_FD}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _reserved_high() -> socket.socket:
    """`simopen.reserve()`, moved onto descriptor HIGH_FD (or the first free one above it)."""
    low = simopen.reserve("127.0.0.1")
    try:
        fd = HIGH_FD
        while fd < HIGH_FD + 50:
            try:
                os.fstat(fd)  # taken: try the next
                fd += 1
            except OSError:
                break
        os.dup2(low.fileno(), fd)
    finally:
        low.close()
    sock = socket.socket(fileno=fd)
    assert sock.fileno() >= 1024
    return sock


def test_a_direct_open_from_a_descriptor_past_1023_connects(high_fd_room):
    server = socket.create_server(("127.0.0.1", 0))
    try:
        sock = _reserved_high()
        conn = simopen.open_direct(sock, server.getsockname()[:2], deadline=time.monotonic() + 5)
        try:
            accepted, _ = server.accept()
            conn.sendall(b"hi")
            assert accepted.recv(2) == b"hi"
            accepted.close()
        finally:
            conn.close()
    finally:
        server.close()


def test_a_refused_direct_open_from_a_descriptor_past_1023_fails_as_oserror(high_fd_room):
    closed = socket.socket()  # bound, never listening: each connect is refused
    closed.bind(("127.0.0.1", 0))
    try:
        sock = _reserved_high()
        started = time.monotonic()
        with pytest.raises(OSError) as failed:  # what the sender takes as a failed try, then falls back
            simopen.open_direct(sock, closed.getsockname()[:2], deadline=time.monotonic() + 5)
        assert not isinstance(failed.value, TimeoutError)
        assert time.monotonic() - started < 3  # MAX_TRIES quick refusals, not the deadline
        assert sock.fileno() == -1  # open_direct closed it
    finally:
        closed.close()
