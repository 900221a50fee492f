"""Plugin commands without loading the plugins: a cached table of names and targets.

Finding the plugin commands means building the plugin system: importing every plugin (QUIC,
crypto, asyncio, pluggy, stevedore, importlib.metadata) to ask `spt_register_commands`, about
0.3 s on a small machine, for a command that then imports one module. So the table it yields
(name -> "module:attribute" target and owning plugin) is kept in the state folder, with what it
was derived from: the interpreter, spt's version, `sys.path` and each entry's mtime (installing,
upgrading or removing a distribution changes its folder), the source file of every plugin that
registered (an edited plugin), the config file (`plugins.disabled`), `SPT_DISABLE_PLUGINS`,
`SPT_DISABLE_PLUGIN_AUTOLOAD` and `-p no:NAME`. Any difference, or any plugin that failed to load,
and the plugin system is built as before. `spt_register_commands` must therefore depend on
nothing else (specs.py says so).
"""

from __future__ import annotations

import json
import os
import sys

from spt import __version__
from spt.core.paths import state_root

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterable

    import click

CACHE_FILE = "cli-commands.json"
FORMAT = 1


def _mtime(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def _search_path() -> list[str]:
    # The current folder (`python -m`, `-c`) changes with every file made in it; distributions
    # are not installed there.
    cwd = os.getcwd()
    return [p for p in sys.path if p and p != cwd]


def _key(blocked: Iterable[str], files: Iterable[str]) -> dict[str, object]:
    return {
        "format": FORMAT,
        "spt": __version__,
        "python": sys.executable,
        "path": [[p, _mtime(p)] for p in _search_path()],
        "env": [os.environ.get("SPT_DISABLE_PLUGINS", ""), os.environ.get("SPT_DISABLE_PLUGIN_AUTOLOAD", "")],
        "blocked": sorted(blocked),
        "files": {f: _mtime(f) for f in sorted(files)},
    }


def _cached(path: str, blocked: Iterable[str]) -> dict[str, list[str]] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            # A table names the modules to import: one another user could write (under sudo, the
            # invoking user's folder; a shared SPT_HOME) would pick the code this run executes.
            if os.fstat(fh.fileno()).st_uid != os.geteuid() or os.stat(os.path.dirname(path)).st_uid != os.geteuid():
                return None
            doc = json.load(fh)
        if doc["key"] == _key(blocked, doc["key"]["files"]):
            commands = doc["commands"]
            if all(isinstance(v, list) and len(v) == 2 for v in commands.values()):
                return dict(commands)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent, unreadable or from another version: build it again
    return None


def _write(root: str, path: str, doc: dict[str, object]) -> None:
    # Only into a state folder of our own: an elevated run must not leave root's file there.
    try:
        if os.stat(root).st_uid != os.geteuid():
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        os.replace(tmp, path)  # atomic: concurrent runs each write a whole file
    except OSError:
        pass  # a cache that cannot be written only costs time


def plugin_commands(ctx: click.Context | None) -> dict[str, tuple[str, str]]:
    """Every plugin command: name -> (target, owning plugin)."""
    from spt.cli._state import CliState, plugin_system, state

    blocked = (state(ctx) if ctx is not None else CliState()).blocked
    root = state_root()
    path = os.path.join(root, CACHE_FILE)
    cached = _cached(path, blocked)
    if cached is not None:
        return {name: (target, owner) for name, (target, owner) in cached.items()}
    system = plugin_system(ctx)
    reg = system.registries.commands
    commands = {ref.name: (ref.target, reg.owner(ref.name)) for ref in reg}
    if not any(r.status == "failed" for r in system.records):
        files = {os.path.join(root, "config.toml")}
        for _name, plugin in system.pm.list_name_plugin():
            module = plugin if hasattr(plugin, "__file__") else sys.modules.get(type(plugin).__module__)
            if getattr(module, "__file__", None):
                files.add(os.path.abspath(module.__file__))
        files.add(os.path.abspath(sys.modules["spt.manager"].__file__ or ""))
        _write(root, path, {"key": _key(blocked, files), "commands": commands})
    return commands
