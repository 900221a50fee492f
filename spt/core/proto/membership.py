"""The membership log of a subnet: signed, hash-linked entries, their merge and the state they give.

What lives here (SPEC.md §6.1–6.2):

1. `Entry`, one signed log entry, its canonical encoding, hash, signatures and plain-dict form
   (msgpack frames carry the dict; SQLite stores `Entry.to_bytes()`, canonical JSON).
2. Constructors for each entry type; `join` and `rekey` entries are proposed by a member and
   countersigned by the new key in a second step.
3. `MembershipLog`: union merge of entries into a hash DAG, with entries whose parents are missing
   kept pending; the deterministic order (topological, ties by (HLC, hash)); the validity of each
   entry; `state()`; and the replication helpers `missing_for` / `entries_since`.

Arrival and validity (the full rule and what it trades: docs/design/membership-validity.md):

- Arrival. An entry whose signatures or shape are wrong is refused (RemoteProtocolError). A
  verified entry is stored only when its author is a member here, it fits the budgets (every
  stored entry is charged to one member; the last quarter of the log is kept for removals), and
  it is valid once stored; otherwise it is dropped: never stored, relayed or built on (a
  member's entry built on it, however far above, brings it in, without effect, on that member's
  budget). New local entries take `valid_heads()` as parents; prunes, leaves, rekeys and
  rotations take `essential_parents()`, which also names the entries they rest on, so that a
  replica with no room for the rest of their ancestry stores them without it (its parents not
  stored here are left out of the DAG here) and they still take effect there.
- Validity. An entry is valid when its author is a member in the state its own valid ancestors
  give and its type's rule holds there, and it is an ancestor of every valid removal (prune,
  leave, rekey-from) of its author, unless it descends from a re-admission that saw the removal.
- Type rules: a `join` cites the seed epoch current among its ancestors and admits a non-member; a
  `seed-rotate` names the next epoch; a `prune` names a key admitted before (not the author); a
  `rekey` replaces a current member (not the author) with a key never admitted.
- Membership is sticky: k is a member when some valid admission of k has every valid removal of k
  among its ancestors. A join concurrent with a prune does not bring the key back.
- Seed epochs: the highest epoch wins; between rotations naming the same epoch, the one ordered
  last wins.
- No seniority. Removals that void each other (a prunes b while b prunes a, concurrently) are a
  conflict: all of them take effect, and `state().conflicts` names them for a human. Arrival
  makes them rare: where a removal has arrived, a counter-removal by the removed key is dropped
  (and reported in `MergeResult.conflicts`).

What must not live here: storage, clocks, sockets. HLC timestamps arrive in the constructors.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from spt.core.errors import IdentityError, LocalProtocolError, RemoteProtocolError, SptError
from spt.core.identity import NodeId, NodeKey, sha256
from spt.core.proto.canonical import canonical_bytes, parse_canonical
from spt.core.proto.hlc import HlcTimestamp
from spt.core.proto.totp import Secret, seed_commitment
from spt.core.types import check_label, check_subnet_name

__all__ = [
    "ENTRY_TYPES",
    "ESSENTIAL_TYPES",
    "LOG_DOMAIN",
    "MAX_ENTRIES_PER_AUTHOR",
    "MAX_ESSENTIAL_PER_AUTHOR",
    "MAX_LOG_ENTRIES",
    "MAX_MEMBERS",
    "NONCE_BYTES",
    "SUBNET_ID_BYTES",
    "Entry",
    "FormerMember",
    "MembershipLog",
    "MembershipState",
    "MergeResult",
    "PruneConflict",
    "countersign_join",
    "countersign_rekey",
    "entry_hash",
    "join_countersignature",
    "make_create",
    "make_label",
    "make_leave",
    "make_prune",
    "make_seed_rotate",
    "propose_join",
    "propose_rekey",
    "sign_entry",
    "sign_rekey_as_old",
    "subnet_id_of",
]

LOG_DOMAIN: Final = b"spt/log/v1"
SUBNET_ID_BYTES: Final = 16
NONCE_BYTES: Final = 16
HASH_BYTES: Final = 32
SIG_BYTES: Final = 64
MAX_PARENTS: Final = 64
MAX_REASON_CHARS: Final = 200

CREATE: Final = "create"
JOIN: Final = "join"
LEAVE: Final = "leave"
PRUNE: Final = "prune"
SEED_ROTATE: Final = "seed-rotate"
LABEL: Final = "label"
REKEY: Final = "rekey"
ENTRY_TYPES: Final = (CREATE, JOIN, LEAVE, PRUNE, SEED_ROTATE, LABEL, REKEY)

# Body fields of each type, exactly; anything else is a malformed entry.
_BODY_KEYS: Final[Mapping[str, frozenset[str]]] = {
    CREATE: frozenset({"name", "nonce", "creator", "label", "commitment"}),
    JOIN: frozenset({"key", "label", "epoch", "admitted_by"}),
    LEAVE: frozenset({"key"}),
    PRUNE: frozenset({"key", "reason"}),
    SEED_ROTATE: frozenset({"epoch", "commitment"}),
    LABEL: frozenset({"key", "label"}),
    REKEY: frozenset({"old", "new"}),
}
_COUNTERSIGNED: Final = frozenset({JOIN, REKEY})
_KEY_FIELDS: Final = frozenset({"key", "creator", "admitted_by", "old", "new"})


# --------------------------------------------------------------------------------------------
# Entries


@dataclass(frozen=True, slots=True, eq=False)
class Entry:
    """One log entry. `body` holds JSON values only (keys as hex); use the accessors to read it.

    `sig` is the author's Ed25519 signature over `"spt/log/v1" ‖ canonical(unsigned fields)`.
    `countersig` is the new key's signature over the same bytes (join, rekey); `oldsig` the old
    key's, when a rekey claim offered one. Equality and hashing follow `hash`.
    """

    parents: tuple[bytes, ...]
    type: str
    body: Mapping[str, Any]
    author: NodeId
    hlc: HlcTimestamp
    sig: bytes = b""
    countersig: bytes | None = None
    oldsig: bytes | None = None
    _encoded: bytes | None = field(default=None, init=False, compare=False, repr=False)
    _hash: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def unsigned_dict(self) -> dict[str, Any]:
        return {
            "parents": [p.hex() for p in self.parents],
            "type": self.type,
            "body": dict(self.body),
            "author": self.author.hex,
            "hlc": self.hlc.to_wire(),
        }

    def signed_bytes(self) -> bytes:
        """What every signature on this entry covers."""
        return LOG_DOMAIN + canonical_bytes(self.unsigned_dict())

    def to_dict(self) -> dict[str, Any]:
        """The plain form (hex strings for binary), for frames; `from_dict` is its inverse."""
        out = self.unsigned_dict()
        out["sig"] = self.sig.hex()
        if self.countersig is not None:
            out["countersig"] = self.countersig.hex()
        if self.oldsig is not None:
            out["oldsig"] = self.oldsig.hex()
        return out

    def to_bytes(self) -> bytes:
        """The canonical encoding including signatures: what is stored and what is hashed."""
        if self._encoded is None:  # computed once: entries are immutable (replace() starts afresh)
            object.__setattr__(self, "_encoded", canonical_bytes(self.to_dict()))
        assert self._encoded is not None
        return self._encoded

    @property
    def hash(self) -> bytes:
        if self._hash is None:
            object.__setattr__(self, "_hash", sha256(self.to_bytes()))
        assert self._hash is not None
        return self._hash

    @classmethod
    def from_dict(cls, data: object, *, proposal: bool = False) -> Entry:
        """Parse a peer's (or the store's) dict; any malformed field raises RemoteProtocolError.

        `proposal=True` accepts a join or rekey that still lacks its countersignature.
        """
        if not isinstance(data, Mapping):
            raise RemoteProtocolError("", "a log entry is a map")
        allowed = {"parents", "type", "body", "author", "hlc", "sig", "countersig", "oldsig"}
        extra = set(data) - allowed
        if extra:
            raise RemoteProtocolError(", ".join(sorted(map(str, extra)))[:80], "unknown log entry fields")
        parents_raw = data.get("parents")
        if not isinstance(parents_raw, list) or len(parents_raw) > MAX_PARENTS:
            raise RemoteProtocolError("parents", f"a list of at most {MAX_PARENTS} hashes")
        parents = tuple(_hex_field(p, "parent", HASH_BYTES) for p in parents_raw)
        if list(parents) != sorted(set(parents)):
            raise RemoteProtocolError("parents", "parents are sorted and distinct")
        etype = data.get("type")
        if not isinstance(etype, str) or etype not in ENTRY_TYPES:
            raise RemoteProtocolError(str(etype)[:40], "unknown log entry type")
        body = _check_body(etype, data.get("body"))
        author = _key_field(data.get("author"), "author")
        hlc = HlcTimestamp.from_wire(data.get("hlc"))
        sig = _hex_field(data.get("sig"), "sig", SIG_BYTES)
        countersig = _opt_hex(data.get("countersig"), "countersig")
        oldsig = _opt_hex(data.get("oldsig"), "oldsig")
        entry = cls(parents, etype, body, author, hlc, sig, countersig, oldsig)
        problem = entry.shape_problem(proposal=proposal)
        if problem:
            raise RemoteProtocolError(entry.hash.hex()[:16], problem)
        return entry

    @classmethod
    def from_bytes(cls, data: bytes) -> Entry:
        return cls.from_dict(parse_canonical(data))

    # ---- typed accessors ------------------------------------------------------------------

    def key(self, field_name: str = "key") -> NodeId:
        """A key-valued body field (`key`, `creator`, `admitted_by`, `old`, `new`) as a NodeId."""
        return NodeId.from_hex(str(self.body[field_name]))

    def label(self) -> str:
        return str(self.body["label"])

    def epoch(self) -> int:
        return int(self.body["epoch"])

    def subject(self) -> NodeId | None:
        """The key this entry is about: admitted, removed, relabelled or rekeyed (the new key)."""
        if self.type == CREATE:
            return self.key("creator")
        if self.type in (JOIN, LEAVE, PRUNE, LABEL):
            return self.key()
        if self.type == REKEY:
            return self.key("new")
        return None

    # ---- checks ---------------------------------------------------------------------------

    def shape_problem(self, *, proposal: bool = False) -> str:
        """Why this entry is malformed regardless of any log, or "" when it is well-formed.

        A `proposal` (join or rekey before countersigning) may lack its countersignature.
        """
        if self.hlc.node != self.author.hex:
            return "the HLC node is not the author"
        if (self.type == CREATE) != (not self.parents):
            return "exactly the create entry has no parents"
        if self.countersig is not None and self.type not in _COUNTERSIGNED:
            return "only join and rekey entries carry a countersignature"
        if self.countersig is None and self.type in _COUNTERSIGNED and not proposal:
            return "a join or rekey entry carries the new key's countersignature"
        if self.oldsig is not None and self.type != REKEY:
            return "only a rekey carries the old key's signature"
        try:
            return _body_rule_problem(self)
        except (KeyError, ValueError, IdentityError):
            return "malformed body"

    def signature_problem(self) -> str:
        """Why a signature fails, or "" when all present signatures verify."""
        data = self.signed_bytes()
        if not self.author.verify(self.sig, data):
            return "the author's signature does not verify"
        if self.type == JOIN and (self.countersig is None or not self.key().verify(self.countersig, data)):
            return "the new member's countersignature does not verify"
        if self.type == REKEY:
            if self.countersig is None or not self.key("new").verify(self.countersig, data):
                return "the new key's countersignature does not verify"
            if self.oldsig is not None and not self.key("old").verify(self.oldsig, data):
                return "the old key's signature does not verify"
        return ""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    def __repr__(self) -> str:
        return f"Entry({self.type}, {self.hash.hex()[:8]}, by {self.author.short}, {self.hlc})"


def entry_hash(entry: Entry) -> bytes:
    """SHA-256 of the entry's canonical encoding, signatures included (SPEC.md §6.1)."""
    return entry.hash


