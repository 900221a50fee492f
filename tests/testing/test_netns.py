"""The network-namespace lab: LANs, multicast, NAT hole punching (DESIGN §3), capture, teardown."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from spt.testing import netns
from spt.testing.netns import Lab, TwoNats

pytestmark = [pytest.mark.lab]

MakeLab = Callable[..., Lab]
MDNS = ("224.0.0.251", 5353)
STUN_PORT = 3478


def recv_all(
    socks: list[socket.socket], timeout: float, want: int = 1000
) -> list[tuple[socket.socket, bytes, str]]:
    """What arrives on `socks` within `timeout` seconds, or the first `want` datagrams."""
    got: list[tuple[socket.socket, bytes, str]] = []
    deadline = time.monotonic() + timeout
    for _ in range(1000):
        left = deadline - time.monotonic()
        if left <= 0 or len(got) >= want:
            break
        ready, _, _ = select.select(socks, [], [], left)
        for sock in ready:
            data, addr = sock.recvfrom(2048)
            got.append((sock, data, addr[0]))
    return got


def test_lan_hosts_ping_and_udp(netns_lab: MakeLab) -> None:
    lab = netns_lab()
    lan = lab.lan(3)
    assert lan.hosts == ["h1", "h2", "h3"]
    assert [lab.addr(h) for h in lan.hosts] == ["10.10.1.11", "10.10.1.12", "10.10.1.13"]
    assert lab.ping("h1", "h2") and lab.ping("h3", "h1")
    assert not lab.ping("h1", "10.10.1.99", timeout=0.3)

    rx = lab.open_socket("h2", bind=(lab.addr("h2"), 9999))
    tx = lab.open_socket("h1")
    tx.sendto(b"hello over the lab", (lab.addr("h2"), 9999))
    [(_, data, src)] = recv_all([rx], 1.0, want=1)
    assert (data, src) == (b"hello over the lab", lab.addr("h1"))

    # a socket made inside `in_netns` stays in h3; the calling thread comes back home
    home = os.stat("/proc/thread-self/ns/net").st_ino
    with lab.in_netns("h3"):
        assert os.stat("/proc/thread-self/ns/net").st_ino == os.stat(f"/run/netns/{lab.ns('h3')}").st_ino
        tx3 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    with tx3:
        tx3.sendto(b"from h3", (lab.addr("h2"), 9999))
        assert [(d, src) for _, d, src in recv_all([rx], 1.0, want=1)] == [(b"from h3", lab.addr("h3"))]

    added = lab.add_host("lan")
    assert added == "h4" and lab.addr(added) == "10.10.1.14"
    assert lab.ping(added, "h1")


def test_lan_multicast_reaches_every_host(netns_lab: MakeLab) -> None:
    lab = netns_lab()
    lab.lan(3)
    receivers = []
    for host in ("h2", "h3"):
        sock = lab.open_socket(host, bind=("", MDNS[1]), reuse=True)
        mreq = struct.pack("4s4s", socket.inet_aton(MDNS[0]), socket.inet_aton(lab.addr(host)))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        receivers.append(sock)
    sender = lab.open_socket("h1")
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    sender.sendto(b"mdns-ish", MDNS)
    got = recv_all(receivers, 1.0, want=2)
    assert sorted((receivers.index(s), d, src) for s, d, src in got) == [
        (0, b"mdns-ish", lab.addr("h1")),
        (1, b"mdns-ish", lab.addr("h1")),
    ]


def test_two_nats_reachability(netns_lab: MakeLab) -> None:
    lab = netns_lab()
    t = lab.two_nats("eim", "eim")
    assert (lab.addr(t.a), lab.addr(t.b)) == ("10.10.1.11", "10.10.2.11")
    assert lab.ping(t.relay, t.public_a) and lab.ping(t.relay, t.public_b)
    assert lab.ping(t.a, t.relay) and lab.ping(t.b, t.relay)
    # LAN hosts are not reachable from the core, nor from each other's LAN
    assert not lab.ping(t.relay, t.a, timeout=0.3)
    assert not lab.ping(t.core, t.b, timeout=0.3)
    assert not lab.ping(t.a, t.b, timeout=0.3)
    assert not lab.ping(t.nat_a, t.b, timeout=0.3)

    # A TTL-2 datagram crosses its own NAT and dies at the core; TTL 3 reaches the relay.
    rx = lab.open_socket(t.relay, bind=(t.relay_addr, 7000))
    tx = lab.open_socket(t.a)
    for ttl in (2, 3):
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        tx.sendto(b"ttl%d" % ttl, (t.relay_addr, 7000))
    assert [(d, src) for _, d, src in recv_all([rx], 0.5, want=1)] == [(b"ttl3", t.public_a)]
    assert recv_all([rx], 0.05) == []


def punch(lab: Lab, t: TwoNats, *, prime: bool, seconds: float = 1.0) -> tuple[bool, bool]:
    """One hole-punch trial between the two LAN hosts; return (a heard b, b heard a)."""
    stun = lab.open_socket(t.relay, bind=(t.relay_addr, STUN_PORT))
    sa = lab.open_socket(t.a, bind=("0.0.0.0", 40001))
    sb = lab.open_socket(t.b, bind=("0.0.0.0", 40002))
    seen: dict[str, tuple[str, int]] = {}
    for name, sock in (("a", sa), ("b", sb)):
        sock.sendto(b"who", (t.relay_addr, STUN_PORT))
        data, addr = stun.recvfrom(64) if select.select([stun], [], [], 1.0)[0] else (b"", ("", 0))
        assert data == b"who", f"{name} cannot reach the relay"
        seen[name] = addr
    if prime:  # three TTL-2 probes open each side's own NAT, then die at the core
        for sock, peer in ((sa, seen["b"]), (sb, seen["a"])):
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 2)
            for _ in range(3):
                sock.sendto(b"prime", peer)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
    heard = {sa: False, sb: False}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(heard.values()):  # 50 ms rounds, bounded
        sa.sendto(b"probe-a", seen["b"])
        sb.sendto(b"probe-b", seen["a"])
        for sock, data, _ in recv_all([sa, sb], 0.05):
            heard[sock] = heard[sock] or data.startswith(b"probe")
    for sock in (stun, sa, sb):
        sock.close()
    return heard[sa], heard[sb]


def test_hole_punch_needs_priming_between_eim_nats(netns_lab: MakeLab) -> None:
    lab = netns_lab()
    t = lab.two_nats("eim", "eim")
    # Without priming, a's first probe reaches b's NAT before b has sent anything: that NAT
    # records the inbound flow, so b's own mapping to a gets another port and both sides miss.
    assert punch(lab, t, prime=False, seconds=0.5) == (False, False)
    lab.flush_conntrack()
    assert punch(lab, t, prime=True) == (True, True)
    lab.flush_conntrack()
    assert punch(lab, t, prime=True) == (True, True)  # repeatable after a flush


def test_hole_punch_fails_through_symmetric_nat(netns_lab: MakeLab) -> None:
    lab = netns_lab()
    t = lab.two_nats("symmetric", "eim")
    assert punch(lab, t, prime=True, seconds=0.5) == (False, False)


def test_symmetric_nat_maps_each_destination_to_its_own_port(netns_lab: MakeLab) -> None:
    lab = netns_lab()
    t = lab.two_nats("symmetric", "eim")
    rx = [lab.open_socket(t.relay, bind=(t.relay_addr, port)) for port in (7001, 7002)]
    tx_a = lab.open_socket(t.a, bind=("0.0.0.0", 40001))
    tx_b = lab.open_socket(t.b, bind=("0.0.0.0", 40002))
    seen: dict[tuple[str, int], set[int]] = {}
    for tx in (tx_a, tx_b):
        for sock in rx:
            tx.sendto(b"x", sock.getsockname())
            _, addr = sock.recvfrom(16) if select.select([sock], [], [], 1.0)[0] else (b"", ("", 0))
            seen.setdefault(tx.getsockname(), set()).add(addr[1])
    assert len(seen[("0.0.0.0", 40001)]) == 2  # symmetric: one port per destination
    assert seen[("0.0.0.0", 40002)] == {40002}  # endpoint-independent: port preserved


def test_capture_on_relay_sees_the_datagram(netns_lab: MakeLab) -> None:
    lab = netns_lab()
    t = lab.two_nats()
    rx = lab.open_socket(t.relay, bind=(t.relay_addr, STUN_PORT))
    tx = lab.open_socket(t.a)
    with lab.capture(t.relay, f"udp port {STUN_PORT}", max_seconds=10) as cap:
        tx.sendto(b"plaintext?", (t.relay_addr, STUN_PORT))
        assert recv_all([rx], 1.0, want=1)
    grams = cap.udp()
    assert [(g.src, g.dst, g.dport, g.payload) for g in grams] == [
        (t.public_a, t.relay_addr, STUN_PORT, b"plaintext?")
    ]
    with open(cap.path, "rb") as fh:
        assert fh.read() == cap.data


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_teardown_removes_everything() -> None:
    started = time.monotonic()
    lab = Lab()
    lab.lan(2)
    lab.two_nats("eim", "symmetric")
    built = time.monotonic() - started
    proc = lab.popen("h1", [sys.executable, "-c", "import time; time.sleep(60)"])
    env = lab.run("h2", [sys.executable, "-c", "import os; print(os.environ['SPT_HOME'])"],
                  env={"SPT_HOME": "/tmp/x"})
    assert env.stdout == "/tmp/x\n"
    # a grandchild outside the lab's process group is still found (in the namespace) and stopped
    orphan = lab.popen("a1", ["sh", "-c", "sleep 60 & echo $!; wait"], start_new_session=False,
                       stdout=subprocess.PIPE, text=True)
    assert orphan.stdout is not None
    sleeper = int(orphan.stdout.readline())
    sock = lab.open_socket("relay", bind=(lab.addr("relay"), 5000))
    out = lab.run("b1", ["ip", "-o", "addr", "show", "eth0"]).stdout
    assert f"{lab.addr('b1')}/24" in out and lab.addr("b1") == "10.10.3.11"  # lan() took 10.10.1
    names = [n.ns for n in lab.nodes.values()]
    started = time.monotonic()
    lab.close()
    closed = time.monotonic() - started
    assert proc.poll() is not None and orphan.poll() is not None
    assert not alive(sleeper)  # the orphaned sleep was killed (a zombie until init reaps it)
    orphan.stdout.close()
    assert sock.fileno() == -1
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert not [n for n in names if n in listed]
    assert lab.prefix not in listed and lab.prefix not in links
    lab.close()  # idempotent
    print(f"built lan(2)+two_nats in {built:.3f} s, closed in {closed:.3f} s")
    assert built < 2.0 and closed < 5.0


def test_a_namespace_the_lab_did_not_make_is_left_alone(netns_lab: MakeLab) -> None:
    lab = netns_lab()
    foreign = f"{lab.prefix}-h2"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        with pytest.raises(netns.LabError, match="already exist"):
            lab.lan(2)
        lab.close()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
        assert foreign in listed.stdout
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True)


def test_self_check_builds_and_uses_every_tool() -> None:
    timings = netns.self_check()
    assert 0 < timings["self_check"] < 30


def test_cut_is_silent_symmetric_and_heals(netns_lab: MakeLab) -> None:
    lab = netns_lab()
    t = lab.two_nats("eim", "eim")
    assert lab.seen_as(t.a) == [lab.addr(t.a), t.public_a]
    rx_relay = lab.open_socket(t.relay, bind=(t.relay_addr, 7001))
    tx_a = lab.open_socket(t.a)
    tx_b = lab.open_socket(t.b)
    with lab.cut(t.a, t.relay) as cut:
        tx_a.sendto(b"lost", (t.relay_addr, 7001))  # no error for the sender: just silence
        assert recv_all([rx_relay], 0.3) == []
        tx_b.sendto(b"b still reaches the relay", (t.relay_addr, 7001))
        assert [d for _, d, _ in recv_all([rx_relay], 1.0, want=1)] == [b"b still reaches the relay"]
        assert cut.active
    assert not cut.active
    tx_a.sendto(b"healed", (t.relay_addr, 7001))
    assert [d for _, d, _ in recv_all([rx_relay], 1.0, want=1)] == [b"healed"]
    with lab.cut(t.a, t.relay, how="down"):
        assert not lab.ping(t.a, t.relay, timeout=0.3)
    assert lab.ping(t.a, t.relay) and lab.ping(t.relay, t.public_a)  # routes came back too
