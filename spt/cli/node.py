"""`spt node show`, `spt node label set`, `spt node trust list|accept|reject`."""

from __future__ import annotations

import click

from spt.cli._output import emit, out, print_json
from spt.cli._state import daemon_call, state


@click.group(epilog="\b\nExamples:\n  spt node show\n  spt node label set laptop\n  spt node trust list\n")
def node() -> None:
    """This node's identity: key, label, addresses."""


@node.command()
@click.pass_context
def show(ctx: click.Context) -> None:
    """Show this node's display form, key, fingerprint and listening addresses."""
    from spt.cli._views import show_node

    show_node(as_json=state(ctx).json)


@node.group(epilog="\b\nExamples:\n  spt node label set desk-2\n  spt node show\n")
def label() -> None:
    """The node's human label."""


@label.command("set")
@click.argument("name")
def label_set(name: str) -> None:
    """Set the node's label (1–63 of letters, digits, '.', '_', '-')."""
    from spt.core.types import check_label

    check_label(name)
    doc = daemon_call("node.label.set", {"label": name})
    emit("LABELED", doc["label"])


@node.group(epilog="\b\nExamples:\n  spt node trust list\n  sudo spt node trust accept desk --subnet home\n  spt node trust reject desk\n")
def trust() -> None:
    """Pinned member keys, and key changes waiting for a human (SPEC.md §6.4)."""


@trust.command("list")
@click.pass_context
def trust_list(ctx: click.Context) -> None:
    """Pinned members per subnet, then pending key changes."""
    doc = daemon_call("node.trust.list")
    if state(ctx).json:
        pending = [{k: p[k] for k in ("subnet", "old", "new", "since", "old_key_signed")} for p in doc["pending"]]
        print_json({"pins": doc["pins"], "pending": pending})
        return
    subnet = None
    for pin in doc["pins"]:
        if pin["subnet"] != subnet:
            subnet = pin["subnet"]
            out(subnet)
        out(f"  {pin['label']} ({pin['key'][:8]}\u2026)")
    for p in doc["pending"]:
        signed = " old-key-signed" if p["old_key_signed"] else ""
        out(f"PENDING {p['label']} ({p['old'][:8]}\u2026) -> {p['new'][:8]}\u2026 {p['subnet']} since {p['since']}{signed}")


@trust.command("accept")
@click.argument("node_name", metavar="NODE")
@click.option("--subnet", "subnet_name", help="The subnet (needed when changes are pending in several).")
@click.option("--yes", is_flag=True, help="Do not ask (required when not interactive).")
def trust_accept(node_name: str, subnet_name: str | None, yes: bool) -> None:
    """Accept a node's new key: appends a rekey entry [elevated]."""
    from spt.cli._output import hint
    from spt.cli._state import is_interactive, require_elevation
    from spt.core.errors import UsageError

    require_elevation()
    args = {"node": node_name, "subnet": subnet_name}
    preview = daemon_call("node.trust.accept", {**args, "preview": True})
    hint(f"old: {preview['old']}  fingerprint {preview['old_fingerprint']}")
    hint(f"new: {preview['new']}  fingerprint {preview['new_fingerprint']}")
    hint("Compare the new fingerprint with `spt node show` on that machine.")
    if not yes:
        if not is_interactive():
            raise UsageError("BAD_USAGE", "", "pass --yes to accept without a terminal to confirm")
        click.confirm(f"Trust the new key in {preview['subnet']}?", abort=True)
    # the exact key just shown: if the claim changed since (another arrived), the daemon refuses
    doc = daemon_call("node.trust.accept", {**args, "new": preview["new_key"]}, timeout=60)
    emit("TRUSTED", doc["trusted"])


@trust.command("reject")
@click.argument("node_name", metavar="NODE")
@click.option("--subnet", "subnet_name", help="The subnet (needed when changes are pending in several).")
def trust_reject(node_name: str, subnet_name: str | None) -> None:
    """Drop a pending key-change claim."""
    doc = daemon_call("node.trust.reject", {"node": node_name, "subnet": subnet_name})
    emit("REJECTED", doc["node"])


@node.command()
@click.option("--yes", is_flag=True, help="Do not ask (required when not interactive).")
def rekey(yes: bool) -> None:
    """Replace this node's key; members must accept the new one [elevated]."""
    import os
    import time

    from spt.cli._output import hint
    from spt.cli._state import is_interactive, require_elevation
    from spt.core.errors import UsageError

    require_elevation()
    if not yes:
        if not is_interactive():
            raise UsageError("BAD_USAGE", "", "pass --yes to replace the key without a terminal to confirm")
        click.confirm("Replace this node's key? Members refuse it until one of them accepts it", abort=True)
    doc = daemon_call("node.rekey")
    emit("REKEYED", doc["display"])
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline and _is_running(int(doc["pid"])):  # it restarts under the new key
        time.sleep(0.05)
    if os.environ.get("SPT_NO_AUTOSTART") == "1":
        hint("The daemon stopped; start it again (spt daemon run) to use the new key.")
    else:
        daemon_call("ping")
    hint("Run `spt node trust accept` on a member, after comparing fingerprints with `spt node show`.")


def _is_running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for its parent to reap it does not)."""
    import os

    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
