"""Noticing that the machine moved networks (SPEC.md §7.3, §7.6 "Network changes").

A laptop that moves from one LAN to another keeps its UDP socket (bound to the wildcard
address) but loses its address, its default route and every NAT mapping it had. Waiting for
QUIC idle timeouts to notice costs a minute; this watcher notices in well under a second.

Linux tells us through a netlink route socket subscribed to link, IPv4 address and IPv4
route changes; we never parse the messages, we only take them as a sign to look again (after
a short settle delay, since one move is a burst of messages). Where netlink is unavailable,
and as a safety net where it is, a periodic look catches what was missed.

What "the network" is, for spt: the node's non-loopback IPv4 addresses and its default route
(gateway and interface). A change is reported with what was lost and what was gained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

NETLINK_ROUTE: Final = 0
RTMGRP_LINK: Final = 0x1
RTMGRP_IPV4_IFADDR: Final = 0x10
RTMGRP_IPV4_ROUTE: Final = 0x40
SETTLE: Final = 0.3  # seconds after the first netlink message before looking
POLL_INTERVAL: Final = 10.0  # the safety-net look, in seconds
ROUTE_FILE: Final = Path("/proc/net/route")


@dataclass(frozen=True)
class NetworkState:
    addresses: tuple[str, ...]
    default_route: str | None  # "gateway dev iface", None when there is none

    def describe(self) -> str:
        route = self.default_route or "no default route"
        return f"{', '.join(self.addresses) or 'no addresses'}; {route}"


@dataclass(frozen=True)
class NetworkChange:
    """What moved between two looks, and when (wall clock)."""

    at: float
    before: NetworkState
    after: NetworkState
    lost: tuple[str, ...] = field(default=())
    gained: tuple[str, ...] = field(default=())

    @property
    def route_changed(self) -> bool:
        return self.before.default_route != self.after.default_route

    @property
    def moved(self) -> bool:
        """Paths in use may be dead: an address went away or the way out changed."""
        return bool(self.lost) or self.route_changed

    def describe(self) -> str:
        parts = []
        if self.lost:
            parts.append(f"lost {', '.join(self.lost)}")
        if self.gained:
            parts.append(f"gained {', '.join(self.gained)}")
        if self.route_changed:
            parts.append(f"default route {self.before.default_route or 'none'} -> {self.after.default_route or 'none'}")
        return "; ".join(parts) or "no change"


def default_route(route_file: Path = ROUTE_FILE) -> str | None:
    """The IPv4 default route as "gateway dev iface", from /proc/net/route (this namespace's)."""
    try:
        lines = route_file.read_text(encoding="ascii").splitlines()[1:]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines[:4096]:
        cols = line.split()
        if len(cols) < 8 or cols[1] != "00000000" or cols[7] != "00000000":
            continue
        try:
            gateway = socket.inet_ntoa(int(cols[2], 16).to_bytes(4, "little"))
            metric = int(cols[6])
        except ValueError:
            continue
        if best is None or metric < best[0]:
            best = (metric, f"{gateway} dev {cols[0]}")
    return best[1] if best else None


def change_between(before: NetworkState, after: NetworkState, at: float) -> NetworkChange | None:
    if before == after:
        return None
    old, new = set(before.addresses), set(after.addresses)
    return NetworkChange(
        at=at, before=before, after=after,
        lost=tuple(sorted(old - new)), gained=tuple(sorted(new - old)),
    )


class NetWatcher:
    """Calls `on_change` once per settled change of the node's addresses or default route."""

    def __init__(
        self,
        addresses: Callable[[], Sequence[str]],
        on_change: Callable[[NetworkChange], None],
        *,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._addresses = addresses
        self._on_change = on_change
        self._poll_interval = poll_interval
        self._sock: socket.socket | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.state = self.look()
        self.netlink = False

    def look(self) -> NetworkState:
        addrs = tuple(sorted(a for a in self._addresses() if not a.startswith("127.")))
        return NetworkState(addrs, default_route())

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE))
            sock.setblocking(False)
        except (OSError, AttributeError) as exc:
            log.info("netlink unavailable; watching the network by polling", extra={"reason": str(exc)})
        else:
            self._sock = sock
            self.netlink = True
            loop.add_reader(sock.fileno(), self._readable)
        self._task = loop.create_task(self._run(), name="network watcher")

    async def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(256):  # drain what is queued; the content does not matter
            try:
                if not self._sock.recv(65536):
                    break
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ENOBUFS: we missed messages, which a look covers anyway
                log.debug("netlink read", extra={"reason": str(exc)})
                break
        self._wake.set()

    async def _run(self) -> None:
        while True:  # ends when the daemon stops (cancelled)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)
            if self._wake.is_set():
                await asyncio.sleep(SETTLE)  # a move is a burst of messages: let it finish
                self._wake.clear()
            self.check()

    def check(self) -> NetworkChange | None:
        """Look now; report and return the change, if any."""
        after = self.look()
        change = change_between(self.state, after, time.time())
        self.state = after
        if change is not None:
            log.info("network changed", extra={"change": change.describe()})
            try:
                self._on_change(change)
            except Exception:
                log.exception("reacting to a network change failed")
        return change
