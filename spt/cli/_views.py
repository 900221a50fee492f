"""What the read commands `spt node show` and `spt whoami` print; click-free, so the plain path
of `_fast.py` and the click commands run the same code."""

from __future__ import annotations

from spt.cli._output import out, print_json
from spt.cli._send import identity
from spt.cli._state import daemon_call

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any


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
    return f"SELF: {me['id']}  {status}  ready={str(me['ready']).lower()} alive={str(me['alive']).lower()}"
