"""The plugin contract of spt: the only spt import a plugin needs.

Writing a plugin, in three steps:

1. Implement the object of your kind from `spt.hooks.interfaces` (a `PayloadType` subclass, a
   `DiscoveryBackend`, …). Third-party payload names are dotted: `acme.location`.
2. Register it from a hook implementation marked with `hookimpl`::

       from spt.hooks import hookimpl, PayloadType

       @hookimpl
       def spt_register_payload_types(registry):
           registry.add(Location)

3. Declare the module under the `spt.plugins` entry-point group in your `pyproject.toml`::

       [project.entry-points."spt.plugins"]
       location = "spt_location.plugin"

   The entry-point name is what users type in `-p no:location` or `SPT_DISABLE_PLUGINS`.

`spt plugins list` then shows the plugin, its distribution and what it provides. A plugin that
fails to import or register is listed as failed with the reason; spt keeps running.
"""

from __future__ import annotations

import pluggy

from spt.hooks.interfaces import (
    BulkTransit,
    Candidate,
    Connector,
    DiscoveryBackend,
    DiscoveryContext,
    HostedTerminal,
    IncomingPayload,
    MemberPresence,
    NodeRuntime,
    NotificationRenderer,
    NotificationSink,
    PayloadContext,
    PayloadType,
    RecordKind,
    ReplicatedRecord,
    Replication,
    SyncTier,
    Updater,
)
from spt.hooks.registry import CommandRef, Registries, Registry
from spt.hooks.specs import PROJECT

hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "PROJECT",
    "BulkTransit",
    "Candidate",
    "CommandRef",
    "Connector",
    "DiscoveryBackend",
    "DiscoveryContext",
    "HostedTerminal",
    "IncomingPayload",
    "MemberPresence",
    "NodeRuntime",
    "NotificationRenderer",
    "NotificationSink",
    "PayloadContext",
    "PayloadType",
    "RecordKind",
    "Registries",
    "Registry",
    "ReplicatedRecord",
    "Replication",
    "SyncTier",
    "Updater",
    "hookimpl",
]
