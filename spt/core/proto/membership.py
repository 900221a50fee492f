"""The membership log of a subnet: signed, hash-linked entries, their merge and the state they give.

What lives here (SPEC.md §6.1–6.2):

1. `Entry`, one signed log entry, its canonical encoding, hash, signatures and plain-dict form
   (msgpack frames carry the dict; SQLite stores `Entry.to_bytes()`, canonical JSON).
2. Constructors for each entry type; `join` and `rekey` entries are proposed by a member and
   countersigned by the new key in a second step.
3. `MembershipLog`: union merge of entries into a hash DAG, with entries whose parents are missing
   kept pending; the deterministic order (topological, ties by (HLC, hash)); the validity of each
   entry; `state()`; and the replication helpers `missing_for` / `entries_since`.

Rules of validity, in the order they are checked:

- Entries whose signatures or shape are wrong are refused at `add` (RemoteProtocolError) and never
  stored: a member merges only entries that verify (§6.3). A second root is refused the same way.
- Every other entry is stored. It is *valid* when its author is a current member of the state its
  own ancestors give, its type's rule holds there, and it is not shadowed. Invalid entries are kept
  (sync stays idempotent) but have no effect.
- Type rules: a `join` cites the seed epoch current among its ancestors and admits a non-member; a
  `seed-rotate` names the next epoch; a `prune` names a known key other than the author; a `rekey`
  replaces a current member (not the author) with a key never seen in the subnet.
- Shadowing: an entry by key k is invalid when some valid `prune` or `leave` of k is not one of its
  descendants, unless the entry descends from a valid admission of k that itself descends from that
  removal. So a pruned node cannot hang entries (joins included) on parents older than its prune.
- Membership is sticky: k is a member when some valid admission of k (create, join, rekey to k) has
  every valid removal of k (prune, leave, rekey from k) among its ancestors. A join concurrent with a
  prune therefore does not bring the key back; only a join that saw the prune does.
- Seed epochs: the highest epoch wins; between rotations naming the same epoch, the one ordered
  last wins.
- Mutual prunes: when a and b prune each other concurrently, the literal rule would void both, and
  a pruned node could then always cancel its prune by pruning its pruner. Instead the more senior
  of the two wins: the one whose current admission comes first in the order (the creator outranks
  everyone). So the senior members can always remove anyone.
- Longer cycles of concurrent removals (a prunes b, b prunes c, c prunes a) stay circular; validity
  is decided in the total order, and an entry still being decided counts as invalid for the
  question that depends on it. The outcome is deterministic for a given set of entries.

What must not live here: storage, clocks, sockets. HLC timestamps arrive in the constructors.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Iterable, Mapping
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
    "LOG_DOMAIN",
    "NONCE_BYTES",
    "SUBNET_ID_BYTES",
    "Entry",
    "FormerMember",
    "MembershipLog",
    "MembershipState",
    "MergeResult",
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
        return canonical_bytes(self.to_dict())

    @property
    def hash(self) -> bytes:
        return sha256(self.to_bytes())

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
    """What the log says now. `members` maps key → label; `invalid` lists entries without effect."""

    subnet_id: bytes
    name: str
    create_nonce: bytes
    members: Mapping[NodeId, str]
    former: Mapping[NodeId, FormerMember]
    epoch: int
    commitment: bytes
    invalid: frozenset[bytes] = field(default_factory=frozenset)

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
class MergeResult:
    """What a merge did: entries now in the log, entries waiting for parents, entries refused."""

    added: tuple[bytes, ...] = ()
    pending: tuple[bytes, ...] = ()
    refused: tuple[tuple[bytes, str], ...] = ()


@dataclass(slots=True)
class _Partial:
    members: dict[NodeId, str]
    former: dict[NodeId, FormerMember]
    epoch: int
    commitment: bytes


class MembershipLog:
    """One subnet's log. In memory; the store persists entries (`Entry.to_bytes`) and reloads them.

    Call `add` or `merge` with entries from anywhere (own, peers, bundle); `state()` is recomputed
    lazily after every change. Not thread-safe; the shell owns it.
    """

    def __init__(self, subnet_id: bytes, *, max_pending: int = 4096) -> None:
        if len(subnet_id) != SUBNET_ID_BYTES:
            raise LocalProtocolError(subnet_id.hex(), f"a subnet id is {SUBNET_ID_BYTES} bytes")
        self._subnet_id = bytes(subnet_id)
        self._max_pending = max_pending
        self._present: dict[bytes, Entry] = {}
        self._pending: dict[bytes, Entry] = {}
        self._waiting: dict[bytes, set[bytes]] = {}  # missing parent → pending children
        self._create: bytes | None = None
        self._cache_order: list[bytes] | None = None
        self._cache_anc: list[int] | None = None
        self._cache_valid: list[bool] | None = None
        self._cache_state: MembershipState | None = None

    @classmethod
    def from_create(cls, create: Entry) -> MembershipLog:
        log = cls(subnet_id_of(create))
        log.add(create)
        return log

    @classmethod
    def from_entries(cls, subnet_id: bytes, entries: Iterable[Entry]) -> MembershipLog:
        """A log holding `entries`; a refused entry raises RemoteProtocolError."""
        log = cls(subnet_id)
        for entry in entries:
            log.add(entry)
        return log

    def copy(self) -> MembershipLog:
        """An independent log with the same entries, without verifying them again."""
        other = MembershipLog(self._subnet_id, max_pending=self._max_pending)
        other._present = dict(self._present)
        other._pending = dict(self._pending)
        other._waiting = {k: set(v) for k, v in self._waiting.items()}
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

    def __contains__(self, entry_hash: object) -> bool:
        return entry_hash in self._present

    def get(self, entry_hash: bytes) -> Entry | None:
        return self._present.get(entry_hash)

    def pending(self) -> tuple[bytes, ...]:
        """Hashes of stored entries still waiting for a parent."""
        return tuple(sorted(self._pending))

    # ---- adding ---------------------------------------------------------------------------

    def add(self, entry: Entry) -> bool:
        """Add one entry; False when already held. Raises RemoteProtocolError if it does not verify."""
        h = entry.hash
        if h in self._present or h in self._pending:
            return False
        problem = entry.shape_problem() or entry.signature_problem()
        if not problem and entry.type == CREATE and h[:SUBNET_ID_BYTES] != self._subnet_id:
            problem = "a create entry of another subnet"
        if problem:
            raise RemoteProtocolError(h.hex()[:16], problem)
        missing = [p for p in entry.parents if p not in self._present]
        if missing:
            if len(self._pending) >= self._max_pending:
                raise RemoteProtocolError(h.hex()[:16], f"over {self._max_pending} entries wait for parents")
            self._pending[h] = entry
            for p in missing:
                self._waiting.setdefault(p, set()).add(h)
            return True
        self._install(h, entry)
        return True

    def merge(self, entries: Iterable[Entry]) -> MergeResult:
        """Union with `entries`. Refused entries are reported, not raised, so one bad entry in a
        batch does not drop the good ones; the shell logs them against the peer."""
        added: list[bytes] = []
        refused: list[tuple[bytes, str]] = []
        before = set(self._present)
        for entry in entries:
            try:
                self.add(entry)
            except RemoteProtocolError as exc:
                refused.append((entry.hash, exc.message))
        added = [h for h in self.ordered_hashes() if h not in before]
        return MergeResult(tuple(added), self.pending(), tuple(refused))

    def _install(self, h: bytes, entry: Entry) -> None:
        ready = [(h, entry)]
        while ready:
            h, entry = ready.pop()
            self._present[h] = entry
            if entry.type == CREATE:
                self._create = h
            for child in sorted(self._waiting.pop(h, ())):
                pending = self._pending[child]
                if all(p in self._present for p in pending.parents):
                    del self._pending[child]
                    ready.append((child, pending))
        self._cache_order = self._cache_anc = self._cache_valid = None
        self._cache_state = None

    # ---- order and replication --------------------------------------------------------------

    def ordered_hashes(self) -> list[bytes]:
        """Hashes of all present entries in the deterministic order (parents first, ties (HLC, hash))."""
        order, _ = self._structure()
        return list(order)

    def entries(self) -> list[Entry]:
        """All present entries, valid or not, in order: what a bundle or a full sync carries."""
        return [self._present[h] for h in self.ordered_hashes()]

    def heads(self) -> tuple[bytes, ...]:
        """Present entries no present entry names as parent, sorted: the parents of a new entry."""
        named = {p for e in self._present.values() for p in e.parents}
        return tuple(sorted(h for h in self._present if h not in named))

    def latest_hlc(self) -> HlcTimestamp | None:
        """The greatest timestamp in the log, for the shell's `Hlc.update` before a new entry."""
        return max((e.hlc for e in self._present.values()), default=None)

    def missing_for(self, their_heads: Iterable[bytes]) -> tuple[bytes, ...]:
        """Which of a peer's heads we do not hold; if any, ask it for `entries_since(our heads)`."""
        return tuple(sorted({h for h in their_heads if h not in self._present}))

    def entries_since(self, their_heads: Iterable[bytes], *, limit: int | None = None) -> list[Entry]:
        """Entries a peer with `their_heads` lacks, parents first; heads we do not know are ignored."""
        order, anc = self._structure()
        index = {h: i for i, h in enumerate(order)}
        known = 0
        for h in their_heads:
            i = index.get(h)
            if i is not None:
                known |= anc[i] | (1 << i)
        out = [self._present[h] for i, h in enumerate(order) if not (known >> i) & 1]
        return out if limit is None else out[:limit]

    def _structure(self) -> tuple[list[bytes], list[int]]:
        if self._cache_order is not None and self._cache_anc is not None:
            return self._cache_order, self._cache_anc
        children: dict[bytes, list[bytes]] = {}
        indegree: dict[bytes, int] = {}
        for h, e in self._present.items():
            indegree[h] = len(e.parents)
            for p in e.parents:
                children.setdefault(p, []).append(h)
        heap = [(self._present[h].hlc, h) for h, d in indegree.items() if d == 0]
        heapq.heapify(heap)
        order: list[bytes] = []
        while heap:
            _, h = heapq.heappop(heap)
            order.append(h)
            for c in children.get(h, ()):
                indegree[c] -= 1
                if indegree[c] == 0:
                    heapq.heappush(heap, (self._present[c].hlc, c))
        index = {h: i for i, h in enumerate(order)}
        anc: list[int] = []
        for h in order:
            mask = 0
            for p in self._present[h].parents:
                j = index[p]
                mask |= anc[j] | (1 << j)
            anc.append(mask)
        self._cache_order, self._cache_anc = order, anc
        return order, anc

    # ---- validity and state -------------------------------------------------------------------

    def is_valid(self, entry_hash: bytes) -> bool:
        """Whether a present entry takes effect. Unknown hashes are not valid."""
        order, _ = self._structure()
        if entry_hash not in self._present:
            return False
        return self._validity()[order.index(entry_hash)]

    def state(self) -> MembershipState:
        """The current state. Raises LocalProtocolError before the create entry has arrived."""
        if self._cache_state is not None:
            return self._cache_state
        create = self.create_entry
        if create is None:
            raise LocalProtocolError(self._subnet_id.hex()[:8], "the log has no create entry yet")
        order, _ = self._structure()
        valid = self._validity()
        partial = _Evaluator(self, order).state_of((1 << len(order)) - 1, valid.__getitem__)
        self._cache_state = MembershipState(
            subnet_id=self._subnet_id,
            name=str(create.body["name"]),
            create_nonce=bytes.fromhex(str(create.body["nonce"])),
            members=dict(partial.members),
            former=dict(partial.former),
            epoch=partial.epoch,
            commitment=partial.commitment,
            invalid=frozenset(h for h, ok in zip(order, valid, strict=True) if not ok),
        )
        return self._cache_state

    def _validity(self) -> list[bool]:
        if self._cache_valid is None:
            order, _ = self._structure()
            self._cache_valid = _Evaluator(self, order).run()
        return self._cache_valid


