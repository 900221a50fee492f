"""The join ceremony (SPEC.md §5.3–5.5): two sans-IO state machines, failure records, the lockout.

What lives here, and the rules that hold for all of it:

1. `JoinerSession` (J, SPAKE2 side A) and `ResponderSession` (M, side B). Each consumes message
   dicts (`{"type": …, fields}`, binary fields as bytes) and returns an `Output`: the messages to
   write, in order, on the one join stream, and the typed events for the shell. Nothing here
   touches a socket, a file or a clock: wall and monotonic times arrive as arguments (seconds as
   float), and so does the lockout view.
2. Each machine is an `Enum` of states plus one transition table keyed by (state, input). A peer
   message with no entry raises RemoteProtocolError (close the stream); an API call with no entry
   raises LocalProtocolError (a bug in the shell).
3. Nothing secret leaves M before J has proved the code: M's hello, its SPAKE2 message and a `fail`
   carry no seed, code, member list or log. The seed and the log travel only in the bundle, sealed
   under a key derived from the SPAKE2 key and the transcript.
4. The transcript binds both node keys, the subnet, the step, both SPAKE2 messages and the TLS
   exporter E of the connection, so a relaying man in the middle fails key confirmation.
5. Only the current step's code is tried; one retry at the adjacent step is offered only when J's
   clock is shown to be off by more than 2 s (§5.4), and that retry is a separate, counted attempt.
6. `FailureRecord` / `UnlockRecord` are the signed, gossiped records of §5.5 and `JoinLimiter`
   turns them into open/locked. The shell stores and gossips the records and passes the limiter's
   current answer for each served subnet (`locks=`) into every `ResponderSession.receive`.

Message sequence (J → M unless marked):
  hello · M: hello (state open | locked | not-here | expired | member | full) · pake · M: pake ·
  confirm · M: confirm + admit, or M: fail (code-mismatch [retry_step] | locked) ·
  countersign · M: bundle.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from hashlib import sha256 as _sha256
from typing import Any, Final, Generic, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B, SPAKEError
from spake2.ed25519_basic import NotOnCurve

from spt.core.errors import (
    LocalProtocolError,
    Refusal,
    RemoteProtocolError,
    SptError,
    UsageError,
)
from spt.core.identity import NodeId, NodeKey, sha256
from spt.core.proto.canonical import canonical_bytes, parse_canonical
from spt.core.proto.hlc import Hlc
from spt.core.proto.membership import (
    MAX_ENTRIES_PER_AUTHOR,
    MAX_LOG_ENTRIES,
    MAX_MEMBERS,
    SUBNET_ID_BYTES,
    Entry,
    MembershipLog,
    join_countersignature,
    propose_join,
)
from spt.core.proto.totp import SEED_BYTES, Secret, code_at, step_of
from spt.core.types import canonical_subnet_name, check_label, check_subnet_name

__all__ = [
    "EXPORTER_BYTES",
    "EXPORTER_LABEL",
    "PROTOCOL_VERSION",
    "AlreadyMember",
    "AttemptFailed",
    "CodeExpired",
    "Contact",
    "FailureRecord",
    "HelloRefused",
    "Interference",
    "JoinBundle",
    "JoinLimiter",
    "JoinStatus",
    "Joined",
    "JoinerEvent",
    "JoinerSession",
    "JoinerState",
    "Locked",
    "MemberAdmitted",
    "MemberHello",
    "NotHere",
    "Output",
    "Rejected",
    "ResponderEvent",
    "ResponderSession",
    "ResponderState",
    "ResponderSubnet",
    "SkewRetry",
    "SubnetFull",
    "UnlockRecord",
    "iso_utc",
    "join_password",
    "transcript",
]

PROTOCOL_VERSION: Final = 1
EXPORTER_LABEL: Final = b"EXPORTER-spt-join-v1"
EXPORTER_BYTES: Final = 32
CODE_MAX_AGE_MS: Final = 30_000
SKEW_RETRY_MS: Final = 2_000
RECORD_TTL_MS: Final = 24 * 3600 * 1000

_PW_DOMAIN: Final = b"spt/join/v1/pw"
_T_DOMAIN: Final = b"spt/join/v1"
_CONFIRM_INFO: Final = b"spt/join/v1/confirm"
_BUNDLE_INFO: Final = b"spt/join/v1/bundle"
_FAILURE_DOMAIN: Final = b"spt/join-failure/v1"
_UNLOCK_DOMAIN: Final = b"spt/join-unlock/v1"
_AEAD_NONCE: Final = bytes(12)  # the bundle key is used once, for one message
_PAKE_MSG_BYTES: Final = 33  # side byte + one Ed25519 group element
_MAC_BYTES: Final = 32
_MAX_TEXT: Final = 256

# message types
HELLO: Final = "hello"
PAKE: Final = "pake"
CONFIRM: Final = "confirm"
FAIL: Final = "fail"
ADMIT: Final = "admit"
COUNTERSIGN: Final = "countersign"
BUNDLE: Final = "bundle"

# join states in M's hello
OPEN: Final = "open"
LOCKED: Final = "locked"
NOT_HERE: Final = "not-here"
EXPIRED: Final = "expired"
MEMBER: Final = "member"
FULL: Final = "full"  # the log would drop a join now: the member cap, or no room for ordinary entries
_HELLO_STATES: Final = (OPEN, LOCKED, NOT_HERE, EXPIRED, MEMBER, FULL)

Message = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Key schedule


def join_password(subnet_id: bytes, step: int, code: Secret[str]) -> Secret[bytes]:
    """pw = SHA-256("spt/join/v1/pw" ‖ subnet id ‖ u64 step ‖ six ASCII digits)."""
    digits = _check_code(code)
    return Secret(sha256(_PW_DOMAIN, subnet_id, step.to_bytes(8, "big"), digits.encode("ascii")))


def _check_code(code: Secret[str]) -> str:
    digits = code.reveal()
    if len(digits) != 6 or not digits.isascii() or not digits.isdigit():
        raise UsageError("BAD_CODE", "", "a join code is six digits")  # never echo the value
    return digits


def _spake_ids(joiner: NodeId, member: NodeId, subnet_id: bytes, cname: str) -> tuple[bytes, bytes]:
    return joiner.raw, member.raw + subnet_id + cname.encode("utf-8")


def transcript(
    joiner: NodeId,
    member: NodeId,
    subnet_id: bytes,
    cname: str,
    step: int,
    msg_a: bytes,
    msg_b: bytes,
    exporter: bytes,
) -> bytes:
    """T = SHA-256("spt/join/v1" ‖ J key ‖ M key ‖ subnet id ‖ canonical name ‖ u64 s ‖ msg A ‖ msg B ‖ E)."""
    return sha256(
        _T_DOMAIN,
        joiner.raw,
        member.raw,
        subnet_id,
        cname.encode("utf-8"),
        step.to_bytes(8, "big"),
        msg_a,
        msg_b,
        exporter,
    )


def _hkdf(key: Secret[bytes], salt: bytes, info: bytes) -> Secret[bytes]:
    return Secret(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key.reveal()))


def _confirm_mac(kc: Secret[bytes], role: bytes, t: bytes) -> bytes:
    return hmac.new(kc.reveal(), role + t, _sha256).digest()


def iso_utc(ms: int) -> str:
    """Milliseconds since the epoch as ISO-8601 UTC, seconds precision (`JOIN_LOCKED:<name> until …`)."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------------------------
