"""Small value types and their validation, shared by every layer.

Validation lives here, at the edge, so the rest of the code trusts typed values (STYLE.md §7).
Pure: nothing here touches files, sockets or clocks.
"""

from __future__ import annotations

import re

from spt.core.errors import UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (`spt ready` loads this)
if TYPE_CHECKING:
    from typing import Final

_LABEL_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,63}")
_SUBNET_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_ENDPOINT_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_label(label: str) -> str:
    """Return `label` if it is a valid node label (1–63 of `[A-Za-z0-9._-]`), else raise BAD_LABEL."""
    if not _LABEL_RE.fullmatch(label):
        raise UsageError("BAD_LABEL", label, 'a label is 1–63 characters of letters, digits, ".", "_" and "-"')
    return label


def label_from_hostname(hostname: str) -> str:
    """The default label: the hostname with characters a label cannot hold replaced by '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", hostname)[:63]
    return cleaned or "node"


def check_subnet_name(name: str) -> str:
    """Return `name` if it is a valid subnet name, else raise BAD_NAME (exit 2)."""
    if not _SUBNET_RE.fullmatch(name):
        raise UsageError(
            "BAD_NAME",
            name,
            'a subnet name is 1–32 letters, digits, "_" or "-", starting with a letter or digit',
        )
    return name


def canonical_subnet_name(name: str) -> str:
    """The form bound into cryptography: lowercase (SPEC.md §2.2)."""
    return check_subnet_name(name).lower()


def check_endpoint_id(endpoint_id: str) -> str:
    """Return `endpoint_id` if valid (SPEC.md §2.3), else raise BAD_ID (exit 2)."""
    if not _ENDPOINT_RE.fullmatch(endpoint_id):
        raise UsageError(
            "BAD_ID",
            endpoint_id,
            'an endpoint id is 1–64 letters, digits, ".", "_" or "-", starting with a letter or digit',
        )
    return endpoint_id


def check_seconds(value: object) -> float:
    """`value` as a `--timeout`: a number of seconds, 0 or more, else BAD_USAGE (exit 2). NaN
    is refused too (`nan < 0` is false): a timer at NaN misorders the event loop's others."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise UsageError("BAD_USAGE", str(value), "--timeout is a number of seconds")
    return float(value)


def parse_hostport(text: str, default_port: int = 47470) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or a bare host; raises ValueError with the bad input named."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"peer address {text!r} has no host; use host:port")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"peer address {text!r} has a bad port; use host:port") from None
    if not 0 < port < 65536:
        raise ValueError(f"peer address {text!r}: port {port} is out of range")
    return host, port
