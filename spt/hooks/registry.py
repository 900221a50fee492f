"""Typed registries handed to the `spt_register_*` hooks.

A registry maps a unique name to one plugin object and remembers which plugin added it, so
`spt plugins list` can say what each plugin provides. Names are wire contract (payload type
names travel in frames), so a second registration under a taken name is an error, never a silent
overwrite. The plugin manager freezes every registry once start-up is done.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar

from spt.core.errors import DuplicateNameError, FrozenRegistryError, PluginError


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Name → object, with owners, duplicate checks and a freeze."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}
        self._frozen = False
        self.current_owner = "?"  # set by the plugin manager around each plugin's hook call

    def add(self, item: T) -> T:
        """Register `item` under `item.name`; raises DuplicateNameError or FrozenRegistryError."""
        name = item.name
        if not isinstance(name, str) or not name:
            raise PluginError(self.kind, f"a {self.kind} needs a non-empty string name, got {name!r}")
        if self._frozen:
            raise FrozenRegistryError(name, f"{self.kind} registry is frozen after start-up")
        if name in self._items:
            raise DuplicateNameError(
                name,
                f"{self.kind} {name!r} is registered by both {self._owners[name]!r} and "
                f"{self.current_owner!r}; disable one with -p no:PLUGIN",
            )
        self._items[name] = item
        self._owners[name] = self.current_owner
        return item

    def freeze(self) -> None:
        self._frozen = True

    @property
    def frozen(self) -> bool:
        return self._frozen

    def get(self, name: str) -> T | None:
        return self._items.get(name)

    def owner(self, name: str) -> str:
        return self._owners[name]

    def names_by_owner(self, owner: str) -> list[str]:
        return sorted(n for n, o in self._owners.items() if o == owner)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)


class CommandRef:
    """A lazily imported CLI command: `name` on the root group, `target` as "module:attribute"."""

    __slots__ = ("help", "name", "target")

    def __init__(self, name: str, target: str, help: str = "") -> None:
        if ":" not in target:
            raise PluginError(name, f'a command target is "module:attribute", got {target!r}')
        self.name = name
        self.target = target
        self.help = help


class Registries:
    """Every registry a plugin can add to; one instance per plugin manager."""

    def __init__(self) -> None:
        from spt.hooks.interfaces import (
            BulkTransit,
            Connector,
            DiscoveryBackend,
            NotificationRenderer,
            PayloadType,
            RecordKind,
            SyncTier,
            Updater,
        )

        self.payload_types: Registry[type[PayloadType]] = Registry("payload type")
        self.discovery_backends: Registry[DiscoveryBackend] = Registry("discovery backend")
        self.connectors: Registry[Connector] = Registry("connector")
        self.sync_tiers: Registry[SyncTier] = Registry("sync tier")
        self.notification_renderers: Registry[NotificationRenderer] = Registry("notification renderer")
        self.updaters: Registry[Updater] = Registry("updater")
        self.record_kinds: Registry[RecordKind] = Registry("record kind")
        self.commands: Registry[CommandRef] = Registry("command")
        self.bulk_transits: Registry[BulkTransit] = Registry("bulk transit")

    def all(self) -> dict[str, Registry[Any]]:
        """Hook suffix → registry, e.g. "payload_types" for `spt_register_payload_types`."""
        return {
            "payload_types": self.payload_types,
            "discovery_backends": self.discovery_backends,
            "connectors": self.connectors,
            "sync_tiers": self.sync_tiers,
            "notification_renderers": self.notification_renderers,
            "updaters": self.updaters,
            "record_kinds": self.record_kinds,
            "commands": self.commands,
            "bulk_transits": self.bulk_transits,
        }

    def freeze(self) -> None:
        for registry in self.all().values():
            registry.freeze()
