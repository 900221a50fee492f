"""`spt subnet …`: status, create, join, show-code, detach/attach, leave, prune, unlock."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import click

from spt.cli._complete import subnet_names
from spt.cli._output import emit, hint, out, print_json
from spt.cli._state import daemon_call, is_interactive, require_elevation, state
from spt.core.errors import UsageError


class _SubnetGroup(click.Group):
    """`spt subnet` alone (or with status's options) is `spt subnet status`; an unknown verb is
    an error that names it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # (not while completing: the verbs themselves are what the shell asks for)
        if not ctx.resilient_parsing and (
            not args or (args[0].startswith("-") and args[0] not in ("-h", "--help"))
        ):
            args = ["status", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_SubnetGroup, epilog="\b\nExamples:\n  sudo spt subnet create home\n  sudo spt subnet join home --peer 192.168.1.20:47470\n  spt subnet status --nodes --json\n")
def subnet() -> None:
    """Subnets: named groups of your machines, joined once with a six-digit code."""


def _print_code(doc: dict[str, Any], *, qr: bool = True) -> None:
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


def _member_line(m: dict[str, Any]) -> str:
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


def _print_homed(doc: dict[str, Any]) -> None:
    for endpoint_id in doc.get("homed", []):
        emit("HOMED", endpoint_id, doc["name"])


@subnet.command()
@click.argument("name", required=False, shell_complete=subnet_names)
@click.option("--nodes", is_flag=True, help="One line per member node.")
@click.option("--all", "show_all", is_flag=True, help="Include nodes that left or were pruned.")
@click.pass_context
def status(ctx: click.Context, name: str | None, nodes: bool, show_all: bool) -> None:
    """Show held subnets (never prints a secret)."""
    nodes = nodes or show_all
    doc = daemon_call("subnet.status", {"name": name, "nodes": nodes, "all": show_all})
    if state(ctx).json:
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
            until = datetime.fromisoformat(joins["locked_until"]).astimezone()
            flags.append(f"joins-locked-until={until:%H:%M}")
        rows.append((sub["name"], str(sub["nodes"]), str(sub["endpoints"]), " ".join(flags)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, row in enumerate(rows):
        out("  ".join(c.ljust(widths[j]) for j, c in enumerate(row[:3])) + ("  " + row[3] if row[3] else ""))
        if i and nodes and "members" in doc["subnets"][i - 1]:
            for m in doc["subnets"][i - 1]["members"]:
                out("  " + _member_line(m))


@subnet.command()
@click.argument("name")
@click.option("--allow-duplicate-name", is_flag=True, help="Create even if a subnet of that name answers nearby.")
def create(name: str, allow_duplicate_name: bool) -> None:
    """Mint a subnet and print its joining code [elevated]."""
    from spt.core.types import check_subnet_name

    check_subnet_name(name)
    require_elevation()
    doc = daemon_call("subnet.create", {"name": name, "allow_duplicate_name": allow_duplicate_name})
    emit("CREATED", doc["name"], f"id={doc['id']}")
    _print_code(doc)
    hint(f"Next: on the new machine, in an elevated terminal, run: spt subnet join {doc['name']}")
    _print_homed(doc)


@subnet.command("show-code")
@click.argument("name", required=False, shell_complete=subnet_names)
@click.option("--no-qr", is_flag=True, help="Do not print the QR code.")
def show_code(name: str | None, no_qr: bool) -> None:
    """Print the current six digits, the otpauth:// URI and a QR code [elevated]."""
    require_elevation()
    doc = daemon_call("subnet.show_code", {"name": name})
    _print_code(doc, qr=not no_qr)


@subnet.command()
@click.argument("name")
@click.option("--code", help="The six digits shown on a member (otherwise prompted).")
@click.option("--id", "subnet_id", help="Choose among subnets that share the name (hex prefix).")
@click.option("--peer", "peers", multiple=True, help="Also try this host:port (repeatable).")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Discovery budget in seconds.")
def join(name: str, code: str | None, subnet_id: str | None, peers: tuple[str, ...], timeout: float) -> None:
    """Join a subnet with the code shown on a member [elevated]."""
    from spt.core.types import check_subnet_name

    check_subnet_name(name)
    require_elevation()
    if code is None:
        if not is_interactive():
            raise UsageError("BAD_USAGE", "", "no terminal to prompt for the code; pass --code DDDDDD")
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
    _print_homed(doc)


@subnet.command()
@click.argument("name", shell_complete=subnet_names)
def detach(name: str) -> None:
    """Stop serving a subnet without leaving it."""
    emit("DETACHED", daemon_call("subnet.detach", {"name": name})["name"])


@subnet.command()
@click.argument("name", shell_complete=subnet_names)
def attach(name: str) -> None:
    """Resume serving a detached subnet."""
    emit("ATTACHED", daemon_call("subnet.attach", {"name": name})["name"])


@subnet.command()
@click.argument("name", shell_complete=subnet_names)
@click.option("--yes", is_flag=True, help="Do not ask (required when not interactive).")
def leave(name: str, yes: bool) -> None:
    """Leave a subnet; endpoints homed there become local-only [elevated]."""
    require_elevation()
    if not yes:
        if not is_interactive():
            raise UsageError("BAD_USAGE", "", "pass --yes to leave without a terminal to confirm")
        click.confirm(f"Leave subnet {name}?", abort=True)
    doc = daemon_call("subnet.leave", {"name": name})
    emit("LEFT", doc["name"])
    for endpoint_id in doc.get("orphaned", []):
        emit("ORPHANED", endpoint_id)


@subnet.command()
@click.argument("node")
@click.option("--subnet", "subnet_name", shell_complete=subnet_names, help="The subnet (needed when this node holds several).")
@click.option("--yes", is_flag=True, help="Do not ask (required when not interactive).")
def prune(node: str, subnet_name: str | None, yes: bool) -> None:
    """Remove a node subnet-wide and rotate the joining secret [elevated]."""
    require_elevation()
    if not yes:
        if not is_interactive():
            raise UsageError("BAD_USAGE", "", "pass --yes to prune without a terminal to confirm")
        click.confirm(f"Prune {node}?", abort=True)
    doc = daemon_call("subnet.prune", {"node": node, "subnet": subnet_name})
    emit("PRUNED", doc["pruned"], doc["name"])
    _print_code(doc)


@subnet.command()
@click.argument("name", shell_complete=subnet_names)
def unlock(name: str) -> None:
    """End a join lockout early, subnet-wide [elevated]."""
    require_elevation()
    emit("UNLOCKED", daemon_call("subnet.unlock", {"name": name})["name"])


@subnet.command()
@click.argument("body", required=False)
@click.option("--subnet", "subnet_name", help="The subnet to notify (needed when this node holds several).")
@click.option("--title", help="A short title (default: the body's first line).")
def notify(body: str | None, subnet_name: str | None, title: str | None) -> None:
    """Raise a notification for the user, shown once on the machine they last used."""
    import sys

    if body is None and not sys.stdin.isatty():
        body = sys.stdin.read()
    body = (body or "").rstrip("\n")
    if not body.strip() and not title:
        raise UsageError("BAD_USAGE", "", "give a body (argument or stdin) or --title")
    doc = daemon_call("notif.raise", {"body": body, "subnet": subnet_name, "title": title or ""})
    emit("NOTIFIED", doc["id"])
