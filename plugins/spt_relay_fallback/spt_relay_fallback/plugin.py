"""Registers the relay connector. Relays come only from `relay.urls` in config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from spt.core.identity import NodeId
from spt.hooks import Candidate, Connector, Registry, hookimpl
from spt.hooks.interfaces import ConnectContext


class RelayConnector(Connector):
    """Reaches a peer through a relay; held back so a direct path gets the first chance."""

    name: ClassVar[str] = "relay"
    priority: ClassVar[int] = 50
    start_delay: ClassVar[float] = 0.25

    async def candidates(self, ctx: ConnectContext, peer: NodeId, hints: Sequence[Candidate]) -> Sequence[Candidate]:
        return []  # no relay is configured until `relay.urls` names one


@hookimpl
def spt_register_connectors(registry: Registry[Connector]) -> None:
    registry.add(RelayConnector())
