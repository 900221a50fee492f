"""The node's side of relaying: registration, rendezvous, the relay path, and punching.

One `RelayClient` per running node (found by node key, so the discovery backend, the
connector and the runtime hook share it):

- a `RelayLink` per configured relay keeps a registration (`server.py` has the protocol):
  it dials on `spt-relay/1`, registers, learns the reflexive address and the NAT's mapping
  behaviour, refreshes the rendezvous tags every 30 s, and registers again when the relay
  says it forgot us (a restart) or stops answering;
- `find` asks every registered relay for a tag (joins find members this way);
- `candidates` offers the virtual relayed address of a peer (`spt.core.net.paths`), which the
  dialer tries alongside direct addresses;
- the upgrader: while a member connection is relayed, the node with the lower key asks the
  peer (over that connection, `relay.punch`) to punch. They exchange candidate addresses
  (reflexive ones from the relays, LAN ones); the peer primes its NAT before it answers, then
  the asker primes and probes (`Paths.punch`, active and passive sides) and moves the
  connection to the path found (`Transport.upgrade`). Failures are retried with backoff (30 s
  doubling to 10 min; at once when our reflexive address changes) and reported as
  `symmetric-nat` or `punch-timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from spt.core.errors import ConfigError, PeerError, ProtocolError, SptError
from spt.core.identity import NodeId
from spt.core.net.connections import Connection
from spt.core.net.paths import MAPPING_ASK, MAPPING_SEEN, NONCE_BYTES, RELAY_NOTICE, Paths, for_node
from spt.core.net.transport import ALPN_MEMBER, ALPN_RELAY
from spt.core.proto.frames import Frame
from spt.core.subnets import rendezvous_tag
from spt.hooks import Candidate, DiscoveryContext
from spt.hooks.interfaces import NodeRuntime
from spt_relay_fallback.sources import Chosen, build_defaults, choose, read_removed
from spt_relay_fallback.tunnel import NodeTunnel
from spt_relay_fallback.url import RelayUrl, token_proof

log = logging.getLogger(__name__)

Address = tuple[str, int]

CONNECT_TIMEOUT: Final = 5.0
UDP_TRY: Final = 2.0  # seconds of UDP silence before a relay with a TCP listener is tried over TCP
REQUEST_TIMEOUT: Final = 5.0
REFRESH_INTERVAL: Final = 30.0
RETRY_MIN: Final = 1.0
RETRY_MAX: Final = 30.0
PUNCH_BACKOFF_MIN: Final = 30.0
PUNCH_BACKOFF_MAX: Final = 600.0
UPGRADE_CHECK: Final = 0.5  # seconds between looks for relayed member connections
PEER_PUNCH_WAIT: Final = 15.0  # seconds the higher key waits for the peer to start punching
PUNCH_TIMEOUT: Final = 5.0
MAPPING_WAIT: Final = 1.0
FIND_WAIT: Final = 3.0  # seconds `find` waits for a first registration at start-up
SOURCES_INTERVAL: Final = 2.0  # seconds between looks at the relays the subnet announces

_clients: dict[NodeId, RelayClient] = {}


def client_for(node: NodeId) -> RelayClient:
    """The relay client of the node with key `node` in this process (made on first use)."""
    client = _clients.get(node)
    if client is None:
        client = _clients[node] = RelayClient(node)
    return client


def configured_urls(section: Mapping[str, Any]) -> list[RelayUrl]:
    """The relays of a `[relay]` config section: this node's own (`spt relay add`)."""
    urls = section.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ConfigError("relay.urls", f"expected a list of relay URLs, got {urls!r}")
    return [RelayUrl.parse(u) for u in urls]


def read_config_section(config_file: Path) -> Mapping[str, Any]:
    try:
        raw = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(config_file), f"is not valid TOML: {exc}") from exc
    section = raw.get("relay", {})
    return section if isinstance(section, dict) else {}


@dataclass
class _PunchState:
    backoff: float = PUNCH_BACKOFF_MIN
    next_at: float = 0.0
    running: bool = False
    first_seen: float = 0.0
    asked: bool = False  # the peer started a punch with us (we have the higher key)
    responding: bool = False  # our side of a punch the peer asked for is running


