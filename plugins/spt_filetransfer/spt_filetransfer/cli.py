"""`spt file send|status|list|cancel`: thin commands over the daemon's `file.*` operations.

Tokens (SPEC.md §3.8): FILE_QUEUED / FILE_SENT / FILE_CANCELLED on stdout; refusals
(NO_PERCH, FILE_REFUSED, FILE_UNREADABLE, …) are raised and printed by the dispatcher.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from spt.cli._output import emit, out, print_json
from spt.cli._state import daemon_call, is_interactive, state
from spt.core.errors import UsageError

SEND_TIMEOUT = 900.0  # seconds the daemon may take to hash what is sent and reach the peer


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


def _line(t: dict[str, Any]) -> str:
    eta = "-" if t.get("eta_s") is None else f"{t['eta_s']:.0f}"
    rate = f"{_human_bytes(t.get('rate') or 0)}/s"
    peer = t.get("peer_label") or str(t.get("peer", ""))[:8]
    return (
        f"TRANSFER:{t['id']} {t['state']} {t['done']}/{t['total']} {rate} eta={eta} "
        f"{t['direction']} {peer} {t.get('path') or '-'}"
    )


class _Bar:
    """A progress bar on stderr, redrawn in place; only when interactive."""

    def __init__(self) -> None:
        self.drawn = False

    def draw(self, t: dict[str, Any]) -> None:
        total = max(1, int(t["total"]))
        frac = min(1.0, int(t["done"]) / total)
        width = 30
        filled = int(frac * width)
        eta = "" if t.get("eta_s") is None else f" eta {t['eta_s']:.0f}s"
        text = (
            f"\r[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
            f"{_human_bytes(int(t['done']))}/{_human_bytes(total)} {_human_bytes(t.get('rate') or 0)}/s"
            f" {t['state']}{eta}   "
        )
        sys.stderr.write(text)
        sys.stderr.flush()
        self.drawn = True

    def end(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


@click.group("file", epilog="\b\nExamples:\n  spt file send report.pdf bob --wait\n  spt file status\n  spt file list --incoming\n")
def file() -> None:
    """Send files and folders to endpoints on any member; see and cancel transfers."""


@file.command("send")
@click.argument("items", nargs=-1, required=True, metavar="PATH… ADDRESS")
@click.option("--wait", is_flag=True, help="Block until the receiver verified everything.")
@click.option("-m", "--message", default="", help="Text of the file event the receiver gets.")
@click.option("--from", "from_id", metavar="ID", help="Send as this endpoint (default: $SPT_AGENT_ID).")
def send(items: tuple[str, ...], wait: bool, message: str, from_id: str | None) -> None:
    """Send files or folders to ADDRESS: FILE_QUEUED (continues in the background), or with
    --wait FILE_SENT once verified at the receiver."""
    if len(items) < 2:
        raise UsageError("BAD_USAGE", "", "give at least one file or folder, then the address")
    *paths, address = items
    args = {
        "paths": [os.path.abspath(p) for p in paths],
        "address": address,
        "message": message,
        "from": from_id or os.environ.get("SPT_AGENT_ID") or None,
        "wait": wait,
    }
    bar = _Bar() if wait and is_interactive() else None

    def on_event(event: dict[str, Any]) -> None:
        progress = event.get("progress")
        if bar is not None and isinstance(progress, dict):
            bar.draw(progress)

    try:
        doc = daemon_call("file.send", args, on_event=on_event, timeout=None if wait else SEND_TIMEOUT)
    finally:
        if bar is not None:
            bar.end()
    emit(str(doc["token"]), str(doc["tid"]))


@file.command("status")
@click.argument("tid", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def status(ctx: click.Context, tid: str | None, as_json: bool) -> None:
    """Progress of one transfer, or of those active or finished in the last hour."""
    doc = daemon_call("file.status", {"tid": tid})
    if as_json or state(ctx).json:
        print_json(doc)
        return
    for t in doc["transfers"]:
        out(_line(t))
        if t.get("reason") and t["state"] not in ("complete",):
            out(f"  {t['reason']}")


@file.command("list")
@click.option("--incoming", is_flag=True, help="Only transfers to this node.")
@click.option("--outgoing", is_flag=True, help="Only transfers from this node.")
@click.option("--all", "show_all", is_flag=True, help="Include transfers finished in the last 7 days.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def list_(ctx: click.Context, incoming: bool, outgoing: bool, show_all: bool, as_json: bool) -> None:
    """One row per transfer: id, direction, state, bytes, peer, name."""
    if incoming and outgoing:
        incoming = outgoing = False
    doc = daemon_call("file.list", {"incoming": incoming, "outgoing": outgoing, "all": show_all})
    if as_json or state(ctx).json:
        print_json(doc)
        return
    if not doc["transfers"]:  # a word rather than nothing: the default hides finished transfers
        out("(no transfers)" if show_all else "(no transfers in progress; --all adds those of the last 7 days)")
    for t in doc["transfers"]:
        key = str(t.get("peer", ""))
        # SPEC.md §2.1: every human view shows a node as LABEL (xxxxxxxx…)
        peer = f"{t['peer_label']} ({key[:8]}\u2026)" if t.get("peer_label") else f"{key[:8]}\u2026"
        out(f"{t['id']}  {t['direction']:8} {t['state']:12} {t['done']}/{t['total']}  {peer}  {t['name']}")


@file.command("cancel")
@click.argument("tid")
def cancel(tid: str) -> None:
    """Cancel a transfer on this side and tell the peer; partial data is deleted."""
    doc = daemon_call("file.cancel", {"tid": tid})
    emit(str(doc["token"]), str(doc["tid"]))
