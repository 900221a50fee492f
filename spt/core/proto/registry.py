"""Endpoint registry replication (SPEC.md §4.5): signed rows, presence, merge, anti-entropy. Pure.

What lives here: `RegistryRow` (one instance's row in one subnet, or its tombstone) and
`Presence` (a node's periodic record), each signed by the node it describes over a domain string
‖ canonical JSON; their plain-dict forms for frames and storage; and `RegistryView`, one subnet's
registry as this node holds it: merge, digest, `missing_for`, offline computation, and the rows
`spt.core.proto.resolve` works on.

Rules this module keeps:
1. A record is accepted only when its signature verifies under the key of the node it describes
   (so no node can write another's rows, however the record travelled) and its version is higher
   than the one held for that row or presence. Everything else is refused, never merged.
2. One version counter per node covers all its rows and its presence records. The caller keeps it
   durable and passes the next value in; nothing here counts.
3. Hiding and purging publish a tombstone (a row with `deleted=True` and a higher version);
   tombstones are kept so an older copy of the row arriving later cannot resurrect it.
4. A view is one subnet: it refuses records of any other subnet, so S's rows cannot reach T.
5. Offline is computed by the observer from presence arrival (and the `detached` flag); it is
   never written into a row.
6. A presence record vouches for its node's live rows: a node signs presence only in a full
   round, together with every live row at the same version, so none of its live rows is older
   than its latest presence. A live row older than the newest presence held or kept for its
   node is refused, and an accepted presence drops the node's held live rows older than itself.
   This is what stops a member replaying a deleted row after its tombstone is gone (a restart
   loses views; owners re-tombstone for 30 days only): the caller stores the presence that
   settled a deletion (`to_keep`) and loads it back with `keep`, one record per node.

What must not: clocks, storage or sockets (time arrives as `now_ms`), and membership. Whether a
record's node is still a member of the subnet is the caller's check, made before `merge`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final

from spt.core.errors import IdentityError, LocalProtocolError, RemoteProtocolError, UsageError
from spt.core.identity import NodeId, NodeKey
from spt.core.proto.canonical import canonical_bytes
from spt.core.proto.hlc import HlcTimestamp
from spt.core.proto.resolve import Row
from spt.core.types import canonical_subnet_name, check_endpoint_id, check_subnet_name

ROW_DOMAIN: Final = b"spt/row/v1"
PRESENCE_DOMAIN: Final = b"spt/presence/v1"
OFFLINE_TTL_MS: Final = 90_000
VANISH_AFTER_MS: Final = 7 * 24 * 3600 * 1000
MAX_DESCRIPTION_BYTES: Final = 1024
ROW_STATES: Final = frozenset({"active", "dormant", "suspended", "unbound"})

_MAX_LIST: Final = 64
_MAX_TEXT: Final = 2048
_HEX64_RE: Final = re.compile(r"[0-9a-f]{64}")
_SIG_RE: Final = re.compile(r"[0-9a-f]{128}")


def check_description(text: str) -> str:
    """Return `text` if it is a valid registry description (≤ 1024 bytes of UTF-8), else BAD_DESCRIPTION."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise UsageError("BAD_DESCRIPTION", "", "a description is UTF-8 text") from exc
    if size > MAX_DESCRIPTION_BYTES:
        raise UsageError("BAD_DESCRIPTION", "", f"a description is at most 1024 bytes; this one is {size}")
    return text


# --- rows -----------------------------------------------------------------------------------

RowKey = tuple[str, str, NodeId]
"""(home lowercased, endpoint id lowercased, node): one instance, within one subnet's view."""


