"""Static peers: `host:port` addresses from `net.static_peers` and `--peer`; works air-gapped.

Static peers are not filtered by tag: the join ALPN's hello tells which subnet a peer serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from spt.core.types import parse_hostport
from spt.hooks import Candidate, DiscoveryBackend, DiscoveryContext, Registry, hookimpl


class StaticPeers(DiscoveryBackend):
    name: ClassVar[str] = "static_peers"
    priority: ClassVar[int] = 10

    def __init__(self) -> None:
        self._peers: list[tuple[str, int]] = []

    async def start(self, ctx: DiscoveryContext) -> None:
        self._peers = [parse_hostport(p) for p in ctx.config_section("net").get("static_peers", [])]

    async def find(self, tag: bytes, timeout: float) -> Sequence[Candidate]:
        return [Candidate(host, port, source="static") for host, port in self._peers]


@hookimpl
def spt_register_discovery_backends(registry: Registry[DiscoveryBackend]) -> None:
    registry.add(StaticPeers())
