"""The `spt` command.

`main()` is the executable's entry point. It stays free of click: the commands agents and
scripts run most (`send`, `ring`, `ready`, `whoami`, `node show`, `endpoint list|state`, `subnet
status|create|show-code|join`), given in their plain shape, take the click-free path of `spt.cli._fast`;
everything else goes to the lazy click group in `spt.cli.root`.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, NoReturn

    import click


def main() -> NoReturn:
    from spt.cli._dispatch import guarded
    from spt.cli._fast import plain_command

    args = sys.argv[1:]
    command = plain_command(args)
    if command is not None:
        sys.exit(guarded(command, args))
    from spt.cli._dispatch import run
    from spt.cli.root import cli

    sys.exit(run(cli))


def __getattr__(name: str) -> Any:
    # `from spt.cli import cli` keeps working without making every import pay for click.
    if name == "cli":
        from spt.cli.root import cli

        return cli
    raise AttributeError(name)


cli: click.Group