class RelayLink:
    """One configured relay and this node's registration there."""

    def __init__(self, client: RelayClient, chosen: Chosen) -> None:
        self.client = client
        self.url = chosen.url
        self.source = chosen.source
        self.subnets = chosen.subnets  # None: every subnet's tags; else only these subnets'
        url = chosen.url
        self.state = "connecting"
        self.addr: Address | None = None  # the relay's resolved address
        self.reflexive: Address | None = None
        self.mapping = "unknown"
        self.conn: Connection | None = None
        self.registered = asyncio.Event()
        self._kick = asyncio.Event()
        self._mapping_nonce = b""
        self._mapping_seen: asyncio.Future[Address] | None = None
        self._task: asyncio.Task[None] | None = None
        # the relay's TCP listener (bulk transit; UDP frames where UDP is blocked), from the URL
        # or the registration reply
        self.tcp_port: int | None = url.tcp_port
        self.tunnel: NodeTunnel | None = None  # our UDP frames over TCP, while UDP is blocked

    @property
    def via(self) -> str:
        return "tcp" if self.tunnel is not None else "udp"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"relay {self.url.public}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        paths = self.client.paths
        if paths is not None:
            paths.remove_relay(self.url.key)
        if self.conn is not None and self.conn.is_open:
            self.conn.close("relay removed")
        await self._close_tunnel()

    def kick(self, *, retry_udp: bool = False) -> None:
        """Register again now (the relay forgot us, or our network changed: then UDP may work
        again, so a tunnel is dropped and UDP tried first)."""
        if retry_udp and self.tunnel is not None:
            self.client._spawn(self._close_tunnel())
        self._kick.set()

    async def _connect(self, paths: Paths) -> Connection:
        """The QUIC connection to the relay: by UDP, else (no answer, and the relay has a TCP
        listener we know of) through a tunnel of UDP frames over TLS/TCP (SPEC.md §7.6)."""
        assert self.addr is not None
        if self.tunnel is not None and self.tunnel.closed:
            await self._close_tunnel()
        if self.tunnel is None:
            try:
                return await paths.transport.connect(
                    self.url.key, [self.addr], alpn=ALPN_RELAY,
                    timeout=UDP_TRY if self.tcp_port else CONNECT_TIMEOUT,
                )
            except (SptError, TimeoutError) as exc:
                if not self.tcp_port:
                    raise
                log.info("relay silent over UDP; trying its TCP listener",
                         extra={"relay": self.url.public, "reason": str(exc)})
            tunnel = await NodeTunnel.open(self.url.host, self.tcp_port, self.url.key)
            addr, transport = self.addr, paths.transport
            transport.set_tunnel(addr, tunnel.start(lambda data: transport.tunnel_received(data, addr)))
            self.tunnel = tunnel
        return await paths.transport.connect(self.url.key, [self.addr], alpn=ALPN_RELAY, timeout=CONNECT_TIMEOUT)

    async def _close_tunnel(self) -> None:
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is None:
            return
        paths = self.client.paths
        if paths is not None and self.addr is not None:
            paths.transport.set_tunnel(self.addr, None)
        await tunnel.close()

    def view(self) -> dict[str, Any]:
        return {
            "url": self.url.public,
            "source": self.source,
            "subnets": sorted(self.subnets) if self.subnets is not None else None,
            "state": self.state,
            "reachable": self.registered.is_set(),
            "reflexive": f"{self.reflexive[0]}:{self.reflexive[1]}" if self.reflexive else None,
            "mapping": self.mapping,
            "via": self.via,
        }

    async def _resolve(self) -> Address:
        host, port = self.url.address
        try:
            ipaddress.IPv4Address(host)
            return (host, port)
        except ValueError:
            pass
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
        if not infos:
            raise PeerError(host, "the relay's name did not resolve")
        return (str(infos[0][4][0]), int(infos[0][4][1]))

    async def _run(self) -> None:
        delay = RETRY_MIN
        while True:  # ends when the link is stopped (cancelled) with the node
            paths = self.client.paths
            if paths is None:
                return
            try:
                await self._session(paths)
                delay = RETRY_MIN
            except asyncio.CancelledError:
                raise
            except (SptError, OSError, TimeoutError) as exc:
                self.state = f"unreachable: {exc}"
                log.info("relay unreachable", extra={"relay": self.url.public, "reason": str(exc)})
            except Exception:
                self.state = "failed"
                log.exception("relay link failed", extra={"relay": self.url.public})
            finally:
                self.registered.clear()
                if self.addr is not None:
                    paths.set_relay(self.url.key, self.addr, None)
            if self._kick.is_set():
                self._kick.clear()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), delay)
            self._kick.clear()
            delay = min(delay * 2, RETRY_MAX)

    async def _session(self, paths: Paths) -> None:
        self.state = "connecting"
        self.addr = await self._resolve()
        paths.set_relay(self.url.key, self.addr, None, label=f"{self.url.host}:{self.url.port}")
        conn = await self._connect(paths)
        self.conn = conn
        try:
            register: dict[str, Any] = {"port": paths.transport.sockname[1]}
            if self.url.token:
                register["proof"] = token_proof(self.url.token, conn)  # the token itself never travels
            reply = await conn.request("relay.register", register, timeout=REQUEST_TIMEOUT)
            body = _map(reply.body)
            tcp_port = body.get("tcp_port")
            if isinstance(tcp_port, int) and not isinstance(tcp_port, bool) and 0 < tcp_port < 65536:
                self.tcp_port = tcp_port
            token, seen = body.get("token"), body.get("addr")
            if not isinstance(token, bytes) or not isinstance(seen, str):
                raise ProtocolError(self.url.public, "the relay's registration answer is malformed")
            host, _, port = seen.rpartition(":")
            previous, self.reflexive = self.reflexive, (host, int(port))
            if previous is not None and previous != self.reflexive:
                self.client.network_changed()
            paths.set_relay(self.url.key, self.addr, token, label=f"{self.url.host}:{self.url.port}")
            self.state = "registered" if self.tunnel is None else "registered (over TCP: UDP is blocked)"
            self.registered.set()
            log.info("registered with relay", extra={"relay": self.url.public, "reflexive": seen})
            await self.push_tags()
            alt = body.get("alt_port")
            if self.tunnel is not None:
                self.mapping = "udp-blocked"
            elif isinstance(alt, int) and not isinstance(alt, bool) and 0 < alt < 65536:
                self.mapping = await self._check_mapping(paths, (self.addr[0], alt))
            self._kick.clear()
            while conn.is_open and not self._kick.is_set():
                kicked = asyncio.ensure_future(self._kick.wait())
                waitables: list[asyncio.Future[Any]] = [kicked, conn.closed]
                try:
                    await asyncio.wait(waitables, timeout=REFRESH_INTERVAL, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    kicked.cancel()
                if conn.is_open and not self._kick.is_set():
                    await self.push_tags()  # the refresh doubles as the liveness check
            if conn.is_open:
                conn.close("registering again")
            self.state = "re-registering" if self._kick.is_set() else f"closed: {conn.close_reason}"
        except BaseException:
            if conn.is_open:
                conn.close("registration failed")
            raise
        finally:
            self.conn = None

    async def push_tags(self) -> None:
        conn, ctx = self.conn, self.client.ctx
        if conn is None or not conn.is_open or not self.registered.is_set():
            return
        tags = list(ctx.advertised_tags()) if ctx is not None else []
        if self.subnets is not None:  # a relay learned from some subnets hears only theirs
            allowed = {rendezvous_tag(name) for name in self.subnets}
            tags = [t for t in tags if t in allowed]
        port = self.client.paths.transport.sockname[1] if self.client.paths is not None else 0
        await conn.request("relay.tags", {"tags": tags, "port": port}, timeout=REQUEST_TIMEOUT)

    async def _check_mapping(self, paths: Paths, alt: Address) -> str:
        """Ask the relay's second port what it sees; another port than the first means symmetric."""
        loop = asyncio.get_running_loop()
        self._mapping_nonce = os.urandom(8)
        self._mapping_seen = loop.create_future()
        try:
            for _ in range(3):
                paths.transport.send_datagram(bytes((MAPPING_ASK,)) + self._mapping_nonce, alt)
                done, _ = await asyncio.wait([self._mapping_seen], timeout=MAPPING_WAIT / 3)
                if done:
                    break
            if not self._mapping_seen.done():
                return "unknown"
            seen = self._mapping_seen.result()
        finally:
            if not self._mapping_seen.done():
                self._mapping_seen.cancel()
        if self.reflexive is None:
            return "unknown"
        return "endpoint-independent" if seen == self.reflexive else "endpoint-dependent"

    def mapping_answer(self, data: bytes) -> None:
        fut = self._mapping_seen
        if fut is None or fut.done() or len(data) != 15 or data[1:9] != self._mapping_nonce:
            return
        fut.set_result((socket.inet_ntoa(data[9:13]), struct.unpack("!H", data[13:15])[0]))


class RelayClient:
    """Relay registrations, rendezvous lookups, relayed candidates and punching for one node."""

    def __init__(self, node_id: NodeId) -> None:
        self.node_id = node_id
        self.ctx: DiscoveryContext | None = None
        self.runtime: NodeRuntime | None = None
        self.paths: Paths | None = None
        self.links: dict[str, RelayLink] = {}
        self.local: list[RelayUrl] = []
        self.defaults: list[RelayUrl] = []
        self._punch: dict[NodeId, _PunchState] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("relay background work failed", exc_info=task.exception())

    # --- lifecycle ------------------------------------------------------------------------------

    def attach(self, ctx: DiscoveryContext) -> None:
        self.ctx = ctx

    def started(self, runtime: NodeRuntime) -> None:
        """The node runs: take the socket, start the configured links and the upgrader."""
        self.runtime = runtime
        paths = for_node(runtime.node_id)
        if paths is None:
            log.warning("relay plugin found no transport; relaying is off")
            return
        self.paths = paths
        paths.on(RELAY_NOTICE, self._notice)
        paths.on(MAPPING_SEEN, self._mapping_seen)
        runtime.add_member_request("relay.punch", self._punch_request)
        runtime.add_op("relay.list", self._op_list)
        runtime.add_op("relay.sync", self._op_sync)
        runtime.on_network_change(self._network_moved)
        runtime.add_doctor_check("relays", self._doctor)
        try:
            self.local = configured_urls(runtime.config_section("relay"))
        except ConfigError as exc:
            log.warning("relay config ignored", extra={"reason": exc.status_line()})
        try:
            self.defaults = build_defaults()
        except ConfigError as exc:
            log.error("the build's default relay list is broken", extra={"reason": exc.status_line()})
        self._refresh_sources()
        runtime.spawn(self._sources_loop(), "relay sources")
        runtime.spawn(self._upgrade_loop(), "relay path upgrader")

    def _doctor(self) -> list[tuple[str, str, str]]:
        """`spt doctor` lines (SPEC.md §7.5): each relay reachable, registered, reflexive address."""
        if not self.links:
            return [("OK", "relays", "none configured; nodes behind different NATs need one: spt relay add <url>")]
        lines = []
        for link in self.links.values():
            view = link.view()
            name = f"relay {view['url']}"
            if view["reachable"]:
                detail = f"registered, reflexive {view['reflexive'] or 'unknown'}, mapping {view['mapping'] or 'unknown'}"
                lines.append(("OK", name, detail))
            else:
                lines.append(("WARN", name, f"{view['state']}; check the URL and that UDP to it is allowed "
                              "(spt relay list), or remove it: spt relay remove <url>"))
        return lines

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for link in list(self.links.values()):
            await link.stop()
        self.links.clear()
        if self.paths is not None:
            self.paths.on(RELAY_NOTICE, None)
            self.paths.on(MAPPING_SEEN, None)
        _clients.pop(self.node_id, None)

    def _set_links(self, chosen: Sequence[Chosen]) -> list[RelayLink]:
        wanted = {c.url.public: c for c in chosen}
        stale = [link for key, link in self.links.items() if key not in wanted or link.url != wanted[key].url]
        for link in stale:
            del self.links[link.url.public]
            self._spawn(link.stop())
        for key, c in wanted.items():
            current = self.links.get(key)
            if current is None:
                self.links[key] = RelayLink(self, c)
                self.links[key].start()
            elif (current.source, current.subnets) != (c.source, c.subnets):
                current.source, current.subnets = c.source, c.subnets
                self._spawn(current.push_tags())  # a subnet more or fewer: the relay's tags follow
        return list(self.links.values())

    def _refresh_sources(self) -> None:
        """Register with exactly the relays chosen now; announce our own to the subnets."""
        runtime = self.runtime
        if runtime is None or self.paths is None:
            return
        runtime.announce_relays([str(u) for u in self.local])
        removed = read_removed(runtime.state_dir)
        self._set_links(choose(self.local, runtime.member_relays(), self.defaults, removed))

    async def _sources_loop(self) -> None:
        while True:  # ends with the node (cancelled)
            await asyncio.sleep(SOURCES_INTERVAL)
            self._refresh_sources()

    def _tunnelled(self, relay: NodeId) -> bool:
        return any(link.url.key == relay and link.tunnel is not None for link in self.links.values())

    def _network_moved(self, change: Any) -> str | None:
        """The machine's network changed: register again everywhere (fresh reflexive address
        and NAT behaviour; the relay learns our new source address) and punch afresh."""
        if not self.links:
            return None
        for link in self.links.values():
            link.kick(retry_udp=True)
        self.network_changed()
        return f"re-registering with {len(self.links)} relay(s)"

    def network_changed(self) -> None:
        """Our public address moved (§7.3): punch relayed peers again at once, not after backoff."""
        for state in self._punch.values():
            state.next_at = 0.0
            state.backoff = PUNCH_BACKOFF_MIN

    # --- control operations ------------------------------------------------------------------

    async def _op_list(self, call: Any) -> Any:
        return {"relays": self._views()}

    def _views(self) -> list[dict[str, Any]]:
        """Every relay in use, then the ones the user removed that the subnet or build offers."""
        views = [link.view() for link in self.links.values()]
        if self.runtime is not None:
            offered = choose([], self.runtime.member_relays(), self.defaults, set())
            removed = read_removed(self.runtime.state_dir)
            views += [
                {"url": c.url.public, "source": c.source, "state": "removed locally", "reachable": None,
                 "reflexive": None, "mapping": None}
                for c in offered if c.url.public in removed and c.url.public not in self.links
            ]
        return views

    async def _op_sync(self, call: Any) -> Any:
        """Re-read `relay.urls` and the deny list (after `spt relay add/remove`)."""
        assert self.runtime is not None
        self.local = configured_urls(read_config_section(self.runtime.state_dir / "config.toml"))
        self._refresh_sources()
        return {"relays": self._views()}

    # --- datagrams from relays ---------------------------------------------------------------

    def _link_at(self, addr: Address) -> RelayLink | None:
        for link in self.links.values():
            if link.addr == addr or (link.addr is not None and link.addr[0] == addr[0]):
                return link
        return None

    def _notice(self, data: bytes, addr: Address) -> None:
        link = self._link_at(addr)
        if link is None or len(data) < 2:
            return
        if data[1] == 1 and link.registered.is_set():
            log.info("relay forgot this node; registering again", extra={"relay": link.url.public})
            link.kick()

    def _mapping_seen(self, data: bytes, addr: Address) -> None:
        link = self._link_at(addr)
        if link is not None:
            link.mapping_answer(data)

    # --- discovery and connecting ------------------------------------------------------------

    def registered_links(self) -> list[RelayLink]:
        return [link for link in self.links.values() if link.registered.is_set() and link.conn is not None]

    async def find(self, tag: bytes, timeout: float) -> list[Candidate]:
        """Members announcing `tag` at any registered relay, as relayed candidates."""
        if self.paths is None or not self.links:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not self.registered_links():
            waits = [asyncio.ensure_future(link.registered.wait()) for link in self.links.values()]
            try:
                await asyncio.wait(waits, timeout=min(timeout, FIND_WAIT), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        found: list[Candidate] = []

        async def ask(link: RelayLink) -> None:
            conn = link.conn
            if conn is None or self.paths is None:
                return
            try:
                reply = await conn.request(
                    "relay.lookup", {"tag": tag}, timeout=max(0.5, min(REQUEST_TIMEOUT, deadline - loop.time()))
                )
            except (SptError, TimeoutError) as exc:
                log.info("rendezvous lookup failed", extra={"relay": link.url.public, "reason": str(exc)})
                return
            body = reply.body if isinstance(reply.body, dict) else {}
            nodes = body.get("nodes")
            for entry in (nodes if isinstance(nodes, list) else [])[:32]:
                if not isinstance(entry, dict):
                    continue  # a malformed answer from one relay must not spoil the others
                try:
                    key = NodeId.from_hex(str(entry.get("key")))
                except SptError:
                    continue
                if key == self.node_id:
                    continue
                host, port = self.paths.relay_path(link.url.key, key)
                found.append(Candidate(host, port, node=key, source="relay", tags=frozenset({tag})))

        await asyncio.gather(*(ask(link) for link in self.registered_links()))
        return found

    def candidates(self, peer: NodeId) -> list[Candidate]:
        """The relayed path to `peer` through every registered relay."""
        if self.paths is None:
            return []
        out = []
        for link in self.registered_links():
            host, port = self.paths.relay_path(link.url.key, peer)
            out.append(Candidate(host, port, node=peer, source="relay"))
        return out

    # --- punching (SPEC.md §7.4) ---------------------------------------------------------------

    def _own_candidates(self) -> list[str]:
        if self.paths is None:
            return []
        port = self.paths.transport.sockname[1]
        out = [f"{link.reflexive[0]}:{link.reflexive[1]}" for link in self.registered_links() if link.reflexive]
        if self.ctx is not None:
            out += [f"{h}:{port}" for h in self.ctx.host_addresses() if not h.startswith("127.")]
        return list(dict.fromkeys(out))

    def _mapping(self) -> str:
        kinds = {link.mapping for link in self.registered_links()}
        if "endpoint-dependent" in kinds:
            return "endpoint-dependent"
        return "endpoint-independent" if "endpoint-independent" in kinds else "unknown"

    def _prime_ttl(self) -> int:
        if self.runtime is None:
            return 2
        ttl = self.runtime.config_section("net").get("punch_prime_ttl", 2)
        return ttl if isinstance(ttl, int) and 1 <= ttl <= 255 else 2

    async def _upgrade_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:  # ends with the node (runtime.spawn cancels it)
            await asyncio.sleep(UPGRADE_CHECK)
            paths = self.paths
            if paths is None:
                return
            for conn in paths.transport.connections():
                route = paths.relay_of(conn.remote_addr) if conn.alpn == ALPN_MEMBER else None
                if route is None or paths.transport.connection(conn.peer) is not conn:
                    continue  # not relayed, or a relayed one lingering after a move (its grace)
                if self._tunnelled(route[0]):
                    paths.set_reason(conn.peer, "udp-blocked")  # punching needs UDP
                    continue
                state = self._punch.get(conn.peer)
                if state is None:
                    state = self._punch[conn.peer] = _PunchState(first_seen=loop.time())
                if self.node_id < conn.peer:
                    if not state.running and loop.time() >= state.next_at:
                        state.running = True
                        self._spawn(self._initiate(conn, state))
                elif not state.asked and loop.time() - state.first_seen > PEER_PUNCH_WAIT:
                    state.asked = True  # the peer never asked: it cannot punch (an older node)
                    paths.set_reason(conn.peer, "no-direct-address")

    async def _initiate(self, conn: Connection, state: _PunchState) -> None:
        """We have the lower key: ask the peer to punch with us, then move to what we found."""
        paths = self.paths
        assert paths is not None
        peer = conn.peer
        loop = asyncio.get_running_loop()
        nonce = os.urandom(NONCE_BYTES)
        shared = self.runtime.shared_subnets(peer) if self.runtime is not None else []
        if not shared:
            return  # every member request names a subnet both sides are in; none is left
        paths.set_reason(peer, "punching")
        mine = self._mapping()
        try:
            reply = await conn.request(
                "relay.punch",
                {"subnet": shared[0], "nonce": nonce, "addrs": self._own_candidates(), "mapping": mine},
                timeout=REQUEST_TIMEOUT,
            )
        except (SptError, TimeoutError) as exc:
            # e.g. this connection lost a simultaneous-dial tie-break: try again on the one that
            # survived, without counting it as a failed punch
            log.info("punch request did not reach the peer", extra={"peer": peer.short, "reason": str(exc)})
            state.running = False
            state.next_at = loop.time() + RETRY_MIN
            return
        reason = "punch-timeout"
        try:
            body = _map(reply.body)
            theirs = str(body.get("mapping", "unknown"))
            targets = _addresses(body.get("addrs"))
            if "endpoint-dependent" in (mine, theirs):
                reason = "symmetric-nat"
                # the path is settled as relayed now; the long-shot punch below still upgrades it
                paths.set_reason(peer, reason)
            if not targets:
                reason = "no-direct-address"
            else:
                found = await paths.punch(peer, nonce, targets, prime_ttl=self._prime_ttl(), timeout=PUNCH_TIMEOUT)
                if found is not None:
                    await paths.transport.upgrade(peer, found, timeout=CONNECT_TIMEOUT)
                    paths.set_reason(peer, None)
                    state.backoff = PUNCH_BACKOFF_MIN
                    log.info("moved to a punched path", extra={"peer": peer.short, "addr": f"{found[0]}:{found[1]}"})
                    return
        except (SptError, TimeoutError) as exc:
            log.info("punching failed", extra={"peer": peer.short, "reason": str(exc)})
        except Exception:
            log.exception("punching failed", extra={"peer": peer.short})
        finally:
            state.running = False
        paths.set_reason(peer, reason)
        state.next_at = loop.time() + state.backoff
        state.backoff = min(state.backoff * 2, PUNCH_BACKOFF_MAX)
        log.info("still relayed", extra={"peer": peer.short, "reason": reason, "retry_s": state.next_at - loop.time()})

    async def _punch_request(self, conn: Any, frame: Frame) -> tuple[str, Any]:
        """The peer (lower key) asks us to punch with it; answer our candidates and start."""
        paths = self.paths
        if paths is None:
            return "error", {"code": "RELAY_OFF", "message": "relaying is not running on this node"}
        body = _map(frame.body)
        nonce = body.get("nonce")
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            return "error", {"code": "BAD_REQUEST", "message": f"a punch nonce is {NONCE_BYTES} bytes"}
        targets = _addresses(body.get("addrs"))
        mine = self._mapping()
        theirs = str(body.get("mapping", "unknown"))
        peer: NodeId = conn.peer
        reason = "symmetric-nat" if "endpoint-dependent" in (mine, theirs) else "punch-timeout"
        state = self._punch.setdefault(peer, _PunchState())
        state.asked = True

        async def respond() -> None:
            try:
                # with a symmetric NAT on either side the answer is known at once (a punch may still win)
                paths.set_reason(peer, "symmetric-nat" if reason == "symmetric-nat" else "punching")
                found = await paths.punch(
                    peer, nonce, targets, active=False, prime_ttl=self._prime_ttl(), timeout=PUNCH_TIMEOUT
                )
                # on success the peer dials us on the punched path and the transport moves over
                paths.set_reason(peer, None if found is not None else reason)
            finally:
                state.responding = False

        # One punch per peer at a time: nothing proves the addresses are the peer's, so repeated
        # requests must not make us probe them (third parties, perhaps) again and again. The
        # peer retries after its backoff, when this one is over.
        if targets and not state.responding:
            state.responding = True
            self._spawn(respond())
            await asyncio.sleep(0)  # the priming probes leave before our answer does
        return "relay.punch", {"addrs": self._own_candidates(), "mapping": mine}


def _map(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError("body", "expected a map")
    return value


def _addresses(value: Any) -> list[Address]:
    out: list[Address] = []
    if not isinstance(value, list):
        return out
    for text in value[:16]:
        if not isinstance(text, str):
            continue
        host, _, port = text.rpartition(":")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            continue
        if port.isdigit() and 0 < int(port) < 65536:
            out.append((host, int(port)))
    return out
