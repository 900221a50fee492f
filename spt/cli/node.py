"""`spt node show`, `spt node label set`."""

from __future__ import annotations

import click

from spt.cli._output import emit, out, print_json
from spt.cli._state import daemon_call, state


@click.group()
def node() -> None:
    """This node's identity: key, label, addresses."""


@node.command()
@click.pass_context
def show(ctx: click.Context) -> None:
    """Show this node's display form, key, fingerprint and listening addresses."""
    doc = daemon_call("node.show")
    if state(ctx).json:
        print_json({k: doc[k] for k in ("label", "key", "fingerprint", "addresses", "subnets")})
        return
    out(f"NODE: {doc['display']}")
    out(f"key: {doc['key']}")
    out(f"fingerprint: {doc['fingerprint']}")
    out(f"addresses: {' '.join(doc['addresses'])}")
    out(f"subnets: {', '.join(s['name'] for s in doc['subnets']) or '(none)'}")


@node.group()
def label() -> None:
    """The node's human label."""


@label.command("set")
@click.argument("name")
def label_set(name: str) -> None:
    """Set the node's label (1–63 of letters, digits, '.', '_', '-')."""
    from spt.core.types import check_label

    check_label(name)
    doc = daemon_call("node.label.set", {"label": name})
    emit("LABELED", doc["label"])
