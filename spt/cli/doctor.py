"""`spt doctor`: health checks, one line each; exit 1 when any check fails."""

from __future__ import annotations

import click

from spt.cli._output import out, print_json
from spt.cli._state import daemon_call, state


@click.command()
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Check the daemon, the state folder, plugins, each peer's path, lockouts and key changes."""
    from spt import __version__

    doc = daemon_call("doctor", {"cli_version": __version__})
    if state(ctx).json:
        print_json(doc)
    else:
        for check in doc["checks"]:
            out(f"{check['level']} {check['name']}: {check['detail']}")
    if not doc["ok"]:
        ctx.exit(1)
