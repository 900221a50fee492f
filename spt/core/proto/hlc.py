"""Hybrid logical clock timestamps (SPEC.md §2.10). Pure.

What lives here: `HlcTimestamp` (wall milliseconds, counter, node key as hex), totally ordered by
those three fields in that order, with its plain wire form; and `Hlc`, the per-node clock that
issues timestamps for local events and absorbs the timestamps of received ones.

What must not: reading a clock. The physical time arrives as `wall_ms` on every call, from the
shell; persisting `Hlc.last` across restarts is the store's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from spt.core.errors import LocalProtocolError, RemoteProtocolError
from spt.core.identity import NodeId

_NODE_HEX_RE: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True, order=True)
class HlcTimestamp:
    """One HLC reading. The dataclass order (wall_ms, counter, node) is the spec's total order.

    `node` is the issuing node's key as 64 lowercase hex characters, so comparing the strings
    compares the keys byte by byte and two nodes never issue equal timestamps.
    """

    wall_ms: int
    counter: int
    node: str

    def __post_init__(self) -> None:
        if self.wall_ms < 0 or self.counter < 0:
            raise LocalProtocolError(str(self), "HLC wall time and counter are never negative")
        if not _NODE_HEX_RE.fullmatch(self.node):
            raise LocalProtocolError(self.node, "an HLC node is 64 lowercase hex characters")

    def to_wire(self) -> list[Any]:
        """`[wall_ms, counter, node_hex]`: the form inside frames and canonical JSON."""
        return [self.wall_ms, self.counter, self.node]

    @classmethod
    def from_wire(cls, value: object) -> HlcTimestamp:
        """Parse `to_wire()` output from a peer; anything else raises RemoteProtocolError."""
        if not isinstance(value, list) or len(value) != 3:
            raise RemoteProtocolError(repr(value)[:80], "an HLC timestamp is [wall_ms, counter, node]")
        wall, counter, node = value
        if not _is_count(wall) or not _is_count(counter):
            raise RemoteProtocolError(repr(value)[:80], "HLC wall time and counter are non-negative integers")
        if not isinstance(node, str) or not _NODE_HEX_RE.fullmatch(node):
            raise RemoteProtocolError(repr(node)[:80], "an HLC node is 64 lowercase hex characters")
        return cls(wall, counter, node)

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.counter}.{self.node[:8]}"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Hlc:
    """A node's hybrid logical clock.

    `now(wall_ms)` stamps a local event; `update(received, wall_ms)` stamps the receipt of a
    remote one. Every timestamp it returns is greater than every timestamp it returned or
    absorbed before, whatever `wall_ms` does (it may stand still or step backwards).

    `max_drift_ms`, when set, refuses received timestamps further ahead of `wall_ms` than that
    with RemoteProtocolError: one peer with a wild clock must not drag ours into the future.
    """

    __slots__ = ("_counter", "_node", "_wall", "max_drift_ms")

    def __init__(
        self, node: NodeId, last: HlcTimestamp | None = None, *, max_drift_ms: int | None = None
    ) -> None:
        self._node = node.hex
        # Resuming from a stored `last` keeps timestamps increasing across restarts.
        self._wall = last.wall_ms if last is not None else 0
        self._counter = last.counter if last is not None else 0
        self.max_drift_ms = max_drift_ms

    @property
    def last(self) -> HlcTimestamp:
        """The latest (wall, counter) this clock has reached, stamped with this node."""
        return HlcTimestamp(self._wall, self._counter, self._node)

    def now(self, wall_ms: int) -> HlcTimestamp:
        """A timestamp for a local or sent event at physical time `wall_ms`."""
        if wall_ms > self._wall:
            self._wall, self._counter = wall_ms, 0
        else:
            self._counter += 1
        return self.last

    def update(self, received: HlcTimestamp, wall_ms: int) -> HlcTimestamp:
        """Absorb a received timestamp at physical time `wall_ms`; returns the receipt's stamp."""
        if self.max_drift_ms is not None and received.wall_ms - wall_ms > self.max_drift_ms:
            raise RemoteProtocolError(
                str(received),
                f"timestamp is {received.wall_ms - wall_ms} ms ahead of this clock "
                f"(the limit is {self.max_drift_ms} ms)",
            )
        wall = max(self._wall, received.wall_ms, wall_ms)
        if wall == self._wall == received.wall_ms:
            counter = max(self._counter, received.counter) + 1
        elif wall == self._wall:
            counter = self._counter + 1
        elif wall == received.wall_ms:
            counter = received.counter + 1
        else:
            counter = 0
        self._wall, self._counter = wall, counter
        return self.last