def subnet_id_of(create: Entry) -> bytes:
    """The subnet id: the first 16 bytes of the create entry's hash (SPEC.md §2.2)."""
    if create.type != CREATE:
        raise LocalProtocolError(create.type, "only a create entry names a subnet")
    return create.hash[:SUBNET_ID_BYTES]


def _body_rule_problem(entry: Entry) -> str:
    body, author = entry.body, entry.author
    if entry.type == CREATE and entry.key("creator") != author:
        return "the creator signs the create entry"
    if entry.type == JOIN:
        if entry.key("admitted_by") != author:
            return "the admitting member signs the join"
        if entry.key() == author:
            return "a node cannot admit itself"
    if entry.type in (LEAVE, LABEL) and entry.key() != author:
        return f"a {entry.type} entry is signed by the node it is about"
    if entry.type == PRUNE and entry.key() == author:
        return "a node cannot prune itself; it leaves"
    if entry.type == SEED_ROTATE and int(body["epoch"]) < 1:
        return "a rotation names an epoch after 0"
    if entry.type == REKEY and entry.key("old") == entry.key("new"):
        return "a rekey changes the key"
    return ""


# --------------------------------------------------------------------------------------------
# Body validation (peer input)


def _check_body(etype: str, body: object) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise RemoteProtocolError(etype, "a log entry body is a map")
    keys = set(body)
    if keys != _BODY_KEYS[etype]:
        raise RemoteProtocolError(etype, f"a {etype} body has exactly the fields {sorted(_BODY_KEYS[etype])}")
    out: dict[str, Any] = {}
    for name, value in body.items():
        if name in _KEY_FIELDS:
            out[name] = _key_field(value, name).hex
        elif name == "label":
            out[name] = _remote(check_label, value, "label")
        elif name == "name":
            out[name] = _remote(check_subnet_name, value, "name")
        elif name == "nonce":
            out[name] = _hex_field(value, name, NONCE_BYTES).hex()
        elif name == "commitment":
            out[name] = _hex_field(value, name, HASH_BYTES).hex()
        elif name == "epoch":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RemoteProtocolError("epoch", "a seed epoch is a non-negative integer")
            out[name] = value
        elif name == "reason":
            if not isinstance(value, str) or len(value) > MAX_REASON_CHARS:
                raise RemoteProtocolError("reason", f"a reason is {MAX_REASON_CHARS} characters at most")
            out[name] = value
    return out


def _remote(check: Any, value: object, name: str) -> str:
    if not isinstance(value, str):
        raise RemoteProtocolError(name, f"{name} is a string")
    try:
        return str(check(value))
    except SptError as exc:
        raise RemoteProtocolError(value[:64], f"invalid {name}") from exc


def _hex_field(value: object, name: str, length: int) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * length:
        raise RemoteProtocolError(name, f"{name} is {length} bytes as lowercase hex")
    try:
        raw = bytes.fromhex(value)
    except ValueError as exc:
        raise RemoteProtocolError(name, f"{name} is not hex") from exc
    if raw.hex() != value:
        raise RemoteProtocolError(name, f"{name} is lowercase hex")
    return raw


def _opt_hex(value: object, name: str) -> bytes | None:
    return None if value is None else _hex_field(value, name, SIG_BYTES)


def _key_field(value: object, name: str) -> NodeId:
    return NodeId(_hex_field(value, name, 32))


# --------------------------------------------------------------------------------------------
# Constructors (local input)


def sign_entry(
    key: NodeKey, etype: str, body: Mapping[str, Any], *, parents: Iterable[bytes], hlc: HlcTimestamp
) -> Entry:
    """Build and sign an entry. Join and rekey still need their countersignature afterwards."""
    if etype not in ENTRY_TYPES:
        raise LocalProtocolError(etype, "unknown log entry type")
    if hlc.node != key.node_id.hex:
        raise LocalProtocolError(str(hlc), "the HLC timestamp must be issued by the author")
    parent_tuple = tuple(sorted(set(parents)))
    try:
        # bytes become hex, and the entry gets a private copy of the body
        body_plain = _check_body(etype, json.loads(canonical_bytes(dict(body))))
    except RemoteProtocolError as exc:
        raise LocalProtocolError(exc.subject, exc.message) from exc
    unsigned = Entry(parent_tuple, etype, body_plain, key.node_id, hlc)
    entry = replace(unsigned, sig=key.sign(unsigned.signed_bytes()))
    problem = entry.shape_problem(proposal=True)
    if problem:
        raise LocalProtocolError(etype, problem)
    return entry


