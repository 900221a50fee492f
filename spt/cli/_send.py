"""`spt send` without click: the one command agents run per message, kept cheap.

`spt send` must start fast (DESIGN.md §4: measured against `python3 -c pass`), and importing
click costs more than everything else it does. So the entry point hands plain `spt send ADDRESS
[--from ID] [--active-only|--deferred|--idle-only] [--json-payload JSON]` to `fast_send`; any
other shape (help, unknown or global options) returns None and goes to the click command, which
calls the same `send_message`. Only the argument parsing exists twice, and a test compares the
two paths' output.
"""

from __future__ import annotations

import os
import sys

from spt.cli._output import emit, report
from spt.core.errors import EXIT_INTERNAL, SptError, UsageError

_VALUE_OPTIONS = {"--from": "from_id", "--json-payload": "json_payload"}
_FLAGS = {"--active-only": "active_only", "--deferred": "deferred", "--idle-only": "idle_only"}
_IGNORED = {"--json"}  # SPEC.md §3.1: action commands ignore --json in either position


def identity(from_id: str | None) -> str | None:
    """SPEC.md §3.1: `--from`, else `SPT_AGENT_ID`, else none."""
    return from_id or os.environ.get("SPT_AGENT_ID") or None


def read_body() -> str:
    from spt.core.proto.body import MAX_BODY_BYTES, check_body

    raw = sys.stdin.buffer.read(MAX_BODY_BYTES + 1) if sys.stdin is not None else b""
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


def fast_send(args: list[str]) -> int | None:
    """Run `spt send ARGS` if they are of the plain shape; None hands them to click."""
    options: dict[str, object] = {"from_id": None, "json_payload": None, "active_only": False,
                                  "deferred": False, "idle_only": False}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in _VALUE_OPTIONS:
            if not eq:
                if i + 1 >= len(args):
                    return None
                i += 1
                value = args[i]
            options[_VALUE_OPTIONS[name]] = value
        elif arg in _FLAGS:
            options[_FLAGS[arg]] = True
        elif arg in _IGNORED:
            pass
        elif arg.startswith("-") and arg != "-":
            return None  # --help, unknown options: click explains them
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 1:
        return None
    try:
        send_message(positional[0], **options)  # type: ignore[arg-type]
    except SptError as exc:
        return report(exc)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        sys.stderr.write(f"spt: internal error: {type(exc).__name__}: {exc} (this is a bug; rerun with --debug)\n")
        return EXIT_INTERNAL
    return 0
