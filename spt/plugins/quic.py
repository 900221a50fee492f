"""The direct QUIC connector: essential, cannot be blocked.

Direct dialling is what every other path falls back from, so it is the one connector spt cannot
run without. It dials every address discovery knows for the peer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from spt.core.identity import NodeId
from spt.hooks import Candidate, Connector, Registry, hookimpl
from spt.hooks.interfaces import ConnectContext


class DirectQuic(Connector):
    name: ClassVar[str] = "quic"
    priority: ClassVar[int] = 0

    async def candidates(self, ctx: ConnectContext, peer: NodeId, hints: Sequence[Candidate]) -> Sequence[Candidate]:
        return [c for c in hints if c.node is None or c.node == peer]


@hookimpl
def spt_register_connectors(registry: Registry[Connector]) -> None:
    registry.add(DirectQuic())