def make_create(
    key: NodeKey, *, name: str, label: str, nonce: bytes, seed: Secret[bytes], hlc: HlcTimestamp
) -> Entry:
    """The create entry. `nonce` is 16 random bytes from the shell; the seed is committed, not stored."""
    if len(nonce) != NONCE_BYTES:
        raise LocalProtocolError("", f"a create nonce is {NONCE_BYTES} bytes")
    body = {
        "name": check_subnet_name(name),
        "nonce": nonce,
        "creator": key.node_id.raw,
        "label": check_label(label),
        "commitment": seed_commitment(nonce, 0, seed),
    }
    return sign_entry(key, CREATE, body, parents=(), hlc=hlc)


def propose_join(
    key: NodeKey, *, parents: Iterable[bytes], joiner: NodeId, label: str, epoch: int, hlc: HlcTimestamp
) -> Entry:
    """The admitting member's half of a join; the joiner adds its countersignature."""
    body = {"key": joiner.raw, "label": check_label(label), "epoch": epoch, "admitted_by": key.node_id.raw}
    return sign_entry(key, JOIN, body, parents=parents, hlc=hlc)


def join_countersignature(entry: Entry, joiner_key: NodeKey) -> bytes:
    """The joiner's signature over a proposed join that names it."""
    if entry.type != JOIN or entry.key() != joiner_key.node_id:
        raise LocalProtocolError(entry.type, "this join entry does not admit this key")
    return joiner_key.sign(entry.signed_bytes())


def countersign_join(entry: Entry, joiner_key: NodeKey) -> Entry:
    return replace(entry, countersig=join_countersignature(entry, joiner_key))


def make_leave(key: NodeKey, *, parents: Iterable[bytes], hlc: HlcTimestamp) -> Entry:
    return sign_entry(key, LEAVE, {"key": key.node_id.raw}, parents=parents, hlc=hlc)


def make_prune(
    key: NodeKey, *, parents: Iterable[bytes], target: NodeId, reason: str = "", hlc: HlcTimestamp
) -> Entry:
    if len(reason) > MAX_REASON_CHARS:
        raise LocalProtocolError("", f"a prune reason is {MAX_REASON_CHARS} characters at most")
    return sign_entry(key, PRUNE, {"key": target.raw, "reason": reason}, parents=parents, hlc=hlc)


def make_seed_rotate(
    key: NodeKey, *, parents: Iterable[bytes], epoch: int, commitment: bytes, hlc: HlcTimestamp
) -> Entry:
    """`commitment` is `seed_commitment(create nonce, epoch, new seed)`."""
    if len(commitment) != HASH_BYTES:
        raise LocalProtocolError("", "a seed commitment is a SHA-256 digest")
    return sign_entry(key, SEED_ROTATE, {"epoch": epoch, "commitment": commitment}, parents=parents, hlc=hlc)


def make_label(key: NodeKey, *, parents: Iterable[bytes], label: str, hlc: HlcTimestamp) -> Entry:
    body = {"key": key.node_id.raw, "label": check_label(label)}
    return sign_entry(key, LABEL, body, parents=parents, hlc=hlc)


def propose_rekey(
    key: NodeKey, *, parents: Iterable[bytes], old: NodeId, new: NodeId, hlc: HlcTimestamp
) -> Entry:
    """The accepting member's half of a rekey; the new key countersigns, the old key may sign too."""
    return sign_entry(key, REKEY, {"old": old.raw, "new": new.raw}, parents=parents, hlc=hlc)


def countersign_rekey(entry: Entry, new_key: NodeKey) -> Entry:
    if entry.type != REKEY or entry.key("new") != new_key.node_id:
        raise LocalProtocolError(entry.type, "this rekey entry does not introduce this key")
    return replace(entry, countersig=new_key.sign(entry.signed_bytes()))


def sign_rekey_as_old(entry: Entry, old_key: NodeKey) -> Entry:
    if entry.type != REKEY or entry.key("old") != old_key.node_id:
        raise LocalProtocolError(entry.type, "this rekey entry does not replace this key")
    return replace(entry, oldsig=old_key.sign(entry.signed_bytes()))


# --------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class FormerMember:
    """A key that was a member. `reason` is "left", "pruned" or "rekeyed"; `note` a prune reason."""

    label: str
    reason: str
    by: NodeId | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class MembershipState:
    """What the log says now. `members` maps key → label; `invalid` lists entries without effect;
    `conflicts` the removals that void each other (all of them take effect; a human should look)."""

    subnet_id: bytes
    name: str
    create_nonce: bytes
    members: Mapping[NodeId, str]
    former: Mapping[NodeId, FormerMember]
    epoch: int
    commitment: bytes
    invalid: frozenset[bytes] = field(default_factory=frozenset)
    conflicts: frozenset[bytes] = field(default_factory=frozenset)

    def is_member(self, node: NodeId) -> bool:
        return node in self.members

    def standing(self, node: NodeId) -> str:
        """`member`, or the handshake refusal reason of §6.3: `pruned`, `left`, `not-a-member`."""
        if node in self.members:
            return "member"
        former = self.former.get(node)
        if former is None or former.reason == "rekeyed":
            return "not-a-member"
        return former.reason

    def seed_matches(self, seed: Secret[bytes], epoch: int | None = None) -> bool:
        """True when `seed` is the seed committed for `epoch` (default: the current epoch)."""
        if epoch is not None and epoch != self.epoch:
            return False
        return seed_commitment(self.create_nonce, self.epoch, seed) == self.commitment


