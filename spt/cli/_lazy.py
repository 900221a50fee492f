"""Lazy command loading: the root group imports a command's module only when it runs.

Built-in commands are a static table, so `spt send` imports nothing else. Plugin commands come
from the `spt_register_commands` hook, asked only when a name is not built in or when the full
list is needed (`--help`, completion), and then through the cached table of `_command_cache`.
A command whose import fails stays visible as a `BrokenCommand` that names the error and the
owning plugin.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import click


class BrokenCommand(click.Command):
    """Stands in for a command whose module failed to import."""

    def __init__(self, name: str, owner: str, error: BaseException) -> None:
        self.owner = owner
        self.error = error
        super().__init__(name, help=f"BROKEN ({owner}): {type(error).__name__}: {error}", add_help_option=False,
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
        self.short_help = f"BROKEN: {type(error).__name__} (plugin {owner})"

    def invoke(self, ctx: click.Context) -> Any:
        from spt.core.errors import PluginError

        raise PluginError(self.name or "?", f"this command is broken ({self.owner}): {type(self.error).__name__}: {self.error}")


def load_target(target: str) -> click.Command:
    module_name, _, attr = target.partition(":")
    command = getattr(importlib.import_module(module_name), attr)
    if not isinstance(command, click.Command):
        raise TypeError(f"{target} is not a click command")
    return accept_json_anywhere(command)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        from spt.cli._state import state

        state(ctx).json = True


def accept_json_anywhere(command: click.Command) -> click.Command:
    """Give `command` and every subcommand a `--json` flag that sets the global one.

    SPEC.md §3.1: `spt whoami --json` ≡ `spt --json whoami` (agent adapters write the first
    form). Read commands print their document; action commands ignore it, as they do the global
    flag. A command that declares its own `--json` keeps it.
    """
    if getattr(command, "_spt_json", False):
        return command
    command._spt_json = True  # type: ignore[attr-defined]
    if not any("--json" in getattr(p, "opts", ()) for p in command.params):
        command.params.append(
            click.Option(["--json"], is_flag=True, expose_value=False, callback=_set_json,
                         help="Print one JSON document (read and status commands).")
        )
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            accept_json_anywhere(sub)
    return command


class LazyGroup(click.Group):
    """A group whose subcommands are "module:attribute" strings, imported on first use."""

    def __init__(self, *args: Any, lazy: Mapping[str, str] | None = None, with_plugins: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})
        self.with_plugins = with_plugins
        self._plugin_refs: dict[str, tuple[str, str]] | None = None  # name -> (target, owner)

    def _plugins(self) -> dict[str, tuple[str, str]]:
        if self._plugin_refs is None:
            from spt.cli._command_cache import plugin_commands

            found = plugin_commands(click.get_current_context(silent=True))
            self._plugin_refs = {name: ref for name, ref in found.items() if name not in self.lazy}
        return self._plugin_refs

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(self.lazy) | set(self.commands)
        if self.with_plugins:
            names |= set(self._plugins())
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return accept_json_anywhere(self.commands[cmd_name])
        if cmd_name in self.lazy:
            return load_target(self.lazy[cmd_name])
        if self.with_plugins and cmd_name in self._plugins():
            target, owner = self._plugins()[cmd_name]
            try:
                return load_target(target)
            except Exception as exc:
                return BrokenCommand(cmd_name, owner, exc)
        return None
