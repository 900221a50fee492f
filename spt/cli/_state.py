"""What every command shares: global options, the state folder, the daemon connection."""

from __future__ import annotations

import os
import sys

from spt.core.errors import ElevationRequired
from spt.core.paths import StatePaths, state_root

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

    import click

    from spt.manager import PluginSystem


class CliState:
    """Global options of one invocation (a plain class: `dataclasses` costs start-up time)."""

    def __init__(self) -> None:
        self.json = False
        self.blocked: tuple[str, ...] = ()
        self.debug = False
        self._plugins: PluginSystem | None = None


def state(ctx: click.Context | None = None) -> CliState:
    import click

    ctx = ctx or click.get_current_context()
    obj = ctx.find_root().obj
    if not isinstance(obj, CliState):
        obj = CliState()
        ctx.find_root().obj = obj
    return obj


def plugin_system(ctx: click.Context | None) -> PluginSystem:
    from spt.core.config import load_config
    from spt.core.errors import ConfigError
    from spt.manager import blocked_names, build_plugin_manager

    st = state(ctx) if ctx is not None else CliState()
    if st._plugins is None:
        try:
            config_blocks: tuple[str, ...] = load_config(StatePaths.resolve()).disabled_plugins
        except ConfigError:
            config_blocks = ()
        st._plugins = build_plugin_manager(blocked=blocked_names(st.blocked, config_blocks))
    return st._plugins


def is_interactive() -> bool:
    """SPEC.md §3.1: stdin and stderr are both terminals."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def spt_command_prefix() -> list[str]:
    """How this spt was started, as an absolute command (SPEC.md §5.7)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if not argv0 or argv0.endswith("__main__.py") or argv0 == "-m" or argv0.endswith(".py"):
        return [sys.executable, "-m", "spt"]
    import shutil

    found = argv0 if os.sep in argv0 else shutil.which(argv0) or argv0
    return [os.path.abspath(found)]


def elevated_command(args: list[str] | None = None) -> str:
    """The exact command to run elevated: `sudo [SPT_HOME=…] <absolute spt> <same arguments>`."""
    import shlex

    args = sys.argv[1:] if args is None else args
    # SPEC.md §5.7: the state folder travels along, so root acts on the user's node, not its own:
    # SPT_HOME when it is set, otherwise the elevated spt finds the user's folder via SUDO_USER.
    env = [f"SPT_HOME={os.environ['SPT_HOME']}"] if os.environ.get("SPT_HOME") else []
    return shlex.join(["sudo", *env, *spt_command_prefix(), *args])


def require_elevation() -> None:
    """Gated commands: re-run under sudo when interactive, else refuse with the exact command.

    The daemon enforces the gate itself from the socket's peer credentials; this only saves a
    round trip and gives the user the command to run.
    """
    if os.geteuid() == 0:
        return
    import shlex
    import shutil

    if is_interactive() and shutil.which("sudo") and os.environ.get("SPT_NO_SUDO") != "1":
        argv = shlex.split(elevated_command())
        os.execvp(argv[0], argv)
    raise ElevationRequired("", ElevationRequired.MESSAGE, lines=[elevated_command()])


def daemon_call(op: str, args: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Ask the daemon (starting it unless `SPT_NO_AUTOSTART=1`) and return the result."""
    from spt.core.ipc import call, connect_or_start

    autostart = os.environ.get("SPT_NO_AUTOSTART") != "1"
    conn = connect_or_start(state_root(), autostart=autostart)
    try:
        return call(conn, op, args, interactive=is_interactive(), **kwargs)
    finally:
        conn.close()
