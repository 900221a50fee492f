"""The bodies of `spt subnet create`, `show-code`, `status` and `join`; click-free, so the plain path of
`_fast.py` and the click commands in `subnet.py` run the same code (`subnet create` ≤ 200 ms is
an issue 14 goal, and a click import is a third of it)."""

from __future__ import annotations

import time

from spt.cli._output import emit, hint, out, print_json
from spt.cli._state import daemon_call, is_interactive, require_elevation
from spt.core.errors import UsageError
from spt.core.types import check_seconds, check_subnet_name

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


def print_code(doc: dict[str, Any], *, qr: bool = True) -> None:
    """`CODE:<name> <dddddd> <n>s`, the otpauth:// URI and its QR code (SPEC.md §3.5)."""
    emit("CODE", doc["name"], f"{doc['code']} {doc['seconds_left']}s")
    out(doc["uri"])
    if qr:
        import io

        import qrcode

        code = qrcode.QRCode(border=1)
        code.add_data(doc["uri"])
        buf = io.StringIO()
        code.print_ascii(out=buf, invert=True)
        out(buf.getvalue().rstrip("\n"))


def print_homed(doc: dict[str, Any]) -> None:
    for endpoint_id in doc.get("homed", []):
        emit("HOMED", endpoint_id, doc["name"])


def create_subnet(name: str, *, allow_duplicate_name: bool) -> None:
    """Mint a subnet and print its joining code [elevated]."""
    check_subnet_name(name)
    require_elevation()
    doc = daemon_call("subnet.create", {"name": name, "allow_duplicate_name": allow_duplicate_name})
    emit("CREATED", doc["name"], f"id={doc['id']}")
    print_code(doc)
    hint(f"Next: on the new machine, in an elevated terminal, run: spt subnet join {doc['name']}")
    print_homed(doc)


def show_subnet_code(name: str | None = None, *, no_qr: bool) -> None:
    """Print the current six digits, the otpauth:// URI and a QR code [elevated]."""
    require_elevation()
    print_code(daemon_call("subnet.show_code", {"name": name}), qr=not no_qr)


def join_subnet(name: str, *, code: str | None, subnet_id: str | None, peers: Sequence[str], timeout: float) -> None:
    """Join a subnet with the code shown on a member [elevated]."""
    check_subnet_name(name)
    timeout = check_seconds(timeout)  # before the code prompt; NaN also broke the call's own timeout
    if subnet_id is not None and not (0 < len(subnet_id) <= 32 and all(c in "0123456789abcdefABCDEF" for c in subnet_id)):
        # else no subnet's id starts with it, and the search ends JOIN_NOT_FOUND
        raise UsageError("BAD_USAGE", subnet_id, "--id is a hex prefix of the subnet id (JOIN_AMBIGUOUS lists them)")
    require_elevation()
    if code is None:
        if not is_interactive():
            raise UsageError("BAD_USAGE", "", "no terminal to prompt for the code; pass --code DDDDDD")
        import click  # only to prompt, as the click command does

        code = click.prompt("Code shown on a member", hide_input=True)
    entered = time.monotonic()
    code = code.strip().replace(" ", "")
    if len(code) != 6 or not (code.isascii() and code.isdigit()):
        raise UsageError("BAD_CODE", "", "a join code is six digits")
    doc = daemon_call(
        "subnet.join",
        {
            "name": name,
            "code": code,
            "id": subnet_id,
            "peers": list(peers),
            "timeout": timeout,
            "entered_ago_ms": int((time.monotonic() - entered) * 1000),
        },
        timeout=timeout + 60,
        # interactive calls get progress events: which member is tried, by which path
        on_event=lambda event: hint(f"spt: {event['progress']}") if "progress" in event else None,
    )
    emit("JOINED", doc["name"])
    print_homed(doc)


def member_line(m: dict[str, Any]) -> str:
    display = f"{m['label']} ({m['key'][:8]}\u2026)"
    if m.get("standing", "member") != "member":
        return f"{display}  {m['standing']}"
    presence = "detached" if m["detached"] else ("online" if m["online"] else "offline")
    path = m.get("path") or {}
    where = path.get("kind", "-" if m["self"] else "none")
    if path.get("addr"):
        where += f" {path['addr']}"
    if path.get("reason"):
        where += f" ({path['reason']})"
    parts = [display, presence, where, m.get("version") or "-"]
    if m["self"]:
        parts.append("(this node)")
    return "  ".join(parts)


def subnet_status(name: str | None = None, *, nodes: bool, show_all: bool, as_json: bool) -> None:
    """Show held subnets (never prints a secret)."""
    nodes = nodes or show_all
    doc = daemon_call("subnet.status", {"name": name, "nodes": nodes, "all": show_all})
    if as_json:
        print_json(doc)
        return
    if not doc["subnets"]:
        out("no subnets")
        return
    rows = [("SUBNET", "NODES", "ENDPOINTS", "")]
    for sub in doc["subnets"]:
        flags = []
        if sub.get("standing"):
            rows.append((sub["name"], "-", "-", sub["standing"]))
            continue
        if not sub["attached"]:
            flags.append("detached")
        if sub.get("conflicts"):
            flags.append("prune-conflict")
        joins = sub["joins"]
        if joins["failed_last_hour"]:
            flags.append(f"joins-failed-1h={joins['failed_last_hour']}")
        if joins["state"] == "locked" and joins["locked_until"]:
            from datetime import datetime  # only here: it costs start-up time

            until = datetime.fromisoformat(joins["locked_until"]).astimezone()
            flags.append(f"joins-locked-until={until:%H:%M}")
        rows.append((sub["name"], str(sub["nodes"]), str(sub["endpoints"]), " ".join(flags)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, row in enumerate(rows):
        out("  ".join(c.ljust(widths[j]) for j, c in enumerate(row[:3])) + ("  " + row[3] if row[3] else ""))
        if i and nodes and "members" in doc["subnets"][i - 1]:
            for m in doc["subnets"][i - 1]["members"]:
                out("  " + member_line(m))
