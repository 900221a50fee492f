"""A simulated network of N spt nodes replicating one subnet's registry through the real sans-IO core.

No sockets, no daemons, no clocks: a deterministic discrete-event loop (a heap of (time, seq,
event)) with a seeded RNG moves frames between nodes; every node has its own `NodeKey` and
`RegistryView`, signs its own records (`sign_row`, `sign_presence`) and merges what arrives with
`RegistryView.merge` (the signature check included), as `spt/core/messaging.py` does.

What is modelled, from spt/core/messaging.py:
- `publish`: a node re-signs all its rows and its presence at its next version, merges them into
  its own view and pushes them (`registry.push`, one request per member, answered by `ok`) to
  every connected member: full mesh, no forwarding. `_push_records` sends to every member at
  once and is done when each answered or its FORWARD_TIMEOUT (10 s) ran out; nothing is re-sent.
  (It pushed to one member after another until this simulation showed what that cost.)
- `_presence_loop`: `publish` every `presence_interval` (30 s, spt/core/config.py), each node at its
  own phase; every ANTI_ENTROPY_SECONDS / interval ticks (60 s) a `sync` with every connection,
  concurrently: `registry.sync` with a hash of our digest, answered `same` or not; if not, the
  full `registry.sync` with our digest, answered by `registry.records` (what we lack, and the
  peer's digest), then a `registry.push` of what the peer lacks, if anything.
- A change (an endpoint row added on one node) is a `publish` at once.

Loss drops a whole frame (a request or a reply) with probability `loss` on each send. QUIC
retransmits lost packets, so this models the worse case the daemon must survive: a request that
got no answer within its timeout. Latency is per ordered link, fixed for the run: `latency_ms` ×
uniform(0.5, 1.5). Processing time on the nodes is not modelled. Bytes are the frames as
`encode_frame` writes them (length header + msgpack), without QUIC, UDP or IP headers.

Cost control, stated because it shapes what each figure covers:
- `converge` simulates what can carry the change: the origin's pushes and presence ticks, and
  every node's anti-entropy with every other node. The other nodes' presence pushes carry nothing
  about the change and are left out there (they are the subject of `traffic`).
- `traffic` simulates every node's presence pushes for one minute, but anti-entropy only on the
  links of the observed node (node 0): there are N(N-1) syncs a minute, each walking two views of
  ~2N records while they change under the pushes. The observed node's figures are what one daemon
  sends and receives.
- Records one node signed are verified by every receiver's `merge` in `converge` and by the
  observed node in `traffic`; the background pushes of `traffic` (other node → other node) reuse
  the result of the first check of the same signed record (`shared_verify`), or every receiver
  checks again with `verify_all=True` (~0.2 ms a record: minutes at 500 nodes).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from spt import __version__
from spt.core.identity import NodeId, NodeKey
from spt.core.messaging import ANTI_ENTROPY_SECONDS, FORWARD_TIMEOUT
from spt.core.proto.frames import encode_frame
from spt.core.proto.hlc import Hlc
from spt.core.proto.registry import (
    MergeOutcome,
    Presence,
    Record,
    RegistryRow,
    RegistryView,
    digest_to_wire,
    sign_presence,
    sign_row,
)

PRESENCE_INTERVAL = 30.0  # spt/core/config.py Config.presence_interval default
SUBNET = "scale"
SUBNET_ID_HEX = "5ca1e" * 6 + "00"  # 16 bytes, as subnet_id_of gives
REQ_ID = 1000  # a typical request id: its msgpack size is what a long-lived connection sends
WALL0_MS = 1_800_000_000_000

# --- the verification memo (for background traffic only; see the module docstring) -------------

_sharing = False
_checked: dict[bytes, bool] = {}
_real_verify: dict[type, Callable[[Any], bool]] = {
    RegistryRow: RegistryRow.verify,
    Presence: Presence.verify,
}
verifications = 0  # Ed25519 checks really run


def _verify_row(self: RegistryRow) -> bool:
    return _verify(self, _real_verify[RegistryRow])


def _verify_presence(self: Presence) -> bool:
    return _verify(self, _real_verify[Presence])


def _verify(record: Any, real: Callable[[Any], bool]) -> bool:
    global verifications
    if _sharing:
        held = _checked.get(record.signature)
        if held is not None:
            return held
    verifications += 1
    ok = real(record)
    _checked[record.signature] = ok
    return ok


RegistryRow.verify = _verify_row  # type: ignore[method-assign]
Presence.verify = _verify_presence  # type: ignore[method-assign]


@contextmanager
def shared_verify(on: bool) -> Iterator[None]:
    global _sharing
    before, _sharing = _sharing, on
    try:
        yield
    finally:
        _sharing = before


# --- nodes and counters --------------------------------------------------------------------------


@dataclass
class Node:
    index: int
    key: NodeKey
    hlc: Hlc
    view: RegistryView
    endpoints: list[str]
    version: int = 0
    order: list[int] = field(default_factory=list)  # the order `_push_records` walks the members in
    phase: float = 0.0  # when its presence loop first ticks
    ticks: int = 0
    digest_cache: Digest | None = None  # until the next accepted merge


@dataclass(frozen=True)
class Digest:
    """A view's digest, its `registry.sync` frame size, and an id equal for equal digests."""

    versions: dict[NodeId, int]
    size: int
    ident: int


