"""The `spt` command.

`main()` is the executable's entry point. It stays free of click: `spt send`, which agents run
once per message, takes the click-free path of `spt.cli._send`; everything else goes to the lazy
click group in `spt.cli.root`.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import click


def main() -> NoReturn:
    args = sys.argv[1:]
    if args and args[0] == "send":
        from spt.cli._send import fast_send

        code = fast_send(args[1:])
        if code is not None:
            sys.exit(code)
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
