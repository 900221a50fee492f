"""The plugin manager: stevedore finds plugins, pluggy calls them, failures are recorded.

Start-up order (every run, the daemon's and the CLI's alike):

1. Apply the block list: `SPT_DISABLE_PLUGINS=a,b`, `-p no:NAME`, config `plugins.disabled`.
2. Register the essential plugins (`quic`); they cannot be blocked.
3. Load the `spt.plugins` entry points (stevedore), unless `SPT_DISABLE_PLUGIN_AUTOLOAD=1`.
4. Add built-ins from `BUILTIN_PLUGINS` that metadata did not provide (a source checkout).
5. Load `-p MODULE` extras given by import path.
6. Check every plugin's hook implementations against the specs (a misspelled hook fails it).
7. Call each `spt_register_*` hook once, one plugin at a time, so a plugin that raises is
   recorded as failed and everything it registered is still attributed correctly.
8. Freeze the registries.

A plugin that fails at any step is recorded (`LoadRecord`) with its reason and traceback and
unregistered; spt keeps running. This module names built-ins only as dotted strings.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from importlib.metadata import EntryPoint
from types import ModuleType
from typing import Any, Final

import pluggy

from spt.hooks import PROJECT, Registries, specs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP: Final = "spt.plugins"
ESSENTIAL_PLUGINS: Final = ("quic",)
BUILTIN_PLUGINS: Final = (
    ("quic", "spt.plugins.quic"),
    ("static_peers", "spt.plugins.static_peers"),
    ("mdns", "spt.plugins.mdns"),
    ("send", "spt.plugins.send"),
    ("ring", "spt.plugins.ring"),
    ("notify", "spt.plugins.notify"),
    ("mind_sync", "spt.plugins.mind_sync"),
    ("rc", "spt.plugins.rc"),
)
REGISTRATION_HOOKS: Final = (
    "payload_types",
    "discovery_backends",
    "connectors",
    "sync_tiers",
    "notification_renderers",
    "updaters",
    "record_kinds",
    "commands",
    "bulk_transits",
)


@dataclass
class LoadRecord:
    """What happened to one plugin: shown by `spt plugins list`."""

    name: str
    dist: str
    version: str
    status: str  # "ok", "blocked" or "failed"
    reason: str = ""
    detail: str = ""  # the traceback of a failure, for `--all`
    provides: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dist": self.dist,
            "version": self.version,
            "status": self.status if self.status != "failed" else f"failed: {self.reason}",
            "reason": self.reason or None,
            "provides": self.provides,
        }


@dataclass
class PluginSystem:
    pm: pluggy.PluginManager
    registries: Registries
    records: list[LoadRecord]

    def record(self, name: str) -> LoadRecord | None:
        return next((r for r in self.records if r.name == name), None)


def blocked_names(cli_blocks: Iterable[str] = (), config_blocks: Iterable[str] = ()) -> set[str]:
    """Names blocked by `-p no:NAME` (passed without the prefix), config, and the environment."""
    env = os.environ.get("SPT_DISABLE_PLUGINS", "")
    names = {n.strip() for n in env.split(",") if n.strip()}
    names.update(cli_blocks)
    names.update(config_blocks)
    return names


def _dist_of(ep: EntryPoint | None, module: str) -> tuple[str, str]:
    """(distribution, version) that ships `module`; stevedore's cached entry points carry no dist."""
    dist = getattr(ep, "dist", None) if ep is not None else None
    if dist is not None:
        return str(dist.name), str(dist.version)
    top = module.split(".")[0]
    try:  # a distribution named as its package (spt, spt_filetransfer, …): one lookup
        found = metadata.distribution(top)
        if top in (found.read_text("top_level.txt") or top).split():
            return str(found.metadata["Name"]), str(found.version)
    except metadata.PackageNotFoundError:
        pass
    # else every installed distribution's file list is read (tens of ms at each daemon start)
    names = _packages_distributions().get(top, [])
    if names:
        try:
            return names[0], metadata.version(names[0])
        except metadata.PackageNotFoundError:
            pass
    return module.split(".")[0], "?"


@functools.cache
def _packages_distributions() -> Mapping[str, list[str]]:
    return metadata.packages_distributions()


def _failure(name: str, dist: tuple[str, str], exc: BaseException) -> LoadRecord:
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    detail = "".join(traceback.format_exception(exc))
    log.warning("plugin failed", extra={"plugin": name, "reason": reason})
    return LoadRecord(name, dist[0], dist[1], "failed", reason, detail)


