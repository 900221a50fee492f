"""Relayed and punched paths on the node's one socket (SPEC.md §7.2–7.4, §7.6).

Non-QUIC datagrams start with a byte below 0x40 that names their kind:

| byte | kind          | layout                                             | direction              |
|------|---------------|----------------------------------------------------|------------------------|
| 0x01 | RELAY_SEND    | 0x01 ‖ destination key (32) ‖ token (16) ‖ packet   | node → relay           |
| 0x02 | RELAY_DELIVER | 0x02 ‖ source key (32) ‖ packet                     | relay → node           |
| 0x03 | RELAY_NOTICE  | 0x03 ‖ code (1)                                     | relay → node           |
| 0x04 | PROBE         | 0x04 ‖ punch nonce (16)                             | node ↔ node            |
| 0x05 | PROBE_ACK     | 0x05 ‖ punch nonce (16)                             | node ↔ node            |
| 0x06 | MAPPING_ASK   | 0x06 ‖ nonce (8)                                    | node → relay's 2nd port |
| 0x07 | MAPPING_SEEN  | 0x07 ‖ nonce (8) ‖ IPv4 (4) ‖ port (2)              | relay's 2nd port → node |

`Paths` belongs to one `Transport` and does three things:

- **Relayed paths.** A peer reached through relay R gets a *virtual address* in 240.0.0.0/5,
  derived from (R's key, the peer's key), so it is the same on every node and across restarts.
  QUIC runs over it unchanged: the transport hands packets for a virtual address to
  `send_virtual`, which wraps them as RELAY_SEND to R; RELAY_DELIVER from R is unwrapped and
  fed to the transport as if it came from the virtual address. The relay never sees more than
  ciphertext, and both ends still pin each other's key. Nothing is ever sent to a real
  240.0.0.0/5 address.
- **Punching.** `punch` sends low-TTL priming probes; the active side then sends full probes
  every 50 ms, the passive side answers them with acks, and both return the address that met.
- **Reporting.** Which peers are relayed or punched, and why a peer is not direct (§7.5).

Other kinds (relay notices, mapping answers) go to handlers registered with `on`. What must not
live here: relay registration and rendezvous (the relay plugin), QUIC state (the transport).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from spt.core.identity import NodeId, sha256

if TYPE_CHECKING:
    from spt.core.net.transport import Transport

__all__ = [
    "KEY_BYTES",
    "MAPPING_ASK",
    "MAPPING_SEEN",
    "NONCE_BYTES",
    "PROBE",
    "PROBE_ACK",
    "RELAY_DELIVER",
    "RELAY_NOTICE",
    "RELAY_SEND",
    "TOKEN_BYTES",
    "VIRTUAL_PREFIXES",
    "PathInfo",
    "Paths",
    "for_node",
    "is_virtual",
    "virtual_address",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]
KindHandler = Callable[[bytes, Address], None]

RELAY_SEND: Final = 0x01
RELAY_DELIVER: Final = 0x02
RELAY_NOTICE: Final = 0x03
PROBE: Final = 0x04
PROBE_ACK: Final = 0x05
MAPPING_ASK: Final = 0x06
MAPPING_SEEN: Final = 0x07

KEY_BYTES: Final = 32
TOKEN_BYTES: Final = 16
NONCE_BYTES: Final = 16
VIRTUAL_NET: Final = ipaddress.IPv4Network("240.0.0.0/5")  # reserved (class E): never routed
VIRTUAL_PREFIXES: Final = tuple(f"{octet}." for octet in range(240, 248))
PUNCH_LINGER: Final = 3.0  # seconds a finished punch keeps answering the peer's probes
MAX_PUNCH_TARGETS: Final = 16
MAX_LEARNED: Final = 4  # peer-reflexive addresses a punch adds from probes it receives
UPGRADE_WINDOW: Final = 15.0  # seconds after a punch in which a connection from there is an upgrade

_by_node: weakref.WeakValueDictionary[NodeId, Paths] = weakref.WeakValueDictionary()


def for_node(node: NodeId) -> Paths | None:
    """The paths of the running transport of `node` in this process, if it was started.

    This is how the relay plugin reaches the node's socket: the plugin contract hands plugins
    the runtime, which does not expose the transport.
    """
    return _by_node.get(node)


def is_virtual(host: str) -> bool:
    """True for addresses of relayed paths (240.0.0.0/5); no real packet ever goes there."""
    return host.startswith(VIRTUAL_PREFIXES)


def virtual_address(relay: NodeId, peer: NodeId) -> Address:
    """The address `peer` has when reached through `relay`: the same on every node."""
    digest = sha256(b"spt/relay-path/v1", relay.raw, peer.raw)
    host = int(VIRTUAL_NET.network_address) | (int.from_bytes(digest[:4], "big") & 0x07FFFFFF)
    port = 1024 + int.from_bytes(digest[4:6], "big") % (65536 - 1024)
    return (str(ipaddress.IPv4Address(host)), port)


@dataclass(frozen=True, slots=True)
class PathInfo:
    """What `spt subnet status --nodes` shows about a path that is relayed or punched."""

    kind: str  # "relayed <relay host:port>" or "direct punched"
    via: str | None
    reason: str | None
    addr: str | None = None  # the address in use when it is not the connection's (the relay's)


@dataclass(eq=False)
class _Relay:
    key: NodeId
    addr: Address
    label: str
    token: bytes | None = None


@dataclass(eq=False)
class _Punch:
    peer: NodeId
    nonce: bytes
    targets: list[Address]
    done: asyncio.Future[Address]
    active: bool
    heard: set[Address] = field(default_factory=set)


class Paths:
    """Relayed paths, punching and path reasons for one transport (see the module docstring)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._handlers: dict[int, KindHandler] = {}
        self._relays: dict[NodeId, _Relay] = {}
        self._relay_addrs: dict[Address, _Relay] = {}
        self._virtual: dict[Address, tuple[NodeId, NodeId]] = {}
        self._punches: dict[bytes, _Punch] = {}
        self._punched: dict[NodeId, dict[Address, float]] = {}  # peer -> address -> when (loop time)
        self._reasons: dict[NodeId, str] = {}
        self._on_registered: list[Callable[[], None]] = []
        self.stats = {"relayed_out": 0, "relayed_in": 0, "dropped_no_route": 0}

    def started(self) -> None:
        """Called by the transport once its socket is bound; makes `for_node` find us."""
        _by_node[self.transport.node_id] = self

    # --- dispatch of non-QUIC datagrams ----------------------------------------------------------

    def on(self, kind: int, handler: KindHandler | None) -> None:
        """Receive datagrams whose first byte is `kind` (a relay plugin's notices, mapping answers)."""
        if kind in (RELAY_DELIVER, PROBE, PROBE_ACK) or not 0 <= kind < 0x40:
            raise ValueError(f"datagram kind 0x{kind:02x} is not free for a handler")
        if handler is None:
            self._handlers.pop(kind, None)
        else:
            self._handlers[kind] = handler

    def receive(self, data: bytes, addr: Address) -> bool:
        """A non-QUIC datagram arrived; True when it was ours to handle (even if dropped)."""
        kind = data[0]
        if kind == RELAY_DELIVER:
            self._deliver(data, addr)
        elif kind in (PROBE, PROBE_ACK):
            self._probe(kind, data, addr)
        else:
            handler = self._handlers.get(kind)
            if handler is None:
                return False
            handler(data, addr)
        return True

    # --- relayed paths -----------------------------------------------------------------------

    def set_relay(self, relay: NodeId, addr: Address, token: bytes | None, *, label: str = "") -> None:
        """Use `relay` at `addr`; `token` is our registration there (None while not registered)."""
        old = self._relays.get(relay)
        if old is not None and old.addr != addr:
            self._relay_addrs.pop(old.addr, None)
        entry = _Relay(relay, addr, label or f"{addr[0]}:{addr[1]}", token)
        self._relays[relay] = entry
        self._relay_addrs[addr] = entry
        if token is not None and (old is None or old.token is None):
            for callback in list(self._on_registered):
                try:
                    callback()
                except Exception:
                    log.exception("relay-registered callback failed")

    def when_relay_registered(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a relay takes our registration: peers may be reachable now."""
        self._on_registered.append(callback)

    def remove_relay(self, relay: NodeId) -> None:
        entry = self._relays.pop(relay, None)
        if entry is not None:
            self._relay_addrs.pop(entry.addr, None)
        for addr, (via, _peer) in list(self._virtual.items()):
            if via == relay:
                del self._virtual[addr]

    def relay_path(self, relay: NodeId, peer: NodeId) -> Address:
        """The virtual address of `peer` through `relay`, routed from now on."""
        addr = virtual_address(relay, peer)
        self._virtual[addr] = (relay, peer)
        return addr

    def has_route(self, addr: Address) -> bool:
        route = self._virtual.get(addr)
        return route is not None and route[0] in self._relays

    def relay_of(self, addr: Address) -> tuple[NodeId, NodeId] | None:
        """(relay key, peer key) of a virtual address, or None."""
        return self._virtual.get(addr)

    def send_virtual(self, data: bytes, addr: Address) -> None:
        """Called by the transport for a packet to a virtual address: wrap it for the relay."""
        route = self._virtual.get(addr)
        relay = self._relays.get(route[0]) if route is not None else None
        if route is None or relay is None or relay.token is None:
            self.stats["dropped_no_route"] += 1
            return  # unregistered for now: QUIC retransmits once the relay takes us again
        self.stats["relayed_out"] += 1
        self.transport.send_datagram(
            bytes((RELAY_SEND,)) + route[1].raw + relay.token + data, relay.addr
        )

    def _deliver(self, data: bytes, addr: Address) -> None:
        relay = self._relay_addrs.get(addr)
        if relay is None or len(data) <= 1 + KEY_BYTES:
            return  # only relays we registered with may speak for other keys
        try:
            source = NodeId(data[1 : 1 + KEY_BYTES])
        except ValueError:
            return
        self.stats["relayed_in"] += 1
        self.transport.feed_datagram(data[1 + KEY_BYTES :], self.relay_path(relay.key, source))

    # --- punching ----------------------------------------------------------------------------

    async def punch(
        self,
        peer: NodeId,
        nonce: bytes,
        targets: Sequence[Address],
        *,
        active: bool = True,
        prime_ttl: int = 2,
        primes: int = 3,
        interval: float = 0.05,
        timeout: float = 5.0,
    ) -> Address | None:
        """Punch towards `peer` at `targets`; the address where we met, or None after `timeout` s.

        Both sides call this with the same `nonce` (exchanged over a channel both trust), the
        passive side first. Each first sends `primes` probes with TTL `prime_ttl` to every
        target: they open our own NAT's mapping but die before the peer's NAT (DESIGN.md §3).
        The active side then sends full probes every `interval` s until one is acked: the ack
        proves the round trip. The passive side sends no full probe: it answers the probes it
        hears and is done at the first one (its ack travels the mapping its priming opened).

        Why only one side probes at full TTL: a full probe that reaches the other NAT before
        that NAT's own host primed is taken by a Linux NAT as traffic to itself; the conntrack
        entry this leaves makes the later priming packet get a *different* public port, and
        the punch fails. The passive side primes before it answers the request that starts
        the punch, and the active side primes before its first full probe, so no full probe
        ever arrives at a NAT that has not been primed.
        """
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"a punch nonce is {NONCE_BYTES} bytes")
        loop = asyncio.get_running_loop()
        wanted = [a for a in dict.fromkeys(targets) if not is_virtual(a[0])][:MAX_PUNCH_TARGETS]
        session = _Punch(peer, nonce, wanted, loop.create_future(), active)
        self._punches[nonce] = session
        probe = bytes((PROBE,)) + nonce
        try:
            for _ in range(primes):
                for target in list(session.targets):
                    self.transport.send_probe(probe, target, ttl=prime_ttl)
            deadline = loop.time() + timeout
            for _ in range(int(timeout / interval) + 2):  # bounded; the deadline ends it first
                if session.done.done() or loop.time() >= deadline:
                    break
                if active:
                    for target in list(session.targets):
                        self.transport.send_probe(probe, target)
                await asyncio.wait([session.done], timeout=min(interval, max(0.0, deadline - loop.time())))
            if not session.done.done():
                return None
            found = session.done.result()
            self._punched.setdefault(peer, {})[found] = loop.time()
            log.info("punched a direct path", extra={"peer": peer.short, "addr": f"{found[0]}:{found[1]}"})
            return found
        finally:
            if not session.done.done():
                session.done.cancel()
            # keep answering the peer's probes a little longer: it may not have our ack yet
            loop.call_later(PUNCH_LINGER, self._punches.pop, nonce, None)

    def _probe(self, kind: int, data: bytes, addr: Address) -> None:
        session = self._punches.get(data[1 : 1 + NONCE_BYTES]) if len(data) == 1 + NONCE_BYTES else None
        if session is None or is_virtual(addr[0]):
            return
        if kind == PROBE:
            self.transport.send_probe(bytes((PROBE_ACK,)) + session.nonce, addr)
            session.heard.add(addr)
            self._punched.setdefault(session.peer, {})[addr] = asyncio.get_running_loop().time()
            if addr not in session.targets and len(session.targets) < MAX_PUNCH_TARGETS + MAX_LEARNED:
                session.targets.append(addr)  # peer-reflexive: where its probes really come from
            if not session.active and not session.done.done():
                session.done.set_result(addr)
        elif not session.done.done():
            session.done.set_result(addr)

    def is_punched(self, peer: NodeId, addr: Address) -> bool:
        """True when a punch with `peer` met it at `addr` just now: a connection arriving from
        there is the peer's upgrade. Later arrivals follow the usual tie-break."""
        when = self._punched.get(peer, {}).get(addr)
        return when is not None and asyncio.get_running_loop().time() - when < UPGRADE_WINDOW

    # --- reporting (§7.5) ----------------------------------------------------------------------

    def set_reason(self, peer: NodeId, reason: str | None) -> None:
        """Why `peer` is not on a direct path (`punching`, `symmetric-nat`, `punch-timeout`…)."""
        if reason is None:
            self._reasons.pop(peer, None)
        else:
            self._reasons[peer] = reason

    def reason(self, peer: NodeId) -> str | None:
        return self._reasons.get(peer)

    def describe(self, peer: NodeId, addr: Address) -> PathInfo | None:
        """The path kind for a connection to `peer` at `addr` when relayed or punched, else None."""
        route = self._virtual.get(addr)
        if route is not None:
            relay = self._relays.get(route[0])
            label = relay.label if relay is not None else route[0].short
            used = f"{relay.addr[0]}:{relay.addr[1]}" if relay is not None else None
            # not judged yet: the relay plugin punches every relayed path it sees (§7.3)
            return PathInfo(f"relayed {label}", label, self._reasons.get(peer, "punching"), used)
        if addr in self._punched.get(peer, ()):
            return PathInfo("direct punched", None, None)
        return None

    def relayed_peers(self) -> Iterable[NodeId]:
        return {peer for _relay, peer in self._virtual.values()}