# Shared shapes

E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class Output(Generic[E]):
    """What one call produced: messages to write in order, then events for the shell."""

    messages: tuple[Message, ...] = ()
    events: tuple[E, ...] = ()


@dataclass(frozen=True, slots=True)
class Contact:
    """Where a member was last seen: `host:port` addresses and relay URLs."""

    addresses: tuple[str, ...] = ()
    relays: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JoinStatus:
    """The lockout view of one subnet (`subnet status` shows it)."""

    state: str = OPEN
    failed_last_hour: int = 0
    locked_until_ms: int | None = None

    @property
    def is_locked(self) -> bool:
        return self.state == LOCKED


@dataclass(frozen=True, slots=True)
class ResponderSubnet:
    """What M needs to answer joins for one subnet it serves (attached, holding the current seed)."""

    log: MembershipLog
    seed: Secret[bytes]
    epoch: int
    label: str
    contacts: Mapping[NodeId, Contact] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JoinBundle:
    """What J receives once admitted. `log` is verified from its create entry; store its entries,
    the seed (0600, never printed) and pin every key in `log.state().members`."""

    subnet_id: bytes
    name: str
    seed: Secret[bytes]
    epoch: int
    log: MembershipLog
    join_entry: Entry
    contacts: Mapping[NodeId, Contact]


# ---- joiner events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberHello:
    """M serves the subnet and joins are open. Call `proceed()` to try the code, or `abort()`
    (several subnet ids under one name: JOIN_AMBIGUOUS, or not the `--id` the user chose)."""

    member: NodeId
    member_label: str
    subnet_id: bytes
    name: str
    step: int
    skew_ms: int


@dataclass(frozen=True, slots=True)
class SkewRetry:
    """The code failed at M's step; J's clock is off, so it retries once at its own step."""

    step: int
    skew_ms: int


@dataclass(frozen=True, slots=True)
class Joined:
    bundle: JoinBundle
    member: NodeId
    skew_ms: int


@dataclass(frozen=True, slots=True)
class Rejected:
    name: str
    skew_ms: int

    def error(self) -> SptError:
        return Refusal("JOIN_REJECTED", self.name, "code did not match")


@dataclass(frozen=True, slots=True)
class Locked:
    name: str
    until_ms: int

    def error(self) -> SptError:
        return Refusal("JOIN_LOCKED", self.name, f"until {iso_utc(self.until_ms)}")


@dataclass(frozen=True, slots=True)
class CodeExpired:
    name: str

    def error(self) -> SptError:
        why = "the code was entered over 30 s ago; enter the current code"
        return Refusal("JOIN_CODE_EXPIRED", self.name, why)


@dataclass(frozen=True, slots=True)
class NotHere:
    """This candidate does not serve the name; try the others (none left: JOIN_NOT_FOUND)."""

    name: str


@dataclass(frozen=True, slots=True)
class AlreadyMember:
    name: str

    def error(self) -> SptError:
        return Refusal("ALREADY_MEMBER", self.name, "this node is already a member")


@dataclass(frozen=True, slots=True)
class SubnetFull:
    """M would not store a join now (SPEC.md has no token for it: the closest, JOIN_REJECTED)."""

    name: str

    def error(self) -> SptError:
        why = f"the subnet is full: it has the most members a subnet holds ({MAX_MEMBERS}), or no room for joins in its log"
        return Refusal("JOIN_REJECTED", self.name, why)


@dataclass(frozen=True, slots=True)
class Interference:
    """M's key confirmation failed after ours passed: someone is interfering. Abort and warn."""

    member: NodeId
    name: str

    def error(self) -> SptError:
        return Refusal(
            "JOIN_INTERFERENCE", self.name, "the member failed key confirmation; someone may be interfering"
        )


JoinerEvent = (
    MemberHello
    | SkewRetry
    | Joined
    | Rejected
    | Locked
    | CodeExpired
    | NotHere
    | AlreadyMember
    | SubnetFull
    | Interference
)


# ---- responder events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloRefused:
    """M answered a hello without running SPAKE2 (`state` is locked, not-here, expired or member)."""

    name: str
    state: str
    joiner: NodeId


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """A failed confirmation. Store and gossip `record`; log the joiner, source and skew."""

    record: FailureRecord
    retry_step: int | None
    skew_ms: int


@dataclass(frozen=True, slots=True)
class MemberAdmitted:
    """J countersigned. Add `entry` to the log, push it to every member, pin `joiner`."""

    entry: Entry
    joiner: NodeId
    label: str
    skew_ms: int


ResponderEvent = HelloRefused | AttemptFailed | MemberAdmitted


