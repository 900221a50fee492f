"""What this node shows of endpoints: `spt endpoint list`, `spt whoami`, and the rows the registry
advertises (SPEC.md §3.6, §3.10, §4.5).

What lives here: `EndpointViews`, the read-only documents built from an `Endpoints` service (its
perches, listeners and settings) and the replicated remote rows; `nulls`, the JSON rule for
absent values. What must not: change anything. Every method only reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from spt.core.caller import may_use
from spt.core.identity import NodeId
from spt.core.proto.resolve import Row

if TYPE_CHECKING:
    from spt.core.endpoints import Endpoints, Perch
    from spt.core.subnets import HeldSubnet

TRANSIENT_PREFIX: Final = "tmp."  # transient sender identities (§4.3): route replies, never listed


def nulls(view: dict[str, Any]) -> dict[str, Any]:
    """SPEC.md §3.10: an absent optional value is `null` in JSON, never an empty string."""
    for key in ("description", "home"):
        if key in view and not view[key]:
            view[key] = None
    return view


class EndpointViews:
    """The documents `spt endpoint list` and `spt whoami` print, and the rows to advertise."""

    def __init__(self, eps: Endpoints) -> None:
        self.eps = eps

    def self_view(self, perch_id: str | None) -> dict[str, Any] | None:
        """The caller's own row (`SELF:`), or None without an identity."""
        if not perch_id:
            return None
        perch = self.eps.get(perch_id)
        return {
            "id": perch.id if perch else perch_id,
            "status": perch.state if perch else None,
            "ready": perch is not None and self.eps.delivery.listening(perch),
            "alive": perch is not None and self.eps.alive(perch),
        }

    def subnet_rows(self, sub: HeldSubnet) -> list[dict[str, Any]]:
        """The rows visible in `sub`: this node's perches, then the replicated remote rows."""
        rows = self.own_rows(sub, transient=False)
        offline = self.eps._offline_reasons()
        for row in self.eps._remote_rows():
            if row.subnet.lower() != sub.canonical or not row.visible or row.node == self.eps.node_id:
                continue
            if row.endpoint_id.startswith(TRANSIENT_PREFIX):
                continue  # transient identities route replies but are not listed
            rows.append(self.remote_view(row, offline))
        return rows

    def own_rows(self, sub: HeldSubnet, *, transient: bool, only: str | None = None) -> list[dict[str, Any]]:
        """This node's rows visible in `sub`; with `only`, that perch's (none, or one)."""
        if only is None:
            perches = self.eps.perches(transient=transient)
        else:  # a look-up, not a scan: a publish asks it for one perch in every subnet
            found = self.eps._table().get(only.lower())
            perches = [found] if found is not None and (transient or not found.transient) else []
        shown = [
            p for p in perches
            # an orphan (home left) is local-only (§4.8); a transient sender has no home at all
            if (p.home is not None or p.transient) and self.eps.visible(p, sub)
        ]
        if not shown:
            return []  # most subnets of a node in many, and the label is a query
        me = {"label": self.eps.host.label, "key": self.eps.node_id.hex}
        return [
            {
                "id": p.id,
                # a transient sender is homed nowhere; its replies come through this subnet
                "home": self.eps._subnet_name(p.home) or (sub.name if p.transient else None),
                "node": me,
                "state": p.state,
                "ready": self.eps.delivery.listening(p),
                "alive": self.eps.alive(p),
                "hosted": p.hosted,
                "description": p.description,
                "offline_reason": None,
            }
            for p in shown
        ]

    def remote_view(self, row: Row, offline: Mapping[NodeId, str]) -> dict[str, Any]:
        return {
            "id": row.endpoint_id,
            "home": row.home,
            "node": {"label": self.eps.host.subnets.label_of(row.node) or row.node.short, "key": row.node.hex},
            "state": "offline" if row.node in offline else row.state,
            "offline_reason": offline.get(row.node),  # `detached` or `silent` (§4.8), else null
            "ready": row.ready,
            "alive": row.alive,
            "hosted": row.hosted,
            "description": row.description,
        }

    def local_rows(self, sub: HeldSubnet) -> list[dict[str, Any]]:
        """What this node advertises in `sub` (§4.5: only where visible), for the registry.

        Transient `tmp.` perches are advertised too, so that replies to a ring reach them.
        """
        return self.own_rows(sub, transient=True)

    def perch_rows(self, sub: HeldSubnet, perch_id: str) -> list[dict[str, Any]]:
        """`local_rows(sub)` of one perch: none where it does not show, else its one row."""
        return self.own_rows(sub, transient=True, only=perch_id)

    def count_visible(self, sub: HeldSubnet) -> int:
        return len(self.subnet_rows(sub))

    def local_view(self, perch: Perch) -> dict[str, Any]:
        settings = self.eps.settings(perch)
        return {
            "id": perch.id,
            "home": self.eps._subnet_name(perch.home),
            "state": perch.state,
            "ready": self.eps.delivery.listening(perch),
            "alive": self.eps.alive(perch),
            "hosted": perch.hosted,
            "pid": self.eps._hosted_pid(perch),
            "folder": os.fspath(self.eps.folder(perch)),
            "visible_in": [s.name for s, visible, _ in settings if visible],
            "scope": [s.name for s, _, in_scope in settings if in_scope],
            "busy": perch.busy,
            "description": perch.description,
        }

    def listing(self, self_id: str | None, subnet: str | None) -> dict[str, Any]:
        """The `spt endpoint list` document (SPEC.md §3.10)."""
        self.eps.housekeeping()
        subnets = self.eps.host.subnets
        subs = (
            [subnets.require(subnet)] if subnet else sorted(subnets.held.values(), key=lambda s: s.canonical)
        )
        return {
            "self": self.self_view(self_id),
            "node": {
                "label": self.eps.host.label,
                "key": self.eps.node_id.hex,
                "display": self.eps.node_id.display(self.eps.host.label),
            },
            "subnets": [
                {"name": s.name, "id": s.id.hex(), "endpoints": [nulls(r) for r in self.subnet_rows(s)]}
                for s in subs
            ],
            "local": [nulls(self.local_view(p)) for p in self.eps.perches() if may_use(p.owner)],
        }