class _Evaluator:
    """Decides validity of every present entry (see the module docstring for the rules)."""

    def __init__(self, log: MembershipLog, order: list[bytes]) -> None:
        _, anc = log._structure()
        self.entries = [log._present[h] for h in order]
        self.anc = anc
        self.n = len(order)
        self.memo: list[bool | None] = [None] * self.n
        self.busy: set[int] = set()
        self.removals: dict[NodeId, list[int]] = {}  # prune/leave of a key: shadowing
        self.admissions: dict[NodeId, list[int]] = {}  # create/join/rekey-to of a key
        # key-valued body fields parsed once: state_of runs once per entry
        self.keys = [
            {f: NodeId.from_hex(str(v)) for f, v in e.body.items() if f in _KEY_FIELDS} for e in self.entries
        ]
        for i, e in enumerate(self.entries):
            if e.type in (PRUNE, LEAVE):
                self.removals.setdefault(e.key(), []).append(i)
            subject = e.subject()
            if e.type in (CREATE, JOIN, REKEY) and subject is not None:
                self.admissions.setdefault(subject, []).append(i)

    def run(self) -> list[bool]:
        return [self.valid(i) for i in range(self.n)]

    def valid(self, i: int) -> bool:
        known = self.memo[i]
        if known is not None:
            return known
        if i in self.busy:
            return False  # a cycle: the entry being decided does not count for this question
        self.busy.add(i)
        try:
            result = self._decide(i)
        finally:
            self.busy.discard(i)
        self.memo[i] = result
        return result

    def _decide(self, i: int) -> bool:
        e = self.entries[i]
        if e.type == CREATE:
            return i == 0
        st = self.state_of(self.anc[i], self.valid)
        author = e.author
        if author not in st.members:
            return False
        if not self._type_rule(e, st):
            return False
        for r in self.removals.get(author, ()):
            if r == i or (self.anc[r] >> i) & 1:
                continue
            remover = self.entries[r].author
            if e.type == PRUNE and e.key() == remover and not self._outranks(remover, r, author, i):
                continue  # a mutual prune that `author` wins by seniority
            if not self.valid(r):
                continue
            if not any(
                (self.anc[i] >> a) & 1 and (self.anc[a] >> r) & 1 and self.valid(a)
                for a in self.admissions.get(author, ())
            ):
                return False
        return True

    def _outranks(self, a: NodeId, at_a: int, b: NodeId, at_b: int) -> bool:
        """Whether `a`'s admission seen from entry `at_a` comes before `b`'s seen from `at_b`."""
        return self._admitted_at(a, self.anc[at_a]) < self._admitted_at(b, self.anc[at_b])

    def _admitted_at(self, key: NodeId, mask: int) -> int:
        """Order position of the latest valid admission of `key` among `mask`; n when none."""
        found = [a for a in self.admissions.get(key, ()) if (mask >> a) & 1 and self.valid(a)]
        return max(found, default=self.n)

    @staticmethod
    def _type_rule(e: Entry, st: _Partial) -> bool:
        if e.type == JOIN:
            return e.key() not in st.members and e.epoch() == st.epoch
        if e.type == SEED_ROTATE:
            return e.epoch() == st.epoch + 1
        if e.type == PRUNE:
            return e.key() in st.members or e.key() in st.former
        if e.type == REKEY:
            old, new = e.key("old"), e.key("new")
            return old in st.members and old != e.author and new not in st.members and new not in st.former
        return e.type in (LEAVE, LABEL)

    def state_of(self, mask: int, valid: Callable[[int], bool]) -> _Partial:
        """The state given by the valid entries among those whose bits are set in `mask`."""
        labels: dict[NodeId, str] = {}
        admitted: dict[NodeId, list[int]] = {}
        removed: dict[NodeId, list[tuple[int, FormerMember]]] = {}
        epoch, commitment = 0, b""
        rest = mask
        while rest:  # set bits, lowest (earliest in order) first
            low = rest & -rest
            rest ^= low
            j = low.bit_length() - 1
            if not valid(j):
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
                gone = FormerMember(labels.get(old, ""), "rekeyed", e.author)
                removed.setdefault(old, []).append((j, gone))
            elif e.type == LEAVE:
                gone = FormerMember(labels.get(k["key"], ""), "left", e.author)
                removed.setdefault(k["key"], []).append((j, gone))
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
        return _Partial(members, former, epoch, commitment)
