"""A lab of Linux network namespaces for spt's network tests (DESIGN.md §6, SPEC.md §7.3–7.4).

A `Lab` builds small topologies out of network namespaces, veth pairs, Linux bridges and
iptables NAT, runs processes and holds sockets inside them, captures traffic, and removes all of
it again in `close()`. Every namespace is named `<prefix>-<node>` with a per-run prefix such as
`spt1k9x7q`, so several runs (and several engineers) can share one machine. Every veth is
created directly inside the namespaces it joins: nothing appears in the machine's own namespace,
and no link connects the lab to it, so lab traffic cannot leave the lab.

Topologies (addresses are per namespace, so two labs never collide):

- `lab.lan(n)`: hosts `h1..hn` on one LAN, 10.10.K.0/24 (hosts from .11), bridged by a switch
  that lives in its own namespace. Multicast (mDNS, 224.0.0.251:5353) works between the hosts.
- `lab.two_nats(kind_a, kind_b)`: LANs `a` (10.10.1.0/24, host `a1` = 10.10.1.11) and `b`
  (10.10.2.0/24, host `b1`) when they are the lab's first LANs (use `lab.addr()`), each behind
  its own NAT router (`nata`, `natb`, gateway .1), whose public sides (10.200.1.2,
  10.200.2.2) hang off a routed `core` namespace, plus a `relay` host on the core
  (10.200.3.2). A packet sent with TTL 2 from a LAN host crosses its own NAT and dies at the
  core router, which is what DESIGN §3's priming probes rely on.
  NAT kinds: ``"eim"`` is ``MASQUERADE`` (endpoint-independent mapping, port preserved when
  free; the filtering is conntrack's, i.e. address-and-port dependent) and ``"symmetric"`` is
  ``MASQUERADE --random-fully`` (a fresh random port for every destination). Unsolicited
  traffic from the core is never forwarded into a LAN; what is addressed to a router itself is
  answered by its own stack (a TCP reset, ICMP port unreachable) unless
  `two_nats(drop_unsolicited=True)` or `lab.drop_unsolicited()`, which drop it as most home
  routers do. Call
  `lab.flush_conntrack()` between trials.
- `lab.add_host(lan)` adds one more host to any LAN of the lab; `lab.move_host(host, lan)`
  carries a host to another LAN (new address and default route; its processes keep running).

Running things:

- `lab.popen(host, argv, env=...)` / `lab.run(host, argv)` run a program through
  `ip netns exec`; `env` holds overrides merged over `os.environ`. `close()` stops every
  process the lab started (by its process group), then any process left inside its namespaces.
- `lab.call(host, fn)` runs `fn()` in a fresh thread that has entered the host's namespace with
  `setns(CLONE_NEWNET)`; `lab.open_socket(host, ...)` uses it to create a socket there. **A
  socket keeps the namespace it was created in**, so one pytest process can create sockets in
  several hosts and then use them all from the main thread or its event loop (for example
  `loop.create_datagram_endpoint(sock=...)`). `lab.in_netns(host)` (and the module-level
  `in_netns(ns)`) switch the *calling* thread for the duration of a ``with`` block; never
  ``await`` inside one, or other tasks would run in that namespace.
- Faults: `lab.cut(a, b)` cuts the link between two hosts (or a host and the relay) with
  iptables DROP at both ends, `lab.cut(a, b, how="down")` takes `a`'s link down; the returned
  `Cut` heals with `heal()` (or as a ``with`` block). `lab.flush_conntrack(router)` makes one
  NAT (or every router) forget its mappings.
- `lab.addr(host)`, `lab.ping(src, dst)` (raw ICMP, no `ping` binary needed),
  `lab.capture(host, "udp port 3478")` (tcpdump, bounded start and stop; `udp_datagrams()`
  parses the result).

In pytest, mark the test `lab` and use the `netns_lab` factory fixture; it closes every lab it
made in its finalizer. When the lab is unavailable (`ok, why = available()`: not root, or `ip` /
`iptables` missing) the test skips as a normal user and fails as root (`spt.testing.required`).
`self_check()` builds a small lab and uses every tool the lab tests need; `scripts/test.sh` runs
it first when run as root, so a machine that cannot build the lab fails CI with the reason.
Debian packages: iproute2 (ip), iptables, conntrack (`flush_conntrack`), tcpdump (`capture`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import ipaddress
import logging
import os
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, TypeVar

import pytest

__all__ = [
    "Capture",
    "Cut",
    "Lab",
    "LabError",
    "Lan",
    "NatKind",
    "Node",
    "TwoNats",
    "UdpDatagram",
    "available",
    "in_netns",
    "netns_lab",
    "pcap_frames",
    "run_in_netns",
    "self_check",
    "udp_datagrams",
    "unavailable_reason",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
NatKind = Literal["eim", "symmetric"]
Role = Literal["host", "router", "switch"]

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
IFF_RUNNING = 0x40
NETNS_RUN_DIR = "/run/netns"
CMD_TIMEOUT = 20.0  # seconds for one ip/iptables/conntrack invocation
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL at close()
LINK_TIMEOUT = 3.0  # seconds to wait for new links to come up
MAX_HOSTS_PER_LAN = 200
RELAY_ADDR = "10.200.3.2"

_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,11}\Z")
_LAN_RE = re.compile(r"[a-z][a-z0-9]{0,7}\Z")
_NAT_RULES = {"eim": "MASQUERADE", "symmetric": "MASQUERADE --random-fully"}

_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    """The lab could not be built, used or torn down; the message says which command failed."""


# --------------------------------------------------------------------------------------------
# availability


def _has_caps(*bits: int) -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    eff = int(line.split()[1], 16)
                    return all(eff >> b & 1 for b in bits)
    except OSError:
        return False
    return False


def unavailable_reason() -> str | None:
    """Why the lab cannot run here (not root, a tool missing), or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "netns lab needs root"
    if not _has_caps(12, 21):  # CAP_NET_ADMIN, CAP_SYS_ADMIN
        return "netns lab needs CAP_NET_ADMIN and CAP_SYS_ADMIN"
    for tool in ("ip", "iptables", "iptables-restore"):
        if _which(tool) is None:
            return f"netns lab needs `{tool}` (Debian packages iproute2, iptables)"
    return None


