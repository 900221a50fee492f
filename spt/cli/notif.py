"""`spt notif list|ack`: the user's notifications (SPEC.md §3.8, §8.4)."""

from __future__ import annotations

import time
from datetime import datetime

import click

from spt.cli._output import emit, out, print_json
from spt.cli._state import daemon_call, state
from spt.core.errors import TokenError, UsageError


@click.group(epilog="\b\nExamples:\n  spt notif list\n  spt notif ack --all\n  spt notif list --all --json\n")
def notif() -> None:
    """Notifications: shown once where you last worked; an ack anywhere clears them everywhere."""


def _age(iso: str) -> str:
    seconds = max(0, int(time.time() - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@notif.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include acknowledged notifications.")
@click.option("--subnet", help="Only this subnet's notifications.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def list_(ctx: click.Context, show_all: bool, subnet: str | None, as_json: bool) -> None:
    """Unacknowledged notifications, oldest first; the body is indented beneath."""
    doc = daemon_call("notif.list", {"all": show_all, "subnet": subnet})
    if as_json or state(ctx).json:
        print_json(doc)
        return
    for n in doc["notifications"]:
        sender = n["from"].rpartition("@")
        who = f"{sender[0]}@{sender[2][:8]}\u2026" if sender[0] else f"{sender[2][:8]}\u2026"
        flag = "  (acked)" if n["acked"] else ""
        out(f"{n['id'][:8]}  {_age(n['time'])}  {n['subnet'] or '-'}  {who}  {n['title']}{flag}")
        for line in n["body"].splitlines():
            out(f"    {line}")


@notif.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "ack_all", is_flag=True, help="Acknowledge every unacknowledged notification.")
def ack(ids: tuple[str, ...], ack_all: bool) -> None:
    """Acknowledge notifications by id (a unique prefix of at least 6 characters)."""
    if not ids and not ack_all:
        raise UsageError("BAD_USAGE", "", "name notification ids, or pass --all")
    if ack_all:
        for notif_id in daemon_call("notif.ack", {"all": True})["acked"]:
            emit("ACKED", notif_id)
        return
    failed = False
    for prefix in ids:  # one line per id: an unknown one does not stop the others
        try:
            for notif_id in daemon_call("notif.ack", {"ids": [prefix]})["acked"]:
                emit("ACKED", notif_id)
        except TokenError as exc:
            if exc.instance_token != "NO_SUCH_NOTIF":
                raise
            emit("NO_SUCH_NOTIF", prefix, exc.message, err=True)
            failed = True
    if failed:
        raise click.exceptions.Exit(1)