@dataclass
class Counts:
    messages: int = 0
    bytes: int = 0
    by_type: dict[str, int] = field(default_factory=dict)

    def add(self, type_name: str, size: int) -> None:
        self.messages += 1
        self.bytes += size
        self.by_type[type_name] = self.by_type.get(type_name, 0) + 1


@dataclass
class Merges:
    accepted: int = 0
    stale: int = 0
    refused: int = 0


class Net:
    """N nodes in one subnet (full mesh), each already holding every node's records at version 1."""

    def __init__(self, n: int, *, latency_ms: float, loss: float, seed: int, verify_all: bool = False) -> None:
        self.rng = random.Random(seed)
        self.latency = latency_ms / 1000
        self.loss = loss
        self.verify_all = verify_all
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.counts = Counts()
        self.lost = 0
        self.merges = Merges()
        self.sent_by = [Counts() for _ in range(n)]
        self.received_by = [Counts() for _ in range(n)]
        self._links: dict[tuple[int, int], float] = {}
        self._digests: dict[frozenset[tuple[NodeId, int]], int] = {}
        self.quiet = False  # presence loops stop (after convergence, while the change's pushes finish)
        # nodes whose merges reuse the first check of a signed record (background traffic only)
        self.shares_verify: Callable[[int], bool] = lambda _j: False
        self.nodes: list[Node] = []
        every = max(1, round(ANTI_ENTROPY_SECONDS / PRESENCE_INTERVAL))
        for i in range(n):
            key = NodeKey.from_private_bytes(self.rng.randbytes(32))  # reproducible from the seed
            node = Node(i, key, Hlc(key.node_id), RegistryView(SUBNET, self_node=key.node_id), [f"p{i}"])
            node.order = [j for j in range(n) if j != i]
            self.rng.shuffle(node.order)
            node.phase = self.rng.uniform(0, PRESENCE_INTERVAL)
            node.ticks = self.rng.randrange(every)  # daemons started at different times
            self.nodes.append(node)
        first = [self.sign(node) for node in self.nodes]
        with shared_verify(True):  # the starting state: every view holds every record, checked once
            for node in self.nodes:
                for records in first:
                    node.view.merge_all(records, now_ms=self.ms())

    # -- the event loop

    def at(self, when: float, event: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, event))

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        """Run events up to `until`; True when `stop()` turned true first."""
        while self._queue and self._queue[0][0] <= until:
            when, _, event = heapq.heappop(self._queue)
            self.now = when
            event()
            if stop is not None and stop():
                return True
        self.now = until
        return False

    def link(self, src: int, dst: int) -> float:
        lat = self._links.get((src, dst))
        if lat is None:
            lat = self._links[(src, dst)] = self.latency * self.rng.uniform(0.5, 1.5)
        return lat

    def send(self, src: int, dst: int, type_name: str, size: int, deliver: Callable[[], None],
             tag: Counts | None = None) -> bool:
        """Count one frame and schedule its arrival; False when it is lost."""
        for counts in (self.counts, self.sent_by[src], tag):
            if counts is not None:
                counts.add(type_name, size)
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return False
        self.received_by[dst].add(type_name, size)
        self.at(self.now + self.link(src, dst), deliver)
        return True

    def ms(self) -> int:
        return WALL0_MS + int(self.now * 1000)

    # -- what a node does

    def sign(self, node: Node) -> list[Record]:
        """`Messaging.own_records`: every row and the presence, at the node's next version."""
        node.version += 1
        hlc = node.hlc.now(self.ms())
        records: list[Record] = [
            sign_row(node.key, subnet=SUBNET, endpoint_id=e, home=SUBNET, version=node.version, hlc=hlc,
                     state="active", ready=True, alive=True)
            for e in node.endpoints
        ]
        i = node.index
        records.append(sign_presence(
            node.key, subnet=SUBNET, version=node.version, software_version=__version__,
            addresses=(f"192.168.{i // 250}.{i % 250 + 2}:47470", f"[fd00::{i + 2:x}]:47470"),
            last_activity_ms=WALL0_MS - 60_000,
        ))
        return records

    def merge(self, dst: int, src: int, records: list[Record]) -> None:
        """`Messaging._merge_records` on node `dst` (every node is a member)."""
        node = self.nodes[dst]
        now_ms = self.ms()
        with shared_verify(self.shares_verify(dst) and not self.verify_all):
            for record in records:
                outcome = node.view.merge(record, now_ms=now_ms)
                if outcome is MergeOutcome.ACCEPTED:
                    self.merges.accepted += 1
                    node.digest_cache = None
                    if isinstance(record, RegistryRow):
                        node.hlc.update(record.hlc, now_ms)
                elif outcome is MergeOutcome.STALE:
                    self.merges.stale += 1
                else:
                    self.merges.refused += 1
        node.view.note_heard(self.nodes[src].key.node_id, now_ms)

    def publish(self, i: int, *, tag: Counts | None = None, done: Callable[[], None] | None = None) -> None:
        """`Messaging.publish`: sign, merge our own, push to every member at once."""
        node = self.nodes[i]
        records = self.sign(node)
        node.view.merge_all(records, now_ms=self.ms())
        node.digest_cache = None
        body = {"subnet": SUBNET_ID_HEX, "records": [r.to_dict() for r in records]}
        size = len(encode_frame("registry.push", body, req_id=REQ_ID))
        self._push_all(i, records, size, list(node.order), tag, done)

    def _push_all(self, i: int, records: list[Record], size: int, members: list[int], tag: Counts | None,
                  done: Callable[[], None] | None) -> None:
        """`_push_records`: a request to every member at once; done when each was answered, or its
        FORWARD_TIMEOUT ran out because the request or its answer was lost."""
        left = [len(members)]
        sent_at = self.now

        def one_done() -> None:
            left[0] -= 1
            if left[0] == 0 and done is not None:
                done()

        if not members and done is not None:
            done()
        for j in members:
            def arrive(j: int = j) -> None:  # `_handle_registry_push` on j, and its `ok`
                self.merge(j, i, records)
                if not self.send(j, i, "ok", OK_SIZE, one_done, tag):
                    self.at(sent_at + FORWARD_TIMEOUT, one_done)

            if not self.send(i, j, "registry.push", size, arrive, tag):
                self.at(sent_at + FORWARD_TIMEOUT, one_done)

    def digest(self, i: int) -> Digest:
        node = self.nodes[i]
        if node.digest_cache is None:
            d = node.view.digest()
            ident = self._digests.setdefault(frozenset(d.items()), len(self._digests))
            size = len(encode_frame("registry.sync", {"subnet": SUBNET_ID_HEX, "digest": digest_to_wire(d)},
                                    req_id=REQ_ID))
            node.digest_cache = Digest(d, size, ident)
        return node.digest_cache

    def missing(self, i: int, theirs: Digest) -> list[Record]:
        if self.digest(i).ident == theirs.ident:  # what `missing_for` would answer, without the walk
            return []
        return self.nodes[i].view.missing_for(theirs.versions)

    def sync(self, i: int, j: int) -> None:
        """`Messaging.sync(periodic=True)` from node i over its connection to j: a hash of the
        digest first, the full exchange only when the views differ (each step a frame that may
        be lost)."""
        mine = self.digest(i)

        def probed() -> None:  # `_handle_registry_sync` on j, answering the hash
            same = self.digest(j).ident == mine.ident
            self.send(j, i, "registry.records", PROBE_REPLY_SIZE, lambda: None if same else full())

        def full() -> None:
            self.send(i, j, "registry.sync", mine.size, at_peer)

        def at_peer() -> None:  # `_handle_registry_sync` on j
            lacking = self.missing(j, mine)
            theirs = self.digest(j)
            reply = theirs.size - EMPTY_SYNC_SIZE + EMPTY_RECORDS_SIZE + records_size(lacking)
            self.send(j, i, "registry.records", reply, lambda: back_home(lacking, theirs))

        def back_home(got: list[Record], theirs: Digest) -> None:
            if got:
                self.merge(i, j, got)
            lacking = self.missing(i, theirs)
            if lacking:
                body = {"subnet": SUBNET_ID_HEX, "records": [r.to_dict() for r in lacking]}

                def pushed() -> None:
                    self.merge(j, i, lacking)
                    self.send(j, i, "ok", OK_SIZE, lambda: None)

                self.send(i, j, "registry.push", len(encode_frame("registry.push", body, req_id=REQ_ID)), pushed)

        self.send(i, j, "registry.sync", PROBE_SIZE, probed)

    def presence_loop(self, i: int, *, publishes: bool, syncs_with: Callable[[int], list[int]]) -> None:
        """`Messaging._presence_loop` of node i, from its phase on (it runs until the run stops)."""
        node = self.nodes[i]
        every = max(1, round(ANTI_ENTROPY_SECONDS / PRESENCE_INTERVAL))

        def tick() -> None:
            if self.quiet:
                return
            if publishes:
                self.publish(i)
            node.ticks += 1
            if node.ticks % every == 0:
                for j in syncs_with(i):
                    self.sync(i, j)
            self.at(self.now + PRESENCE_INTERVAL, tick)

        self.at(node.phase, tick)