@dataclass(frozen=True, slots=True)
class PruneConflict:
    """A prune of a key admitted here (a member, or a former member: it may have left after
    pruning the author), by a key known here, that was not stored: its history disagrees with
    this log on who was removed first (a counter-prune by a pruned key, or a branch built by a
    removed key). The history that arrived first stands here; a human should look."""

    entry: bytes  # the refused entry
    author: NodeId  # the key that signed it
    target: NodeId  # the key it tried to remove


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What a merge did.

    `added`: entries now in the log, in order. `pending`: entries waiting for parents.
    `refused`: entries that do not verify (the sender is at fault). `dropped`: entries that verify
    but were not stored here: their author is not a member, or they were invalid on arrival, or
    they do not fit a budget (an honest peer may send these: it stored them before it heard of a
    removal, or in another order).
    `conflicts`: removals that would void each other (see `PruneConflict`).
    """

    added: tuple[bytes, ...] = ()
    pending: tuple[bytes, ...] = ()
    refused: tuple[tuple[bytes, str], ...] = ()
    dropped: tuple[tuple[bytes, str], ...] = ()
    conflicts: tuple[PruneConflict, ...] = ()


# Budgets (docs/design/membership-validity.md, "Budgets"). Every stored entry is charged to one
# member: its author when it arrives as a member's entry, or the member whose entry brought it in
# (an endorsed chain, whoever signed its links). Ordinary entries (create, join, label, and all an
# endorsement brings in) stop short of the log's cap: the last quarter is kept for the entries a
# member needs to get rid of another (prune, leave, rekey, and the rotation after a prune).
MAX_LOG_ENTRIES: Final = 16384  # per subnet; evaluation stays well under a second at this size
MAX_ENTRIES_PER_AUTHOR: Final = 1024  # ordinary entries charged to one member
MAX_ESSENTIAL_PER_AUTHOR: Final = 256  # its own prunes, leaves, rekeys and rotations
RESERVE_SHARE: Final = 4  # 1/4 of the log (4,096 entries) is kept for essential entries
REMOVAL_COST: Final = 4  # reserve entries removing one member take at most (see _reserve_problem)
MAX_MEMBERS: Final = MAX_LOG_ENTRIES // RESERVE_SHARE // REMOVAL_COST  # 1,024: removing all fits the reserve
MAX_QUARANTINE: Final = 512  # dropped entries kept in memory in case a valid entry names them
ESSENTIAL_TYPES: Final = frozenset({PRUNE, LEAVE, SEED_ROTATE, REKEY})
# what a stored entry is charged as: its author's ordinary or essential entry (capped per member),
# or another key's entry a member's entry brought in (vouched: not capped per member)
_ORDINARY: Final = "ordinary"
_ESSENTIAL: Final = "essential"
_VOUCHED: Final = "vouched"


def _admits(entry: Entry) -> NodeId | None:
    """The key `entry` admits (create, join, rekey), if any."""
    return entry.subject() if entry.type in (CREATE, JOIN, REKEY) else None


class MembershipLog:
    """One subnet's log. In memory; the store persists entries (`Entry.to_bytes`) and reloads them.

    Call `merge` (or `add`) with entries from anywhere (own, peers, bundle); `state()` is
    recomputed lazily after every change. Not thread-safe; the shell owns it.

    Arrival (see docs/design/membership-validity.md): an entry is stored only when it verifies,
    its author is a member here, and it is valid once stored. Everything else is dropped, kept only
    in a small in-memory quarantine so that a member's entry built on it can still be installed
    (an honest member may have built on it before it heard of a removal).
    """

    def __init__(self, subnet_id: bytes, *, max_pending: int = 4096, max_entries: int = MAX_LOG_ENTRIES) -> None:
        if len(subnet_id) != SUBNET_ID_BYTES:
            raise LocalProtocolError(subnet_id.hex(), f"a subnet id is {SUBNET_ID_BYTES} bytes")
        self._subnet_id = bytes(subnet_id)
        self._max_pending = max_pending
        self._max_entries = max_entries
        self._present: dict[bytes, Entry] = {}
        self._pending: dict[bytes, Entry] = {}
        self._quarantine: OrderedDict[bytes, Entry] = OrderedDict()
        self._charged: dict[bytes, tuple[NodeId, str]] = {}  # entry -> (the member it is charged to, _ORDINARY ...)
        self._spent: Counter[tuple[NodeId, str]] = Counter()  # (member, kind) -> entries charged
        self._rotated: Counter[bytes] = Counter()  # removal -> stored rotations naming it as a parent
        self._reserve_rekeyed: set[NodeId] = set()  # keys a rekey stored in the reserve introduced
        self._reserve_removals: set[bytes] = set()  # prunes and rekeys stored in the reserve
        self._create: bytes | None = None
        self._struct: _Structure | None = None
        self._valid: list[bool] | None = None
        self._undecided: frozenset[int] = frozenset()
        self._cache_state: MembershipState | None = None

    @classmethod
    def from_create(cls, create: Entry) -> MembershipLog:
        log = cls(subnet_id_of(create))
        log.add(create)
        return log

    @classmethod
    def from_entries(
        cls, subnet_id: bytes, entries: Iterable[Entry], *, stored: bool = False, max_entries: int = MAX_LOG_ENTRIES
    ) -> MembershipLog:
        """A log holding `entries` (those that stand here); an entry that does not verify raises
        RemoteProtocolError. `stored`: they are what this log stored before (a restart loads its
        store): each is kept without the arrival check, which depends on the order entries
        arrived in (the budgets, the reserve) and would judge them again in another order."""
        log = cls(subnet_id, max_entries=max_entries)
        result = log.merge(entries, _stored=stored)
        if result.refused:
            h, why = result.refused[0]
            raise RemoteProtocolError(h.hex()[:16], why)
        return log

    def copy(self) -> MembershipLog:
        """An independent log with the same entries, without verifying them again."""
        other = MembershipLog(self._subnet_id, max_pending=self._max_pending, max_entries=self._max_entries)
        other._present = dict(self._present)
        other._pending = dict(self._pending)
        other._quarantine = OrderedDict(self._quarantine)
        other._charged = dict(self._charged)
        other._spent = Counter(self._spent)
        other._rotated = Counter(self._rotated)
        other._reserve_rekeyed = set(self._reserve_rekeyed)
        other._reserve_removals = set(self._reserve_removals)
        other._create = self._create
        return other

    @property
    def subnet_id(self) -> bytes:
        return self._subnet_id

    @property
    def create_entry(self) -> Entry | None:
        return None if self._create is None else self._present[self._create]

    def __len__(self) -> int:
        return len(self._present)

    @property
    def ordinary_cap(self) -> int:
        """Entries the log holds before only essential ones (prune, leave, rekey, rotation) get in."""
        return self._max_entries - self._max_entries // RESERVE_SHARE

    @property
    def max_members(self) -> int:
        """Members at most: removing every one of them fits the reserve."""
        return max(2, self._max_entries // RESERVE_SHARE // REMOVAL_COST)

    def spent(self, member: NodeId) -> tuple[int, int]:
        """(ordinary, essential) stored entries charged to `member` (its own, capped)."""
        return self._spent[(member, _ORDINARY)], self._spent[(member, _ESSENTIAL)]

    def join_problem(self) -> str:
        """Why any member's join would be dropped on arrival now ("" when it would not): the
        member cap, or no room for ordinary entries. (A member whose own ordinary budget is spent
        cannot admit either, but another member can: see `spent`.)"""
        if len(self._present) >= self.ordinary_cap:
            return f"the log holds {self.ordinary_cap} entries; the rest is kept for removals"
        if len(self.state().members) >= self.max_members:
            return f"the subnet has {self.max_members} members"
        return ""

    def is_full(self) -> bool:
        """Whether the ordinary part is full: from now on only prunes, leaves, rekeys and
        rotations are stored here (the log never shrinks below what a merge found). A sync
        sends such a log nothing else (`entries_since(essential_only=True)`)."""
        return len(self._present) >= self.ordinary_cap

    def is_whole(self) -> bool:
        """Whether every stored entry's parents are stored here: a log that holds a removal
        without the ancestry it had no room for cannot be handed to a joiner (its fresh log,
        with room for that ancestry, would wait for it), so another member admits."""
        return not self._structure().partial

    def vouched(self, member: NodeId) -> int:
        """Stored entries of other keys that `member`'s entries brought in (not capped per member)."""
        return self._spent[(member, _VOUCHED)]

    def __contains__(self, entry_hash: object) -> bool:
        return entry_hash in self._present

    def get(self, entry_hash: bytes) -> Entry | None:
        return self._present.get(entry_hash)

    def pending(self) -> tuple[bytes, ...]:
        """Hashes of entries still waiting for a parent (not stored yet)."""
        return tuple(sorted(self._pending))

    def forget_pending(self, hashes: Iterable[bytes]) -> None:
        """Stop waiting for the parents of these entries (what a stranger offered)."""
        for h in hashes:
            self._pending.pop(h, None)

    # ---- adding ---------------------------------------------------------------------------

    def add(self, entry: Entry) -> bool:
        """Merge one entry: True when stored or waiting for parents, False when already held or
        dropped here. Raises RemoteProtocolError when it does not verify."""
        result = self.merge([entry])
        if result.refused:
            raise RemoteProtocolError(result.refused[0][0].hex()[:16], result.refused[0][1])
        return bool(result.added) or entry.hash in self._pending

    def merge(self, entries: Iterable[Entry], *, _stored: bool = False) -> MergeResult:
        """Union with the entries that stand here (see the class docstring). One bad entry in a
        batch does not drop the good ones; the result says what happened to each. (`_stored`:
        see `from_entries`.)"""
        refused: list[tuple[bytes, str]] = []
        dropped: list[tuple[bytes, str]] = []
        conflicts: list[PruneConflict] = []
        todo: dict[bytes, Entry] = dict(self._pending)
        self._pending.clear()
        for entry in entries:
            h = entry.hash
            if h in self._present or h in todo:
                continue
            if h in self._quarantine:  # verified before, dropped here: check arrival again
                todo[h] = self._quarantine.pop(h)
                continue
            problem = entry.shape_problem() or entry.signature_problem()
            if not problem and entry.type == CREATE and h[:SUBNET_ID_BYTES] != self._subnet_id:
                problem = "a create entry of another subnet"
            if problem:
                refused.append((h, problem))
                continue
            todo[h] = entry
        if not todo:
            return MergeResult((), self.pending(), tuple(refused))
        state = self.state() if self._create is not None else None
        members: set[NodeId] = set(state.members) if state is not None else set()
        new: list[bytes] = []

        known: set[NodeId] = set(members) | (set(state.former) if state is not None else set())
        removed_by: dict[NodeId, NodeId] = {}  # prunes: key -> author
        if state is not None:
            removed_by.update({k: f.by for k, f in state.former.items() if f.reason == "pruned" and f.by is not None})

        admitted_by: dict[NodeId, set[NodeId]] | None = None  # key -> the keys that admitted it

        def vouched(author: NodeId) -> bool:
            """`author` is known here, or was admitted (by entries stored, dropped or arriving
            here) by a chain of keys that starts at one known here: not a stranger's key."""
            nonlocal admitted_by
            if admitted_by is None:  # built once, and only when a prune of a member is dropped
                admitted_by = {}
                for e in [*self._present.values(), *self._quarantine.values(), *todo.values()]:
                    subject = e.subject() if e.type in (JOIN, REKEY) else None
                    if subject is not None:
                        admitted_by.setdefault(subject, set()).add(e.author)
            seen: set[NodeId] = set()
            frontier = {author}
            while frontier:
                if frontier & known or frontier & removed_by.keys():
                    return True
                seen |= frontier
                frontier = {a for k in frontier for a in admitted_by.get(k, ())} - seen
            return False

        # dropped in this merge: kept for it even when pushed out of the quarantine, so that an
        # honest entry on top of many dropped ones (a member's wide fan of entries past its
        # budget, arriving together) still brings them in, here as on a replica that stored them
        dropped_now: dict[bytes, Entry] = {}
        no_room: set[bytes] = set()  # members' entries whose dropped chain does not fit this log

        def drop(h: bytes, entry: Entry, why: str) -> None:
            self._quarantine_entry(h, entry)
            dropped_now[h] = entry
            dropped.append((h, why))
            # a prune of a key admitted here (a member, or one gone since: it may have left after
            # pruning the author) by a key whose standing traces to this log, refused: the
            # histories disagree on who was removed first (a counter-prune, a branch built by a
            # removed key, or by a key that only such a branch admitted)
            if entry.type == PRUNE and entry.key() in known and vouched(entry.author):
                conflicts.append(PruneConflict(h, entry.author, entry.key()))

        waiting: dict[bytes, list[bytes]] = {}  # absent parent -> entries of `todo` waiting for it

        def install(h: bytes, entry: Entry, payer: NodeId, *, endorsed: bool = False) -> None:
            """Store `entry`, charged to the member `payer`: its author, or its endorser (then its
            own entries as ordinary ones, whatever their type, and other keys' as vouched)."""
            for child in waiting.pop(h, ()):
                missing_count[child] -= 1
                if missing_count[child] == 0 and child in todo:
                    heapq.heappush(heap, (todo[child].hlc, child))
            # a removal of a member that takes the last ordinary place counts as one in the
            # reserve: its rotation lands there (one entry, and that member is not among those
            # the reserve must still remove)
            last_place = len(self._present) == self.ordinary_cap - 1 and entry.type in (PRUNE, REKEY) and (
                (entry.key("old") if entry.type == REKEY else entry.key()) in members
            )
            if entry.type in (PRUNE, REKEY) and (len(self._present) >= self.ordinary_cap or last_place):
                self._reserve_removals.add(h)
                if entry.type == REKEY:
                    self._reserve_rekeyed.add(entry.key("new"))
            self._present[h] = entry
            if endorsed:
                kind = _ORDINARY if entry.author == payer else _VOUCHED
            else:
                kind = _ESSENTIAL if entry.type in ESSENTIAL_TYPES else _ORDINARY
                # only a restart's stored entries come here past a budget (the arrival check
                # keeps the others within): charged as a live merge would have brought them in
                if kind == _ESSENTIAL and self._spent[(payer, _ESSENTIAL)] >= MAX_ESSENTIAL_PER_AUTHOR:
                    kind = _ORDINARY
                if kind == _ORDINARY and self._spent[(payer, _ORDINARY)] >= MAX_ENTRIES_PER_AUTHOR:
                    kind = _VOUCHED
            self._charge(h, entry, payer, kind)
            if admitted_ever is not None and (admits := _admits(entry)) is not None:
                admitted_ever.add(admits)
            new.append(h)
            if entry.type == CREATE:
                self._create = h
            # the members of the state after this entry, as far as the arrival check needs them
            gone = entry.key("old") if entry.type == REKEY else entry.key() if entry.type in (PRUNE, LEAVE) else None
            if gone is not None:
                members.discard(gone)
                if entry.type == PRUNE:
                    removed_by[gone] = entry.author
            admitted = entry.subject() if entry.type in (CREATE, JOIN, REKEY) else None
            if admitted is not None:
                members.add(admitted)
                known.add(admitted)

        admitted_ever: set[NodeId] | None = None  # keys any stored entry admits, valid or not

        def ever_admitted() -> set[NodeId]:
            """A copy of the keys admitted by stored entries (built once per merge, on the first
            endorsement): a chain's links may be signed only by those, or by keys it admits."""
            nonlocal admitted_ever
            if admitted_ever is None:
                admitted_ever = {k for e in self._present.values() if (k := _admits(e)) is not None}
            return set(admitted_ever)

        at_hand: dict[bytes, bool] = {}  # not stored: is all its unstored ancestry dropped or arriving?
        # Entries `endorse` may still visit in this merge. A walk that installs its chain is never
        # repeated (the next one stops at stored entries), so honest merges stay far below it; walks
        # that fail (a full log, an evicted ancestor) are, once for every member's entry on top
        # of the same chain: without a bound, one member's sync cost chain x entries on top.
        endorse_budget = 4 * (len(todo) + len(self._quarantine)) + 64

        def is_at_hand(root: bytes) -> bool:
            """Whether `root` and its ancestors not stored here are all quarantined or arriving
            in this merge. Memoized for the whole merge (what is absent stays absent), and
            iterative: a chain may be thousands of entries long."""
            stack = [(root, False)]
            while stack:
                h, parents_done = stack.pop()
                if h in at_hand:
                    continue
                found = todo.get(h) or self._quarantine.get(h) or dropped_now.get(h)
                if found is None:
                    at_hand[h] = h in self._present
                elif parents_done:
                    at_hand[h] = all(p in self._present or at_hand[p] for p in found.parents)
                else:
                    stack.append((h, True))
                    stack.extend((p, False) for p in found.parents if p not in self._present)
            return at_hand[root]

        def endorse(entry: Entry) -> None:
            """A member's entry that builds on entries dropped here brings them in, with the
            entries between them and it (arriving now, waiting on the dropped ones): they take
            effect only if the evaluation says so; the member's entry itself then meets the
            arrival check like any other."""
            if not all(p in self._present or is_at_hand(p) for p in entry.parents):
                return
            nonlocal endorse_budget
            chain: list[bytes] = []  # its unstored ancestors, parents first
            seen: set[bytes] = set()
            stack = [(p, False) for p in entry.parents]
            while stack:
                endorse_budget -= 1
                if endorse_budget < 0:  # it stays waiting, and is considered again at a later merge
                    return
                h, parents_done = stack.pop()
                if parents_done:
                    chain.append(h)
                elif h not in self._present and h not in seen:
                    found = todo.get(h) or self._quarantine.get(h) or dropped_now.get(h)
                    if found is None:  # pushed out of a full quarantine during this merge
                        return
                    seen.add(h)
                    stack.append((h, True))
                    stack.extend((p, False) for p in found.parents)
            # What it brings in is charged to the endorsing member. Its own links count against
            # its ordinary budget (its own chain past its cap stays out). A link signed by a key
            # that no entry here or in the chain admits is refused (a chain of throw-away keys).
            # Other keys' links are vouched for, not capped per member: the budgets are decided in
            # arrival order, which a hostile member chooses, so a replica may have stored on the
            # author's account what does not fit it here; refusing them would drop an honest
            # member's entries built on them here for ever, and split the replicas.
            if len(self._present) + len(chain) > self.ordinary_cap:
                no_room.add(entry.hash)
                return
            admitted = ever_admitted()
            own = 0
            for h in chain:
                link = todo.get(h) or self._quarantine.get(h) or dropped_now[h]
                if link.author == entry.author:
                    own += 1
                elif link.author not in admitted:
                    return
                if (admits := _admits(link)) is not None:
                    admitted.add(admits)
            if self._spent[(entry.author, _ORDINARY)] + own > MAX_ENTRIES_PER_AUTHOR:
                return
            for h in chain:
                link = todo.pop(h) if h in todo else self._quarantine.pop(h) if h in self._quarantine else dropped_now[h]
                dropped_now.pop(h, None)
                install(h, link, entry.author, endorsed=True)

        # entries whose parents are all stored go through the arrival check in (HLC, hash) order
        missing_count: dict[bytes, int] = {}
        heap: list[tuple[HlcTimestamp, bytes]] = []
        for h, entry in todo.items():
            absent = {p for p in entry.parents if p not in self._present}
            missing_count[h] = len(absent)
            for p in absent:
                waiting.setdefault(p, []).append(h)
            if not absent:
                heap.append((entry.hlc, h))
        heapq.heapify(heap)

        def stands_alone(entry: Entry) -> bool:
            """Whether `entry` is stored without its parents that are not stored here: an
            essential entry by a member whose absent ancestry this log has no room for (its
            ordinary part is full, or the dropped chain under it does not fit), so that an honest
            removal is taken here however a hostile member filled this replica. (A restart:
            every entry left waiting was stored so.)"""
            if _stored:
                return True
            return (
                entry.type in ESSENTIAL_TYPES
                and entry.author in members
                and (len(self._present) >= self.ordinary_cap or entry.hash in no_room)
                and any(p in self._present or p in todo for p in entry.parents)
            )

        def builds_on_dropped(h: bytes) -> bool:
            return h in todo and all(p in self._present or p in self._quarantine or p in dropped_now for p in todo[h].parents)

        # each round takes entries out of `todo` or ends the loop
        while True:
            while True:
                while heap:
                    _, h = heapq.heappop(heap)
                    if h not in todo:  # endorsed meanwhile
                        continue
                    entry = todo.pop(h)
                    why = "" if _stored and entry.type != CREATE else self._arrival_problem(entry, members)
                    if why:
                        drop(h, entry, why)
                    else:
                        install(h, entry, entry.author)
                # a member's entry that builds on entries dropped here brings them in (no effect),
                # however deep the chain and whichever of its entries arrive only now
                for h, entry in list(todo.items()):
                    if h in todo and entry.author in members:
                        endorse(entry)
                if not heap:
                    break
            # entries that build only on dropped entries are dropped too, each as its last parent is
            # (a worklist: passes over the batch until none dropped cost chain x batch on a chain
            # sent top first), unless they stand alone
            stuck = [h for h in todo if builds_on_dropped(h) and not stands_alone(todo[h])]
            while stuck:
                h = stuck.pop()
                if not builds_on_dropped(h) or stands_alone(todo[h]):
                    continue
                drop(h, todo.pop(h), "it builds on an entry dropped here")
                stuck.extend(child for child in waiting.get(h, ()) if builds_on_dropped(child))
            # Essential entries that stand alone meet the arrival check, parents first; their
            # parents not stored here are left out of the DAG here, as if they had fewer. One
            # stored parent at least (an honest one names the entries its validity rests on,
            # `essential_parents`): nothing else may order before the create entry.
            before = len(todo)
            alone = {h: e for h, e in todo.items() if stands_alone(e)}
            for h in _Structure.of(alone).order:
                entry = todo[h]
                if not any(p in self._present for p in entry.parents):
                    continue
                del todo[h]
                why = "" if _stored else self._arrival_problem(entry, members)
                if why:
                    drop(h, entry, why)
                else:
                    install(h, entry, entry.author)
            if len(todo) == before:
                break
        for h, entry in todo.items():
            if len(self._pending) >= self._max_pending:
                dropped.append((h, f"over {self._max_pending} entries wait for parents"))
                continue
            self._pending[h] = entry
        if new:
            self._invalidate()
            if not _stored:
                self._peel(set(new), dropped, conflicts)
        added_set = set(new) & set(self._present)
        added = tuple(h for h in self.ordered_hashes() if h in added_set)
        return MergeResult(added, self.pending(), tuple(refused), tuple(dropped), tuple(conflicts))

    def _arrival_problem(self, entry: Entry, members: set[NodeId]) -> str:
        """Why a verified entry whose parents are present is not stored here, or "". Cheap checks
        only: the author comes first, before anything is computed from the entry's ancestors."""
        if entry.type == CREATE:
            return "" if self._create is None else "a second create entry"
        if entry.author not in members:
            return "its author is not a member here"
        stored = len(self._present)
        if stored >= self._max_entries:
            return f"the log holds {self._max_entries} entries already"
        if entry.type in ESSENTIAL_TYPES:
            if self._spent[(entry.author, _ESSENTIAL)] >= MAX_ESSENTIAL_PER_AUTHOR:
                return f"its author has {MAX_ESSENTIAL_PER_AUTHOR} prunes, leaves, rekeys and rotations already"
            return self._reserve_problem(entry, members) if stored >= self.ordinary_cap else ""
        if stored >= self.ordinary_cap:
            return f"the log holds {self.ordinary_cap} entries; the rest is kept for removals"
        if self._spent[(entry.author, _ORDINARY)] >= MAX_ENTRIES_PER_AUTHOR:
            return f"its author has {MAX_ENTRIES_PER_AUTHOR} entries already"
        if entry.type == JOIN and len(members) >= self.max_members:
            return f"the subnet has {self.max_members} members"
        return ""

    def _reserve_problem(self, entry: Entry, members: set[NodeId]) -> str:
        """In the reserve (the log past `ordinary_cap`), an essential entry must remove a current
        member, or be the one rotation after its author's prune or rekey stored in the reserve; a
        key a rekey introduced in the reserve is not rekeyed there again. So each member present
        when the reserve began costs at most REMOVAL_COST reserve entries (a rekey and its
        rotation, then a prune and its rotation; or a leave), and with at most `max_members`
        members the reserve holds all of that, whoever signs it."""
        if entry.type == PRUNE and entry.key() not in members:
            return "in the reserve a prune removes a current member"
        if entry.type == REKEY and (entry.key("old") not in members or entry.key("old") in self._reserve_rekeyed):
            return "in the reserve a key is rekeyed once"
        if entry.type == SEED_ROTATE and not any(
            h in self._reserve_removals and self._present[h].author == entry.author and not self._rotated[h]
            for h in entry.parents
        ):
            return "in the reserve a rotation follows its author's own prune or rekey, once"
        return ""

    def _charge(self, h: bytes, entry: Entry, payer: NodeId, kind: str) -> None:
        self._charged[h] = (payer, kind)
        self._spent[(payer, kind)] += 1
        if entry.type == SEED_ROTATE:
            self._rotated.update(entry.parents)

    def _uncharge(self, h: bytes, entry: Entry) -> None:
        self._spent[self._charged.pop(h)] -= 1
        if entry.type == SEED_ROTATE:
            self._rotated.subtract(entry.parents)
        if entry.type == REKEY:
            self._reserve_rekeyed.discard(entry.key("new"))
        self._reserve_removals.discard(h)

    def _quarantine_entry(self, h: bytes, entry: Entry) -> None:
        self._quarantine[h] = entry
        self._quarantine.move_to_end(h)
        while len(self._quarantine) > MAX_QUARANTINE:
            self._quarantine.popitem(last=False)

    def _peel(self, new: set[bytes], dropped: list[tuple[bytes, str]], conflicts: list[PruneConflict]) -> None:
        """Take back entries of this merge that are invalid and that no stored entry names: they
        were invalid on arrival. Removing an invalid leaf changes no other entry's validity."""
        valid = self._validity()
        struct = self._structure()
        state = self.state() if self._create is not None else None
        known = set(state.members) | set(state.former) if state is not None else set()
        named: Counter[bytes] = Counter(p for e in self._present.values() for p in e.parents)
        gone: list[bytes] = []
        for i in reversed(range(len(struct.order))):
            h = struct.order[i]
            if h in new and not valid[i] and not named[h] and h != self._create:
                entry = self._present.pop(h)
                self._uncharge(h, entry)
                for p in entry.parents:
                    named[p] -= 1
                self._quarantine_entry(h, entry)
                dropped.append((h, "invalid on arrival"))
                gone.append(h)
                if entry.type == PRUNE and entry.key() in known:
                    conflicts.append(PruneConflict(h, entry.author, entry.key()))
        if gone:
            self._invalidate()

    def _invalidate(self) -> None:
        self._struct = None
        self._valid = None
        self._undecided = frozenset()
        self._cache_state = None

    # ---- order and replication --------------------------------------------------------------

    def ordered_hashes(self) -> list[bytes]:
        """Hashes of all present entries in the deterministic order (parents first, ties (HLC, hash))."""
        return list(self._structure().order)

    def entries(self) -> list[Entry]:
        """All stored entries, valid or not, in order: what a full sync carries."""
        return [self._present[h] for h in self._structure().order]

    def heads(self) -> tuple[bytes, ...]:
        """Stored entries no stored entry names as parent, sorted: what sync exchanges."""
        named = {p for e in self._present.values() for p in e.parents}
        return tuple(sorted(h for h in self._present if h not in named))

    def valid_heads(self) -> tuple[bytes, ...]:
        """The parents of a new local entry: valid entries no valid entry names, at most
        MAX_PARENTS of them (the latest in order). Invalid entries are never built on."""
        struct = self._structure()
        valid = self._validity()
        named: set[int] = set()
        for i in range(len(struct.order)):
            if valid[i]:
                named.update(struct.parents[i])
        heads = [i for i in range(len(struct.order)) if valid[i] and i not in named]
        return tuple(sorted(struct.order[i] for i in heads[-MAX_PARENTS:]))

    def essential_parents(self, author: NodeId, removed: NodeId | None = None) -> tuple[bytes, ...]:
        """The parents of a new prune, leave, rekey or rotation by `author` (removing the key
        `removed`: the one pruned or rekeyed, or the author for a leave): `valid_heads()` plus
        the valid entries it rests on, so that a replica that had no room for the rest of its
        ancestry stores it with these and still gives it the same effect
        (docs/design/membership-validity.md, "An honest removal is taken everywhere"):

        1. the admissions that make `author` and `removed` members, and the rotation of the
           current epoch (its validity);
        2. every valid entry `removed` signed other than labels, oldest first (a removal voids
           the removed key's entries it did not see: these keep their effect everywhere);
        3. the latest valid entries that are not labels and that no such entry descends from.

        At most MAX_PARENTS hashes, in that order of priority, then the valid heads.
        """
        struct = self._structure()
        valid = self._validity()
        wanted = {k for k in (author, removed) if k is not None}
        admissions: dict[NodeId, list[int]] = {}
        removals: dict[NodeId, list[int]] = {}
        rotation: tuple[int, int] | None = None
        by_removed: list[int] = []
        skeleton: list[int] = []
        for i, h in enumerate(struct.order):
            if not valid[i]:
                continue
            entry = self._present[h]
            if (admits := _admits(entry)) in wanted and admits is not None:
                admissions.setdefault(admits, []).append(i)
            gone = entry.key("old") if entry.type == REKEY else entry.key() if entry.type in (PRUNE, LEAVE) else None
            if gone in wanted and gone is not None:
                removals.setdefault(gone, []).append(i)
            if entry.type == SEED_ROTATE and (rotation is None or entry.epoch() >= rotation[0]):
                rotation = (entry.epoch(), i)
            if entry.type != LABEL:
                skeleton.append(i)
                if entry.author == removed:
                    by_removed.append(i)
        first: list[int] = []
        for key, adms in admissions.items():
            # the admission that saw every removal of the key (sticky membership), else the last
            current = [a for a in adms if all((struct.anc[a] >> r) & 1 for r in removals.get(key, ()))]
            first.append((current or adms)[-1])
        if rotation is not None:
            first.append(rotation[1])
        below = 0  # the skeleton's entries that another one descends from
        for i in skeleton:
            below |= struct.anc[i]
        tops = [i for i in reversed(skeleton) if not (below >> i) & 1]
        chosen: list[bytes] = []
        for i in [*first, *by_removed, *tops]:
            if struct.order[i] not in chosen and len(chosen) < MAX_PARENTS:
                chosen.append(struct.order[i])
        room = MAX_PARENTS - len(chosen)
        heads = [h for h in self.valid_heads() if h not in chosen]
        return tuple(sorted(chosen + (heads[-room:] if room else [])))

    def ancestry(self, entry_hash: bytes) -> list[Entry]:
        """An entry and all its ancestors, parents first: what `log.offer` carries."""
        struct = self._structure()
        i = struct.index.get(entry_hash)
        if i is None:
            return []
        mask = struct.anc[i]
        return [self._present[h] for j, h in enumerate(struct.order) if (mask >> j) & 1 or j == i]

    def latest_hlc(self) -> HlcTimestamp | None:
        """The greatest timestamp in the log, for the shell's `Hlc.update` before a new entry."""
        return max((e.hlc for e in self._present.values()), default=None)

    def missing_for(self, their_heads: Iterable[bytes]) -> tuple[bytes, ...]:
        """Which of a peer's heads we do not hold; if any, ask it for `entries_since(our heads)`."""
        return tuple(sorted({h for h in their_heads if h not in self._present}))

    def entries_since(
        self, their_heads: Iterable[bytes], *, limit: int | None = None, essential_only: bool = False,
    ) -> list[Entry]:
        """Entries a peer with `their_heads` lacks, parents first; heads we do not know are ignored.
        `essential_only`: the peer's log is full (`is_full`), so only its prunes, leaves, rekeys
        and rotations can be stored there; the rest would be dropped at every sync (replicas
        full of different branches never converge on their stored entries)."""
        struct = self._structure()
        known = 0
        for h in their_heads:
            i = struct.index.get(h)
            if i is not None:
                known |= struct.anc[i] | (1 << i)
        out = [
            self._present[h] for i, h in enumerate(struct.order)
            if not (known >> i) & 1 and (not essential_only or self._present[h].type in ESSENTIAL_TYPES)
        ]
        return out if limit is None else out[:limit]

    def _structure(self) -> _Structure:
        if self._struct is None:
            self._struct = _Structure.of(self._present)
        return self._struct

    # ---- validity and state -------------------------------------------------------------------

    def is_valid(self, entry_hash: bytes) -> bool:
        """Whether a stored entry takes effect. Unknown hashes are not valid."""
        i = self._structure().index.get(entry_hash)
        return i is not None and self._validity()[i]

    def state(self) -> MembershipState:
        """The current state. Raises LocalProtocolError before the create entry has arrived."""
        if self._cache_state is not None:
            return self._cache_state
        create = self.create_entry
        if create is None:
            raise LocalProtocolError(self._subnet_id.hex()[:8], "the log has no create entry yet")
        struct = self._structure()
        valid = self._validity()
        members, former, epoch, commitment = _Evaluator(struct, self._present).state(valid)
        self._cache_state = MembershipState(
            subnet_id=self._subnet_id,
            name=str(create.body["name"]),
            create_nonce=bytes.fromhex(str(create.body["nonce"])),
            members=members,
            former=former,
            epoch=epoch,
            commitment=commitment,
            invalid=frozenset(h for h, ok in zip(struct.order, valid, strict=True) if not ok),
            conflicts=frozenset(struct.order[i] for i in self._undecided),
        )
        return self._cache_state

    def _validity(self) -> list[bool]:
        if self._valid is None:
            self._valid, self._undecided = _Evaluator(self._structure(), self._present).run()
        return self._valid