@dataclass(frozen=True, slots=True)
class RegistryRow:
    """One instance's signed row in one subnet, or (with `deleted`) its tombstone.

    `subnet` is the canonical (lowercase) name, as bound into the signature. A tombstone carries
    an empty `state`, false flags and no description.
    """

    subnet: str
    endpoint_id: str
    home: str
    node: NodeId
    version: int
    hlc: HlcTimestamp
    state: str
    ready: bool
    alive: bool
    hosted: bool
    description: str
    deleted: bool
    signature: bytes

    @property
    def key(self) -> RowKey:
        return (self.home.lower(), self.endpoint_id.lower(), self.node)

    def _content(self) -> dict[str, Any]:
        return {
            "kind": "row",
            "subnet": self.subnet,
            "id": self.endpoint_id,
            "home": self.home,
            "node": self.node.hex,
            "version": self.version,
            "hlc": self.hlc.to_wire(),
            "state": self.state,
            "ready": self.ready,
            "alive": self.alive,
            "hosted": self.hosted,
            "description": self.description,
            "deleted": self.deleted,
        }

    def signed_bytes(self) -> bytes:
        """What the signature covers: `"spt/row/v1"` ‖ canonical JSON of every field but `sig`."""
        return ROW_DOMAIN + canonical_bytes(self._content())

    def verify(self) -> bool:
        """True when the row is signed by the node it describes."""
        return self.node.verify(self.signature, self.signed_bytes())

    def to_dict(self) -> dict[str, Any]:
        """The plain-dict form for frames and storage."""
        return {**self._content(), "sig": self.signature.hex()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegistryRow:
        """Parse `to_dict()` output; malformed data raises RemoteProtocolError (not verified here)."""
        _expect_keys(data, "row", _ROW_KEYS)
        deleted = _bool(data, "deleted")
        subnet = _text(data, "subnet")
        if subnet != subnet.lower():
            raise RemoteProtocolError(subnet, "a row names its subnet in canonical lowercase")
        try:
            check_subnet_name(subnet)
            endpoint_id = check_endpoint_id(_text(data, "id"))
            home = check_subnet_name(_text(data, "home"))
        except UsageError as exc:
            raise RemoteProtocolError(exc.subject, f"bad registry row: {exc.message}") from exc
        node = _node(data, "node")
        hlc = HlcTimestamp.from_wire(data["hlc"])
        if hlc.node != node.hex:
            raise RemoteProtocolError(node.short, "a row's HLC timestamp is stamped by the row's node")
        state = _text(data, "state")
        description = _text(data, "description", limit=MAX_DESCRIPTION_BYTES)
        flags = (_bool(data, "ready"), _bool(data, "alive"), _bool(data, "hosted"))
        if deleted and (state or description or any(flags)):
            raise RemoteProtocolError(endpoint_id, "a tombstone carries no state, flags or description")
        if not deleted and state not in ROW_STATES:
            raise RemoteProtocolError(state, f"a row's state is one of {', '.join(sorted(ROW_STATES))}")
        return cls(
            subnet=subnet,
            endpoint_id=endpoint_id,
            home=home,
            node=node,
            version=_version(data),
            hlc=hlc,
            state=state,
            ready=flags[0],
            alive=flags[1],
            hosted=flags[2],
            description=description,
            deleted=deleted,
            signature=_signature(data),
        )

    def as_row(self, subnet: str) -> Row:
        """The resolution view of this row, under the subnet's display name."""
        return Row(
            subnet=subnet,
            endpoint_id=self.endpoint_id,
            home=self.home,
            node=self.node,
            state=self.state,
            ready=self.ready,
            alive=self.alive,
            hosted=self.hosted,
            description=self.description,
            visible=not self.deleted,
        )


_ROW_KEYS: Final = frozenset(
    {"kind", "subnet", "id", "home", "node", "version", "hlc", "state", "ready", "alive", "hosted"}
    | {"description", "deleted", "sig"}
)


def sign_row(
    key: NodeKey,
    *,
    subnet: str,
    endpoint_id: str,
    home: str,
    version: int,
    hlc: HlcTimestamp,
    state: str,
    ready: bool = False,
    alive: bool = False,
    hosted: bool = False,
    description: str = "",
) -> RegistryRow:
    """This node's row for its instance `(home, endpoint_id)` as advertised in `subnet`.

    `version` is the node's next durable version; `hlc` must be stamped by this node.
    Raises BAD_DESCRIPTION for a description over 1024 bytes; other bad values are our bugs
    (LocalProtocolError or the value checks of `spt.core.types`).
    """
    if state not in ROW_STATES:
        raise LocalProtocolError(state, f"a row's state is one of {', '.join(sorted(ROW_STATES))}")
    return _sign_row(
        key,
        subnet=subnet,
        endpoint_id=endpoint_id,
        home=home,
        version=version,
        hlc=hlc,
        state=state,
        ready=ready,
        alive=alive,
        hosted=hosted,
        description=check_description(description),
        deleted=False,
    )


def sign_tombstone(
    key: NodeKey, *, subnet: str, endpoint_id: str, home: str, version: int, hlc: HlcTimestamp
) -> RegistryRow:
    """The deletion of this node's row for `(home, endpoint_id)` in `subnet` (hide, purge)."""
    return _sign_row(
        key,
        subnet=subnet,
        endpoint_id=endpoint_id,
        home=home,
        version=version,
        hlc=hlc,
        state="",
        ready=False,
        alive=False,
        hosted=False,
        description="",
        deleted=True,
    )


def _sign_row(
    key: NodeKey, *, subnet: str, endpoint_id: str, home: str, version: int, hlc: HlcTimestamp, **rest: Any
) -> RegistryRow:
    if version < 1:
        raise LocalProtocolError(str(version), "row versions start at 1")
    if hlc.node != key.node_id.hex:
        raise LocalProtocolError(str(hlc), "a row's HLC timestamp must come from this node's clock")
    row = RegistryRow(
        node=key.node_id,
        signature=b"",
        subnet=canonical_subnet_name(subnet),
        endpoint_id=check_endpoint_id(endpoint_id),
        home=check_subnet_name(home),
        version=version,
        hlc=hlc,
        **rest,
    )
    return _with_signature(row, key.sign(row.signed_bytes()))


def _with_signature(row: RegistryRow, signature: bytes) -> RegistryRow:
    values = {f.name: getattr(row, f.name) for f in fields(row)}
    values["signature"] = signature
    return RegistryRow(**values)


# --- presence -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Presence:
    """A node's signed presence record in one subnet (sent every 30 s, forwarded by members).

    `last_activity_ms` is the node's last user-activity time (SPEC.md §8.4), None if never;
    `detached` announces that the node stopped serving the subnet, so observers show it offline
    at once.
    """

    subnet: str
    node: NodeId
    version: int
    addresses: tuple[str, ...]
    relays: tuple[str, ...]
    software_version: str
    last_activity_ms: int | None
    plugins_digest: str
    staged_release: str | None
    detached: bool
    signature: bytes

    def _content(self) -> dict[str, Any]:
        return {
            "kind": "presence",
            "subnet": self.subnet,
            "node": self.node.hex,
            "version": self.version,
            "addresses": list(self.addresses),
            "relays": list(self.relays),
            "software": self.software_version,
            "last_activity_ms": self.last_activity_ms,
            "plugins_digest": self.plugins_digest,
            "staged": self.staged_release,
            "detached": self.detached,
        }

    def signed_bytes(self) -> bytes:
        """`"spt/presence/v1"` ‖ canonical JSON of every field but `sig`."""
        return PRESENCE_DOMAIN + canonical_bytes(self._content())

    def verify(self) -> bool:
        """True when the record is signed by the node it describes."""
        return self.node.verify(self.signature, self.signed_bytes())

    def to_dict(self) -> dict[str, Any]:
        return {**self._content(), "sig": self.signature.hex()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Presence:
        """Parse `to_dict()` output; malformed data raises RemoteProtocolError (not verified here)."""
        _expect_keys(data, "presence", _PRESENCE_KEYS)
        subnet = _text(data, "subnet")
        if subnet != subnet.lower():
            raise RemoteProtocolError(subnet, "a presence record names its subnet in canonical lowercase")
        last_activity = data["last_activity_ms"]
        if last_activity is not None and not _is_count(last_activity):
            raise RemoteProtocolError(repr(last_activity)[:40], "last_activity_ms is a non-negative integer")
        staged = data["staged"]
        if staged is not None:
            staged = _text(data, "staged")
        return cls(
            subnet=subnet,
            node=_node(data, "node"),
            version=_version(data),
            addresses=_texts(data, "addresses"),
            relays=_texts(data, "relays"),
            software_version=_text(data, "software"),
            last_activity_ms=last_activity,
            plugins_digest=_text(data, "plugins_digest"),
            staged_release=staged,
            detached=_bool(data, "detached"),
            signature=_signature(data),
        )


_PRESENCE_KEYS: Final = frozenset(
    {"kind", "subnet", "node", "version", "addresses", "relays", "software", "last_activity_ms"}
    | {"plugins_digest", "staged", "detached", "sig"}
)


def sign_presence(
    key: NodeKey,
    *,
    subnet: str,
    version: int,
    software_version: str,
    addresses: Sequence[str] = (),
    relays: Sequence[str] = (),
    last_activity_ms: int | None = None,
    plugins_digest: str = "",
    staged_release: str | None = None,
    detached: bool = False,
) -> Presence:
    """This node's presence record for `subnet`, at the node's next durable `version`."""
    if version < 1:
        raise LocalProtocolError(str(version), "presence versions start at 1")
    unsigned = Presence(
        subnet=canonical_subnet_name(subnet),
        node=key.node_id,
        version=version,
        addresses=tuple(addresses),
        relays=tuple(relays),
        software_version=software_version,
        last_activity_ms=last_activity_ms,
        plugins_digest=plugins_digest,
        staged_release=staged_release,
        detached=detached,
        signature=b"",
    )
    values = {f.name: getattr(unsigned, f.name) for f in fields(unsigned)}
    values["signature"] = key.sign(unsigned.signed_bytes())
    return Presence(**values)


Record = RegistryRow | Presence


def record_from_dict(data: object) -> Record:
    """A row or presence record from its plain-dict form (dispatching on `kind`)."""
    if not isinstance(data, Mapping):
        raise RemoteProtocolError(type(data).__name__, "a registry record is a JSON object")
    kind = data.get("kind")
    if kind == "row":
        return RegistryRow.from_dict(data)
    if kind == "presence":
        return Presence.from_dict(data)
    raise RemoteProtocolError(repr(kind)[:40], 'a registry record\'s kind is "row" or "presence"')


# --- plain-dict parsing helpers ---------------------------------------------------------------


def _expect_keys(data: Mapping[str, Any], kind: str, keys: frozenset[str]) -> None:
    if data.get("kind") != kind:
        raise RemoteProtocolError(repr(data.get("kind"))[:40], f'expected a record of kind "{kind}"')
    have = set(data)
    if have != keys:
        # a peer's keys need not be strings (msgpack maps take any key): list them as text
        missing, unknown = sorted(keys - have), sorted(repr(k)[:40] for k in have - keys)
        raise RemoteProtocolError(kind, f"bad {kind} record: missing {missing}, unknown {unknown}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text(data: Mapping[str, Any], name: str, *, limit: int = _MAX_TEXT) -> str:
    value = data[name]
    if not isinstance(value, str):
        raise RemoteProtocolError(name, f"{name} is a string")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise RemoteProtocolError(name, f"{name} is not valid UTF-8") from exc
    if size > limit:
        raise RemoteProtocolError(name, f"{name} is {size} bytes; the limit is {limit}")
    return value


def _texts(data: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = data[name]
    if not isinstance(value, list) or len(value) > _MAX_LIST:
        raise RemoteProtocolError(name, f"{name} is a list of at most {_MAX_LIST} strings")
    return tuple(_text({name: item}, name) for item in value)


def _bool(data: Mapping[str, Any], name: str) -> bool:
    value = data[name]
    if not isinstance(value, bool):
        raise RemoteProtocolError(name, f"{name} is true or false")
    return value


def _version(data: Mapping[str, Any]) -> int:
    value = data["version"]
    if not _is_count(value) or value < 1:
        raise RemoteProtocolError(repr(value)[:40], "a version is a positive integer")
    return int(value)


def _node(data: Mapping[str, Any], name: str) -> NodeId:
    value = data[name]
    if not isinstance(value, str) or not _HEX64_RE.fullmatch(value):
        raise RemoteProtocolError(repr(value)[:80], "a node key is 64 lowercase hex characters")
    try:
        return NodeId.from_hex(value)
    except IdentityError as exc:  # unreachable after the pattern check; kept for the type's sake
        raise RemoteProtocolError(value, exc.message) from exc


def _signature(data: Mapping[str, Any]) -> bytes:
    value = data["sig"]
    if not isinstance(value, str) or not _SIG_RE.fullmatch(value):
        raise RemoteProtocolError("sig", "a signature is 128 lowercase hex characters")
    return bytes.fromhex(value)


# --- digests --------------------------------------------------------------------------------


def digest_to_wire(digest: Mapping[NodeId, int]) -> dict[str, int]:
    """A digest's plain-dict form: node hex → highest version."""
    return {node.hex: version for node, version in sorted(digest.items(), key=lambda item: item[0].raw)}


def digest_from_wire(data: object) -> dict[NodeId, int]:
    """Parse `digest_to_wire` output from a peer; malformed data raises RemoteProtocolError."""
    if not isinstance(data, Mapping):
        raise RemoteProtocolError(type(data).__name__, "a digest is a JSON object")
    out: dict[NodeId, int] = {}
    for node_hex, version in data.items():
        out[_node({"node": node_hex}, "node")] = _version({"version": version})
    return out


# --- the view -------------------------------------------------------------------------------


def _by_node_then_version(record: Record) -> tuple[bytes, int]:
    # NodeId orders by its bytes: sorting on the bytes gives the same order without a dataclass
    # comparison per step (digests and anti-entropy walk every record, at 500 nodes ~1000)
    return (record.node.raw, record.version)


class MergeOutcome(enum.Enum):
    """What `RegistryView.merge` did with a record."""

    ACCEPTED = "accepted"
    STALE = "stale"  # not newer than what is held: drop quietly (normal with forwarding)
    BAD_SIGNATURE = "bad-signature"  # forged or corrupted: the sender broke the protocol
    WRONG_SUBNET = "wrong-subnet"  # another subnet's record: never merged across subnets


class RegistryView:
    """One subnet's registry as this node holds it.

    Feed it records with `merge` (own ones included, so they are served in anti-entropy); read
    rows with `rows`/`resolve_rows`, liveness with `offline`, and compare with a peer through
    `digest` and `missing_for`.
    """

    __slots__ = (
        "_deleted_at", "_floors", "_heard", "_kept", "_keys_of", "_presence", "_rows", "canonical", "self_node",
        "subnet",
    )

    def __init__(self, subnet: str, *, self_node: NodeId | None = None) -> None:
        self.subnet = subnet
        self.canonical = canonical_subnet_name(subnet)
        self.self_node = self_node
        self._rows: dict[RowKey, RegistryRow] = {}
        self._presence: dict[NodeId, Presence] = {}
        self._heard: dict[NodeId, int] = {}
        # Highest version of each node removed by leave or prune: older copies still held by
        # members that have not seen the removal must not bring its rows back.
        self._floors: dict[NodeId, int] = {}
        self._keys_of: dict[NodeId, set[RowKey]] = {}  # each node's row keys, for rule 6's drop
        # Rule 6: the presence of each node the caller stored (it survives restarts, unlike the
        # view), and the highest version at which a deletion of the node's rows was seen here.
        self._kept: dict[NodeId, Presence] = {}
        self._deleted_at: dict[NodeId, int] = {}

    # merging

    def merge(self, record: Record, *, now_ms: int | None = None, signed_here: bool = False) -> MergeOutcome:
        """Merge one record. A newly accepted presence counts as hearing from its node at `now_ms`.

        Pass `now_ms=None` when reloading from storage, so old presence does not look fresh, and
        `signed_here=True` only for records this node has just signed with its own key (their
        signature is not checked again: the publisher did that once per subnet per publish).
        """
        if record.subnet != self.canonical:
            return MergeOutcome.WRONG_SUBNET
        if record.version <= self._floors.get(record.node, 0):
            return MergeOutcome.STALE
        if isinstance(record, Presence):
            held_presence = self._presence.get(record.node)
            if held_presence is not None and record.version <= held_presence.version:
                return MergeOutcome.STALE
            if self._kept and record.version < self._kept_version(record.node):
                return MergeOutcome.STALE  # older than one stored before a restart: a replay
            if not signed_here and not record.verify():
                return MergeOutcome.BAD_SIGNATURE
            self._presence[record.node] = record
            self._drop_rows_older_than(record)
            if now_ms is not None:
                self.note_heard(record.node, now_ms)
            return MergeOutcome.ACCEPTED
        key = record.key
        held = self._rows.get(key)
        if held is not None and record.version <= held.version:
            return MergeOutcome.STALE
        if not record.deleted and record.version < self.presence_floor(record.node):
            return MergeOutcome.STALE  # rule 6: a live row older than its owner's presence was deleted since
        if not signed_here and not record.verify():
            return MergeOutcome.BAD_SIGNATURE
        self._rows[key] = record
        if held is None:
            self._keys_of.setdefault(record.node, set()).add(key)
        if record.deleted:
            self._deleted_at[record.node] = max(record.version, self._deleted_at.get(record.node, 0))
        return MergeOutcome.ACCEPTED

    def _drop_rows_older_than(self, presence: Presence) -> None:
        """Rule 6: a live row of the node older than its new presence was deleted since (its
        tombstone missed here, or gone with a restart of the owner's 30-day memory)."""
        keys = self._keys_of.get(presence.node, set())
        rows = self._rows
        old = [k for k in keys if (row := rows[k]).version < presence.version and not row.deleted]
        for k in old:
            del self._rows[k]
            keys.discard(k)
        if old:
            self._deleted_at[presence.node] = max(presence.version, self._deleted_at.get(presence.node, 0))

    def presence_floor(self, node: NodeId) -> int:
        """The version below which no live row of `node` is accepted: its newest presence, held
        or kept (rule 6); 0 when none is known."""
        held = self._presence.get(node)
        kept = self._kept.get(node)
        return max(0 if held is None else held.version, 0 if kept is None else kept.version)

    def _kept_version(self, node: NodeId) -> int:
        kept = self._kept.get(node)
        return kept.version if kept is not None else 0

    def keep(self, presence: Presence) -> bool:
        """Note that the caller stored `presence` (or loaded it from storage after a restart):
        it refuses the node's older live rows and older presence from now on (rule 6). It is not
        served to peers: one taking it without the rows signed with it would never ask for them
        (digests name only the highest version). False (nothing noted) for a record that does
        not verify or belongs to another subnet."""
        if presence.subnet != self.canonical or not presence.verify():
            return False
        if presence.version > self._kept_version(presence.node):
            self._kept[presence.node] = presence
        if self._deleted_at.get(presence.node, 0) <= presence.version:
            self._deleted_at.pop(presence.node, None)
        return True

    def to_keep(self) -> list[Presence]:
        """Held presence records the caller should store (then pass to `keep`): each settles a
        deletion seen here that no stored presence covers yet. Deletions are rare, so this is
        rarely a write; this node's own presence is left out (its durable version counter is
        its floor)."""
        out: list[Presence] = []
        for node, at in self._deleted_at.items():
            held = self._presence.get(node)
            if node != self.self_node and held is not None and held.version >= at > self._kept_version(node):
                out.append(held)
        return out

    def merge_all(
        self, records: Iterable[Record], *, now_ms: int | None = None, signed_here: bool = False,
    ) -> list[MergeOutcome]:
        return [self.merge(r, now_ms=now_ms, signed_here=signed_here) for r in records]

    def remove_node(self, node: NodeId) -> None:
        """Drop every row and the presence of `node` at once (it left or was pruned)."""
        floor = max(self._highest(node), self._kept_version(node))
        if floor:
            self._floors[node] = max(floor, self._floors.get(node, 0))
        self._rows = {k: r for k, r in self._rows.items() if r.node != node}
        self._keys_of.pop(node, None)
        self._presence.pop(node, None)
        self._heard.pop(node, None)
        self._kept.pop(node, None)
        self._deleted_at.pop(node, None)

    # reading

    def get(self, home: str, endpoint_id: str, node: NodeId) -> RegistryRow | None:
        """The held row or tombstone for one instance, if any."""
        return self._rows.get((home.lower(), endpoint_id.lower(), node))

    def rows(self) -> list[RegistryRow]:
        """Live (non-tombstone) rows, ordered by id, then node."""
        return sorted(
            (r for r in self._rows.values() if not r.deleted), key=lambda r: (r.endpoint_id.lower(), r.node)
        )

    def resolve_rows(self) -> list[Row]:
        """The rows as `spt.core.proto.resolve` takes them, under this subnet's display name."""
        return [r.as_row(self.subnet) for r in self.rows()]

    def presence(self, node: NodeId) -> Presence | None:
        return self._presence.get(node)

    def records(self) -> list[Record]:
        """Every held record, tombstones included, for storage; ordered by node, then version."""
        return sorted(self._held(), key=_by_node_then_version)

    def _held(self) -> Iterator[Record]:
        yield from self._rows.values()
        yield from self._presence.values()

    def nodes(self) -> set[NodeId]:
        """Every node with a row, tombstone or presence record here."""
        return {r.node for r in self._rows.values()} | set(self._presence)

    # anti-entropy

    def _highest(self, node: NodeId) -> int:
        versions = [self._rows[k].version for k in self._keys_of.get(node, ())]
        held = self._presence.get(node)
        if held is not None:
            versions.append(held.version)
        return max(versions, default=0)

    def digest(self) -> dict[NodeId, int]:
        """Node → highest version held, over rows, tombstones and presence (and removed nodes).

        A kept presence counts as one version below its own: peers then send what was signed
        with it and later, never the older records rule 6 refuses (they would come again every
        round while the owner is away).
        """
        out = dict(self._floors)
        for node, kept in self._kept.items():
            if kept.version > 1:
                out[node] = max(out.get(node, 0), kept.version - 1)
        for record in self._held():
            if record.version > out.get(record.node, 0):
                out[record.node] = record.version
        return out

    def missing_for(self, their_digest: Mapping[NodeId, int]) -> list[Record]:
        """The records a peer with `their_digest` lacks: every record newer than its highest for
        that node.

        Ordered by node, then version, so a receiver merging them in order never holds a later
        version of a node while missing an earlier one (the digest could not show that gap).
        """
        newer = (r for r in self._held() if r.version > their_digest.get(r.node, 0))
        return sorted(newer, key=_by_node_then_version)

    # liveness

    def note_heard(self, node: NodeId, at_ms: int) -> None:
        """Record that a fresh presence of `node` arrived at `at_ms` (also to restore from storage)."""
        self._heard[node] = max(at_ms, self._heard.get(node, at_ms))

    def last_heard(self, node: NodeId) -> int | None:
        return self._heard.get(node)

    def offline_reason(self, node: NodeId, now_ms: int, *, ttl_ms: int = OFFLINE_TTL_MS) -> str | None:
        """`"detached"`, `"silent"` (no presence newer than `ttl_ms`), or None when online."""
        if node == self.self_node:
            return None
        held = self._presence.get(node)
        if held is not None and held.detached:
            return "detached"
        heard = self._heard.get(node)
        if heard is None or now_ms - heard > ttl_ms:
            return "silent"
        return None

    def is_offline(self, node: NodeId, now_ms: int, *, ttl_ms: int = OFFLINE_TTL_MS) -> bool:
        return self.offline_reason(node, now_ms, ttl_ms=ttl_ms) is not None

    def offline(self, now_ms: int, *, ttl_ms: int = OFFLINE_TTL_MS) -> set[NodeId]:
        """Every node known here that is offline at `now_ms`."""
        return {n for n in self.nodes() if self.is_offline(n, now_ms, ttl_ms=ttl_ms)}

    def vanished(self, now_ms: int, *, after_ms: int = VANISH_AFTER_MS) -> set[NodeId]:
        """Nodes last heard more than `after_ms` ago, whose rows views leave out (SPEC.md §4.5)."""
        return {n for n, heard in self._heard.items() if now_ms - heard > after_ms and n != self.self_node}