OK_SIZE = len(encode_frame("ok", {}, req_id=REQ_ID))
EMPTY_SYNC_SIZE = len(encode_frame("registry.sync", {"subnet": SUBNET_ID_HEX, "digest": {}}, req_id=REQ_ID))
EMPTY_RECORDS_SIZE = len(encode_frame("registry.records", {"records": [], "digest": {}}, req_id=REQ_ID))
PROBE_SIZE = len(encode_frame("registry.sync", {"subnet": SUBNET_ID_HEX, "digest_hash": "0" * 32}, req_id=REQ_ID))
PROBE_REPLY_SIZE = len(encode_frame("registry.records", {"records": [], "same": True}, req_id=REQ_ID))


def records_size(records: list[Record]) -> int:
    """Bytes the records add to a frame body (beyond an empty list)."""
    return len(encode_frame("x", [r.to_dict() for r in records])) - len(encode_frame("x", []))


# --- the experiments -----------------------------------------------------------------------------


@dataclass
class Convergence:
    nodes: int
    loss: float
    seconds: float | None  # None: not every view held the row within the window
    change_messages: int  # frames of the change's own publish: its pushes and their `ok` answers
    change_bytes: int
    messages: int  # every frame sent from the change until convergence (anti-entropy, ticks included)
    merges: Merges
    lost: int
    verifications: int
    push_loop_seconds: float | None  # how long the change's own push loop took to reach every member


