"""The one place where exceptions become output and exit codes (SPEC.md §3.2).

Commands raise; they never call `sys.exit` or print an error token. An SptError prints its
token line (and any candidate lines) on stderr and exits with its code; click usage errors
exit 2; anything else is a bug: a short notice, the traceback with `--debug`, exit 5.
Ctrl-C prints `Aborted.` and exits 130 (128 + SIGINT, as a shell reports an interrupted
command; not in SPEC.md §3.2's table, which lists outcomes of the command), the same on both
paths and at a prompt; a prompt ended by Ctrl-D, or a confirmation answered no, exits 1.

`guarded` does all but the click part and imports no click: the plain commands of `_fast.py`
run through it too.
"""

from __future__ import annotations

import sys

from spt.cli._output import report
from spt.core.errors import EXIT_INTERNAL, EXIT_REFUSED, EXIT_USAGE, SptError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable

    import click

EXIT_INTERRUPTED = 130


def _aborted(exc: BaseException) -> int:
    """click's Abort: a prompt or confirmation ended by Ctrl-C, Ctrl-D or a no (click has
    already ended the prompt's line), or Ctrl-C anywhere on the click path (click.main turns
    KeyboardInterrupt into Abort after printing a newline)."""
    sys.stderr.write("Aborted.\n")
    return EXIT_INTERRUPTED if isinstance(exc.__context__, KeyboardInterrupt) else EXIT_REFUSED


def guarded(body: Callable[[], object], args: list[str]) -> int:
    """Run `body` (a whole command) and turn what it returns or raises into an exit code."""
    try:
        code = body()
    except SptError as exc:
        if exc.instance_token == "ELEVATION_REQUIRED" and not exc.lines:
            from spt.cli._state import elevated_command

            exc.lines = (elevated_command(args),)
        return report(exc)
    except KeyboardInterrupt:
        sys.stderr.write("\nAborted.\n")  # as click.main says it on the click path
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as exc:
        click = sys.modules.get("click")  # loaded only if the command used it (a prompt)
        if click is not None and isinstance(exc, click.Abort):
            return _aborted(exc)
        sys.stderr.write(f"spt: internal error: {type(exc).__name__}: {exc} (this is a bug; rerun with --debug)\n")
        if "--debug" in args:
            import traceback

            traceback.print_exc()
        return EXIT_INTERNAL
    return code if isinstance(code, int) else 0


def run(cli: click.Group, argv: list[str] | None = None) -> int:
    import click

    args = sys.argv[1:] if argv is None else argv

    def body() -> object:
        try:
            # Without standalone mode click returns `ctx.exit(n)`'s code instead of exiting.
            return cli.main(args=args, prog_name="spt", standalone_mode=False)
        except click.exceptions.Exit as exc:
            return int(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            return EXIT_USAGE

    return guarded(body, args)