# --------------------------------------------------------------------------------------------
# Failure and unlock records, and the lockout


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """One failed confirmation (§5.5), signed by the responding member. Kept 24 h."""

    subnet_id: bytes
    responder: NodeId
    joiner: NodeId
    source: str
    time_ms: int
    step: int
    sig: bytes = b""

    def unsigned_dict(self) -> dict[str, Any]:
        return {
            "subnet": self.subnet_id.hex(),
            "responder": self.responder.hex,
            "joiner": self.joiner.hex,
            "source": self.source,
            "time_ms": self.time_ms,
            "step": self.step,
        }

    @classmethod
    def sign(
        cls, key: NodeKey, *, subnet_id: bytes, joiner: NodeId, source: str, time_ms: int, step: int
    ) -> FailureRecord:
        unsigned = cls(subnet_id, key.node_id, joiner, source[:_MAX_TEXT], time_ms, step)
        return replace(unsigned, sig=key.sign(_FAILURE_DOMAIN + canonical_bytes(unsigned.unsigned_dict())))

    def verify(self) -> bool:
        return self.responder.verify(self.sig, _FAILURE_DOMAIN + canonical_bytes(self.unsigned_dict()))

    @property
    def id(self) -> bytes:
        return sha256(canonical_bytes(self.to_dict()))

    def is_expired(self, now_ms: int) -> bool:
        return now_ms - self.time_ms > RECORD_TTL_MS

    def to_dict(self) -> dict[str, Any]:
        return {**self.unsigned_dict(), "sig": self.sig.hex()}

    @classmethod
    def from_dict(cls, data: object) -> FailureRecord:
        """Parse a gossiped record; malformed or badly signed raises RemoteProtocolError."""
        d = _map(data, "failure record")
        record = cls(
            _hexb(d, "subnet", SUBNET_ID_BYTES),
            _key(d, "responder"),
            _key(d, "joiner"),
            _text(d, "source"),
            _int(d, "time_ms"),
            _int(d, "step"),
            _hexb(d, "sig", 64),
        )
        if not record.verify():
            raise RemoteProtocolError(record.responder.short, "failure record signature does not verify")
        return record


@dataclass(frozen=True, slots=True)
class UnlockRecord:
    """`spt subnet unlock`: ends a lockout and clears the count, subnet-wide."""

    subnet_id: bytes
    author: NodeId
    time_ms: int
    sig: bytes = b""

    def unsigned_dict(self) -> dict[str, Any]:
        return {"subnet": self.subnet_id.hex(), "author": self.author.hex, "time_ms": self.time_ms}

    @classmethod
    def sign(cls, key: NodeKey, *, subnet_id: bytes, time_ms: int) -> UnlockRecord:
        unsigned = cls(subnet_id, key.node_id, time_ms)
        return replace(unsigned, sig=key.sign(_UNLOCK_DOMAIN + canonical_bytes(unsigned.unsigned_dict())))

    def verify(self) -> bool:
        return self.author.verify(self.sig, _UNLOCK_DOMAIN + canonical_bytes(self.unsigned_dict()))

    def to_dict(self) -> dict[str, Any]:
        return {**self.unsigned_dict(), "sig": self.sig.hex()}

    @classmethod
    def from_dict(cls, data: object) -> UnlockRecord:
        d = _map(data, "unlock record")
        record = cls(
            _hexb(d, "subnet", SUBNET_ID_BYTES), _key(d, "author"), _int(d, "time_ms"), _hexb(d, "sig", 64)
        )
        if not record.verify():
            raise RemoteProtocolError(record.author.short, "unlock record signature does not verify")
        return record


@dataclass(frozen=True, slots=True)
class JoinLimiter:
    """The attempt cap of §5.5 as a pure function of the records. Thresholds are parameters so
    tests can shrink them (`join.max_failures`, `join.lockout_seconds`).

    The `max_failures`-th failure inside any rolling `window_ms` locks joins for `lockout_ms` from
    that failure; failures that land during a lockout belong to it; when it ends, counting starts
    from zero. An unlock clears every failure up to its time. Callers pass only records that
    verified, were authored by members, and belong to this subnet.
    """

    max_failures: int = 10
    window_ms: int = 3_600_000
    lockout_ms: int = 3_600_000

    def status(
        self, failures: Iterable[FailureRecord], unlocks: Iterable[UnlockRecord], now_ms: int
    ) -> JoinStatus:
        reset = max((u.time_ms for u in unlocks if u.time_ms <= now_ms), default=None)
        unique = {f.id: f.time_ms for f in failures}
        times = sorted(t for t in unique.values() if t <= now_ms and (reset is None or t > reset))
        counting_from: int | None = reset
        locked_until: int | None = None
        window: list[int] = []
        for t in times:
            if locked_until is not None:
                if t < locked_until:
                    continue
                counting_from, locked_until, window = locked_until, None, []
            window = [w for w in window if w > t - self.window_ms]
            window.append(t)
            if len(window) >= self.max_failures:
                locked_until = t + self.lockout_ms
        if locked_until is not None and now_ms >= locked_until:
            counting_from, locked_until = locked_until, None
        recent = [
            t for t in times if t > now_ms - self.window_ms and (counting_from is None or t >= counting_from)
        ]
        if locked_until is not None:
            return JoinStatus(LOCKED, len(recent), locked_until)
        return JoinStatus(OPEN, len(recent), None)


# --------------------------------------------------------------------------------------------
# Message field parsing (peer input → RemoteProtocolError)


