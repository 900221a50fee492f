"""Message bodies: valid UTF-8 of at most 1 MiB (SPEC.md §3.4). Pure.

Apart from `envelope` because every `spt send` checks its body before asking the daemon, and
this module is cheap to import.
"""

from __future__ import annotations

from spt.core.errors import UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (every `spt send` loads this)
if TYPE_CHECKING:
    from typing import Final

__all__ = ["MAX_BODY_BYTES", "check_body"]

MAX_BODY_BYTES: Final = 1024 * 1024
_AS_FILE: Final = "send binary or large data as a file (spt file send)"


def check_body(body: str | bytes) -> str:
    """The body as text if it is valid UTF-8 of at most 1 MiB, else UsageError BAD_BODY."""
    if isinstance(body, bytes):
        raw = body
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            why = f"the body is not valid UTF-8 (byte {exc.start}); {_AS_FILE}"
            raise UsageError("BAD_BODY", "", why) from exc
    else:
        text = body
        try:
            raw = body.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UsageError(
                "BAD_BODY", "", f"the body is not valid UTF-8 (character {exc.start}); {_AS_FILE}"
            ) from exc
    if len(raw) > MAX_BODY_BYTES:
        raise UsageError("BAD_BODY", "", f"the body is {len(raw)} bytes, over 1 MiB; {_AS_FILE}")
    return text
