"""Which relays the members of this node's subnets announce (SPEC.md §7.6, "Relays belong to
the subnet").

A relay added on one member (`spt relay add`) travels in that member's signed presence records
and in the join bundle, so a machine that joined on a LAN with no relay of its own still knows
where its subnet can be reached when it moves behind another NAT. The book keeps the last list
each member announced, durably, because a node that wakes up on a new network has no fresh
presence yet and needs the relays exactly then. Only current members count: when a member is
pruned or leaves, the relays it alone announced drop out on the next look.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Final

from spt.core.identity import NodeId
from spt.core.store import Store

META_KEY: Final = "member_relays"
MAX_RELAYS_PER_MEMBER: Final = 16
MAX_URL_LENGTH: Final = 512


class RelayBook:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._by_node: dict[NodeId, tuple[str, ...]] = {}
        try:
            raw = json.loads(store.get_meta(META_KEY) or "{}")
        except json.JSONDecodeError:
            raw = {}
        if isinstance(raw, dict):
            for key, urls in raw.items():
                try:
                    self._by_node[NodeId.from_hex(key)] = _clean(urls)
                except Exception:  # a damaged entry costs that member's relays, nothing else
                    continue

    def learn(self, node: NodeId, urls: Sequence[str]) -> None:
        """`node` now announces exactly `urls` (from its signed presence, or a join bundle)."""
        cleaned = _clean(urls)
        if self._by_node.get(node) == cleaned:
            return
        if cleaned:
            self._by_node[node] = cleaned
        else:
            self._by_node.pop(node, None)
        self._save()

    def _save(self) -> None:
        with self._store.transaction():
            self._store.set_meta(META_KEY, json.dumps({n.hex: list(u) for n, u in sorted(self._by_node.items())}))

    def announced_by(self, node: NodeId) -> tuple[str, ...]:
        return self._by_node.get(node, ())

    def keep_only(self, members: Iterable[NodeId]) -> None:
        """Forget what nodes that are no longer members announced (pruned, left)."""
        gone = set(self._by_node) - set(members)
        if gone:
            for node in gone:
                del self._by_node[node]
            self._save()


def _clean(urls: object) -> tuple[str, ...]:
    """A member's list, bounded: strings only, short, at most MAX_RELAYS_PER_MEMBER, no repeats."""
    if not isinstance(urls, list | tuple):
        return ()
    kept = [u for u in urls if isinstance(u, str) and 0 < len(u) <= MAX_URL_LENGTH]
    return tuple(dict.fromkeys(kept))[:MAX_RELAYS_PER_MEMBER]
