"""The control channel between the CLI and the daemon: JSON lines over a Unix socket.

One request per connection: the client sends `{"v": 1, "op": ..., "args": {...}}`; the daemon
answers with zero or more `{"event": ...}` lines (streams such as `spt ready`), then one
`{"result": ...}` or `{"error": {...}}` line. A streaming client may send further lines (acks).

This module is the client half and the wire helpers. It is imported by every CLI command, so it
stays on the standard library's blocking sockets: no asyncio, no crypto, and not even `socket`,
`pathlib` or `typing` at run time (their imports cost more than a control call takes): the raw
`_socket` module and a line buffer of its own. The daemon's half lives in `spt.core.daemon`.
"""

from __future__ import annotations

import _socket
import json
import os
import sys
import time

from spt.core.errors import DaemonDown, SptError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from typing import Any, Final

PROTOCOL_VERSION: Final = 1
MAX_LINE: Final = 8 * 1024 * 1024
AUTOSTART_WAIT: Final = 15.0
_RECV: Final = 64 * 1024


def read_request(raw: bytes) -> tuple[str, dict[str, Any], bool]:
    """A client's request line as (op, args, interactive); ValueError when it is not one (any
    process the socket lets in may send it). Pure: a fuzz target (tests/fuzz)."""
    try:
        req = json.loads(raw)
    except RecursionError:  # nesting deeper than the parser's stack: no request is like that
        raise ValueError("nested too deeply") from None
    if not isinstance(req, dict) or req.get("v") != PROTOCOL_VERSION or not isinstance(req.get("op"), str):
        raise ValueError("not a control request")
    args = req.get("args") or {}
    if not isinstance(args, dict):
        raise ValueError("args is not a map")
    return req["op"], args, bool(req.get("interactive"))


def encode_line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class IpcConnection:
    """A connected control socket; `send()` writes a request or ack line, `lines()` reads answers."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def send(self, obj: Mapping[str, Any]) -> None:
        try:
            self.sock.sendall(encode_line(obj))
        except (BrokenPipeError, ConnectionResetError):  # the daemon died (kill -9): not a bug here
            raise DaemonDown("", "the daemon closed the control connection") from None

    def _readline(self) -> bytes:
        """One line with its newline; b"" once the daemon closed the connection."""
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                return line
            if len(self._buf) > MAX_LINE:
                raise DaemonDown("", f"the daemon sent an answer line over {MAX_LINE} bytes")
            start = len(self._buf)
            chunk = self.sock.recv(_RECV)
            if not chunk:
                return b""  # a partial line without its newline is no answer either
            self._buf += chunk

    def lines(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Answer lines as dicts until the final one; `timeout` bounds the wait for each line."""
        self.sock.settimeout(timeout)
        while True:
            try:
                raw = self._readline()
            except TimeoutError:
                raise DaemonDown("", "the daemon did not answer in time") from None
            except ConnectionResetError:
                raise DaemonDown("", "the daemon closed the control connection") from None
            if not raw:
                raise DaemonDown("", "the daemon closed the control connection")
            msg = json.loads(raw)
            if not isinstance(msg, dict):
                raise DaemonDown("", "the daemon sent a malformed answer")
            yield msg
            if "result" in msg or "error" in msg:
                return

    def close(self) -> None:
        self.sock.close()


def connect(socket_path: str | os.PathLike[str]) -> IpcConnection:
    """Connect to a running daemon; raises DaemonDown when none listens there."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(socket_path))
    except PermissionError:
        sock.close()
        raise DaemonDown(
            "", f"the control socket {os.fspath(socket_path)} belongs to another user; run spt as that user"
        ) from None
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise DaemonDown("", f"no daemon listens on {os.fspath(socket_path)}") from None
    return IpcConnection(sock)


def start_daemon(state_root: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> None:
    """Start `spt daemon run` detached, its output appended to the state folder's log."""
    import subprocess

    root = os.fspath(state_root)
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o700)
    child_env = dict(os.environ if env is None else env)
    child_env["SPT_HOME"] = root
    # An elevated command (sudo) must not leave a root daemon on the user's state folder.
    uid = gid = None
    if os.geteuid() == 0 and child_env.get("SUDO_UID", "").isdigit() and child_env.get("SUDO_GID", "").isdigit():
        uid, gid = int(child_env["SUDO_UID"]), int(child_env["SUDO_GID"])
    with open(os.path.join(root, "daemon.log"), "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "spt", "daemon", "run"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=child_env,
            start_new_session=True,
            close_fds=True,
            user=uid,
            group=gid,
        )


def connect_or_start(state_root: str | os.PathLike[str], *, autostart: bool) -> IpcConnection:
    """Connect, starting the daemon first when allowed (SPEC.md §3.1, `SPT_NO_AUTOSTART`)."""
    root = os.fspath(state_root)
    socket_path = os.path.join(root, "spt.sock")
    try:
        return connect(socket_path)
    except DaemonDown as exc:
        if not autostart:  # say how to get one: `spt daemon start` is not a command
            raise DaemonDown("", f"{exc.message} (spt daemon run runs it in the foreground; any other command "
                             "starts it unless SPT_NO_AUTOSTART=1)") from None
    start_daemon(root)
    deadline = time.monotonic() + AUTOSTART_WAIT
    delay = 0.01
    while time.monotonic() < deadline:
        time.sleep(delay)
        # a refused connect costs microseconds; a long pause here is added to the command's time
        delay = min(delay * 1.5, 0.03)
        try:
            return connect(socket_path)
        except DaemonDown as exc:
            last = exc
    log = os.path.join(root, "daemon.log")
    raise DaemonDown("", f"the daemon did not start within {AUTOSTART_WAIT:.0f} s; see {log}") from last


def call(
    conn: IpcConnection,
    op: str,
    args: Mapping[str, Any] | None = None,
    *,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout: float | None = 60.0,
    interactive: bool = False,
) -> Any:
    """Send one request and return its result; an error answer is raised as an SptError."""
    conn.send({"v": PROTOCOL_VERSION, "op": op, "args": dict(args or {}), "interactive": interactive})
    for msg in conn.lines(timeout):
        if "event" in msg:
            if on_event is not None:
                on_event(msg["event"])
        elif "error" in msg:
            raise SptError.from_wire(msg["error"])
        else:
            banner = msg.get("banner")
            if isinstance(banner, str) and banner:
                sys.stderr.write(banner.splitlines()[0] + "\n")  # SPEC.md §8.4: one line
            return msg.get("result")
    raise DaemonDown("", "the daemon closed the control connection")
