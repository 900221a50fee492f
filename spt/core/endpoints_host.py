"""`EndpointsHost`: what the endpoint service (`spt.core.endpoints.Endpoints`) asks of the node
around it. The daemon is one and passes itself; a test may pass a smaller stand-in.

Every member is required: a host missing one is a mypy error where `Endpoints` is built, not a
hook looked up by name that silently does nothing (a daemon without `forward_messages` once left
batched messages waiting in the outgoing spool until the next drain). What may be absent answers
"none" by design: no hosted process (`hosted_alive` False, `hosted_pid` None), no plugin seeding a
fork's mind (`fork_mind` does nothing), no registry rows or offline nodes yet.

The network half (`spt.core.messaging`) is behind these methods; it starts after `Endpoints` is
built, so they are called only once the daemon has started, never from `Endpoints.__init__`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence, Set
from typing import TYPE_CHECKING, Any, Protocol

from spt.core.subnets import Notifier

if TYPE_CHECKING:
    from spt.core.config import NodeConfig
    from spt.core.identity import NodeId, NodeKey
    from spt.core.paths import StatePaths
    from spt.core.proto.resolve import RemoteTarget, Row
    from spt.core.store import Store
    from spt.core.subnets import Subnets


class EndpointsHost(Notifier, Protocol):
    # -- the node's own state, read when `Endpoints` is built and after ----------------------

    @property
    def store(self) -> Store: ...

    @property
    def key(self) -> NodeKey: ...

    @property
    def paths(self) -> StatePaths: ...

    @property
    def config(self) -> NodeConfig: ...

    @property
    def subnets(self) -> Subnets: ...

    @property
    def label(self) -> str: ...

    # -- the registry (the network layer publishes and replicates it) ------------------------

    def on_endpoint_changed(self, perch_id: str) -> None:
        """A local perch changed: publish its rows (best effort; the presence loop repeats)."""
        ...

    def registry_rows(self) -> Sequence[Row]:
        """Other nodes' rows as replicated here (empty before any arrived)."""
        ...

    def offline_nodes(self) -> Set[NodeId]:
        ...

    def offline_reasons(self) -> Mapping[NodeId, str]:
        """Each node known offline, with why (SPEC.md §7.5 reasons)."""
        ...

    # -- messages for other nodes ------------------------------------------------------------

    async def forward_message(self, target: RemoteTarget, payload: Mapping[str, Any]) -> str:
        """The target's token; Refusal for its refusal; PeerError, TimeoutError or
        ConnectionError when it cannot be reached (the message then waits in the outgoing spool)."""
        ...

    def forward_messages(self, target: RemoteTarget, payloads: Sequence[Mapping[str, Any]]) -> list[asyncio.Future[str]]:
        """`forward_message` for a batch to one target node, queued in order before any await:
        one future per payload."""
        ...

    def outgoing_queued(self) -> None:
        """A message was committed to the outgoing spool: the drain may forward it now."""
        ...

    # -- the rest of the node ----------------------------------------------------------------

    def hosted_alive(self, perch_id: str) -> bool:
        """True while the perch's hosted process runs; False when none is hosted."""
        ...

    def hosted_pid(self, perch_id: str) -> int | None:
        """The hosted process's pid; None when none is hosted."""
        ...

    def fork_mind(self, source_id: str, new_id: str) -> None:
        """`new_id` was forked from `source_id`: plugins seed its mind; nothing without them."""
        ...