@dataclass(slots=True)
class _Structure:
    """The DAG in the deterministic order: parent indices and ancestor bitmasks (bit j set in
    `anc[i]` when entry j is an ancestor of entry i)."""

    order: list[bytes]
    index: dict[bytes, int]
    parents: list[list[int]]
    anc: list[int]
    partial: bool  # an entry names a parent not stored here

    @classmethod
    def of(cls, present: Mapping[bytes, Entry]) -> _Structure:
        # a parent not stored here is left out: only an essential entry stored without the
        # ancestry this log has no room for names one (see MembershipLog.merge)
        children: dict[bytes, list[bytes]] = {}
        indegree: dict[bytes, int] = {}
        partial = False
        for h, e in present.items():
            stored = [p for p in e.parents if p in present]
            indegree[h] = len(stored)
            partial |= len(stored) < len(e.parents)
            for p in stored:
                children.setdefault(p, []).append(h)
        heap = [(present[h].hlc, h) for h, d in indegree.items() if d == 0]
        heapq.heapify(heap)
        order: list[bytes] = []
        while heap:
            _, h = heapq.heappop(heap)
            order.append(h)
            for c in children.get(h, ()):
                indegree[c] -= 1
                if indegree[c] == 0:
                    heapq.heappush(heap, (present[c].hlc, c))
        index = {h: i for i, h in enumerate(order)}
        parents = [[index[p] for p in present[h].parents if p in index] for h in order]
        anc: list[int] = []
        for ps in parents:
            mask = 0
            for j in ps:
                mask |= anc[j] | (1 << j)
            anc.append(mask)
        return cls(order, index, parents, anc, partial)


