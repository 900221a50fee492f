"""Where a node's relays come from (SPEC.md §7.6): this machine, its subnets, the build.

- **local**: `relay.urls` in this node's config.toml (`spt relay add`); these are also the
  relays the node announces to its subnets, in its signed presence.
- **subnet**: relays announced by current members of the node's subnets (learned from presence
  and the join bundle; see `spt.core.relaybook`). A relay that only a pruned member announced
  drops out.
- **default**: the list a distribution ships as package data (`data/default_relays.txt`),
  empty here; an air-gapped build has no relay plugin at all.

`spt relay remove` of a relay that came from the subnet or the build puts it on a local deny
list (`<state>/relay/removed.json`), so it stays removed however often members announce it;
`spt relay add` of it takes it off again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

from spt.core.errors import ConfigError
from spt_relay_fallback.url import RelayUrl

LOCAL: Final = "local"
SUBNET: Final = "subnet"
DEFAULT: Final = "default"
MAX_REMOVED: Final = 256


@dataclass(frozen=True)
class Chosen:
    url: RelayUrl
    source: str
    # the subnets whose business may go to this relay (rendezvous tags): None for this node's own
    # relays and the build's, which serve every subnet; for a relay learned from members, only
    # the subnets whose members announce it (SPEC.md §9.13: nothing of S to a stranger to S)
    subnets: frozenset[str] | None = None


def build_defaults() -> list[RelayUrl]:
    """The distribution's default relays (package data); a bad line is a packaging bug."""
    text = resources.files("spt_relay_fallback").joinpath("data/default_relays.txt").read_text(encoding="utf-8")
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [RelayUrl.parse(line) for line in lines if line]


def removed_file(state_dir: Path) -> Path:
    return state_dir / "relay" / "removed.json"


def read_removed(state_dir: Path) -> set[str]:
    """Public forms of the relays this node's user removed (an unreadable file counts as empty)."""
    try:
        raw: Any = json.loads(removed_file(state_dir).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return set()
    return {u for u in raw if isinstance(u, str)} if isinstance(raw, list) else set()


def write_removed(state_dir: Path, removed: Iterable[str]) -> None:
    path = removed_file(state_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(sorted(removed)[:MAX_REMOVED], fh)
    os.replace(tmp, path)


def choose(
    local: Sequence[RelayUrl],
    subnet: Mapping[str, Sequence[str]],
    defaults: Sequence[RelayUrl],
    removed: set[str],
) -> list[Chosen]:
    """The relays to register with, each once: local, then the build's, then the subnet's
    (`subnet` maps a URL to the subnets whose members announce it); removed ones left out
    (unless added locally again, which `spt relay add` also takes off the deny list)."""
    out: dict[str, Chosen] = {}
    for url in local:
        out.setdefault(url.public, Chosen(url, LOCAL))
    for url in defaults:
        if url.public not in removed:
            out.setdefault(url.public, Chosen(url, DEFAULT))
    for text, names in subnet.items():
        try:
            url = RelayUrl.parse(text)
        except ConfigError:
            continue  # a member announcing garbage costs that entry only
        if url.public in removed or (url.public in out and out[url.public].subnets is None):
            continue
        before = out.get(url.public)
        scope = frozenset(names) | (before.subnets or frozenset() if before is not None else frozenset())
        out[url.public] = Chosen(url, SUBNET, scope)
    return list(out.values())
