"""Canonical JSON: the one byte form that is signed and hashed. Pure.

What lives here: `canonical_bytes`, which encodes a JSON-shaped value with sorted keys, no
whitespace, UTF-8 and integers only (SPEC.md §6.1), and `parse_canonical`, its strict inverse for
bytes read back from a peer or from storage. Binary values are carried as lowercase hex strings;
`canonical_bytes` turns `bytes` into hex itself, so callers may pass raw keys and hashes.

What must not: floats (their text form is not canonical across implementations), non-string
keys, or anything JSON cannot say. Those are our own bugs when encoding (LocalProtocolError) and
the peer's when decoding (RemoteProtocolError).
"""

from __future__ import annotations

import json
from typing import Any

from spt.core.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["canonical_bytes", "parse_canonical"]


def canonical_bytes(obj: object) -> bytes:
    """The canonical encoding of `obj`: dicts with str keys, lists/tuples, str, int, bool, None, bytes.

    Raises LocalProtocolError for anything else (a float included): what we sign must be exact.
    """
    return json.dumps(
        _normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def parse_canonical(data: bytes) -> Any:
    """Decode canonical JSON bytes; floats, NaN and invalid UTF-8 raise RemoteProtocolError.

    The result is plain JSON data (dict, list, str, int, bool, None): binary values stay hex.
    """
    try:
        text = data.decode("utf-8")
        return json.loads(text, parse_float=_refuse_float, parse_constant=_refuse_float)
    except (UnicodeDecodeError, json.JSONDecodeError, _FloatError) as exc:
        raise RemoteProtocolError("", f"not canonical JSON: {exc}") from exc


class _FloatError(ValueError):
    pass


def _refuse_float(text: str) -> Any:
    raise _FloatError(f"non-integer number {text[:20]!r}")


def _normalise(obj: object) -> object:
    # bool is an int subclass and is fine in JSON; only real floats are refused.
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).hex()
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise LocalProtocolError(repr(key)[:40], "canonical JSON keys are strings")
            out[key] = _normalise(value)
        return out
    if isinstance(obj, list | tuple):
        return [_normalise(v) for v in obj]
    raise LocalProtocolError(
        type(obj).__name__, "canonical JSON holds dicts, lists, str, int, bool, None and bytes"
    )
