"""The objects plugins register: one ABC per plugin kind, plus the context protocols they get.

A plugin implements one of these and adds it to the matching registry from a `spt_register_*`
hook (see `spt.hooks.specs`). The node runtime implements the `*Context` protocols; plugins never
import the runtime itself, so they run unchanged against the in-memory test kit.

Order never comes from registration: where it matters the object carries `priority` (lower
first, ties by name), as STYLE.md §3 says.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from spt.core.identity import NodeId

# --- payload types -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IncomingPayload:
    """A payload for a local perch, after the sender's membership and the perch's visibility
    in `subnet` were checked. `sender` is the sending node; `sender_form` the sender's address
    as this node renders it (the envelope's `from`); `subnet` is empty for a local sender."""

    type_name: str
    sender: NodeId
    subnet: str
    perch: str
    sender_form: str
    value: Any


class PayloadContext(Protocol):
    """What a payload handler may ask of the node it runs on."""

    @property
    def node_id(self) -> NodeId: ...

    async def deliver(
        self, perch_id: str, event_type: str, body: str, attrs: Sequence[tuple[str, str]], *, sender: str
    ) -> str:
        """Hand an envelope to a local perch; returns the token "SENT" or "QUEUED"."""
        ...

    async def deliver_message(self, payload: IncomingPayload) -> str:
        """Deliver a message payload (`send`, `ring`: id, window, reply-to, body) exactly once to
        its perch; "SENT" or "QUEUED". Raises Refusal NO_PERCH, RemoteProtocolError if malformed."""
        ...

    async def deliver_messages(self, payloads: Sequence[IncomingPayload]) -> list[str | Exception]:
        """`deliver_message` for several message payloads at once, in order, made durable together
        (one write, one fsync): per payload its token or the exception `deliver_message` would
        raise. Once one for a perch is refused SPOOL_FULL, the later ones for it are refused too."""
        ...


class PayloadType(ABC):
    """A kind of payload that travels between nodes (send, ring, notify, file, third parties).

    `name` is wire contract: undotted names are reserved for spt's own distributions, third
    parties use a dotted name (`acme.location`). `encode`/`decode` are pure; `decode` raises
    `RemoteProtocolError` for garbage. `handle` runs on the receiving node and returns the reply
    body sent back to the sender.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    summary: ClassVar[str] = ""

    @classmethod
    def encode(cls, value: Any) -> Any:
        """Turn a value into msgpack-able data (dicts, lists, str, bytes, ints)."""
        return value

    @classmethod
    def decode(cls, data: Any) -> Any:
        """Turn received data back into a value; raise RemoteProtocolError on garbage."""
        return data

    @classmethod
    @abstractmethod
    async def handle(cls, ctx: PayloadContext, payload: IncomingPayload) -> Mapping[str, Any]:
        """Act on a received payload; the returned mapping is the reply sent to the sender."""

    @classmethod
    async def handle_batch(
        cls, ctx: PayloadContext, payloads: Sequence[IncomingPayload]
    ) -> Sequence[Mapping[str, Any] | Exception]:
        """Act on several payloads of this type that arrived together (`msg.deliver_batch`), in
        order: per payload its reply, or the exception `handle` would raise. Override it when a
        batch is cheaper handled whole (messages: one spool write for all). The default runs
        `handle` for each, started in order and concurrently."""
        replies: list[Mapping[str, Any] | Exception] = []
        for outcome in await asyncio.gather(*(cls.handle(ctx, p) for p in payloads), return_exceptions=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # cancelled: the node is stopping
            replies.append(outcome)
        return replies


# --- discovery -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """A place where a node might be reached: its key when known, and a UDP address."""

    host: str
    port: int
    node: NodeId | None = None
    source: str = ""
    tags: frozenset[bytes] = field(default_factory=frozenset)


class DiscoveryContext(Protocol):
    """What a discovery backend may ask of the node: who it is and what it serves."""

    @property
    def node_id(self) -> NodeId: ...

    @property
    def port(self) -> int: ...

    def host_addresses(self) -> Sequence[str]:
        """The IPv4 addresses this node can be reached at (for adverts)."""
        ...

    def advertised_tags(self) -> Sequence[bytes]:
        """Rendezvous tags (SPEC.md §5.2) of the subnets this node serves now."""
        ...

    def config_section(self, name: str) -> Mapping[str, Any]: ...


class DiscoveryBackend(ABC):
    """Finds members of a subnet by its rendezvous tag, and announces this node."""

    name: ClassVar[str]
    priority: ClassVar[int] = 100

    async def start(self, ctx: DiscoveryContext) -> None:
        """Begin announcing; called once when the node starts. Default: nothing to announce."""

    async def refresh(self) -> None:
        """The set of served subnets changed; update what is announced."""

    async def stop(self) -> None:
        """Withdraw announcements and release resources."""

    @abstractmethod
    async def find(self, tag: bytes, timeout: float) -> Sequence[Candidate]:
        """Candidates that serve `tag`, gathered for at most `timeout` seconds."""

    def settled_in(self) -> float:
        """Seconds until this backend has heard whatever nearby announces, 0 once it has (an
        mDNS browser that has listened long enough). A check that something is absent waits
        only this long. Default: 0, a backend that listens for nothing has nothing to wait for."""
        return 0.0


# --- connectors (transports and fallbacks) --------------------------------------------------


class ConnectContext(Protocol):
    """What a connector may ask of the node when dialling."""

    @property
    def node_id(self) -> NodeId: ...


class Connector(ABC):
    """One way to reach a peer: direct QUIC (essential), the relay, …

    The dialer races connectors by `priority`, each held back by its `start_delay` seconds.
    """

    name: ClassVar[str]
    priority: ClassVar[int] = 100
    start_delay: ClassVar[float] = 0.0

    @abstractmethod
    async def candidates(self, ctx: ConnectContext, peer: NodeId, hints: Sequence[Candidate]) -> Sequence[Candidate]:
        """Addresses this connector would dial for `peer`, given what discovery knows."""


class BulkTransit(ABC):
    """A blind byte pipe to a member through a third party (a relay's TCP listener, SPEC.md §7.6
    bulk transit), for bulk data that is already end-to-end encrypted and keyed over the pinned
    member connection. The third party holds no key for what flows through it.

    One side asks `offer(peer)`: it returns an invitation (a small map the caller hands to `peer`
    over their member connection) and a blocking call that joins our end. The peer's node calls
    `join(peer, invitation)` (blocking). Both ends get a connected blocking socket, or raise
    OSError / SptError.
    """

    name: ClassVar[str]
    priority: ClassVar[int] = 100

    @abstractmethod
    async def offer(self, ctx: ConnectContext, peer: NodeId) -> tuple[Mapping[str, Any], Callable[[], Any]] | None:
        """(invitation for `peer`, blocking join of our end), or None when this transit cannot
        reach `peer` now."""

    @abstractmethod
    def join(self, ctx: ConnectContext, peer: NodeId, invitation: Mapping[str, Any]) -> Any:
        """Our end of the pipe `peer` invited us to (blocking; run it on a thread)."""


# --- mind sync, notifications, updates ------------------------------------------------------


class SyncTier(ABC):
    """A tier of an endpoint's mind (live, project) and how it replicates."""

    name: ClassVar[str]
    eager: ClassVar[bool] = False  # pushed at once (live) or by anti-entropy (project)


class NotificationRenderer(ABC):
    """Turns a notification record into what the user sees at the surfacing node.

    `notification` has the keys of `spt notif list --json` (id, subnet, kind, title, body, from,
    time, acked). `show` runs once, on the one node that surfaces it; it must not block (spawn
    detached processes, never wait for them).
    """

    name: ClassVar[str]
    priority: ClassVar[int] = 100

    @abstractmethod
    def render(self, notification: Mapping[str, Any]) -> str: ...

    def show(self, notification: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """Present the notification (`config` is the `notifications` config section)."""


# --- replicated records ---------------------------------------------------------------------


class ReplicatedRecord(Protocol):
    """One signed, never-edited record as the replication facility hands it to plugins.

    `hlc` orders records (compare `(record.hlc, record.id)`); `part` is the partition the kind put
    it in; `data` is the kind's own JSON payload; `author` signed it.
    """

    @property
    def kind(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def part(self) -> str: ...

    @property
    def author(self) -> NodeId: ...

    @property
    def hlc(self) -> Any: ...

    @property
    def data(self) -> Mapping[str, Any]: ...


class RecordKind(ABC):
    """A kind of replicated record a plugin declares: who may receive it and how it merges.

    Records are immutable and merge by union (a change is a new record naming the old one).
    The facility signs, stores (SQLite), pushes new records at once to `recipients`, and runs
    digest anti-entropy with every connected member over the `partitions` both sides name, on
    connect and every `anti_entropy_seconds`. A record arriving from a peer through subnet S is
    stored only when its author's signature verifies and `accept` says yes, so a kind enforces
    on the receiving side what `recipients` promises on the sending side.

    Methods run on the daemon's loop and must not block.
    """

    name: ClassVar[str]
    anti_entropy_seconds: ClassVar[float] = 60.0

    @abstractmethod
    def partitions(self, subnet: str, peer: NodeId) -> Sequence[str]:
        """The partitions this node compares with member `peer` over `subnet` (both sides must name one)."""

    @abstractmethod
    def accept(self, record: ReplicatedRecord, *, subnet: str, peer: NodeId) -> bool:
        """Whether a record `peer` offers over `subnet` may be stored here; raise
        RemoteProtocolError for malformed data (the peer broke the protocol)."""

    def recipients(self, record: ReplicatedRecord) -> Sequence[tuple[str, NodeId]]:
        """(subnet, node) pairs a new local record is pushed to at once. Default: none (anti-entropy only)."""
        return ()

    def merged(self, records: Sequence[ReplicatedRecord]) -> None:
        """New records were stored (received or local); react here (surface, index…)."""

    def expired(self, record: ReplicatedRecord, now_ms: int) -> bool:
        """True when a held record may be dropped (and is refused if offered again)."""
        return False

    def left_subnet(self, subnet: str) -> Sequence[str]:
        """This node left or was pruned from `subnet`: the partitions to delete (SPEC.md §4.8)."""
        return ()


class Replication(Protocol):
    """The replication facility as plugins use it (`NodeRuntime.replication`)."""

    def publish(
        self, kind: str, part: str, data: Mapping[str, Any], *, record_id: str | None = None
    ) -> ReplicatedRecord:
        """Sign a new record with this node's key, store it and push it to its recipients.
        `record_id` (32 hex) is for records several nodes may write for one event; default random."""
        ...

    def records(self, kind: str, part: str | None = None) -> Sequence[ReplicatedRecord]:
        """Held records of `kind` (one partition, or all), ordered by HLC, then id."""
        ...

    def get(self, kind: str, record_id: str) -> ReplicatedRecord | None: ...

    def parts(self, kind: str) -> list[str]:
        """The partitions of `kind` this node holds records in."""
        ...

    def request_sync(self, node: NodeId) -> None:
        """Run anti-entropy with a connected member soon (e.g. it newly hosts what we hold)."""
        ...


class NotificationSink(Protocol):
    """What the notification plugin offers the core (`NodeRuntime.set_notification_sink`)."""

    def raise_notification(
        self, subnet: str | None, kind: str, title: str, body: str, *, dedupe_seconds: float = 0,
        event: str | None = None,
    ) -> str | None:
        """Record and replicate a notification; its id, or None when deduplicated. Members that
        raise one for the same `event` produce the same id, so the user sees it once."""
        ...

    def unread(self) -> int:
        """Unacknowledged notifications in the subnets this node holds."""
        ...

    def banner(self) -> str | None:
        """The one-line stderr banner for an interactive command now, or None (rate-limited)."""
        ...


class Updater(ABC):
    """Stages and applies signed releases (SPEC.md §8.8)."""

    name: ClassVar[str]

    @abstractmethod
    def status(self) -> Mapping[str, Any]: ...


# --- the running node, as plugins see it ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberPresence:
    """What a member's latest presence record says, as a plugin sees it (SPEC.md §4.5):
    `subnet` is the shared subnet it came through, `staged_release` the release it offers."""

    node: NodeId
    label: str
    subnet: str
    software_version: str
    staged_release: str | None


OpHandler = Callable[[Any], Awaitable[Any]]
MemberRequestHandler = Callable[[Any, Any], Awaitable[tuple[str, Any]]]
MemberStreamHandler = Callable[[Any, Any, Any], Awaitable[None]]


class HostedTerminal(Protocol):
    """A viewer's connection to the PTY of a hosted endpoint on this node (SPEC.md §8.6).

    `recv()` returns the host's frames as maps with `t`: `hello` {start, end, pid, applied},
    `lost` {from, to}, `out` {off, data}, `ack` {seq}, `ended` {exit, end}; None when the
    connection ends. Output is numbered by byte offset; input is numbered per viewer id and
    applied once whatever is resent.
    """

    async def recv(self) -> Mapping[str, Any] | None: ...

    async def send_input(self, seq: int, data: bytes) -> None: ...

    async def resize(self, rows: int, cols: int) -> None: ...

    def close(self) -> None: ...


# `spt doctor` lines a plugin adds: (level OK|WARN|FAIL, check name, detail saying what to do next)
DoctorCheck = Callable[[], Sequence[tuple[str, str, str]]]


class NodeRuntime(Protocol):
    """The public surface of a running node, handed to `spt_runtime_started`.

    Through it a plugin adds control operations (what its CLI commands call), answers its own
    request types from members, resolves addresses, reaches peers and delivers envelopes to
    local perches. Connections are `spt.core.net.connections.Connection` objects: `request()`,
    `open_stream()`, `peer`, `remote_addr`.
    """

    @property
    def node_id(self) -> NodeId: ...

    @property
    def label(self) -> str: ...

    @property
    def port(self) -> int:
        """The UDP port the node's QUIC socket is bound to (a peer that sees another port
        knows a NAT between them changes ports)."""
        ...

    @property
    def state_dir(self) -> Path:
        """The node's state folder; a plugin keeps its files in a sub-folder named after it."""
        ...

    def config_section(self, name: str) -> Mapping[str, Any]: ...

    def add_op(self, name: str, handler: OpHandler, *, elevated: bool = False) -> None:
        """A control operation the CLI calls; the handler gets the call (`.args`, `.emit`)."""
        ...

    def add_doctor_check(self, name: str, check: DoctorCheck) -> None:
        """Add lines to `spt doctor` (SPEC.md §7.5): `check()` returns (level, name, detail)
        tuples; a WARN or FAIL detail says what to do next."""
        ...

    def add_member_request(self, type_name: str, handler: MemberRequestHandler) -> None:
        """Answer `type_name` requests from members: `handler(connection, frame) -> (type, body)`."""
        ...

    def resolve(self, address: str) -> Any:
        """Resolve `[subnet:]id[@node]` (SPEC.md §4.1): a local target (`.perch.id`) or a remote
        one (`.node.key`, `.subnet`, `.row.endpoint_id`); refusals raise their token."""
        ...

    def sender(self, from_id: str | None, target: Any) -> str:
        """The endpoint id a message or file to `target` (from `resolve`) goes out as, so that the
        receiver's `from` leads back (SPEC.md §3.4, §4.3): `from_id`, given a perch here when it
        has none (replies are held for it), else a transient `tmp.` identity kept for an hour."""
        ...

    def member_subnet(self, connection: Any, subnet: str) -> bool:
        """True when the connection's peer is a current member of the named attached subnet."""
        ...

    def shared_subnets(self, node: NodeId) -> list[str]:
        """Names of the attached subnets `node` is a current member of (for requests that must
        name one: every member request does, and the receiver re-checks it)."""
        ...

    def perch_visible(self, perch_id: str, subnet: str) -> bool:
        """True when a local perch exists and is visible in the named subnet."""
        ...

    def perch_id(self, perch_id: str) -> str | None:
        """The stored id of the local perch `perch_id` names (ids match without regard to case),
        or None. Canonicalise an id from the network with it before using it as a key or path."""
        ...

    def endpoint_folder(self, perch_id: str) -> Path:
        """The local perch's folder, named by its stored id whatever case `perch_id` has."""
        ...

    def bulk_transits(self) -> Sequence[BulkTransit]:
        """The registered bulk transits (relay TCP listeners…), best first; empty without them."""
        ...

    async def connect_member(self, node: NodeId) -> Any:
        """A live member connection to `node` (dialled if needed); PeerError when unreachable."""
        ...

    async def deliver(
        self, perch_id: str, event_type: str, body: str, attrs: Sequence[tuple[str, str]], *, sender: str
    ) -> str:
        """Spool an envelope for a local perch; "SENT" or "QUEUED" as for `spt send`."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        """Run background work for the node's lifetime; failures are logged."""
        ...

    def add_member_stream(self, type_name: str, handler: MemberStreamHandler) -> None:
        """Own the streams members open with a first frame of `type_name` (a stream type of
        the plugin's own, long-lived, both ways): `handler(connection, stream, first_frame)`.
        The stream's `send(type, body)` / `recv(timeout)` carry frames; the handler checks the
        peer's standing (`member_subnet`) itself."""
        ...

    def hosted_info(self, perch_id: str) -> Mapping[str, Any] | None:
        """None when the local perch is not hosted; else {"alive", "pid", "remote_attach",
        "exit"} (`remote_attach` is false after `endpoint run --no-remote-attach`)."""
        ...

    async def attach_hosted(self, perch_id: str, hello: Mapping[str, Any]) -> HostedTerminal:
        """Attach a viewer to a hosted perch's PTY. `hello`: offset (None for a fresh viewer),
        replay, read_only, rows, cols, viewer (a stable id across reconnects). Refusals:
        NOT_HOSTED; RC_ENDED (message `exit=<n>`) when the process ended and its host is gone."""
        ...

    def touch_user_activity(self) -> None:
        """A person acted on this node (a keystroke through rc): stamp the user-activity time
        that notifications use to pick where to surface (SPEC.md §8.4)."""
        ...

    def announce_relays(self, urls: Sequence[str]) -> None:
        """Publish the relays this node was told to use (`spt relay add`) to its subnets, in its
        signed presence, so members that have none of their own can use them (SPEC.md §7.6)."""
        ...

    def member_relays(self) -> Mapping[str, Sequence[str]]:
        """Relay URLs announced by current members of this node's attached subnets, each with
        the (canonical) names of the subnets whose members announce it: only those subnets'
        business goes to that relay. Remembered across restarts; pruned members drop out."""
        ...

    def on_network_change(self, listener: Callable[[Any], str | None]) -> None:
        """Call `listener(change)` when the node's addresses or default route change (a
        `spt.core.net.netwatch.NetworkChange`); it returns a short note of what it did, or None."""
        ...

    def raise_notification(self, kind: str, title: str, body: str, *, subnet: str | None = None) -> str | None:
        """Raise a notification for the user (SPEC.md §8.4 kinds, e.g. `update-consent`), replicated
        to the members of `subnet`, or of every attached subnet when None; returns its id."""
        ...

    def announce_release(self, version: str | None) -> None:
        """The release this node offers to members, carried in its presence (`staged`)."""
        ...

    def member_presence(self) -> Sequence[MemberPresence]:
        """The latest presence of every online member of the attached subnets (one per subnet)."""
        ...

    def plugin_status(self) -> Mapping[str, str]:
        """Each plugin's load status by name: `ok`, `blocked` or `failed: <reason>`."""
        ...

    def restart(self, executable: str) -> None:
        """Stop the node as `spt daemon stop` does, then replace this process (same pid and
        environment) with `executable -m spt` and the same arguments: how a new version starts."""
        ...

    # replicated records, notifications, user activity (since 0.2)

    @property
    def replication(self) -> Replication:
        """The replicated-records facility (declare kinds with `spt_register_record_kinds`)."""
        ...

    def subnet_names(self) -> list[str]:
        """The attached subnets this node serves, by name."""
        ...

    def subnet_members(self, subnet: str) -> list[NodeId]:
        """Current members of an attached subnet (this node included); empty if not held."""
        ...

    def online_activity(self, subnet: str) -> dict[NodeId, int | None]:
        """Online members of `subnet` (this node included) → last user-activity time in ms, from presence."""
        ...

    def set_notification_sink(self, sink: NotificationSink) -> None:
        """The notification plugin takes over `raise_notification`, `daemon status` unread and the banner."""
        ...

    def add_fork_listener(self, listener: Callable[[str, str], None]) -> None:
        """`listener(source_id, new_id)` runs after `spt endpoint fork` created a local perch."""
        ...

    def local_endpoints(self) -> list[tuple[str, str | None]]:
        """Local perches as (id, home subnet name or None), transient ones left out."""
        ...

    def effective_sync_subnets(self, perch_id: str) -> list[str]:
        """Subnets where a local perch is both visible and in its sync scope (SPEC.md §2.6)."""
        ...

    def instance_nodes(self, home: str, endpoint_id: str, subnet: str) -> list[NodeId]:
        """Other nodes with a visible registry row of endpoint (home, id) in `subnet`."""
        ...

    def endpoint_workdir(self, perch_id: str) -> Path | None:
        """A local endpoint's working folder (SPEC.md §2.8): its `endpoint run --project`, else
        where it last ran `spt ready`; None when unknown."""
        ...
