"""The `msg.deliver_batch` wire (issue 14): bounded, and refused whole when malformed."""

from __future__ import annotations

import pytest

from spt.core.errors import RemoteProtocolError
from spt.core.proto.deliver import MAX_BATCH, MAX_BATCH_BYTES, decode_batch, decode_results


def _payload(body: str = "hi") -> dict[str, object]:
    return {"id": "ab" * 16, "from": "alice", "to": "bob", "body": body}


def test_a_batch_within_its_limits_decodes_in_order():
    payloads = [_payload(f"m{i}") for i in range(MAX_BATCH)]
    assert [p["body"] for p in decode_batch({"subnet": "x", "payloads": payloads})] == [f"m{i}" for i in range(MAX_BATCH)]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"payloads": [_payload()] * (MAX_BATCH + 1)}, f"the limit is {MAX_BATCH}"),
        # four bodies of 1 MiB and one byte more pass the byte limit; multi-byte characters count as bytes
        ({"payloads": [_payload("x" * (MAX_BATCH_BYTES // 4))] * 4 + [_payload("x")]}, "-byte limit"),
        ({"payloads": [_payload("é" * (MAX_BATCH_BYTES // 4))] * 2 + [_payload("x")]}, "-byte limit"),
        ({"payloads": []}, "non-empty list"),
        ({"payloads": "x"}, "non-empty list"),
        ({"payloads": [_payload(), 5]}, "string 'body'"),
        ({"payloads": [{"body": b"bytes"}]}, "string 'body'"),
        ([_payload()], "expected a map"),
    ],
)
def test_an_oversize_or_malformed_batch_is_refused_whole_with_the_reason(body, why):
    with pytest.raises(RemoteProtocolError, match=why):
        decode_batch(body)


def test_results_must_answer_every_message_with_a_token_or_an_error():
    body = {"results": [{"token": "SENT"}, {"error": {"code": "NO_PERCH", "message": "bob"}}, {"token": "QUEUED"}]}
    assert decode_results(body, 3) == [("token", "SENT", ""), ("error", "NO_PERCH", "bob"), ("token", "QUEUED", "")]
    with pytest.raises(RemoteProtocolError, match="expected 2 results"):
        decode_results(body, 2)  # an answer for more (or fewer) messages than were sent is no answer
    with pytest.raises(RemoteProtocolError, match="token SENT/QUEUED"):
        decode_results({"results": [{"token": "DELIVERED"}]}, 1)
