"""Several messages in one `msg.deliver_batch` request to a member node, and its answer. Pure.

A node that has several messages for the same node at once (a caller's batch, or concurrent
senders whose messages queued behind a request in flight) sends them in one request instead of
one `msg.deliver` each: one stream, one frame, one group commit on the receiver. The receiver
answers per message, in order, only once each is durable (or refused):

    request  msg.deliver_batch  {"subnet": <hex>, "payloads": [<msg.deliver payload>, ...]}
    answer   msg.results        {"results": [{"token": "SENT"|"QUEUED"} | {"error": {"code", "message"}}, ...]}

Once a message for a perch is refused with a retryable token (e.g. SPOOL_FULL), the batch's
later messages for that perch are refused the same way, not spooled: they wait behind it for the
sender's retry, in order.

Bounded: at most MAX_BATCH messages and MAX_BATCH_BYTES of bodies per request; a batch over
either, or malformed, is refused whole (nothing of it is spooled). A node that does not know the
type answers it as unknown (`unknown-type`) and the sender falls back to one `msg.deliver` per message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from spt.core.errors import RemoteProtocolError

__all__ = [
    "BATCH_TYPE",
    "MAX_BATCH",
    "MAX_BATCH_BYTES",
    "RESULTS_TYPE",
    "body_bytes",
    "decode_batch",
    "decode_results",
]

BATCH_TYPE: Final = "msg.deliver_batch"
RESULTS_TYPE: Final = "msg.results"
MAX_BATCH: Final = 256
MAX_BATCH_BYTES: Final = 4 * 1024 * 1024  # of message bodies; the frame limit is 16 MiB


def body_bytes(payload: Mapping[str, Any]) -> int:
    """The UTF-8 size of a payload's body (what the byte cap counts)."""
    body = payload.get("body")
    return len(body.encode("utf-8", "surrogatepass")) if isinstance(body, str) else 0


def decode_batch(body: Any) -> list[dict[str, Any]]:
    """The payloads of a batch request, in order; RemoteProtocolError for a malformed or oversize
    batch. Each payload is checked further (ids, sizes) as a single `msg.deliver` payload is."""
    if not isinstance(body, dict):
        raise RemoteProtocolError(BATCH_TYPE, "expected a map")
    payloads = body.get("payloads")
    if not isinstance(payloads, list) or not payloads:
        raise RemoteProtocolError(BATCH_TYPE, "'payloads' must be a non-empty list")
    if len(payloads) > MAX_BATCH:
        raise RemoteProtocolError(BATCH_TYPE, f"{len(payloads)} messages in one batch; the limit is {MAX_BATCH}")
    total = 0
    for payload in payloads:
        if not isinstance(payload, dict) or not isinstance(payload.get("body"), str):
            raise RemoteProtocolError(BATCH_TYPE, "each payload is a map with a string 'body'")
        total += body_bytes(payload)
        if total > MAX_BATCH_BYTES:
            raise RemoteProtocolError(BATCH_TYPE, f"the batch's bodies pass the {MAX_BATCH_BYTES}-byte limit")
    return payloads


def decode_results(body: Any, expected: int) -> list[tuple[str, str, str]]:
    """The answer to a batch: per message ("token", token, "") or ("error", code, message);
    RemoteProtocolError when it is malformed or does not answer exactly `expected` messages."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or len(results) != expected:
        raise RemoteProtocolError(RESULTS_TYPE, f"expected {expected} results")
    out: list[tuple[str, str, str]] = []
    for item in results:
        if isinstance(item, dict) and item.get("token") in ("SENT", "QUEUED"):
            out.append(("token", str(item["token"]), ""))
        elif isinstance(item, dict) and isinstance(item.get("error"), dict):
            err = item["error"]
            out.append(("error", str(err.get("code", "ERROR"))[:64], str(err.get("message", ""))[:1000]))
        else:
            raise RemoteProtocolError(RESULTS_TYPE, "each result is a token SENT/QUEUED or an error")
    return out
