"""`spt send`'s body, click-free: the one command agents run per message, kept cheap.

Both the plain path (`_fast.py`) and the click command call `send_message`; `spt ring` shares
the identity, body and window helpers.
"""

from __future__ import annotations

import os
import sys

from spt.cli._output import emit
from spt.core.errors import UsageError


def identity(from_id: str | None) -> str | None:
    """SPEC.md §3.1: `--from`, else `SPT_AGENT_ID`, else none."""
    return from_id or os.environ.get("SPT_AGENT_ID") or None


def read_body() -> str:
    from spt.core.proto.body import MAX_BODY_BYTES, check_body

    if sys.stdin is None:
        return check_body(b"")
    if sys.stdin.isatty() and sys.stderr.isatty():  # else it looks hung (SPEC.md §3.1: hints on stderr)
        sys.stderr.write("spt: type the message, then Ctrl-D on a line of its own\n")
        sys.stderr.flush()
    raw = sys.stdin.buffer.read(MAX_BODY_BYTES + 1)
    return check_body(raw)


def window(active_only: bool, deferred: bool, idle_only: bool) -> str:
    if (active_only or deferred) and idle_only:
        raise UsageError("BAD_USAGE", "", "--active-only and --idle-only exclude each other")
    if active_only or deferred:
        return "active"
    return "idle" if idle_only else "default"


def send_message(
    address: str, *, from_id: str | None, active_only: bool, deferred: bool, idle_only: bool,
    json_payload: str | None,
) -> None:
    """Send stdin to `address` and print SENT or QUEUED (SPEC.md §3.7)."""
    from spt.cli._state import daemon_call

    chosen = window(active_only, deferred, idle_only)
    body = read_body()
    doc = daemon_call(
        "msg.send",
        {"address": address, "from": identity(from_id), "body": body, "json": json_payload, "window": chosen},
    )
    emit(doc["token"], address)
