"""The root click group of `spt`: lazy subcommands and the global options.

Command modules load on first use (`_lazy.py`); nothing here imports aioquic, cryptography or a
plugin, so an agent's per-message `spt send` stays cheap.
"""

from __future__ import annotations

from typing import Final

import click

from spt import __version__
from spt.cli._lazy import LazyGroup
from spt.cli._state import state

BUILTIN_COMMANDS: Final = {
    "daemon": "spt.cli.daemon:daemon",
    "endpoint": "spt.cli.endpoint:endpoint",
    "how-to": "spt.cli.messaging:how_to",
    "node": "spt.cli.node:node",
    "notif": "spt.cli.notif:notif",
    "plugins": "spt.cli.plugins:plugins",
    "ready": "spt.cli.messaging:ready",
    "ring": "spt.cli.messaging:ring",
    "send": "spt.cli.messaging:send",
    "subnet": "spt.cli.subnet:subnet",
    "doctor": "spt.cli.doctor:doctor",
    "whoami": "spt.cli.messaging:whoami",
}


def _blocks(ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    names = []
    for value in values:
        if not value.startswith("no:") or len(value) == 3:
            raise click.BadParameter(f"{value!r}: use -p no:NAME to disable a plugin")
        names.append(value[3:])
    # Recorded while parsing: click looks the subcommand up before it runs `cli` below, and a
    # blocked plugin's command must not be found (`spt -p no:file file …` is "No such command").
    state(ctx).blocked = tuple(names)
    return tuple(names)


@click.group(cls=LazyGroup, lazy=BUILTIN_COMMANDS, with_plugins=True, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\nExamples:\n  echo hi | spt send bob              # SENT:bob (a listener took it) or QUEUED:bob (held)\n  spt ready bob --once --timeout 30   # what is held for bob, else wait for one message\n  sudo spt subnet create home         # then: sudo spt subnet join home, on the other machine\n")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (read and status commands).")
@click.option("-p", "blocks", multiple=True, callback=_blocks, is_eager=True, metavar="no:PLUGIN", help="Disable a plugin by name.")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
@click.version_option(__version__, "-V", "--version", prog_name="spt")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, blocks: tuple[str, ...], debug: bool) -> None:
    """spt: connect your machines and the agents on them.

    Join machines into a subnet once with a six-digit code; then `spt send NAME` reaches NAME
    on whichever machine it runs.
    """
    st = state(ctx)
    st.json = as_json
    st.debug = debug
