"""LAN discovery over mDNS (python-zeroconf), service `_spt._udp.local`.

The TXT record carries the node key (`k`) and one rendezvous tag per attached subnet (`t0`,
`t1`, …): nothing derived from a join code or seed (SPEC.md §5.2). `discovery.mdns = false`
turns the backend off; `discovery.mdns_interfaces` limits it to the listed addresses, which the
demo and the tests in the machine's own namespace set to loopback or turn off, so multicast never
leaves the machine. zeroconf is imported only when the backend starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from spt.core.errors import SptError
from spt.core.identity import NodeId
from spt.hooks import Candidate, DiscoveryBackend, DiscoveryContext, Registry, hookimpl

log = logging.getLogger(__name__)

SERVICE_TYPE = "_spt._udp.local."
TAG_BYTES = 16  # spt.core.subnets.rendezvous_tag
# After the first match, wait this long for more answers before returning (other members).
GATHER_AFTER_FIRST = 0.25
# A browser has heard the services present when it started once its first query is answered: the
# query goes out 20–120 ms after the browser starts (zeroconf), answers within 120 ms (RFC 6762
# §6: 20–120 ms; 400–500 ms only after a truncated query, which a first query, with no known
# answers to list, is not). Later queries, a second apart and more, only make up for lost packets,
# and services registered later announce themselves. A name check waits at most this long.
BROWSE_SETTLED = 0.5


MAX_TAGS = 64  # rendezvous tags one advert may carry (one per attached subnet)


def read_advert(properties: Mapping[bytes, bytes | None]) -> tuple[NodeId, frozenset[bytes]] | None:
    """The node key and rendezvous tags of a TXT record as anyone on the LAN may send it, or None
    when it is not a well-formed spt advert. Pure: a fuzz target (tests/fuzz)."""
    key = properties.get(b"k")
    tags: set[bytes] = set()
    try:
        node = NodeId.from_hex(key.decode("ascii")) if isinstance(key, bytes) else None
        for name, value in properties.items():
            if name.startswith(b"t") and isinstance(value, bytes):
                tag = bytes.fromhex(value.decode("ascii"))
                if len(tag) != TAG_BYTES or len(tags) >= MAX_TAGS:
                    return None
                tags.add(tag)
    except (ValueError, SptError):  # UnicodeDecodeError is a ValueError
        return None
    return (node, frozenset(tags)) if node is not None else None


class MdnsDiscovery(DiscoveryBackend):
    name: ClassVar[str] = "mdns"
    priority: ClassVar[int] = 20

    def __init__(self) -> None:
        self._ctx: DiscoveryContext | None = None
        self._azc: Any = None
        self._browser: Any = None
        self._found: dict[str, Candidate] = {}  # service name -> candidate
        self._changed = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()
        self._info: Any = None
        self._lock = asyncio.Lock()  # refresh() may run while start() is still registering
        self._browsing_since: float | None = None

    async def start(self, ctx: DiscoveryContext) -> None:
        section = ctx.config_section("discovery")
        if not section.get("mdns", True):
            return
        from zeroconf import InterfaceChoice, IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        self._ctx = ctx
        interfaces = section.get("mdns_interfaces", "all")
        self._azc = AsyncZeroconf(
            interfaces=InterfaceChoice.All if interfaces == "all" else list(interfaces), ip_version=IPVersion.V4Only
        )
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change])
        self._browsing_since = time.monotonic()
        async with self._lock:
            await self._register()

    def _service_info(self) -> Any:
        from zeroconf.asyncio import AsyncServiceInfo

        assert self._ctx is not None
        key = self._ctx.node_id.hex
        props: dict[str, str] = {"k": key}
        for i, tag in enumerate(self._ctx.advertised_tags()):
            props[f"t{i}"] = tag.hex()
        hosts = [h for h in self._ctx.host_addresses() if h != "0.0.0.0"]
        # Loopback is advertised only when it is all there is (the local demo): a LAN peer that
        # picked 127.0.0.1 would dial itself.
        hosts = [h for h in hosts if not h.startswith("127.")] or hosts
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"spt-{key[:16]}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(h) for h in hosts],
            port=self._ctx.port,
            properties=props,
            server=f"spt-{key[:16]}.local.",
        )

    async def _register(self) -> None:
        info = self._service_info()
        if self._info is None:
            # Our names are `spt-<first 64 bits of the node key>`, unique by construction, so they
            # are announced at once instead of probed first (RFC 6762 §8.1: about a second, which
            # the daemon's start, a command that started it, and a joiner looking for this node
            # would all wait for). A probe could only find this node's own key on another host, or
            # a host answering for any name to keep us off the LAN.
            await self._azc.async_register_service(info, allow_name_change=False, cooperating_responders=True)
        else:
            await self._azc.async_update_service(info)
        self._info = info

    async def refresh(self) -> None:
        if self._azc is not None:
            async with self._lock:
                await self._register()

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if state_change is ServiceStateChange.Removed:
            self._found.pop(name, None)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _resolve(self, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._azc.zeroconf, 1500):
            return
        advert = read_advert(info.properties)
        if advert is None:
            log.debug("ignoring a malformed spt advert", extra={"service": name})
            return
        node, tags = advert
        assert self._ctx is not None
        if node == self._ctx.node_id:
            return
        addrs = sorted(info.parsed_addresses(), key=lambda a: a.startswith("127."))  # loopback last
        if addrs:
            self._found[name] = Candidate(addrs[0], int(info.port or 0), node=node, source="mdns", tags=tags)
        self._changed.set()

    async def find(self, tag: bytes, timeout: float) -> Sequence[Candidate]:
        if self._azc is None:
            return []
        deadline = time.monotonic() + timeout
        first_at: float | None = None
        while True:
            matches = [c for c in self._found.values() if tag in c.tags]
            now = time.monotonic()
            if matches and first_at is None:
                first_at = now
            if now >= deadline or (first_at is not None and now >= first_at + GATHER_AFTER_FIRST):
                return matches
            self._changed.clear()
            wait = deadline - now if first_at is None else first_at + GATHER_AFTER_FIRST - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=max(0.0, wait))

    def settled_in(self) -> float:
        if self._browsing_since is None:
            return 0.0  # off: nothing will be heard
        return max(0.0, self._browsing_since + BROWSE_SETTLED - time.monotonic())

    async def stop(self) -> None:
        if self._azc is None:
            return
        for task in self._pending:
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        with contextlib.suppress(Exception):
            await self._azc.async_unregister_all_services()
        await self._azc.async_close()
        self._azc = None


@hookimpl
def spt_register_discovery_backends(registry: Registry[DiscoveryBackend]) -> None:
    registry.add(MdnsDiscovery())