def build_plugin_manager(
    *,
    blocked: Iterable[str] = (),
    autoload: bool | None = None,
    extra_modules: Sequence[str] = (),
    extra_plugins: Sequence[tuple[str, object]] = (),
) -> PluginSystem:
    """Run the start-up order above and return the manager, frozen registries and load records.

    `extra_plugins` registers ready objects (the test kit's `register_plugin`).
    """
    if autoload is None:
        autoload = os.environ.get("SPT_DISABLE_PLUGIN_AUTOLOAD") != "1"
    blocked_set = set(blocked) - set(ESSENTIAL_PLUGINS)
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(specs)
    if os.environ.get("SPT_TRACE_HOOKS") == "1":
        pm.trace.root.setwriter(lambda msg: log.debug("hook", extra={"trace": msg}))
        pm.enable_tracing()
    records: list[LoadRecord] = []
    candidates: list[tuple[str, str, EntryPoint | None]] = []  # (name, module, entry point)

    if autoload:
        candidates.extend(_entry_points())
    seen = {name for name, _, _ in candidates}
    candidates.extend((name, module, None) for name, module in BUILTIN_PLUGINS if name not in seen)
    candidates.extend((module.rsplit(".", 1)[-1], module, None) for module in extra_modules)
    # Essentials first, then by name: registration order must never carry meaning, but a stable
    # order keeps `plugins list` readable.
    candidates.sort(key=lambda c: (c[0] not in ESSENTIAL_PLUGINS, c[0]))

    loaded: list[tuple[str, object]] = []
    for name, module, ep in candidates:
        dist = _dist_of(ep, module)
        if name in blocked_set:
            records.append(LoadRecord(name, dist[0], dist[1], "blocked", "blocked by the user"))
            continue
        if any(r.name == name for r in records):
            records.append(LoadRecord(name, dist[0], dist[1], "failed", f"a second plugin is named {name!r}"))
            continue
        try:
            plugin: object = ep.load() if ep is not None else importlib.import_module(module)
            pm.register(plugin, name=name)
        except Exception as exc:
            # Keep going: one broken plugin must not stop spt. This record is what makes the
            # failure visible in `spt plugins list`.
            records.append(_failure(name, dist, exc))
            continue
        records.append(LoadRecord(name, dist[0], dist[1], "ok"))
        loaded.append((name, plugin))
    for name, obj in extra_plugins:
        pm.register(obj, name=name)
        mod = obj.__name__ if isinstance(obj, ModuleType) else type(obj).__module__
        records.append(LoadRecord(name, *_dist_of(None, mod), "ok"))
        loaded.append((name, obj))

    _check_hooks(pm, loaded, records)
    registries = Registries()
    _register_all(pm, loaded, records, registries)
    registries.freeze()
    return PluginSystem(pm, registries, records)


def _entry_points() -> list[tuple[str, str, EntryPoint | None]]:
    # stevedore finds the entry points; a manager that names no extension loads none, so
    # blocked plugins are never imported. Loading is ours (guarded, one record per plugin).
    from stevedore import NamedExtensionManager

    finder: NamedExtensionManager[Any] = NamedExtensionManager(ENTRY_POINT_GROUP, names=[], invoke_on_load=False)
    return [(ep.name, ep.value.split(":")[0], ep) for ep in finder.list_entry_points()]


def _check_hooks(pm: pluggy.PluginManager, loaded: list[tuple[str, object]], records: list[LoadRecord]) -> None:
    for _ in range(len(loaded) + 1):
        try:
            pm.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or "?"
            pm.unregister(exc.plugin)
            _mark_failed(records, loaded, name, exc)


def _mark_failed(
    records: list[LoadRecord], loaded: list[tuple[str, object]], name: str, exc: BaseException
) -> None:
    for i, rec in enumerate(records):
        if rec.name == name and rec.status == "ok":
            records[i] = _failure(name, (rec.dist, rec.version), exc)
    loaded[:] = [(n, p) for n, p in loaded if n != name]


def _register_all(
    pm: pluggy.PluginManager, loaded: list[tuple[str, object]], records: list[LoadRecord], registries: Registries
) -> None:
    by_kind = registries.all()
    for name, plugin in list(loaded):
        others = [p for n, p in loaded if n != name]
        try:
            for kind in REGISTRATION_HOOKS:
                registry = by_kind[kind]
                registry.current_owner = name
                caller = pm.subset_hook_caller(f"spt_register_{kind}", remove_plugins=others)
                caller(registry=registry)
        except Exception as exc:
            pm.unregister(plugin)
            _mark_failed(records, loaded, name, exc)
            # Withdraw nothing already added: names it took stay reserved, so a broken plugin
            # cannot be silently replaced by another of the same name later in this run.
    for rec in records:
        if rec.status == "ok":
            rec.provides = [
                f"{kind.rstrip('s').replace('_', '-')}:{item}"
                for kind in REGISTRATION_HOOKS
                for item in by_kind[kind].names_by_owner(rec.name)
            ]
