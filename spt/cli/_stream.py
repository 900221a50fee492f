"""`spt ring` and `spt ready`, click-free: what agents run per message and per poll.

Delivery is exactly once because of the order here: an envelope is written and flushed to
stdout, and only then acknowledged on the control connection (SPEC.md §4.2 step 6). SIGINT and
SIGTERM end `ready` and `ring` with exit 0, but never between that flush and its ack. A daemon
killed after the ack left but before it recorded it hands the message out again once it is back;
the listener, which outlived it, remembers what it acked and acks such a copy without printing it.

Both the plain path (`_fast.py`) and the click commands in `messaging.py` call `ring_message`
and `listen`; like the control client, this module stays off click, typing and contextlib.
"""

from __future__ import annotations

import os
import signal
import sys

from spt.cli._output import emit, out
from spt.cli._send import identity, read_body, window
from spt.cli._state import is_interactive
from spt.core.errors import SptError, UsageError
from spt.core.paths import state_root

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType
    from typing import Any

    from spt.core.ipc import IpcConnection


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived outside an envelope's flush-then-ack."""


class Stream:
    """Writes envelopes to stdout and acks them; defers signals while one is in flight."""

    ACKED_REMEMBERED = 4096  # far more than a daemon can have in flight when it dies

    def __init__(self) -> None:
        self.conn: IpcConnection | None = None
        self._critical = False
        self._pending = False
        self._acked: dict[str, None] = {}  # insertion-ordered: the oldest goes first

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._critical:
            self._pending = True
            return
        raise _Interrupted

    def envelope(self, event: dict[str, Any]) -> None:
        """One envelope line; after the last line of a message, flush and then ack it."""
        self._critical = True
        msg = str(event["msg"])
        if msg not in self._acked:  # else a restarted daemon's copy of one already printed
            sys.stdout.write(str(event["line"]) + "\n")
        if event.get("last"):
            sys.stdout.flush()
            assert self.conn is not None
            self.conn.send({"ack": msg})
            self._acked[msg] = None
            if len(self._acked) > self.ACKED_REMEMBERED:
                del self._acked[next(iter(self._acked))]
            self._critical = False
            if self._pending:
                raise _Interrupted

    def run(self, op: str, args: dict[str, Any], on_event: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
        """Call a streaming op; None when interrupted by a signal."""
        from spt.core.ipc import call, connect_or_start

        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.conn = connect_or_start(state_root(), autostart=os.environ.get("SPT_NO_AUTOSTART") != "1")
            try:
                result = call(self.conn, op, args, on_event=on_event, timeout=None, interactive=is_interactive())
            finally:
                self.conn.close()
        except _Interrupted:
            return None
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return result if isinstance(result, dict) else {}


def ring_message(
    address: str, *, from_id: str | None, active_only: bool, deferred: bool, idle_only: bool,
    json_payload: str | None, timeout: float,
) -> None:
    """Send stdin to `address` and print the reply envelope, else TIMEOUT (SPEC.md §3.7)."""
    chosen_window = window(active_only, deferred, idle_only)
    body = read_body()
    stream = Stream()

    def on_event(event: dict[str, Any]) -> None:
        if "sent" in event:
            emit(str(event["sent"]), address, err=True)
        elif "line" in event:
            stream.envelope(event)

    args = {
        "address": address,
        "from": identity(from_id),
        "body": body,
        "json": json_payload,
        "window": chosen_window,
        "timeout": timeout,
    }
    result = stream.run("msg.ring", args, on_event)
    if result is not None and result.get("timeout"):
        out("TIMEOUT")
        sys.stdout.flush()


RECONNECT_SECONDS = 30.0


def _daemon_back(timeout: float) -> bool:
    """Wait (never starting a daemon: one is on its way back) until the control socket answers."""
    import time

    from spt.core.ipc import connect

    socket_path = os.path.join(state_root(), "spt.sock")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connect(socket_path).close()
            return True
        except SptError:
            time.sleep(0.1)
    return False


def listen(endpoint_id: str | None = None, *, once: bool, subnet: str | None, timeout: float | None) -> None:
    """Listen as `endpoint_id` (default $SPT_AGENT_ID): held messages, then new ones (SPEC.md §3.7)."""
    endpoint_id = endpoint_id or os.environ.get("SPT_AGENT_ID")
    if not endpoint_id:
        raise UsageError("NO_IDENTITY", "", "give an endpoint id or set SPT_AGENT_ID")
    from spt.core.types import check_endpoint_id

    check_endpoint_id(endpoint_id)
    if timeout is not None and not once:
        raise UsageError("BAD_USAGE", "", "--timeout applies only with --once")
    stream = Stream()
    announced = False
    down_since: float | None = None

    def on_event(event: dict[str, Any]) -> None:
        nonlocal announced, down_since
        if "ready" in event:
            down_since = None
            if not announced:  # SPEC.md §8.8: a listener that reconnected does not say READY again
                emit("READY", str(event["ready"]), err=True)
                announced = True
        elif "line" in event:
            stream.envelope(event)

    args = {"id": endpoint_id, "once": once, "subnet": subnet, "timeout": timeout, "cwd": os.getcwd()}
    while True:
        try:
            result = stream.run("endpoint.ready", args, on_event)
            break
        except SptError as exc:
            # The daemon restarted under a listening agent (an update, a stop and start): keep
            # listening once it is back, within RECONNECT_SECONDS; anything else is the error.
            import time

            down_since = down_since or time.monotonic()
            left = down_since + RECONNECT_SECONDS - time.monotonic()
            if exc.instance_token != "DAEMON_DOWN" or not announced or left <= 0 or not _daemon_back(left):
                raise
            time.sleep(0.1)
    if result is None:
        return
    if result.get("timeout"):
        out("TIMEOUT")
        sys.stdout.flush()
    elif result.get("ended"):
        emit(str(result["ended"]), str(result.get("id", endpoint_id)), err=True)
