"""Replicated records (DESIGN.md §5, docs/design/replication.md): signed, immutable, union-merged. Pure.

What lives here: `SignedRecord`, one record of a plugin-declared kind, signed by its author over
`"spt/rec/v1"` ‖ canonical JSON of every field but the signature; its plain-dict form for frames
and storage; and the digest arithmetic anti-entropy uses: a partition's digest is one hash of
its sorted ids (constant size however many records it holds), and on a mismatch the ids are
split into `BUCKETS` buckets by their first hex digits, whose hashes are compared next, so only
the differing buckets' id lists ever travel.

Rules this module keeps:
1. Records are never edited: a record is identified by (kind, id) and a second copy with the
   same id is the same record (the signature covers the id). State that changes (an ack) is a
   new record that names the one it refers to.
2. A record is accepted only when the signature verifies under its author's key. Who the author
   may be, and who may receive it, is the kind's decision (`spt.hooks.RecordKind`).

What must not: clocks, storage or sockets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from spt.core.errors import IdentityError, RemoteProtocolError
from spt.core.identity import NodeId, NodeKey, sha256
from spt.core.proto.canonical import canonical_bytes
from spt.core.proto.hlc import HlcTimestamp

RECORD_DOMAIN: Final = b"spt/rec/v1"
MAX_RECORD_BYTES: Final = 96 * 1024  # a 64 KiB mind entry plus its envelope
BUCKET_HEX: Final = 2  # ids are split into 16**2 = 256 buckets on a digest mismatch
BUCKETS: Final = 16**BUCKET_HEX
EMPTY_DIGEST: Final = sha256(b"").hex()[:32]

_KIND_RE: Final = re.compile(r"[a-z][a-z0-9._-]{0,63}")
_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
_PART_RE: Final = re.compile(r"[\x21-\x7e]{1,300}")  # printable ASCII, no spaces
_HEX64_RE: Final = re.compile(r"[0-9a-f]{64}")
_SIG_RE: Final = re.compile(r"[0-9a-f]{128}")
_KEYS: Final = frozenset({"kind", "id", "part", "author", "hlc", "data", "sig"})


@dataclass(frozen=True, slots=True)
class SignedRecord:
    """One replicated record: `kind` names the plugin's record kind, `part` the partition it is
    compared in (a subnet, an endpoint's live tier…), `data` the kind's own JSON payload."""

    kind: str
    id: str
    part: str
    author: NodeId
    hlc: HlcTimestamp
    data: Mapping[str, Any]
    signature: bytes

    def _content(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.id,
            "part": self.part,
            "author": self.author.hex,
            "hlc": self.hlc.to_wire(),
            "data": dict(self.data),
        }

    def signed_bytes(self) -> bytes:
        return RECORD_DOMAIN + canonical_bytes(self._content())

    def verify(self) -> bool:
        return self.author.verify(self.signature, self.signed_bytes())

    def to_dict(self) -> dict[str, Any]:
        return {**self._content(), "sig": self.signature.hex()}

    def raw(self) -> bytes:
        """The stored form: canonical JSON of `to_dict()`."""
        return canonical_bytes(self.to_dict())

    @classmethod
    def from_dict(cls, data: object) -> SignedRecord:
        """Parse `to_dict()` output from a peer or the store; malformed data raises
        RemoteProtocolError (the signature is not checked here: call `verify`)."""
        if not isinstance(data, Mapping):
            raise RemoteProtocolError(type(data).__name__, "a record is a map")
        if set(data) != _KEYS:
            raise RemoteProtocolError("record", f"a record has exactly the keys {sorted(_KEYS)}")
        kind, rid, part, author, sig, payload = (
            data["kind"], data["id"], data["part"], data["author"], data["sig"], data["data"]
        )
        if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
            raise RemoteProtocolError(repr(kind)[:40], "a record kind is lowercase [a-z0-9._-]")
        if not isinstance(rid, str) or not _ID_RE.fullmatch(rid):
            raise RemoteProtocolError(repr(rid)[:40], "a record id is 32 lowercase hex characters")
        if not isinstance(part, str) or not _PART_RE.fullmatch(part):
            raise RemoteProtocolError(repr(part)[:40], "a partition is 1–300 printable ASCII characters")
        if not isinstance(author, str) or not _HEX64_RE.fullmatch(author):
            raise RemoteProtocolError(repr(author)[:80], "an author is a 64-hex node key")
        if not isinstance(sig, str) or not _SIG_RE.fullmatch(sig):
            raise RemoteProtocolError("sig", "a signature is 128 lowercase hex characters")
        if not isinstance(payload, Mapping) or not all(isinstance(k, str) for k in payload):
            raise RemoteProtocolError("data", "a record's data is a map with string keys")
        try:
            node = NodeId.from_hex(author)
        except IdentityError as exc:
            raise RemoteProtocolError(author[:16], exc.message) from exc
        hlc = HlcTimestamp.from_wire(data["hlc"])
        if hlc.node != author:
            raise RemoteProtocolError(node.short, "a record's HLC timestamp is stamped by its author")
        record = cls(kind, rid, part, node, hlc, dict(payload), bytes.fromhex(sig))
        try:
            size = len(record.raw())
        except Exception as exc:  # floats or other values canonical JSON refuses
            raise RemoteProtocolError("data", f"a record's data is not canonical JSON: {exc}") from exc
        if size > MAX_RECORD_BYTES:
            raise RemoteProtocolError("record", f"a record is at most {MAX_RECORD_BYTES} bytes; this one is {size}")
        return record


def sign_record(
    key: NodeKey, *, kind: str, record_id: str, part: str, hlc: HlcTimestamp, data: Mapping[str, Any]
) -> SignedRecord:
    """A new record authored by this node (`hlc` from this node's clock)."""
    unsigned = SignedRecord(kind, record_id, part, key.node_id, hlc, dict(data), b"")
    signed = SignedRecord(kind, record_id, part, key.node_id, hlc, dict(data), key.sign(unsigned.signed_bytes()))
    return SignedRecord.from_dict(signed.to_dict())  # our own record passes the peer's checks too


# --- digests --------------------------------------------------------------------------------


def digest_of(ids: Iterable[str]) -> str:
    """A set's digest: 128 bits of the SHA-256 of its sorted ids (the empty set has one too)."""
    return sha256("\n".join(sorted(ids)).encode()).hex()[:32]


def bucket_of(record_id: str) -> str:
    return record_id[:BUCKET_HEX]


def bucket_digests(ids: Iterable[str]) -> dict[str, str]:
    """Bucket → digest, for the non-empty buckets only (a missing bucket is empty)."""
    buckets: dict[str, list[str]] = {}
    for rid in ids:
        buckets.setdefault(bucket_of(rid), []).append(rid)
    return {b: digest_of(members) for b, members in sorted(buckets.items())}


def differing_buckets(mine: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """Buckets whose digests differ (one side empty counts as differing)."""
    return sorted(b for b in set(mine) | set(theirs) if mine.get(b) != theirs.get(b))


def check_digest_map(value: object, what: str, *, limit: int) -> dict[str, str]:
    """A peer's `{name: digest}` map, checked; RemoteProtocolError otherwise."""
    if not isinstance(value, Mapping) or len(value) > limit:
        raise RemoteProtocolError(what, f"{what} is a map of at most {limit} digests")
    out: dict[str, str] = {}
    for name, digest in value.items():
        if not isinstance(name, str) or not _PART_RE.fullmatch(name):
            raise RemoteProtocolError(what, f"bad name in {what}")
        if not isinstance(digest, str) or not _ID_RE.fullmatch(digest):
            raise RemoteProtocolError(what, f"bad digest in {what}")
        out[name] = digest
    return out


def check_ids(value: object, *, limit: int) -> list[str]:
    """A peer's list of record ids, checked."""
    if not isinstance(value, list) or len(value) > limit:
        raise RemoteProtocolError("ids", f"ids is a list of at most {limit} record ids")
    for rid in value:
        if not isinstance(rid, str) or not _ID_RE.fullmatch(rid):
            raise RemoteProtocolError("ids", "a record id is 32 lowercase hex characters")
    return list(value)