def converge(n: int, *, latency_ms: float, loss: float, seed: int, window: float = 600.0,
             verify_all: bool = False) -> Convergence:
    """An endpoint row added on node 0 at a random moment; seconds until every node's view holds it."""
    global verifications
    net = Net(n, latency_ms=latency_ms, loss=loss, seed=seed, verify_all=verify_all)
    everyone = range(n)
    for i in everyone:
        net.presence_loop(i, publishes=(i == 0), syncs_with=lambda i: [j for j in everyone if j != i])
    start = PRESENCE_INTERVAL + net.rng.uniform(0, PRESENCE_INTERVAL)  # every loop is going by then
    net.run(start)
    net.counts, net.merges, net.lost, verifications = Counts(), Merges(), 0, 0
    origin = net.nodes[0]
    origin.endpoints.append("new0")
    node0 = origin.key.node_id
    change = Counts()
    chain_done: float | None = None

    def finished() -> None:
        nonlocal chain_done
        chain_done = net.now

    net.publish(0, tag=change, done=finished)
    holders = {0}

    def converged() -> bool:
        for j in range(1, n):
            if j not in holders and net.nodes[j].view.get(SUBNET, "new0", node0) is not None:
                holders.add(j)
        return len(holders) == n

    seconds = net.now - start if net.run(start + window, converged) else None
    messages, merges, lost, checked = net.counts.messages, replace(net.merges), net.lost, verifications
    # The change's push loop may still be going (each lost frame holds it FORWARD_TIMEOUT): let it
    # finish alone, to count all its frames.
    net.quiet = True
    if chain_done is None:
        net.run(start + window + n * FORWARD_TIMEOUT, lambda: chain_done is not None)
    return Convergence(n, loss, seconds, change.messages, change.bytes, messages, merges, lost, checked,
                       None if chain_done is None else chain_done - start)


@dataclass
class Traffic:
    nodes: int
    loss: float
    sent: Counts
    received: Counts
    seconds: float  # the window: one minute
    verifications: int


def traffic(n: int, *, latency_ms: float, loss: float, seed: int, verify_all: bool = False) -> Traffic:
    """One minute of an idle subnet: what node 0 sends and receives (presence, answers, anti-entropy)."""
    global verifications
    net = Net(n, latency_ms=latency_ms, loss=loss, seed=seed, verify_all=verify_all)
    others = list(range(1, n))
    net.shares_verify = lambda j: j != 0
    for i in range(n):
        net.presence_loop(i, publishes=True, syncs_with=lambda i: others if i == 0 else [0])
    verifications = 0
    window = ANTI_ENTROPY_SECONDS  # each node ticks twice and syncs once in it
    net.run(window)
    return Traffic(n, loss, net.sent_by[0], net.received_by[0], window, verifications)
