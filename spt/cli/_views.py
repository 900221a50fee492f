"""The bodies of commands that make one control call and print its answer (`spt node show`,
`spt whoami`, `spt endpoint list`, `spt endpoint state`); click-free, so the plain path of
`_fast.py` and the click commands run the same code."""

from __future__ import annotations

import os

from spt.cli._output import emit, out, print_json
from spt.cli._send import identity
from spt.cli._state import daemon_call

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

ELLIPSIS = "\u2026"


def show_node(*, as_json: bool) -> None:
    """This node's display form, key, fingerprint, listening addresses and subnets."""
    doc = daemon_call("node.show")
    if as_json:
        print_json({k: doc[k] for k in ("label", "key", "fingerprint", "addresses", "subnets")})
        return
    out(f"NODE: {doc['display']}")
    out(f"key: {doc['key']}")
    out(f"fingerprint: {doc['fingerprint']}")
    out(f"addresses: {' '.join(doc['addresses'])}")
    out(f"subnets: {', '.join(s['name'] for s in doc['subnets']) or '(none)'}")


def show_whoami(*, as_json: bool) -> None:
    """Who this caller is ($SPT_AGENT_ID), its perch state, and the subnets."""
    doc = daemon_call("endpoint.whoami", {"self": identity(None)})
    if as_json:
        print_json(doc)
        return
    me = doc["self"]
    if me is None:
        out("SELF: none")
    else:
        out(_self_line(me))
    for sub in doc["subnets"]:
        out(f"SUBNET {sub['name']}")


def _self_line(me: dict[str, Any]) -> str:
    status = me["status"] or "no-perch"
    return f"SELF: {me['id']}  {status}  ready={_bool(me['ready'])} alive={_bool(me['alive'])}"


def _bool(value: Any) -> str:
    return str(bool(value)).lower()


def _display(node: dict[str, Any]) -> str:
    return f"{node['label']} ({node['key'][:8]}{ELLIPSIS})"


def list_endpoints(*, detail: bool, subnet: str | None, as_json: bool) -> None:
    """Endpoints visible in each subnet, then this node's perches."""
    doc = daemon_call("endpoint.list", {"self": os.environ.get("SPT_AGENT_ID") or None, "subnet": subnet})
    if as_json:
        doc.pop("node", None)
        print_json(doc)
        return
    if doc["self"] is not None:
        out(_self_line(doc["self"]))
    count = 0
    for sub in doc["subnets"]:
        out(f"SUBNET {sub['name']}")
        for row in sub["endpoints"]:
            count += 1
            why = f" ({row['offline_reason']})" if row.get("offline_reason") else ""
            out(f"  {row['id']}  {_display(row['node'])}  \u25a0 {row['state'].upper()}{why}")
            if detail:
                out(f"    home={row['home'] or '-'}  ready={_bool(row['ready'])} alive={_bool(row['alive'])}")
                if row["description"]:
                    out(f"    {row['description']}")
    out(f"ENDPOINTS:{count}")
    out(f"This node: {doc['node']['display']}")
    if not doc["local"]:
        out("  (no local perches)")
    for perch in doc["local"]:
        out(f"  {perch['id']}  {perch['state']}  ready={_bool(perch['ready'])} alive={_bool(perch['alive'])}")
        if detail:
            out(
                f"    home={perch['home'] or '-'}  visible_in={','.join(perch['visible_in']) or '-'}"
                f"  scope={','.join(perch['scope']) or '-'}"
            )
            out(f"    folder={perch['folder']}")
            if perch.get("description"):
                out(f"    {perch['description']}")


def set_activity(endpoint_id: str, activity: str) -> None:
    """Report that perch `endpoint_id` is busy or idle: STATE:<id> <activity>."""
    doc = daemon_call("endpoint.state", {"id": endpoint_id, "activity": activity})
    emit("STATE", doc["id"], doc["activity"])
