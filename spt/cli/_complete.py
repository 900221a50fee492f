"""Shell completion of values, not only verbs: addresses, local endpoint ids, subnet names.

`eval "$(_SPT_COMPLETE=bash_source spt)"` (or zsh_source, fish_source) turns it on. The values
come from the running daemon (never started for a completion) and are empty without one.
Cheap to import: everything is imported inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import click
    from click.shell_completion import CompletionItem

ASK_TIMEOUT = 2.0


def _ask(op: str, args: dict[str, Any] | None = None) -> Any:
    from spt.core.errors import SptError
    from spt.core.ipc import call, connect
    from spt.core.paths import StatePaths

    try:
        conn = connect(StatePaths.resolve().socket)
    except (SptError, OSError):
        return None
    try:
        return call(conn, op, args or {}, timeout=ASK_TIMEOUT)
    except (SptError, OSError):
        return None
    finally:
        conn.close()


def _items(values: set[str], incomplete: str) -> list[CompletionItem]:
    from click.shell_completion import CompletionItem

    wanted = incomplete.lower()
    return [CompletionItem(v) for v in sorted(values, key=str.lower) if v.lower().startswith(wanted)]


def local_ids(_ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Ids of this node's perches (what `spt ready`, `endpoint stop|state|…` take)."""
    doc = _ask("endpoint.list") or {}
    return _items({p["id"] for p in doc.get("local", [])}, incomplete)


def addresses(_ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Endpoint ids from the local registry: local perches, remote rows, and `id@label` forms."""
    doc = _ask("endpoint.list") or {}
    values = {p["id"] for p in doc.get("local", [])}
    for sub in doc.get("subnets", []):
        for row in sub.get("endpoints", []):
            values.add(row["id"])
            values.add(f"{row['id']}@{row['node']['label']}")
    return _items(values, incomplete)


def subnet_names(_ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    doc = _ask("subnet.status") or {}
    return _items({s["name"] for s in doc.get("subnets", []) if s.get("name")}, incomplete)