def available() -> tuple[bool, str]:
    """(True, "") when the lab can run (root with the capabilities, `ip` and `iptables`
    present), else (False, why). A tuple is always truthy: unpack it, don't test it."""
    reason = unavailable_reason()
    return reason is None, reason or ""


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _require(tool: str, package: str) -> str:
    path = _which(tool)
    if path is None:
        raise LabError(f"`{tool}` not found; install the Debian package {package}")
    return path


# --------------------------------------------------------------------------------------------
# entering namespaces from threads


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the ``with`` block with the calling thread inside network namespace `ns`.

    `ns` is a name under /run/netns or an absolute path to a namespace file. Only the calling
    thread moves; it returns to its previous namespace when the block ends. Sockets created in
    the block stay in `ns` for their whole life.
    """
    path = ns if ns.startswith("/") else os.path.join(NETNS_RUN_DIR, ns)
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)
    finally:
        os.close(target)


def run_in_netns(ns: str, fn: Callable[[], T], *, timeout: float = 10.0) -> T:
    """Call `fn()` in a new thread that has entered namespace `ns`; return or raise its outcome.

    Waits at most `timeout` seconds, then raises TimeoutError (the daemon thread is left behind).
    """

    def inside() -> T:
        with in_netns(ns):
            return fn()

    return _in_thread(inside, timeout=timeout, name=f"netns:{ns}")


def _in_thread(fn: Callable[[], T], *, timeout: float, name: str) -> T:
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{name}: still running after {timeout} s")
    if error:
        raise error[0]
    return result[0]


# --------------------------------------------------------------------------------------------
# topology records


@dataclass
class Node:
    """One namespace of the lab: a host, a router or a LAN switch."""

    name: str
    ns: str
    role: Role
    addr: str | None = None
    lan: str | None = None


@dataclass
class Lan:
    """One bridged LAN: 10.10.`index`.0/24, its switch namespace, gateway and hosts."""

    name: str
    index: int
    switch: str
    host_prefix: str
    gateway: str | None = None
    hosts: list[str] = field(default_factory=list)
    next_host: int = 1

    @property
    def subnet(self) -> str:
        return f"10.10.{self.index}.0/24"


@dataclass(frozen=True)
class TwoNats:
    """Node names and public addresses of a `Lab.two_nats` topology."""

    kind_a: NatKind
    kind_b: NatKind
    lan_a: str
    lan_b: str
    a: str
    b: str
    nat_a: str
    nat_b: str
    core: str
    relay: str
    public_a: str
    public_b: str
    relay_addr: str


@dataclass
class _Plan:
    """What one build step creates; applied by `Lab._apply` in four batched phases."""

    namespaces: list[str] = field(default_factory=list)
    root: list[str] = field(default_factory=list)  # `ip -b` lines run from the root namespace
    per_ns: dict[str, list[str]] = field(default_factory=dict)  # `ip -n NS -b` lines
    sysctl: dict[str, dict[str, str]] = field(default_factory=dict)
    iptables: dict[str, str] = field(default_factory=dict)  # iptables-restore input per ns
    links: dict[str, list[str]] = field(default_factory=dict)  # interfaces to see running

    def ns_lines(self, ns: str) -> list[str]:
        return self.per_ns.setdefault(ns, [])


# --------------------------------------------------------------------------------------------
# the lab

_open_labs: weakref.WeakSet[Lab] = weakref.WeakSet()


def _close_open_labs() -> None:
    for lab in list(_open_labs):
        with contextlib.suppress(Exception):
            lab.close()


atexit.register(_close_open_labs)


def _new_prefix() -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    pid = os.getpid() % 36**3
    pid_part = "".join(digits[pid // 36**i % 36] for i in (2, 1, 0))
    return "spt" + pid_part + "".join(secrets.choice(digits) for _ in range(3))


class Lab:
    """A set of network namespaces built for one test; `close()` (or ``with``) removes them all."""

    def __init__(self, prefix: str | None = None, *, ipv6: bool = False) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise LabError(reason)
        self.prefix = prefix or _new_prefix()
        if not re.fullmatch(r"[a-z][a-z0-9]{2,10}", self.prefix):
            raise LabError(f"bad lab prefix {self.prefix!r}")
        self.ipv6 = ipv6
        self.nodes: dict[str, Node] = {}
        self.lans: dict[str, Lan] = {}
        self.topology: TwoNats | None = None
        self.timings: dict[str, float] = {}
        self.workdir = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self._ip = _require("ip", "iproute2")
        self._procs: list[tuple[subprocess.Popen[Any], bool]] = []
        self._sockets: list[socket.socket] = []
        self._captures: list[Capture] = []
        self._cuts: list[Cut] = []
        self._next_lan = 1
        self._next_ifindex = 100
        self._created: list[str] = []  # namespaces this lab made: the only ones it deletes
        self._batch_seq = 0
        self._closed = False
        _open_labs.add(self)

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- lookups -----------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise LabError(f"no node {name!r} in lab {self.prefix}") from None

    def ns(self, host: str) -> str:
        """The namespace name of node `host` (usable with `ip netns exec`)."""
        return self.node(host).ns

    def addr(self, host: str) -> str:
        """The IPv4 address of node `host` (for a NAT router: its public address)."""
        addr = self.node(host).addr
        if addr is None:
            raise LabError(f"node {host!r} has no address")
        return addr

    def hosts(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.role == "host"]

    def local_ipv6_nets(self, host: str, nets: Sequence[str]) -> None:
        """Make every address of each IPv6 prefix in `nets` local to `host` (AnyIP on lo), so a
        test can bind a fresh source address per connection, as a host owning a /64 can."""
        self.run(host, ["sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1"])
        for net in nets:
            self.run(host, ["ip", "-6", "route", "add", "local", net, "dev", "lo"])

    def _resolve(self, dst: str) -> str:
        if dst in self.nodes:
            return self.addr(dst)
        return str(ipaddress.IPv4Address(dst))

    # -- building ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LabError(f"lab {self.prefix} is closed")

    def _add_node(self, plan: _Plan, name: str, role: Role, *, addr: str | None = None,
                  lan: str | None = None) -> Node:
        if not _NAME_RE.match(name):
            raise LabError(f"bad node name {name!r} (lowercase letters and digits, at most 12)")
        if name in self.nodes:
            raise LabError(f"node {name!r} already exists in lab {self.prefix}")
        node = Node(name=name, ns=f"{self.prefix}-{name}", role=role, addr=addr, lan=lan)
        self.nodes[name] = node
        plan.namespaces.append(node.ns)
        plan.root.append(f"netns add {node.ns}")
        sysctl = plan.sysctl.setdefault(node.ns, {})
        if not self.ipv6:
            sysctl["net/ipv6/conf/all/disable_ipv6"] = "1"
            sysctl["net/ipv6/conf/default/disable_ipv6"] = "1"
        if role == "router":
            sysctl["net/ipv4/ip_forward"] = "1"
        plan.ns_lines(node.ns).append("link set lo up")
        return node

    def _veth(self, plan: _Plan, a: Node, a_if: str, b: Node, b_if: str) -> None:
        # Explicit, lab-unique ifindexes: when a veth end has the same ifindex as its peer (easy
        # across namespaces), the kernel treats its carrier change as non-urgent and delays it
        # by up to a second, during which the link silently drops packets (the first ARP).
        self._next_ifindex += 2
        ia, ib = self._next_ifindex, self._next_ifindex + 1
        plan.root.append(
            f"link add {a_if} index {ia} netns {a.ns} type veth peer name {b_if} index {ib} netns {b.ns}"
        )
        plan.links.setdefault(a.ns, []).append(a_if)
        plan.links.setdefault(b.ns, []).append(b_if)

    def _new_lan(self, plan: _Plan, name: str, host_prefix: str, gateway: str | None) -> Lan:
        if not _LAN_RE.match(name):
            raise LabError(f"bad LAN name {name!r} (lowercase letters and digits, at most 8)")
        if name in self.lans:
            raise LabError(f"LAN {name!r} already exists in lab {self.prefix}")
        if self._next_lan > 250:
            raise LabError("too many LANs")
        switch = self._add_node(plan, f"{name}sw", "switch")
        lan = Lan(name=name, index=self._next_lan, switch=switch.name, host_prefix=host_prefix,
                  gateway=gateway)
        self._next_lan += 1
        self.lans[name] = lan
        plan.ns_lines(switch.ns).extend([
            "link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
            "link set br0 up",
        ])
        return lan

    def _lan_port(self, plan: _Plan, lan: Lan, node: Node, ifname: str) -> None:
        switch = self.nodes[lan.switch]
        port = f"p-{node.name}"
        self._veth(plan, node, ifname, switch, port)
        plan.ns_lines(switch.ns).append(f"link set {port} master br0 up")

    def _plan_host(self, plan: _Plan, lan: Lan, name: str | None) -> str:
        if len(lan.hosts) >= MAX_HOSTS_PER_LAN:
            raise LabError(f"LAN {lan.name} is full")
        if name is None:
            for _ in range(MAX_HOSTS_PER_LAN + len(self.nodes) + 1):
                candidate = f"{lan.host_prefix}{lan.next_host}"
                lan.next_host += 1
                if candidate not in self.nodes:
                    name = candidate
                    break
            else:  # pragma: no cover - bounded search exhausted
                raise LabError(f"no free host name on LAN {lan.name}")
        addr = f"10.10.{lan.index}.{10 + len(lan.hosts) + 1}"
        host = self._add_node(plan, name, "host", addr=addr, lan=lan.name)
        lan.hosts.append(name)
        self._lan_port(plan, lan, host, "eth0")
        lines = plan.ns_lines(host.ns)
        lines += [
            f"addr add {addr}/24 dev eth0",
            "link set eth0 up",
            "route add 224.0.0.0/4 dev eth0",
        ]
        if lan.gateway is not None:
            lines.append(f"route add default via {lan.gateway}")
        return name

    def lan(self, n: int = 2, *, name: str = "lan", host_prefix: str = "h") -> Lan:
        """Build a LAN of `n` hosts named `<host_prefix>1..n` on one bridge; return it."""
        self._check_open()
        if not 1 <= n <= MAX_HOSTS_PER_LAN:
            raise LabError(f"lan(n): n must be 1..{MAX_HOSTS_PER_LAN}")
        started = time.monotonic()
        plan = _Plan()
        lan = self._new_lan(plan, name, host_prefix, None)
        for _ in range(n):
            self._plan_host(plan, lan, None)
        self._apply(plan)
        self.timings[f"lan:{name}"] = time.monotonic() - started
        return lan

    def add_host(self, lan: str, name: str | None = None) -> str:
        """Add one host to LAN `lan` (routed through its gateway, if it has one); return its name."""
        self._check_open()
        the_lan = self.lans.get(lan)
        if the_lan is None:
            raise LabError(f"no LAN {lan!r} in lab {self.prefix}")
        started = time.monotonic()
        plan = _Plan()
        host = self._plan_host(plan, the_lan, name)
        self._apply(plan)
        self.timings[f"add_host:{host}"] = time.monotonic() - started
        return host

    def move_host(self, host: str, lan: str) -> str:
        """Unplug `host` from its LAN and plug it into `lan` (a laptop carried to another
        network): its eth0 and address go away, a new eth0 comes up with an address on `lan`
        and a default route through `lan`'s gateway. Processes inside keep running. Returns the
        new address."""
        self._check_open()
        node = self.nodes.get(host)
        target = self.lans.get(lan)
        if node is None or node.role != "host" or node.lan is None:
            raise LabError(f"no host {host!r} on a LAN in lab {self.prefix}")
        if target is None:
            raise LabError(f"no LAN {lan!r} in lab {self.prefix}")
        if node.lan == lan:
            raise LabError(f"{host} is already on LAN {lan}")
        if len(target.hosts) >= MAX_HOSTS_PER_LAN:
            raise LabError(f"LAN {lan} is full")
        started = time.monotonic()
        # Deleting one end of a veth deletes its peer, the old switch port, with it.
        self._run_parallel([[self._ip, "-n", node.ns, "link", "del", "eth0"]])
        self.lans[node.lan].hosts.remove(host)
        addr = f"10.10.{target.index}.{10 + target.next_host + 100}"
        target.next_host += 1
        plan = _Plan()
        self._lan_port(plan, target, node, "eth0")
        lines = plan.ns_lines(node.ns)
        lines += [f"addr add {addr}/24 dev eth0", "link set eth0 up", "route add 224.0.0.0/4 dev eth0"]
        if target.gateway is not None:
            lines.append(f"route add default via {target.gateway}")
        self._apply(plan)
        node.addr, node.lan = addr, lan
        target.hosts.append(host)
        self.timings[f"move_host:{host}"] = time.monotonic() - started
        return addr

    def two_nats(self, kind_a: NatKind = "eim", kind_b: NatKind = "eim", *,
                 hosts_per_lan: int = 1, drop_unsolicited: bool = False) -> TwoNats:
        """Build two NATed home LANs, a routed core and a relay host on it (see module doc).

        `drop_unsolicited`: the NAT routers silently drop what arrives from the core for
        themselves and matches no mapping, as most home routers do, instead of answering from
        their own stack (a TCP reset for a SYN to an unmapped port, which aborts a TCP
        simultaneous open: docs/design/tcp-simultaneous-open.md)."""
        self._check_open()
        if self.topology is not None:
            raise LabError("two_nats() already built in this lab")
        for kind in (kind_a, kind_b):
            if kind not in _NAT_RULES:
                raise LabError(f"unknown NAT kind {kind!r}; use one of {sorted(_NAT_RULES)}")
        if not 1 <= hosts_per_lan <= MAX_HOSTS_PER_LAN:
            raise LabError(f"hosts_per_lan must be 1..{MAX_HOSTS_PER_LAN}")
        started = time.monotonic()
        plan = _Plan()
        core = self._add_node(plan, "core", "router")
        relay = self._add_node(plan, "relay", "host", addr=RELAY_ADDR)
        self._veth(plan, relay, "eth0", core, "c-relay")
        plan.ns_lines(core.ns).extend(["addr add 10.200.3.1/24 dev c-relay", "link set c-relay up"])
        plan.ns_lines(relay.ns).extend([
            f"addr add {RELAY_ADDR}/24 dev eth0",
            "link set eth0 up",
            "route add default via 10.200.3.1",
        ])
        firsts: list[str] = []
        publics: list[str] = []
        lan_names: list[str] = []
        for side, kind in (("a", kind_a), ("b", kind_b)):
            lan = self._new_lan(plan, side, side, None)
            lan.gateway = f"10.10.{lan.index}.1"
            k = {"a": 1, "b": 2}[side]
            public = f"10.200.{k}.2"
            nat = self._add_node(plan, f"nat{side}", "router", addr=public, lan=lan.name)
            self._lan_port(plan, lan, nat, "lan")
            self._veth(plan, nat, "wan", core, f"c-{nat.name}")
            plan.ns_lines(nat.ns).extend([
                f"addr add {lan.gateway}/24 dev lan",
                "link set lan up",
                f"addr add {public}/24 dev wan",
                "link set wan up",
                f"route add default via 10.200.{k}.1",
            ])
            plan.ns_lines(core.ns).extend([
                f"addr add 10.200.{k}.1/24 dev c-{nat.name}",
                f"link set c-{nat.name} up",
            ])
            plan.iptables[nat.ns] = "\n".join([
                "*nat",
                f"-A POSTROUTING -o wan -j {_NAT_RULES[kind]}",
                "COMMIT",
                "*filter",
                ":FORWARD DROP [0:0]",
                "-A FORWARD -i lan -o wan -j ACCEPT",
                "-A FORWARD -i wan -o lan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                "COMMIT",
                "",
            ])
            hosts = [self._plan_host(plan, lan, None) for _ in range(hosts_per_lan)]
            firsts.append(hosts[0])
            publics.append(public)
            lan_names.append(lan.name)
        self._apply(plan)
        self.topology = TwoNats(
            kind_a=kind_a, kind_b=kind_b, lan_a=lan_names[0], lan_b=lan_names[1],
            a=firsts[0], b=firsts[1], nat_a="nata", nat_b="natb", core="core", relay="relay",
            public_a=publics[0], public_b=publics[1], relay_addr=RELAY_ADDR,
        )
        if drop_unsolicited:
            self.drop_unsolicited()
        self.timings["two_nats"] = time.monotonic() - started
        return self.topology

    def _batch_file(self, lines: Sequence[str]) -> str:
        self._batch_seq += 1
        path = os.path.join(self.workdir, f"batch{self._batch_seq}")
        with open(path, "w", encoding="ascii") as fh:
            fh.write("\n".join(lines) + "\n")
        return path

    def _run_parallel(self, commands: Sequence[Sequence[str]]) -> None:
        """Run commands at once; raise LabError naming every one that failed."""
        procs = [
            (cmd, subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True))
            for cmd in commands
        ]
        errors: list[str] = []
        for cmd, proc in procs:
            try:
                _, err = proc.communicate(timeout=CMD_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                errors.append(f"{' '.join(cmd)}: timed out")
                continue
            if proc.returncode != 0:
                errors.append(f"{' '.join(cmd)}: exit {proc.returncode}: {err.strip()}")
        if errors:
            raise LabError("; ".join(errors))

    def _apply(self, plan: _Plan) -> None:
        # 1. namespaces and veth pairs, created straight into their namespaces by one process
        taken = [ns for ns in plan.namespaces if os.path.exists(os.path.join(NETNS_RUN_DIR, ns))]
        if taken:
            raise LabError(f"namespaces already exist (not ours, left alone): {taken}")
        try:
            self._run_parallel([[self._ip, "-b", self._batch_file(plan.root)]])
        finally:
            self._created += [
                ns for ns in plan.namespaces if os.path.exists(os.path.join(NETNS_RUN_DIR, ns))
            ]
        # 2. sysctls (links are still down, so IPv6 never starts on them) from one thread
        def write_sysctls() -> None:
            for ns, values in plan.sysctl.items():
                with in_netns(ns):
                    for key, value in values.items():
                        with open(f"/proc/sys/{key}", "w", encoding="ascii") as fh:
                            fh.write(value)

        if plan.sysctl:
            _in_thread(write_sysctls, timeout=CMD_TIMEOUT, name=f"sysctl:{self.prefix}")
        # 3. addresses, links, routes and NAT rules: one process per namespace, all at once
        commands: list[list[str]] = [
            [self._ip, "-n", ns, "-b", self._batch_file(lines)] for ns, lines in plan.per_ns.items()
        ]
        if plan.iptables:
            restore = _require("iptables-restore", "iptables")
            for ns, rules in plan.iptables.items():
                commands.append([self._ip, "netns", "exec", ns, restore, self._batch_file([rules])])
        self._run_parallel(commands)
        # 4. the kernel brings carriers up asynchronously; wait (bounded) until every link runs
        if plan.links:
            _in_thread(lambda: _wait_running(plan.links, LINK_TIMEOUT), timeout=LINK_TIMEOUT + 5,
                       name=f"links:{self.prefix}")

    # -- running things ----------------------------------------------------------------------

    def popen(self, host: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` in `host` (via `ip netns exec`); `env` overrides entries of os.environ.

        The process gets its own session (so its children can be stopped with it) unless
        `start_new_session=False` is passed. `close()` stops it if it still runs.
        """
        self._check_open()
        ns = self.ns(host)
        kwargs.setdefault("start_new_session", True)
        full_env = None if env is None else {**os.environ, **env}
        proc: subprocess.Popen[Any] = subprocess.Popen(
            [self._ip, "netns", "exec", ns, *argv], env=full_env, **kwargs
        )
        self._procs.append((proc, bool(kwargs["start_new_session"])))
        return proc

    def run(self, host: str, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True,
            env: Mapping[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run `argv` in `host` to completion (text output captured); bounded by `timeout`."""
        self._check_open()
        full_env = None if env is None else {**os.environ, **env}
        kwargs.setdefault("capture_output", True)
        return subprocess.run(
            [self._ip, "netns", "exec", self.ns(host), *argv],
            env=full_env, timeout=timeout, check=check, text=True, **kwargs,
        )

    def call(self, host: str, fn: Callable[[], T], *, timeout: float = 10.0) -> T:
        """Call `fn()` in a fresh thread inside `host`'s namespace and return its result."""
        self._check_open()
        return run_in_netns(self.ns(host), fn, timeout=timeout)

    def in_netns(self, host: str) -> contextlib.AbstractContextManager[None]:
        """Move the calling thread into `host` for a ``with`` block (see module doc)."""
        self._check_open()
        return in_netns(self.ns(host))

    def open_socket(self, host: str, kind: int = socket.SOCK_DGRAM, *, family: int = socket.AF_INET,
                    proto: int = 0, bind: tuple[str, int] | None = None,
                    reuse: bool = False) -> socket.socket:
        """Create a socket inside `host` (optionally bound); it stays there. Closed at close()."""

        def make() -> socket.socket:
            sock = socket.socket(family, kind, proto)
            try:
                if reuse:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if bind is not None:
                    sock.bind(bind)
            except BaseException:
                sock.close()
                raise
            return sock

        sock = self.call(host, make)
        self._sockets.append(sock)
        return sock

    def ping(self, src: str, dst: str, *, timeout: float = 1.0) -> bool:
        """Send ICMP echo from `src` to `dst` (node name or IPv4); True if a reply came in time."""
        dst_ip = self._resolve(dst)
        sock = self.open_socket(src, socket.SOCK_RAW, proto=socket.IPPROTO_ICMP)
        try:
            ident = secrets.randbelow(0xFFFF)
            deadline = time.monotonic() + timeout
            for seq in (1, 2, 3):  # bounded: three requests spread over `timeout`
                body = struct.pack("!HH", ident, seq) + b"spt-netns-lab"
                packet = struct.pack("!BBH", 8, 0, _checksum(b"\x08\x00\x00\x00" + body)) + body
                try:
                    sock.sendto(packet, (dst_ip, 0))
                except OSError as exc:  # no route from src: unreachable, not an error
                    log.debug("ping %s -> %s: %s", src, dst_ip, exc)
                    return False
                until = min(deadline, time.monotonic() + timeout / 3)
                for _ in range(1000):
                    left = until - time.monotonic()
                    if left <= 0 or not select.select([sock], [], [], left)[0]:
                        break
                    data, (addr, _) = sock.recvfrom(4096)
                    icmp = data[(data[0] & 0x0F) * 4:]
                    if len(icmp) < 8:
                        continue
                    if icmp[0] == 0 and addr == dst_ip and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                        return True
                    if icmp[0] in (3, 11) and len(icmp) >= 36:  # unreachable / TTL exceeded
                        inner = icmp[8 + (icmp[8] & 0x0F) * 4:]
                        if len(inner) >= 8 and struct.unpack("!HH", inner[4:8]) == (ident, seq):
                            return False
                if time.monotonic() >= deadline:
                    break
            return False
        finally:
            sock.close()

    def capture(self, host: str, bpf_filter: str = "", *, iface: str = "any",
                max_seconds: float = 60.0, max_packets: int | None = None,
                start_timeout: float = 10.0, snaplen: int = 0) -> Capture:
        """Start tcpdump in `host` and wait until it listens; use as ``with lab.capture(...) as c``.

        The capture stops itself after `max_seconds` (or `max_packets`); `stop()` ends it and
        returns the pcap bytes, also saved at `capture.path` (in the lab's workdir, removed at
        close(); `save()` elsewhere to keep it). A small `snaplen` (headers only) lets a capture
        of bulk traffic keep up: lengths are read from the IP headers.
        """
        self._check_open()
        cap = Capture(self, host, bpf_filter, iface=iface, max_seconds=max_seconds,
                      max_packets=max_packets, start_timeout=start_timeout, snaplen=snaplen)
        self._captures.append(cap)
        cap.start()
        return cap

    # -- faults: cutting links, forgetting NAT mappings ---------------------------------------

    def seen_as(self, host: str) -> list[str]:
        """The addresses other hosts see `host`'s packets come from: its own, and its NAT
        router's public address when its LAN has a gateway."""
        node = self.node(host)
        addrs = [self.addr(host)]
        lan = self.lans.get(node.lan or "")
        if node.role == "host" and lan is not None and lan.gateway is not None:
            addrs += [n.addr for n in self.nodes.values()
                      if n.role == "router" and n.lan == lan.name and n.addr is not None]
        return addrs

    def cut(self, a: str, b: str, *, how: Literal["drop", "down"] = "drop") -> Cut:
        """Cut the link between hosts `a` and `b` (either may be the relay); `heal()` the result.

        ``how="drop"``: iptables DROP on INPUT at both ends for packets from the other's
        addresses (`seen_as`), so the senders see no error, just silence, as on a real
        partition; traffic through a relay between the two is not affected.
        ``how="down"``: `a`'s eth0 goes down (it loses every peer, `b` is only documentation);
        healing brings it up and restores its routes.
        """
        self._check_open()
        cut = Cut(self, a, b, how)
        cut.apply()
        return cut

    def flush_conntrack(self, router: str | None = None) -> None:
        """Forget NAT mappings and connection-tracking entries: in `router` only, or in every
        router of the lab."""
        self._check_open()
        tool = _require("conntrack", "conntrack")
        if router is not None:
            if self.node(router).role != "router":
                raise LabError(f"{router!r} is not a router")
            routers = [self.ns(router)]
        else:
            routers = [n.ns for n in self.nodes.values() if n.role == "router"]
        if routers:
            self._run_parallel([[self._ip, "netns", "exec", ns, tool, "-F"] for ns in routers])

    def drop_unsolicited(self, router: str | None = None) -> None:
        """From now on `router` (or every NAT router of `two_nats`) drops what arrives from the
        core for itself and matches no mapping, instead of answering from its own stack."""
        self._check_open()
        if router is not None:
            routers = [router]
        elif self.topology is not None:
            routers = [self.topology.nat_a, self.topology.nat_b]
        else:
            raise LabError("drop_unsolicited() without a router needs two_nats()")
        tool = _require("iptables", "iptables")
        for rule in (["-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                     ["-A", "INPUT", "-i", "wan", "-j", "DROP"]):  # in this order: the routers side by side
            self._run_parallel([[self._ip, "netns", "exec", self.ns(r), tool, "-w", *rule] for r in routers])

    def _iptables(self, host: str, *args: str) -> None:
        tool = _require("iptables", "iptables")
        self._run_parallel([[self._ip, "netns", "exec", self.ns(host), tool, "-w", *args]])

    # -- teardown ----------------------------------------------------------------------------

    def _stop_processes(self) -> None:
        live = [(p, group) for p, group in self._procs if p.poll() is None]
        for proc, group in live:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(proc.pid, signal.SIGTERM)
                else:
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc, group in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    if group:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_GRACE)

    def _pids_in_namespaces(self) -> list[int]:
        """Processes (other than this one) living in this lab's namespaces."""
        inodes: set[tuple[int, int]] = set()
        for ns in self._created:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(NETNS_RUN_DIR, ns))
                inodes.add((st.st_dev, st.st_ino))
        found: list[int] = []
        if not inodes:
            return found
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{entry}/ns/net")
                if (st.st_dev, st.st_ino) in inodes:
                    found.append(int(entry))
        return found

    def _sweep_namespaces(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._pids_in_namespaces()
            if not pids:
                return
            log.warning("lab %s: stopping leftover processes %s with %s", self.prefix, pids, sig.name)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + STOP_GRACE
            while time.monotonic() < deadline and self._pids_in_namespaces():
                time.sleep(0.02)

    def close(self) -> None:
        """Stop captures and processes, close sockets, delete every namespace; idempotent."""
        if self._closed:
            return
        self._closed = True
        _open_labs.discard(self)
        errors: list[str] = []
        for cap in self._captures:
            try:
                cap.stop()
            except Exception as exc:
                errors.append(f"capture: {exc}")
        for sock in self._sockets:
            sock.close()
        self._stop_processes()
        self._sweep_namespaces()
        names = [ns for ns in self._created if os.path.exists(os.path.join(NETNS_RUN_DIR, ns))]
        if names:
            lines = [f"netns del {ns}" for ns in names]
            path = os.path.join(self.workdir, "teardown")
            with open(path, "w", encoding="ascii") as fh:
                fh.write("\n".join(lines) + "\n")
            proc = subprocess.run([self._ip, "-force", "-b", path], capture_output=True, text=True,
                                  timeout=CMD_TIMEOUT, check=False)
            if proc.returncode != 0:
                errors.append(f"ip netns del: {proc.stderr.strip()}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise LabError(f"teardown of lab {self.prefix}: " + "; ".join(errors))


class Cut:
    """One cut link of a lab (`Lab.cut`); `heal()` restores it. Usable as a context manager."""

    def __init__(self, lab: Lab, a: str, b: str, how: Literal["drop", "down"]) -> None:
        if how not in ("drop", "down"):
            raise LabError(f"unknown cut {how!r}; use 'drop' or 'down'")
        for host in (a, b):
            if lab.node(host).role != "host":
                raise LabError(f"{host!r} is not a host")
        self.lab, self.a, self.b, self.how = lab, a, b, how
        self.active = False
        self._rules: list[tuple[str, list[str]]] = []  # (host, rule) pairs inserted in INPUT
        self._routes: list[str] = []

    def apply(self) -> None:
        if self.active:
            return
        if self.how == "drop":
            self._rules = [(self.a, ["-s", src, "-j", "DROP"]) for src in self.lab.seen_as(self.b)]
            self._rules += [(self.b, ["-s", src, "-j", "DROP"]) for src in self.lab.seen_as(self.a)]
            for host, rule in self._rules:
                self.lab._iptables(host, "-I", "INPUT", "1", *rule)
        else:
            ns = self.lab.ns(self.a)
            shown = subprocess.run([self.lab._ip, "-n", ns, "route", "show"], capture_output=True,
                                   text=True, timeout=CMD_TIMEOUT, check=True).stdout
            # routes through eth0 other than the connected one vanish with the link
            self._routes = [line.strip() for line in shown.splitlines()
                            if "dev eth0" in line and "proto kernel" not in line]
            self.lab._run_parallel([[self.lab._ip, "-n", ns, "link", "set", "eth0", "down"]])
        self.active = True
        self.lab._cuts.append(self)

    def heal(self) -> None:
        """Restore the link (idempotent); with ``how="down"`` waits until eth0 runs again."""
        if not self.active or self.lab._closed:
            return
        self.active = False
        if self.how == "drop":
            for host, rule in self._rules:
                self.lab._iptables(host, "-D", "INPUT", *rule)
        else:
            ns = self.lab.ns(self.a)
            self.lab._run_parallel([[self.lab._ip, "-n", ns, "link", "set", "eth0", "up"]])
            _in_thread(lambda: _wait_running({ns: ["eth0"]}, LINK_TIMEOUT), timeout=LINK_TIMEOUT + 5,
                       name=f"heal:{ns}")
            if self._routes:
                self.lab._run_parallel([[self.lab._ip, "-n", ns, "-b",
                                         self.lab._batch_file([f"route replace {r}" for r in self._routes])]])

    def __enter__(self) -> Cut:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.heal()


def _wait_running(links: Mapping[str, Sequence[str]], timeout: float) -> None:
    """Poll (SIOCGIFFLAGS) until every listed interface has IFF_RUNNING, or raise LabError."""
    deadline = time.monotonic() + timeout
    pending = {ns: list(names) for ns, names in links.items()}
    while pending:
        for ns in list(pending):
            with in_netns(ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                pending[ns] = [name for name in pending[ns] if not _running(sock, name)]
            if not pending[ns]:
                del pending[ns]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise LabError(f"links not running after {timeout} s: {pending}")
        time.sleep(0.002)


def _running(sock: socket.socket, ifname: str) -> bool:
    req = struct.pack("16sH14x", ifname.encode(), 0)
    flags: int = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1]
    return bool(flags & IFF_RUNNING)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def self_check() -> dict[str, float]:
    """Build a small lab and use every tool the lab tests need (namespaces, NAT, ping, iptables
    cut and heal, link down and up, conntrack, tcpdump); raise LabError naming what failed.
    Returns the timings. `scripts/test.sh` runs it first as root (``python -m spt.testing.labcheck``)."""
    reason = unavailable_reason()
    if reason is not None:
        raise LabError(reason)
    for tool, package in (("conntrack", "conntrack"), ("tcpdump", "tcpdump")):
        _require(tool, package)
    started = time.monotonic()
    with Lab() as lab:
        t = lab.two_nats("eim", "eim")
        if not lab.ping(t.a, t.relay):
            raise LabError(f"{t.a} cannot ping the relay through its NAT")
        with lab.cut(t.a, t.relay):
            if lab.ping(t.a, t.relay, timeout=0.3):
                raise LabError("an iptables cut between a host and the relay let a ping through")
        with lab.cut(t.b, t.relay, how="down"):
            if lab.ping(t.b, t.relay, timeout=0.3):
                raise LabError("a link taken down let a ping through")
        with lab.capture(t.relay, "icmp", max_seconds=10) as cap:
            if not (lab.ping(t.a, t.relay) and lab.ping(t.b, t.relay)):
                raise LabError("healed links do not carry pings")
            cap.wait_frames(4, timeout=3.0)  # two requests, two replies
        if len(pcap_frames(cap.data)[1]) < 4:
            raise LabError(f"tcpdump did not capture the pings: {cap.stderr}")
        lab.flush_conntrack(t.nat_a)
        lab.timings["self_check"] = time.monotonic() - started
        return dict(lab.timings)


# --------------------------------------------------------------------------------------------
# packet capture


CAPTURE_BUFFER_KIB: Final = 32 * 1024


class Capture:
    """One tcpdump run inside a lab host; see `Lab.capture`."""

    MAX_BYTES = 256 * 1024 * 1024

    def __init__(self, lab: Lab, host: str, bpf_filter: str, *, iface: str, max_seconds: float,
                 max_packets: int | None, start_timeout: float, snaplen: int = 0) -> None:
        self.lab = lab
        self.snaplen = snaplen  # 0: whole packets; a few hundred bytes keeps headers and counts up
        self.host = host
        self.bpf_filter = bpf_filter
        self.iface = iface
        self.max_seconds = max_seconds
        self.max_packets = max_packets
        self.start_timeout = start_timeout
        self.path = os.path.join(lab.workdir, f"{host}-{len(lab._captures)}.pcap")
        self.stderr = ""
        self._data = bytearray()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._result: bytes | None = None

    def start(self) -> None:
        tcpdump = _require("tcpdump", "tcpdump")
        argv = [self.lab._ip, "netns", "exec", self.lab.ns(self.host), tcpdump, "-i", self.iface,
                "-n", "-U", "--immediate-mode", "-s", str(self.snaplen), "-w", "-",
                # a 32 MiB kernel buffer: with the 2 MiB default a loaded machine dropped packets
                # of a relayed file transfer, and the capture no longer held the whole file
                "-B", str(CAPTURE_BUFFER_KIB)]
        if self.max_packets is not None:
            argv += ["-c", str(self.max_packets)]
        if self.bpf_filter:
            argv.append(self.bpf_filter)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        self._proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        err = b""
        deadline = time.monotonic() + self.start_timeout
        while b"listening on" not in err:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None or len(err) > 65536:
                self._kill()
                raise LabError(f"tcpdump in {self.host} did not start: {err.decode(errors='replace')}")
            if select.select([proc.stderr], [], [], left)[0]:
                chunk = os.read(proc.stderr.fileno(), 4096)
                if not chunk:
                    continue
                err += chunk
        self.stderr = err.decode(errors="replace")
        self._reader = threading.Thread(target=self._read, args=(proc,), daemon=True,
                                        name=f"capture:{self.host}")
        self._reader.start()
        self._timer = threading.Timer(self.max_seconds, self._interrupt)
        self._timer.daemon = True
        self._timer.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            if len(self._data) < self.MAX_BYTES:
                self._data += chunk

    def _interrupt(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGINT)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait(STOP_GRACE)

    def stop(self, timeout: float = 5.0) -> bytes:
        """Stop tcpdump (SIGINT, then SIGKILL after `timeout`); return the pcap bytes."""
        if self._result is not None:
            return self._result
        if self._timer is not None:
            self._timer.cancel()
        proc = self._proc
        if proc is not None:
            self._interrupt()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
            if self._reader is not None:
                self._reader.join(timeout)
            if proc.stderr is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.stderr += proc.stderr.read().decode(errors="replace")
                    proc.stderr.close()
            if proc.stdout is not None:
                proc.stdout.close()
        self._result = bytes(self._data)
        with contextlib.suppress(OSError), open(self.path, "wb") as fh:
            fh.write(self._result)
        return self._result

    def wait_frames(self, n: int, timeout: float = 5.0) -> int:
        """Wait (bounded) until at least `n` frames have come out of tcpdump; return how many.
        Stopping right after the traffic can lose what tcpdump has not written yet."""
        deadline = time.monotonic() + timeout
        while True:
            count = len(pcap_frames(bytes(self._data))[1])
            if count >= n or time.monotonic() >= deadline:
                return count
            time.sleep(0.02)

    @property
    def data(self) -> bytes:
        """The pcap bytes (stops the capture first if it is still running)."""
        return self.stop()

    def save(self, path: str | os.PathLike[str]) -> str:
        with open(path, "wb") as fh:
            fh.write(self.data)
        return os.fspath(path)

    def udp(self) -> list[UdpDatagram]:
        return udp_datagrams(self.data)

    def __enter__(self) -> Capture:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass(frozen=True)
class UdpDatagram:
    """One IPv4 UDP datagram found in a capture."""

    src: str
    sport: int
    dst: str
    dport: int
    ttl: int
    payload: bytes


# link type -> (offset of the 2-byte ethertype, offset of the network header)
_LINK_HEADERS = {1: (12, 14), 113: (14, 16), 276: (0, 20)}


def pcap_frames(data: bytes) -> tuple[int, list[bytes]]:
    """Split a classic pcap file into (link type, frames)."""
    if len(data) < 24:
        return 0, []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError("not a pcap file")
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0x0FFFFFFF
    frames: list[bytes] = []
    pos = 24
    while pos + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[pos + 8:pos + 12])[0]
        pos += 16
        frames.append(data[pos:pos + incl])
        pos += incl
    return linktype, frames


def udp_datagrams(data: bytes) -> list[UdpDatagram]:
    """The IPv4 UDP datagrams of a pcap (link types Ethernet, Linux cooked v1 and v2)."""
    linktype, frames = pcap_frames(data)
    if linktype not in _LINK_HEADERS:
        return []
    type_at, net_at = _LINK_HEADERS[linktype]
    out: list[UdpDatagram] = []
    for frame in frames:
        if frame[type_at:type_at + 2] != b"\x08\x00" or len(frame) < net_at + 28:
            continue
        ip = frame[net_at:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[0] >> 4 != 4 or ip[9] != 17 or struct.unpack("!H", ip[6:8])[0] & 0x1FFF:
            continue
        total = struct.unpack("!H", ip[2:4])[0]
        sport, dport, length = struct.unpack("!HHH", ip[ihl:ihl + 6])
        end = min(len(ip), total, ihl + length)
        out.append(UdpDatagram(
            src=socket.inet_ntoa(ip[12:16]), sport=sport, dst=socket.inet_ntoa(ip[16:20]),
            dport=dport, ttl=ip[8], payload=bytes(ip[ihl + 8:end]),
        ))
    return out


# --------------------------------------------------------------------------------------------
# pytest


@pytest.fixture
def netns_lab() -> Iterator[Callable[..., Lab]]:
    """Factory of `Lab`s (same arguments as `Lab`), closed after the test. When the lab cannot
    run, it skips as a normal user and fails as root (CI): see `spt.testing.required`."""
    reason = unavailable_reason()
    if reason is not None:
        if os.geteuid() == 0:
            pytest.fail(f"the netns lab is required when running as root, and cannot run: {reason}",
                        pytrace=False)
        pytest.skip(reason)
    labs: list[Lab] = []

    def make(prefix: str | None = None, *, ipv6: bool = False) -> Lab:
        lab = Lab(prefix, ipv6=ipv6)
        labs.append(lab)
        return lab

    yield make
    errors: list[str] = []
    for lab in labs:
        try:
            lab.close()
        except LabError as exc:
            errors.append(str(exc))
    if errors:
        raise LabError("; ".join(errors))

