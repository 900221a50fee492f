"""Static peers: `host:port` addresses from `net.static_peers` and `--peer`; works air-gapped.

Static peers are not filtered by tag: the join ALPN's hello tells which subnet a peer serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from spt.hooks import Candidate, DiscoveryBackend, DiscoveryContext, Registry, hookimpl


def parse_hostport(text: str, default_port: int = 47470) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or a bare host; raises ValueError with the bad input named."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"peer address {text!r} has no host; use host:port")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"peer address {text!r} has a bad port; use host:port") from None
    if not 0 < port < 65536:
        raise ValueError(f"peer address {text!r}: port {port} is out of range")
    return host, port


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
