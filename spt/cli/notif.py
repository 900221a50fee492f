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


def _member_labels() -> dict[str, str]:
    """Node key -> label, for every member (former ones too) of the subnets held here."""
    doc = daemon_call("subnet.status", {"name": None, "nodes": True, "all": True})
    return {m["key"]: m["label"] for sub in doc["subnets"] for m in sub.get("members", ())}


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
    if not doc["notifications"]:  # a word rather than nothing
        out("(no notifications)" if show_all else "(no unread notifications; --all adds acknowledged ones)")
    labels = _member_labels() if doc["notifications"] else {}
    for n in doc["notifications"]:
        endpoint, _, key = n["from"].rpartition("@")
        # SPEC.md §2.1: every human view shows a node as LABEL (xxxxxxxx…)
        who = f"{labels[key]} ({key[:8]}\u2026)" if key in labels else f"{key[:8]}\u2026"
        who = f"{endpoint}@{who}" if endpoint else who
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


