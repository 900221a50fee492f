"""Checks of the file service's request bodies, shared by its modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spt.core.errors import RemoteProtocolError

__all__ = ["as_map", "check_tid"]


def as_map(body: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise RemoteProtocolError(what, f"a {what} body is a map")
    return body


def check_tid(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 32 or not all(ch in "0123456789abcdef" for ch in value):
        raise RemoteProtocolError("tid", "a transfer id is 32 lowercase hex characters")
    return value
