"""A local process sending crafted lines to a daemon's control socket (issue 10). In system mode
the socket lets a group of other users' processes in, so it reads bytes from strangers too: each
malformed request gets BAD_REQUEST, never a traceback in the daemon's log, and the daemon keeps
answering."""

from __future__ import annotations

import contextlib
import socket

import pytest

from spt.core.ipc import MAX_LINE

pytestmark = pytest.mark.slow

CRAFTED = [
    b"[" * 200_000 + b"\n",  # nested past the JSON parser's stack
    b'{"v": 1, "op": "daemon.status", "args": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n",
    b"\xff\xfe\n",
    b"[]\n",
    b'"daemon.status"\n',
    b'{"v": 1}\n',
    b'{"v": 1, "op": 5}\n',
    b'{"v": 1, "op": "daemon.status", "args": [1]}\n',
    b'{"v": 2, "op": "daemon.status"}\n',
    b"x" * (MAX_LINE + 10) + b"\n",  # longer than a line may be
]


def send(path, line: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(line)  # the daemon may answer and close before reading it all
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_crafted_control_lines_are_refused_cleanly(spt_nodes):
    node = spt_nodes("n")
    answers = [send(node.home / "spt.sock", line) for line in CRAFTED]
    assert all(b"BAD_REQUEST" in a for a in answers), answers
    assert node.cli("daemon", "status").returncode == 0
    log = node.log()
    assert "Traceback" not in log and "Unhandled exception" not in log, log[-4000:]
