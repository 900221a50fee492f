"""Every hook spt calls, in one place, grouped by phase.

What holds for all of them:
- Hooks are synchronous: they never block, await or do I/O. Work that waits belongs in the
  objects a plugin registers (payload types, backends…), which the runtime awaits.
- Implementation order carries no meaning. Where order matters, registered objects carry
  `priority`.
- An implementation may take fewer parameters than its spec (pluggy matches by name).
- Policy hooks answer True, False or None ("no opinion"); answers are collected: any False
  refuses, else any True accepts, else the documented default holds.

Fields in every docstring, in this order: Called by, Returns, Mode, Since.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from spt.hooks.interfaces import (
        BulkTransit,
        Connector,
        DiscoveryBackend,
        IncomingPayload,
        NodeRuntime,
        NotificationRenderer,
        PayloadType,
        RecordKind,
        SyncTier,
        Updater,
    )
    from spt.hooks.registry import (
        CommandRef,
        Registry,
    )

PROJECT = "spt"
_spec = pluggy.HookspecMarker(PROJECT)

# ---------------------------------------------------------------------------------------------
# bootstrap
# ---------------------------------------------------------------------------------------------


@_spec(historic=True)
def spt_addhooks(specs: pluggy.PluginManager) -> None:
    """Add a plugin's own hook specs (named `spt_<plugin>_<verb>`) with `specs.add_hookspecs`.

    Called by: the plugin manager, once per plugin as it is registered.
    Returns: nothing.
    Mode: historic (replayed to plugins registered later).
    Since: 0.1
    """


# ---------------------------------------------------------------------------------------------
# registration: each is called once per plugin at start-up, then the registry is frozen
# ---------------------------------------------------------------------------------------------


@_spec
def spt_register_payload_types(registry: Registry[type[PayloadType]]) -> None:
    """Add payload types (classes) with `registry.add(cls)`.

    Called by: the plugin manager, once, at start-up.
    Returns: nothing; a duplicate name marks the plugin failed.
    Mode: collect-all.
    Since: 0.1
    """


@_spec
def spt_register_discovery_backends(registry: Registry[DiscoveryBackend]) -> None:
    """Add discovery backends (mDNS, static peers, relay rendezvous).

    Called by: the plugin manager, once, at start-up.
    Returns: nothing.
    Mode: collect-all.
    Since: 0.1
    """


@_spec
def spt_register_connectors(registry: Registry[Connector]) -> None:
    """Add connectors: ways to reach a peer (direct QUIC, relay fallback).

    Called by: the plugin manager, once, at start-up.
    Returns: nothing.
    Mode: collect-all.
    Since: 0.1
    """


@_spec
def spt_register_bulk_transits(registry: Registry[BulkTransit]) -> None:
    """Add bulk transits: blind byte pipes to a member through a third party (relay TCP).

    Called by: the plugin manager, once, at start-up.
    Returns: nothing.
    Mode: collect-all.
    Since: 0.1
    """


@_spec
def spt_register_sync_tiers(registry: Registry[SyncTier]) -> None:
    """Add mind-sync tiers (live, project).

    Called by: the plugin manager, once, at start-up.
    Returns: nothing.
    Mode: collect-all.
    Since: 0.1
    """


@_spec
def spt_register_notification_renderers(registry: Registry[NotificationRenderer]) -> None:
    """Add notification renderers.

    Called by: the plugin manager, once, at start-up.
    Returns: nothing.
    Mode: collect-all.
    Since: 0.1
    """


@_spec
def spt_register_updaters(registry: Registry[Updater]) -> None:
    """Add the self-updater (at most one is used: the lowest name).

    Called by: the plugin manager, once, at start-up.
    Returns: nothing.
    Mode: collect-all.
    Since: 0.1
    """


@_spec
def spt_register_record_kinds(registry: Registry[RecordKind]) -> None:
    """Add replicated-record kinds (notifications, mind entries, third parties' dotted names).

    Called by: the plugin manager, once, at start-up.
    Returns: nothing; a duplicate name marks the plugin failed.
    Mode: collect-all.
    Since: 0.2
    """


@_spec
def spt_register_commands(registry: Registry[CommandRef]) -> None:
    """Add top-level CLI commands as lazy `CommandRef("name", "module:attribute")`.

    Called by: the CLI, only when a command is not built in (so `spt send` loads no plugin),
    and only when its cached table is out of date (`spt/cli/_command_cache.py`): what this
    registers must depend on the plugin's code alone, not on the time, the network or the node.
    Returns: nothing.
    Mode: collect-all.
    Since: 0.1
    """


# ---------------------------------------------------------------------------------------------
# runtime events and policy
# ---------------------------------------------------------------------------------------------


@_spec
def spt_node_started(node_id: str, port: int) -> None:
    """The daemon is up: its socket is bound and the control socket listens.

    Called by: the daemon, once per start.
    Returns: nothing.
    Mode: collect-all.
    Since: 0.1
    """


@_spec
def spt_runtime_started(runtime: NodeRuntime) -> None:
    """The node is running; a plugin adds its control operations and member request handlers.

    Called by: the daemon, once per start, after the transport and control socket are up.
    Returns: nothing; start background work with `runtime.spawn`.
    Mode: collect-all.
    Since: 0.1
    """


@_spec
def spt_peer_connected(peer: str, path: str) -> None:
    """A member connection opened (`peer` is the key in hex, `path` its kind).

    Called by: the daemon, for each new member connection.
    Returns: nothing.
    Mode: collect-all.
    Since: 0.1
    """


@_spec
def spt_accept_payload(payload: IncomingPayload) -> bool | None:
    """Decide whether this node handles an incoming payload.

    Called by: the node runtime, once per payload, after signature and membership checks.
    Returns: True to accept, False to refuse (the sender is told), None for no opinion.
    Mode: collect-all; any False refuses, otherwise the payload is accepted.
    Since: 0.1
    """


# ---------------------------------------------------------------------------------------------
# shutdown
# ---------------------------------------------------------------------------------------------


@_spec
def spt_node_stopping() -> None:
    """The daemon is about to stop; release what was acquired in `spt_node_started`.

    Called by: the daemon, once, before connections close.
    Returns: nothing.
    Mode: collect-all.
    Since: 0.1
    """
