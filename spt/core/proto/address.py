"""Address syntax: `[subnet ":"] id ["@" node]` (SPEC.md §4.1, step 1). Pure.

What lives here: the `Address` value and `parse_address`, which checks syntax only and raises
`BAD_ADDRESS` (exit 2) for anything that is not an address.

What must not: resolution. Whether the subnet is held, the node exists or the id has a perch is
decided against a registry snapshot in `spt.core.proto.resolve`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from spt.core.errors import UsageError
from spt.core.types import check_endpoint_id, check_label, check_subnet_name

KEY_PREFIX_MIN: Final = 4
KEY_PREFIX_MAX: Final = 64

_SHAPE_RE: Final = re.compile(r"(?:(?P<subnet>[^:@]*):)?(?P<id>[^:@]*)(?:@(?P<node>[^:@]*))?")
_KEY_PREFIX_RE: Final = re.compile(r"[0-9A-Fa-f]{4,64}")
_SYNTAX: Final = "an address is [subnet:]id[@node], e.g. sergey, home:sergey, sergey@desktop"


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed address. `text` is the address exactly as typed: tokens echo it (`SENT:<text>`)."""

    subnet: str | None
    id: str
    node: str | None
    text: str

    def __str__(self) -> str:
        return self.text


def is_key_prefix(qualifier: str) -> bool:
    """True when a node qualifier can be read as a key prefix (4–64 hex characters)."""
    return _KEY_PREFIX_RE.fullmatch(qualifier) is not None


def check_node_qualifier(qualifier: str) -> str:
    """Return `qualifier` if it is a label or a 4–64 hex key prefix, else raise BAD_ADDRESS."""
    if is_key_prefix(qualifier):
        return qualifier
    try:
        return check_label(qualifier)
    except UsageError as exc:
        raise UsageError(
            "BAD_ADDRESS",
            qualifier,
            f"node {qualifier!r} is neither a label (1–63 of letters, digits, '.', '_', '-') "
            f"nor a key prefix ({KEY_PREFIX_MIN}–{KEY_PREFIX_MAX} hex characters)",
        ) from exc


def parse_address(text: str) -> Address:
    """Parse `[subnet:]id[@node]`; any syntax error raises UsageError("BAD_ADDRESS", text, why)."""
    shape = _SHAPE_RE.fullmatch(text)
    if shape is None or not text:
        raise UsageError("BAD_ADDRESS", text, _SYNTAX)
    subnet, endpoint_id, node = shape.group("subnet", "id", "node")
    if subnet is not None:
        try:
            check_subnet_name(subnet)
        except UsageError as exc:
            raise UsageError("BAD_ADDRESS", text, f"subnet {subnet!r}: {exc.message}") from exc
    try:
        check_endpoint_id(endpoint_id)
    except UsageError as exc:
        raise UsageError("BAD_ADDRESS", text, f"id {endpoint_id!r}: {exc.message}") from exc
    if node is not None:
        try:
            check_node_qualifier(node)
        except UsageError as exc:
            raise UsageError("BAD_ADDRESS", text, exc.message) from exc
    return Address(subnet=subnet, id=endpoint_id, node=node, text=text)
