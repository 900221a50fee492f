"""`spt plugins list`: every plugin, its distribution, status and what it provides."""

from __future__ import annotations

import click

from spt.cli._output import out, print_json
from spt.cli._state import plugin_system, state


@click.group(epilog="\b\nExamples:\n  spt plugins list\n  spt plugins list --all\n  spt -p no:mdns subnet status\n")
def plugins() -> None:
    """Installed plugins."""


@plugins.command("list")
@click.option("--all", "show_all", is_flag=True, help="Show details of blocked and failed plugins.")
@click.pass_context
def list_(ctx: click.Context, show_all: bool) -> None:
    """List plugins: NAME DIST VERSION STATUS PROVIDES."""
    system = plugin_system(ctx)
    if state(ctx).json:
        print_json({"plugins": [r.as_json() for r in system.records]})
        return
    rows = [("NAME", "DIST", "VERSION", "STATUS", "PROVIDES")]
    for r in system.records:
        status = f"failed: {r.reason}" if r.status == "failed" else r.status
        rows.append((r.name, r.dist, r.version, status, ", ".join(r.provides) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        out("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
    if show_all:
        for r in system.records:
            if r.status != "ok":
                out(f"\n{r.name}: {r.status} {r.reason}")
                if r.detail:
                    out(r.detail.rstrip())