_MAX_ROUNDS: Final = 8


class _Evaluator:
    """Decides the validity of every stored entry (docs/design/membership-validity.md).

    One pass in order decides each entry from its ancestors (author a member there, the type's
    rule) and from a given set of removals that shadow it. Which removals shadow depends on which
    removals are valid, so the passes repeat until that set is stable: twice without conflicts.
    Removals that void each other make it oscillate; those are the conflicts, and all of them
    take effect (a pruned key never voids its own prune).
    """

    def __init__(self, struct: _Structure, present: Mapping[bytes, Entry]) -> None:
        self.struct = struct
        self.anc = struct.anc
        entries = [present[h] for h in struct.order]
        self.n = len(entries)
        self.kind = [e.type for e in entries]
        self.author = [e.author for e in entries]
        self.entries = entries
        self.keys: list[dict[str, NodeId]] = [
            {f: NodeId.from_hex(str(v)) for f, v in e.body.items() if f in _KEY_FIELDS} for e in entries
        ]
        self.removals: dict[NodeId, list[int]] = {}  # prune, leave, rekey-from of a key
        self.admissions: dict[NodeId, list[int]] = {}  # create, join, rekey-to of a key
        for i, e in enumerate(entries):
            k = self.keys[i]
            if e.type in (PRUNE, LEAVE):
                self.removals.setdefault(k["key"], []).append(i)
            elif e.type == REKEY:
                self.removals.setdefault(k["old"], []).append(i)
            subject = e.subject()
            if e.type in (CREATE, JOIN, REKEY) and subject is not None:
                self.admissions.setdefault(subject, []).append(i)
        self.removal_idx = [i for i, e in enumerate(entries) if e.type in (PRUNE, LEAVE, REKEY)]

    def run(self) -> tuple[list[bool], frozenset[int]]:
        """(validity per entry, the removals in conflict)."""
        shadow: frozenset[int] = frozenset()
        seen: list[frozenset[int]] = []
        valid = self.one_pass(shadow, frozenset())
        for _ in range(_MAX_ROUNDS):
            nxt = frozenset(r for r in self.removal_idx if valid[r])
            if nxt == shadow:
                return valid, frozenset()
            seen.append(shadow)
            if nxt in seen:
                cycle = seen[seen.index(nxt):]
                break
            shadow = nxt
            valid = self.one_pass(shadow, frozenset())
        else:
            cycle = seen[-2:]
        union = frozenset().union(*cycle)
        undecided = union - frozenset.intersection(*cycle)
        return self.one_pass(union, undecided), undecided

    def one_pass(self, shadow: frozenset[int], forced: frozenset[int]) -> list[bool]:
        n, kind, anc = self.n, self.kind, self.anc
        valid = [False] * n
        epoch_seen = [0] * n  # the highest valid rotation among an entry's ancestors
        for i in range(n):
            if kind[i] == CREATE:
                valid[i] = i == 0
                continue
            ep = 0
            for p in self.struct.parents[i]:
                x = epoch_seen[p]
                if valid[p] and kind[p] == SEED_ROTATE:
                    x = max(x, self.entries[p].epoch())
                ep = max(ep, x)
            epoch_seen[i] = ep
            author, mask = self.author[i], anc[i]
            if not self.member_at(author, mask, valid):
                continue  # checked first: nothing else is computed for a non-member's entry
            if not self.type_rule(i, mask, ep, valid):
                continue
            if i not in forced and self.shadowed(i, author, mask, shadow, valid):
                continue
            valid[i] = True
        return valid

    def member_at(self, key: NodeId, mask: int, valid: list[bool]) -> bool:
        """Sticky membership among the entries of `mask`: a valid admission that has seen every
        valid removal of the key."""
        adms = [a for a in self.admissions.get(key, ()) if valid[a] and (mask >> a) & 1]
        if not adms:
            return False
        rems = [r for r in self.removals.get(key, ()) if valid[r] and (mask >> r) & 1]
        return any(all((self.anc[a] >> r) & 1 for r in rems) for a in adms)

    def ever_admitted(self, key: NodeId, mask: int, valid: list[bool]) -> bool:
        return any(valid[a] and (mask >> a) & 1 for a in self.admissions.get(key, ()))

    def type_rule(self, i: int, mask: int, epoch: int, valid: list[bool]) -> bool:
        e, k = self.entries[i], self.keys[i]
        if e.type == JOIN:
            return e.epoch() == epoch and not self.member_at(k["key"], mask, valid)
        if e.type == SEED_ROTATE:
            return e.epoch() == epoch + 1
        if e.type == PRUNE:
            return self.ever_admitted(k["key"], mask, valid)
        if e.type == REKEY:
            old, new = k["old"], k["new"]
            return old != e.author and self.member_at(old, mask, valid) and not self.ever_admitted(new, mask, valid)
        return e.type in (LEAVE, LABEL)

    def shadowed(self, i: int, key: NodeId, mask: int, shadow: frozenset[int], valid: list[bool]) -> bool:
        """Whether a removal of `key` in `shadow` voids entry i: i is not one of its ancestors and
        i does not descend from a re-admission of the key that saw that removal."""
        for r in self.removals.get(key, ()):
            if r == i or r not in shadow or (self.anc[r] >> i) & 1:
                continue
            readmitted = any(
                valid[a] and (mask >> a) & 1 and (self.anc[a] >> r) & 1 for a in self.admissions.get(key, ())
            )
            if not readmitted:
                return True
        return False

    def state(self, valid: list[bool]) -> tuple[dict[NodeId, str], dict[NodeId, FormerMember], int, bytes]:
        """Members, former members, epoch and commitment given by the valid entries."""
        labels: dict[NodeId, str] = {}
        admitted: dict[NodeId, list[int]] = {}
        removed: dict[NodeId, list[tuple[int, FormerMember]]] = {}
        epoch, commitment = 0, b""
        for j in range(self.n):
            if not valid[j]:
                continue
            e, k = self.entries[j], self.keys[j]
            if e.type == CREATE:
                labels[k["creator"]] = e.label()
                admitted.setdefault(k["creator"], []).append(j)
                commitment = bytes.fromhex(str(e.body["commitment"]))
            elif e.type == JOIN:
                labels[k["key"]] = e.label()
                admitted.setdefault(k["key"], []).append(j)
            elif e.type == LABEL:
                labels[k["key"]] = e.label()
            elif e.type == REKEY:
                old, new = k["old"], k["new"]
                labels[new] = labels.get(old, "")
                admitted.setdefault(new, []).append(j)
                removed.setdefault(old, []).append((j, FormerMember(labels.get(old, ""), "rekeyed", e.author)))
            elif e.type == LEAVE:
                removed.setdefault(k["key"], []).append((j, FormerMember(labels.get(k["key"], ""), "left", e.author)))
            elif e.type == PRUNE:
                gone = FormerMember(labels.get(k["key"], ""), "pruned", e.author, str(e.body["reason"]))
                removed.setdefault(k["key"], []).append((j, gone))
            elif e.type == SEED_ROTATE and e.epoch() >= epoch:
                epoch, commitment = e.epoch(), bytes.fromhex(str(e.body["commitment"]))
        members: dict[NodeId, str] = {}
        former: dict[NodeId, FormerMember] = {}
        for key, adms in admitted.items():
            rems = removed.get(key, [])
            if any(all((self.anc[a] >> r) & 1 for r, _ in rems) for a in adms):
                members[key] = labels.get(key, "")
            elif rems:
                last = rems[-1][1]
                former[key] = replace(last, label=labels.get(key, last.label))
        return members, former, epoch, commitment
