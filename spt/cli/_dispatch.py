"""The one place where exceptions become output and exit codes (SPEC.md §3.2).

Commands raise; they never call `sys.exit` or print an error token. An SptError prints its
token line (and any candidate lines) on stderr and exits with its code; click usage errors
exit 2; anything else is a bug: a short notice, the traceback with `--debug`, exit 5.
"""

from __future__ import annotations

import sys

import click

from spt.cli._output import report
from spt.core.errors import EXIT_INTERNAL, EXIT_USAGE, SptError


def run(cli: click.Group, argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # Without standalone mode click returns `ctx.exit(n)`'s code instead of exiting.
        code = cli.main(args=args, prog_name="spt", standalone_mode=False)
    except SptError as exc:
        if exc.instance_token == "ELEVATION_REQUIRED" and not exc.lines:
            from spt.cli._state import elevated_command

            exc.lines = (elevated_command(args),)
        return report(exc)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except click.Abort:
        sys.stderr.write("Aborted.\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        sys.stderr.write(f"spt: internal error: {type(exc).__name__}: {exc} (this is a bug; rerun with --debug)\n")
        if debug:
            import traceback

            traceback.print_exc()
        return EXIT_INTERNAL
    return code if isinstance(code, int) else 0