def _map(data: object, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise RemoteProtocolError("", f"a {what} is a map")
    return data


def _int(msg: Mapping[str, Any], name: str, *, signed: bool = False) -> int:
    value = msg.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or (value < 0 and not signed):
        raise RemoteProtocolError(name, f"{name} is {'an' if signed else 'a non-negative'} integer")
    return value


def _opt_int(msg: Mapping[str, Any], name: str) -> int | None:
    return None if msg.get(name) is None else _int(msg, name)


def _text(msg: Mapping[str, Any], name: str) -> str:
    value = msg.get(name)
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise RemoteProtocolError(name, f"{name} is text of at most {_MAX_TEXT} characters")
    return value


def _bytes(msg: Mapping[str, Any], name: str, length: int | None = None) -> bytes:
    value = msg.get(name)
    if not isinstance(value, bytes) or (length is not None and len(value) != length):
        size = f"{length} " if length is not None else ""
        raise RemoteProtocolError(name, f"{name} is {size}bytes")
    return value


def _hexb(msg: Mapping[str, Any], name: str, length: int) -> bytes:
    value = msg.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != length:
        raise RemoteProtocolError(name, f"{name} is {length} bytes as hex")
    return raw


def _key(msg: Mapping[str, Any], name: str) -> NodeId:
    return NodeId(_hexb(msg, name, 32))


def _checked(check: Any, value: str, name: str) -> str:
    try:
        return str(check(value))
    except SptError as exc:
        raise RemoteProtocolError(value[:64], f"invalid {name}") from exc


def _msg_type(msg: object) -> tuple[str, Mapping[str, Any]]:
    m = _map(msg, "join message")
    mtype = m.get("type")
    if not isinstance(mtype, str):
        raise RemoteProtocolError("", "a join message has a type")
    return mtype, m


def _spake_finish(spake: Any, inbound: bytes, side: bytes) -> Secret[bytes]:
    if len(inbound) != _PAKE_MSG_BYTES or inbound[:1] != side:
        raise RemoteProtocolError("pake", f"a SPAKE2 message is {_PAKE_MSG_BYTES} bytes from side {side!r}")
    try:
        return Secret(bytes(spake.finish(inbound)))
    except (SPAKEError, NotOnCurve, ValueError) as exc:
        raise RemoteProtocolError("pake", "the SPAKE2 message is not a valid group element") from exc


def _step_after(table: Mapping[tuple[Any, Any], Any], state: Any, inp: Any, *, remote: bool) -> Any:
    nxt = table.get((state, inp))
    if nxt is None:
        if remote:
            raise RemoteProtocolError(inp.value, f"unexpected in state {state.value}")
        raise LocalProtocolError(inp.value, f"not allowed in state {state.value}")
    return nxt


# --------------------------------------------------------------------------------------------
# The joiner


class JoinerState(Enum):
    START = "start"
    AWAIT_HELLO = "await-hello"
    HELLO_RECEIVED = "hello-received"  # waiting for the shell: proceed() or abort()
    AWAIT_PAKE = "await-pake"
    AWAIT_CONFIRM = "await-confirm"
    AWAIT_ADMIT = "await-admit"
    AWAIT_BUNDLE = "await-bundle"
    JOINED = "joined"
    FAILED = "failed"


class _JIn(Enum):
    START = "start"
    HELLO_OPEN = "hello-open"
    HELLO_REFUSED = "hello-refused"
    PROCEED = "proceed"
    ABORT = "abort"
    PAKE = "pake"
    CONFIRM_OK = "confirm-ok"
    CONFIRM_BAD = "confirm-bad"
    FAIL_RETRY = "fail-retry"
    FAIL_FINAL = "fail-final"
    ADMIT = "admit"
    BUNDLE = "bundle"


_J = JoinerState
_JOINER_TABLE: Final[dict[tuple[JoinerState, _JIn], JoinerState]] = {
    (_J.START, _JIn.START): _J.AWAIT_HELLO,
    (_J.AWAIT_HELLO, _JIn.HELLO_OPEN): _J.HELLO_RECEIVED,
    (_J.AWAIT_HELLO, _JIn.HELLO_REFUSED): _J.FAILED,
    (_J.HELLO_RECEIVED, _JIn.PROCEED): _J.AWAIT_PAKE,
    (_J.AWAIT_PAKE, _JIn.PAKE): _J.AWAIT_CONFIRM,
    (_J.AWAIT_PAKE, _JIn.FAIL_FINAL): _J.FAILED,  # M found the subnet locked before this run
    (_J.AWAIT_CONFIRM, _JIn.CONFIRM_OK): _J.AWAIT_ADMIT,
    (_J.AWAIT_CONFIRM, _JIn.CONFIRM_BAD): _J.FAILED,
    (_J.AWAIT_CONFIRM, _JIn.FAIL_RETRY): _J.AWAIT_PAKE,
    (_J.AWAIT_CONFIRM, _JIn.FAIL_FINAL): _J.FAILED,
    (_J.AWAIT_ADMIT, _JIn.ADMIT): _J.AWAIT_BUNDLE,
    (_J.AWAIT_BUNDLE, _JIn.BUNDLE): _J.JOINED,
    **{(s, _JIn.ABORT): _J.FAILED for s in _J if s not in (_J.JOINED, _J.FAILED)},
}


class JoinerSession:
    """J's side of one join stream to one candidate member.

    The shell: build it once the QUIC connection is up (`member` is the key from M's certificate,
    `exporter` the 32-byte TLS exporter labelled EXPORTER-spt-join-v1); write `start()`'s hello;
    feed every message from M to `receive()` and write what it returns; on `MemberHello` call
    `proceed()` (or `abort()`); stop at a terminal event (Joined, Rejected, Locked, CodeExpired,
    NotHere, AlreadyMember, Interference), or call `abort()` on timeout or a closed stream.
    """

    def __init__(
        self,
        key: NodeKey,
        member: NodeId,
        exporter: bytes,
        *,
        name: str,
        label: str,
        code: Secret[str],
        entered_at: float,
    ) -> None:
        """`name` as typed; `entered_at` is the monotonic time (s) the user submitted `code`."""
        if len(exporter) != EXPORTER_BYTES:
            raise LocalProtocolError("", f"the TLS exporter is {EXPORTER_BYTES} bytes")
        self._key = key
        self._member = member
        self._exporter = bytes(exporter)
        self._typed_name = check_subnet_name(name)
        self._cname = canonical_subnet_name(name)
        self._label = check_label(label)
        _check_code(code)
        self._code = code
        self._entered_at = entered_at
        self.state = JoinerState.START
        self._subnet_id = b""
        self._name = self._typed_name
        self._step = 0
        self._hello_step = 0
        self._skew_ms = 0
        self._retried = False
        self._spake: Any = None
        self._msg_a = b""
        self._t = b""
        self._k: Secret[bytes] | None = None
        self._kc: Secret[bytes] | None = None
        self._entry: Entry | None = None

    @property
    def is_finished(self) -> bool:
        return self.state in (JoinerState.JOINED, JoinerState.FAILED)

    def _go(self, inp: _JIn, *, remote: bool) -> None:
        self.state = _step_after(_JOINER_TABLE, self.state, inp, remote=remote)

    def start(self, *, wall: float, mono: float) -> Output[JoinerEvent]:
        """The hello. `wall` is J's wall clock (s since the epoch), `mono` its monotonic clock."""
        entered_ago_ms = round((mono - self._entered_at) * 1000)
        if entered_ago_ms < 0:
            raise LocalProtocolError(str(entered_ago_ms), "the code cannot be entered in the future")
        self._go(_JIn.START, remote=False)
        hello: Message = {
            "type": HELLO,
            "version": PROTOCOL_VERSION,
            "name": self._typed_name,
            "label": self._label,
            "entered_ago_ms": entered_ago_ms,
            "wall_ms": round(wall * 1000),
        }
        return Output((hello,))

    def proceed(self) -> Output[JoinerEvent]:
        """Try the code with this member: the first SPAKE2 message."""
        self._go(_JIn.PROCEED, remote=False)
        return Output((self._pake_message(),))

    def abort(self) -> Output[JoinerEvent]:
        """Give up on this stream (timeout, closed stream, another candidate chosen). Idempotent."""
        if not self.is_finished:
            self._go(_JIn.ABORT, remote=False)
        self._wipe()
        return Output()

    def receive(self, msg: object) -> Output[JoinerEvent]:
        """Consume one message from M. A RemoteProtocolError leaves the session FAILED: close."""
        try:
            return self._dispatch(msg)
        except RemoteProtocolError:
            self.state = JoinerState.FAILED
            self._wipe()
            raise

    def _expect(self, inputs: set[_JIn], mtype: str) -> None:
        if not any((self.state, i) in _JOINER_TABLE for i in inputs):
            raise RemoteProtocolError(mtype, f"unexpected in state {self.state.value}")

    def _dispatch(self, msg: object) -> Output[JoinerEvent]:
        mtype, m = _msg_type(msg)
        if mtype == HELLO:
            return self._on_hello(m)
        if mtype == PAKE:
            return self._on_pake(m)
        if mtype == CONFIRM:
            return self._on_confirm(m)
        if mtype == FAIL:
            return self._on_fail(m)
        if mtype == ADMIT:
            return self._on_admit(m)
        if mtype == BUNDLE:
            return self._on_bundle(m)
        raise RemoteProtocolError(mtype[:32], "not a message a member sends")

    # ---- handlers ---------------------------------------------------------------------------

    def _on_hello(self, m: Mapping[str, Any]) -> Output[JoinerEvent]:
        self._expect({_JIn.HELLO_OPEN, _JIn.HELLO_REFUSED}, HELLO)
        state = m.get("state")
        if state not in _HELLO_STATES:
            raise RemoteProtocolError(str(state)[:32], "unknown join state")
        if _int(m, "version") != PROTOCOL_VERSION:
            raise RemoteProtocolError(str(m.get("version")), f"join protocol {PROTOCOL_VERSION} expected")
        if state == NOT_HERE:
            self._go(_JIn.HELLO_REFUSED, remote=True)
            return Output(events=(NotHere(self._typed_name),))
        name = _checked(check_subnet_name, _text(m, "name"), "subnet name")
        if canonical_subnet_name(name) != self._cname:
            raise RemoteProtocolError(name, "the member answered for another subnet name")
        self._name = name
        self._subnet_id = _bytes(m, "subnet_id", SUBNET_ID_BYTES)
        event: JoinerEvent
        if state == LOCKED:
            event = Locked(name, _int(m, "locked_until_ms"))
        elif state == EXPIRED:
            event = CodeExpired(name)
        elif state == MEMBER:
            event = AlreadyMember(name)
        elif state == FULL:
            event = SubnetFull(name)
        else:
            self._go(_JIn.HELLO_OPEN, remote=True)
            self._step = self._hello_step = _int(m, "step")
            self._skew_ms = _int(m, "skew_ms", signed=True)
            label = _checked(check_label, _text(m, "label"), "label")
            hello = MemberHello(self._member, label, self._subnet_id, name, self._step, self._skew_ms)
            return Output(events=(hello,))
        self._go(_JIn.HELLO_REFUSED, remote=True)
        return Output(events=(event,))

    def _pake_message(self) -> Message:
        id_a, id_b = _spake_ids(self._key.node_id, self._member, self._subnet_id, self._cname)
        pw = join_password(self._subnet_id, self._step, self._code)
        self._spake = SPAKE2_A(pw.reveal(), idA=id_a, idB=id_b)
        self._msg_a = bytes(self._spake.start())
        return {"type": PAKE, "msg": self._msg_a}

    def _on_pake(self, m: Mapping[str, Any]) -> Output[JoinerEvent]:
        self._expect({_JIn.PAKE}, PAKE)
        msg_b = _bytes(m, "msg")
        self._k = _spake_finish(self._spake, msg_b, b"B")
        self._spake = None
        self._go(_JIn.PAKE, remote=True)
        me, ids = self._key.node_id, (self._subnet_id, self._cname, self._step)
        self._t = transcript(me, self._member, *ids, self._msg_a, msg_b, self._exporter)
        self._kc = _hkdf(self._k, self._t, _CONFIRM_INFO)
        return Output(({"type": CONFIRM, "mac": _confirm_mac(self._kc, b"joiner", self._t)},))

    def _on_confirm(self, m: Mapping[str, Any]) -> Output[JoinerEvent]:
        self._expect({_JIn.CONFIRM_OK, _JIn.CONFIRM_BAD}, CONFIRM)
        mac = _bytes(m, "mac", _MAC_BYTES)
        if self._kc is None:
            raise LocalProtocolError(self.state.value, "confirmation without a key")
        if hmac.compare_digest(mac, _confirm_mac(self._kc, b"member", self._t)):
            self._go(_JIn.CONFIRM_OK, remote=True)
            return Output()
        self._go(_JIn.CONFIRM_BAD, remote=True)
        self._wipe()
        return Output(events=(Interference(self._member, self._name),))

    def _on_fail(self, m: Mapping[str, Any]) -> Output[JoinerEvent]:
        self._expect({_JIn.FAIL_RETRY, _JIn.FAIL_FINAL}, FAIL)
        reason = m.get("reason")
        if reason == LOCKED:
            self._go(_JIn.FAIL_FINAL, remote=True)
            self._wipe()
            return Output(events=(Locked(self._name, _int(m, "locked_until_ms")),))
        if reason != "code-mismatch":
            raise RemoteProtocolError(str(reason)[:32], "unknown fail reason")
        retry = _opt_int(m, "retry_step")
        if retry is not None and not self._retried and retry in (self._hello_step - 1, self._hello_step + 1):
            self._go(_JIn.FAIL_RETRY, remote=True)
            self._retried = True
            self._step = retry
            self._k = self._kc = None
            return Output((self._pake_message(),), (SkewRetry(retry, self._skew_ms),))
        self._go(_JIn.FAIL_FINAL, remote=True)
        self._wipe()
        return Output(events=(Rejected(self._name, self._skew_ms),))

    def _on_admit(self, m: Mapping[str, Any]) -> Output[JoinerEvent]:
        self._expect({_JIn.ADMIT}, ADMIT)
        entry = Entry.from_dict(m.get("entry"), proposal=True)
        me = self._key.node_id
        if entry.type != "join" or entry.countersig is not None:
            raise RemoteProtocolError(entry.type, "admission is a join entry awaiting our countersignature")
        if entry.author != self._member or entry.key() != me or entry.label() != self._label:
            raise RemoteProtocolError(entry.author.short, "the join entry does not admit us from this member")
        if not entry.author.verify(entry.sig, entry.signed_bytes()):
            raise RemoteProtocolError(entry.author.short, "the join entry's signature does not verify")
        sig = join_countersignature(entry, self._key)
        self._entry = replace(entry, countersig=sig)
        self._go(_JIn.ADMIT, remote=True)
        return Output(({"type": COUNTERSIGN, "sig": sig},))

    def _on_bundle(self, m: Mapping[str, Any]) -> Output[JoinerEvent]:
        self._expect({_JIn.BUNDLE}, BUNDLE)
        if self._k is None or self._entry is None:
            raise LocalProtocolError(self.state.value, "bundle state without a key or entry")
        kb = _hkdf(self._k, self._t, _BUNDLE_INFO)
        try:
            plain = ChaCha20Poly1305(kb.reveal()).decrypt(_AEAD_NONCE, _bytes(m, "sealed"), self._t)
        except InvalidTag as exc:
            raise RemoteProtocolError("bundle", "the sealed bundle does not open") from exc
        bundle = _open_bundle(parse_canonical(plain), self._subnet_id, self._entry, me=self._key.node_id)
        self._go(_JIn.BUNDLE, remote=True)
        self._wipe()
        return Output(events=(Joined(bundle, self._member, self._skew_ms),))

    def _wipe(self) -> None:
        self._spake = None
        self._k = self._kc = None


def _open_bundle(data: object, subnet_id: bytes, join_entry: Entry, *, me: NodeId) -> JoinBundle:
    """Verify a bundle: the log from its create entry, the subnet id, our join, the seed."""
    d = _map(data, "bundle")
    subnet = _map(d.get("subnet"), "subnet record")
    if _hexb(subnet, "id", SUBNET_ID_BYTES) != subnet_id:
        raise RemoteProtocolError("bundle", "the bundle is for another subnet id")
    seed = Secret(_hexb(d, "seed", SEED_BYTES))
    epoch = _int(d, "epoch")
    raw_log = d.get("log")
    if not isinstance(raw_log, list):
        raise RemoteProtocolError("bundle", "the log is a list of entries")
    if len(raw_log) > MAX_LOG_ENTRIES:
        raise RemoteProtocolError("bundle", f"a log holds at most {MAX_LOG_ENTRIES} entries")
    log = MembershipLog(subnet_id)
    # refuses bad signatures and a foreign create; entries that do not stand here are left out
    merged = log.merge([Entry.from_dict(raw) for raw in raw_log])
    if merged.refused:
        raise RemoteProtocolError("bundle", f"a log entry does not verify: {merged.refused[0][1]}")
    if log.create_entry is None or log.pending():
        raise RemoteProtocolError("bundle", "the log does not reach back to its create entry")
    state = log.state()
    h = join_entry.hash
    if h not in log or not log.is_valid(h) or me not in state.members:
        raise RemoteProtocolError("bundle", "the log does not hold our valid join")
    if epoch != state.epoch or not state.seed_matches(seed):
        raise RemoteProtocolError("bundle", "the seed does not match the log's commitment")
    contacts: dict[NodeId, Contact] = {}
    members = d.get("members")
    if not isinstance(members, list):
        raise RemoteProtocolError("bundle", "members is a list")
    for raw in members:
        mm = _map(raw, "member")
        node = _key(mm, "key")
        if node in state.members:  # the log, not the list, says who is a member
            contacts[node] = Contact(_texts(mm, "addresses"), _texts(mm, "relays"))
    return JoinBundle(subnet_id, state.name, seed, epoch, log, join_entry, contacts)


def _texts(m: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = m.get(name, [])
    if not isinstance(value, list) or len(value) > 64 or not all(isinstance(v, str) for v in value):
        raise RemoteProtocolError(name, f"{name} is a list of strings")
    return tuple(v[:_MAX_TEXT] for v in value)


# --------------------------------------------------------------------------------------------
# The responder


class ResponderState(Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_PAKE = "await-pake"
    AWAIT_CONFIRM = "await-confirm"
    AWAIT_RETRY = "await-retry"  # a skew retry was offered; J's second SPAKE2 message comes next
    AWAIT_COUNTERSIGN = "await-countersign"
    ADMITTED = "admitted"
    CLOSED = "closed"


class _RIn(Enum):
    HELLO_OPEN = "hello-open"
    HELLO_REFUSED = "hello-refused"
    PAKE = "pake"
    PAKE_LOCKED = "pake-locked"
    CONFIRM_OK = "confirm-ok"
    CONFIRM_BAD_RETRY = "confirm-bad-retry"
    CONFIRM_BAD_FINAL = "confirm-bad-final"
    COUNTERSIGN = "countersign"
    ABORT = "abort"


_R = ResponderState
_RESPONDER_TABLE: Final[dict[tuple[ResponderState, _RIn], ResponderState]] = {
    (_R.AWAIT_HELLO, _RIn.HELLO_OPEN): _R.AWAIT_PAKE,
    (_R.AWAIT_HELLO, _RIn.HELLO_REFUSED): _R.CLOSED,
    (_R.AWAIT_PAKE, _RIn.PAKE): _R.AWAIT_CONFIRM,
    (_R.AWAIT_PAKE, _RIn.PAKE_LOCKED): _R.CLOSED,
    (_R.AWAIT_CONFIRM, _RIn.CONFIRM_OK): _R.AWAIT_COUNTERSIGN,
    (_R.AWAIT_CONFIRM, _RIn.CONFIRM_BAD_RETRY): _R.AWAIT_RETRY,
    (_R.AWAIT_CONFIRM, _RIn.CONFIRM_BAD_FINAL): _R.CLOSED,
    (_R.AWAIT_RETRY, _RIn.PAKE): _R.AWAIT_CONFIRM,
    (_R.AWAIT_RETRY, _RIn.PAKE_LOCKED): _R.CLOSED,
    (_R.AWAIT_COUNTERSIGN, _RIn.COUNTERSIGN): _R.ADMITTED,
    **{(s, _RIn.ABORT): _R.CLOSED for s in _R if s not in (_R.ADMITTED, _R.CLOSED)},
}


class ResponderSession:
    """M's side of one incoming join stream.

    The shell: build it per stream on the join ALPN (`joiner` is the key from J's certificate,
    `exporter` the connection's TLS exporter, `source` J's address for failure records, `rtt` the
    connection's RTT estimate in seconds); `subnets` maps canonical name → `ResponderSubnet` for
    every subnet this node serves right now. Feed each message from J to `receive()` with the wall
    clock and, for hello and pake messages, the current `JoinLimiter` status of that subnet; write
    the returned messages; act on the events; close the stream once `is_finished`. Answer joins
    for one subnet at a time (§5.5).
    """

    def __init__(
        self,
        key: NodeKey,
        joiner: NodeId,
        exporter: bytes,
        *,
        subnets: Mapping[str, ResponderSubnet],
        source: str = "",
        rtt: float = 0.0,
    ) -> None:
        if len(exporter) != EXPORTER_BYTES:
            raise LocalProtocolError("", f"the TLS exporter is {EXPORTER_BYTES} bytes")
        self._key = key
        self._joiner = joiner
        self._exporter = bytes(exporter)
        self._subnets = subnets
        self._source = source
        self._rtt = rtt
        self.state = ResponderState.AWAIT_HELLO
        self._ctx: ResponderSubnet | None = None
        self._subnet_id = b""
        self._name = ""
        self._cname = ""
        self._joiner_label = ""
        self._step = 0
        self._retry_step: int | None = None
        self._skew_ms = 0
        self._t = b""
        self._k: Secret[bytes] | None = None
        self._kc: Secret[bytes] | None = None
        self._proposal: Entry | None = None

    @property
    def subnet_id(self) -> bytes:
        """The subnet this stream asks for, once the hello named one this node serves."""
        return self._subnet_id

    @property
    def is_finished(self) -> bool:
        return self.state in (ResponderState.ADMITTED, ResponderState.CLOSED)

    def _go(self, inp: _RIn, *, remote: bool = True) -> None:
        self.state = _step_after(_RESPONDER_TABLE, self.state, inp, remote=remote)

    def abort(self) -> Output[ResponderEvent]:
        """The stream closed or timed out. Nothing is appended and nothing is counted."""
        if not self.is_finished:
            self._go(_RIn.ABORT, remote=False)
        self._wipe()
        return Output()

    def receive(
        self, msg: object, *, wall: float, locks: Mapping[bytes, JoinStatus]
    ) -> Output[ResponderEvent]:
        """Consume one message from J. A RemoteProtocolError leaves the session CLOSED: close.

        `wall`: M's wall clock (s). `locks`: subnet id → current `JoinLimiter` status, for every
        subnet in `subnets`; it is read before each SPAKE2 run (hello and pake messages).
        """
        try:
            return self._dispatch(msg, wall, locks)
        except RemoteProtocolError:
            self.state = ResponderState.CLOSED
            self._wipe()
            raise

    def _dispatch(
        self, msg: object, wall: float, locks: Mapping[bytes, JoinStatus]
    ) -> Output[ResponderEvent]:
        mtype, m = _msg_type(msg)
        if mtype == HELLO:
            self._expect({_RIn.HELLO_OPEN, _RIn.HELLO_REFUSED}, mtype)
            return self._on_hello(m, wall, locks)
        if mtype == PAKE:
            self._expect({_RIn.PAKE}, mtype)
            return self._on_pake(m, _lock_of(locks, self._subnet_id))
        if mtype == CONFIRM:
            self._expect({_RIn.CONFIRM_OK}, mtype)
            return self._on_confirm(m, wall)
        if mtype == COUNTERSIGN:
            self._expect({_RIn.COUNTERSIGN}, mtype)
            return self._on_countersign(m)
        raise RemoteProtocolError(mtype[:32], "not a message a joiner sends")

    def _expect(self, inputs: set[_RIn], mtype: str) -> None:
        if not any((self.state, i) in _RESPONDER_TABLE for i in inputs):
            raise RemoteProtocolError(mtype, f"unexpected in state {self.state.value}")

    # ---- handlers ---------------------------------------------------------------------------

    def _on_hello(
        self, m: Mapping[str, Any], wall: float, locks: Mapping[bytes, JoinStatus]
    ) -> Output[ResponderEvent]:
        if _int(m, "version") != PROTOCOL_VERSION:
            raise RemoteProtocolError(str(m.get("version")), f"join protocol {PROTOCOL_VERSION} expected")
        typed = _text(m, "name")
        self._joiner_label = _checked(check_label, _text(m, "label"), "label")
        entered_ago_ms = _int(m, "entered_ago_ms")
        joiner_wall_ms = _int(m, "wall_ms")
        ctx = self._serving(typed)
        if ctx is None:
            return self._refuse(typed, {"type": HELLO, "version": PROTOCOL_VERSION, "state": NOT_HERE})
        state = ctx.log.state()
        self._ctx, self._subnet_id, self._name = ctx, state.subnet_id, state.name
        self._cname = canonical_subnet_name(state.name)
        base: Message = {
            "type": HELLO,
            "version": PROTOCOL_VERSION,
            "name": state.name,
            "subnet_id": state.subnet_id,
            "label": ctx.label,
            "wall_ms": round(wall * 1000),
        }
        if self._joiner in state.members:
            return self._refuse(state.name, {**base, "state": MEMBER})
        if ctx.log.join_problem():  # before any code is tried: nothing is counted
            return self._refuse(state.name, {**base, "state": FULL})
        lock = _lock_of(locks, state.subnet_id)
        if lock.is_locked:
            until = lock.locked_until_ms or 0
            return self._refuse(state.name, {**base, "state": LOCKED, "locked_until_ms": until})
        if entered_ago_ms > CODE_MAX_AGE_MS:
            return self._refuse(state.name, {**base, "state": EXPIRED})
        entered_ago = entered_ago_ms / 1000
        self._step = step_of(wall - entered_ago)
        skew = joiner_wall_ms / 1000 + self._rtt / 2 - wall
        self._skew_ms = round(skew * 1000)
        joiner_step = step_of(joiner_wall_ms / 1000 - entered_ago)
        if abs(skew) * 1000 > SKEW_RETRY_MS and joiner_step in (self._step - 1, self._step + 1):
            self._retry_step = joiner_step
        self._go(_RIn.HELLO_OPEN)
        return Output(({**base, "state": OPEN, "step": self._step, "skew_ms": self._skew_ms},))

    def _serving(self, typed: str) -> ResponderSubnet | None:
        try:
            ctx = self._subnets.get(canonical_subnet_name(typed))
        except UsageError:
            return None
        if ctx is None or ctx.log.create_entry is None:
            return None
        state = ctx.log.state()
        # A member that was pruned, or that has not yet fetched the winning epoch's seed, cannot
        # answer joins (§6.5); saying so is what keeps the joiner looking elsewhere.
        if self._key.node_id not in state.members:
            return None
        if ctx.epoch != state.epoch or not state.seed_matches(ctx.seed):
            return None
        # a member whose own budget is spent would sign a join the log drops: another member admits
        if ctx.log.spent(self._key.node_id)[0] >= MAX_ENTRIES_PER_AUTHOR:
            return None
        # a log holding a removal without the ancestry it had no room for: the joiner's log
        # could not place it (a full log answers `full` below)
        if not ctx.log.is_whole() and not ctx.log.join_problem():
            return None
        return ctx

    def _refuse(self, name: str, hello: Message) -> Output[ResponderEvent]:
        self._go(_RIn.HELLO_REFUSED)
        return Output((hello,), (HelloRefused(name, str(hello["state"]), self._joiner),))

    def _on_pake(self, m: Mapping[str, Any], lock: JoinStatus) -> Output[ResponderEvent]:
        msg_a = _bytes(m, "msg")
        if lock.is_locked:
            self._go(_RIn.PAKE_LOCKED)
            fail: Message = {"type": FAIL, "reason": LOCKED, "locked_until_ms": lock.locked_until_ms or 0}
            return Output((fail,), (HelloRefused(self._name, LOCKED, self._joiner),))
        ctx = self._context()
        if self.state == ResponderState.AWAIT_RETRY:
            if self._retry_step is None:
                raise LocalProtocolError(self.state.value, "a retry without a retry step")
            self._step, self._retry_step = self._retry_step, None
        id_a, id_b = _spake_ids(self._joiner, self._key.node_id, self._subnet_id, self._cname)
        pw = join_password(self._subnet_id, self._step, code_at(ctx.seed, self._step))
        spake = SPAKE2_B(pw.reveal(), idA=id_a, idB=id_b)
        msg_b = bytes(spake.start())
        self._k = _spake_finish(spake, msg_a, b"A")
        self._go(_RIn.PAKE)
        ids = (self._subnet_id, self._cname, self._step)
        self._t = transcript(self._joiner, self._key.node_id, *ids, msg_a, msg_b, self._exporter)
        self._kc = _hkdf(self._k, self._t, _CONFIRM_INFO)
        return Output(({"type": PAKE, "msg": msg_b},))

    def _on_confirm(self, m: Mapping[str, Any], wall: float) -> Output[ResponderEvent]:
        mac = _bytes(m, "mac", _MAC_BYTES)
        ctx = self._context()
        if self._kc is None:
            raise LocalProtocolError(self.state.value, "confirmation without a key")
        if hmac.compare_digest(mac, _confirm_mac(self._kc, b"joiner", self._t)):
            self._go(_RIn.CONFIRM_OK)
            wall_ms = round(wall * 1000)
            hlc = Hlc(self._key.node_id, ctx.log.latest_hlc()).now(wall_ms)
            self._proposal = propose_join(
                self._key,
                parents=ctx.log.valid_heads(),
                joiner=self._joiner,
                label=self._joiner_label,
                epoch=ctx.epoch,
                hlc=hlc,
            )
            confirm: Message = {"type": CONFIRM, "mac": _confirm_mac(self._kc, b"member", self._t)}
            return Output((confirm, {"type": ADMIT, "entry": self._proposal.to_dict()}))
        record = FailureRecord.sign(
            self._key,
            subnet_id=self._subnet_id,
            joiner=self._joiner,
            source=self._source,
            time_ms=round(wall * 1000),
            step=self._step,
        )
        retry = self._retry_step
        self._go(_RIn.CONFIRM_BAD_RETRY if retry is not None else _RIn.CONFIRM_BAD_FINAL)
        self._wipe()
        fail: Message = {"type": FAIL, "reason": "code-mismatch", "retry_step": retry}
        fail["skew_ms"] = self._skew_ms
        return Output((fail,), (AttemptFailed(record, retry, self._skew_ms),))

    def _on_countersign(self, m: Mapping[str, Any]) -> Output[ResponderEvent]:
        sig = _bytes(m, "sig", 64)
        ctx = self._context()
        if self._proposal is None or self._k is None:
            raise LocalProtocolError(self.state.value, "countersign without a proposal")
        entry = replace(self._proposal, countersig=sig)
        problem = entry.signature_problem()
        if problem:
            raise RemoteProtocolError(self._joiner.short, problem)
        self._go(_RIn.COUNTERSIGN)
        log = ctx.log.copy()
        log.add(entry)
        state = log.state()
        if self._joiner not in state.members:
            raise LocalProtocolError(entry.hash.hex()[:16], "our own join entry did not take effect")
        members = [
            {
                "key": node.hex,
                "label": label,
                "addresses": list(ctx.contacts.get(node, Contact()).addresses),
                "relays": list(ctx.contacts.get(node, Contact()).relays),
            }
            for node, label in sorted(state.members.items())
        ]
        plain = canonical_bytes(
            {
                "subnet": {"id": self._subnet_id, "name": state.name},
                "seed": ctx.seed.reveal(),
                "epoch": ctx.epoch,
                "members": members,
                "log": [e.to_dict() for e in log.entries()],
            }
        )
        kb = _hkdf(self._k, self._t, _BUNDLE_INFO)
        sealed = ChaCha20Poly1305(kb.reveal()).encrypt(_AEAD_NONCE, plain, self._t)
        self._wipe()
        return Output(
            ({"type": BUNDLE, "sealed": sealed},),
            (MemberAdmitted(entry, self._joiner, self._joiner_label, self._skew_ms),),
        )

    def _context(self) -> ResponderSubnet:
        if self._ctx is None:
            raise LocalProtocolError(self.state.value, "no subnet chosen")
        return self._ctx

    def _wipe(self) -> None:
        self._k = self._kc = None


def _lock_of(locks: Mapping[bytes, JoinStatus], subnet_id: bytes) -> JoinStatus:
    lock = locks.get(subnet_id)
    if lock is None:
        raise LocalProtocolError(subnet_id.hex()[:8], "pass the JoinLimiter status of every served subnet")
    return lock
