"""Reaching across networks in the netns lab (SPEC.md §7.3–7.7, §9.11–9.12; issue 6).

Two home LANs behind NATs, a routed core and a relay host (`spt.testing.netns`). Daemons run
inside the lab's namespaces; the CLI talks to them over their Unix sockets from here. Each
trial uses fresh nodes (fresh keys) and starts from flushed conntrack tables.

`ReachLab` is also what `bench/reach.py` drives.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spt.testing.netns import Lab, pcap_frames, udp_datagrams
from spt.testing.nodes import LabNode, fresh_code, stop_all
from spt.testing.traffic import listed
from spt.testing.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.relay]

NODE_PORT = 47470
RELAY_PORT = 47471


class ReachLab:
    """Two NATed LANs, a relay on the core, and nodes started in them."""

    def __init__(self, lab: Lab, kind_a: str = "eim", kind_b: str = "eim", *, hosts_per_lan: int = 1,
                 drop_unsolicited: bool = False) -> None:
        self.lab = lab
        self.topo = lab.two_nats(kind_a, kind_b, hosts_per_lan=hosts_per_lan,  # type: ignore[arg-type]
                                 drop_unsolicited=drop_unsolicited)
        self.root = Path(tempfile.mkdtemp(prefix="spt-reach-"))
        self.nodes: list[LabNode] = []
        self.relay_proc: subprocess.Popen[str] | None = None
        self.relay_url: str | None = None
        self.relay_log = self.root / "relay.log"
        self._count = 0

    def start_relay(self, *extra: str, timeout: float = 15.0) -> str:
        key_file = self.root / "relay.key"
        with open(self.relay_log, "a") as log:
            proc = self.lab.popen(
                "relay",
                [sys.executable, "-m", "spt", "relay", "serve", "--listen",
                 f"{self.topo.relay_addr}:{RELAY_PORT}", "--key-file", str(key_file), *extra],
                env={"SPT_HOME": str(self.root / "relayhome")}, stdout=subprocess.PIPE, stderr=log, text=True,
            )
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline and not line:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                line = proc.stdout.readline().strip()
            if proc.poll() is not None and not line:
                break
        if not line.startswith("RELAY_LISTENING:"):
            raise AssertionError(f"relay did not start: {line!r}\n{self.relay_log.read_text()}")
        self.relay_proc = proc
        self.relay_url = line.split(":", 1)[1]
        return self.relay_url

    def stop_relay(self) -> None:
        if self.relay_proc is not None and self.relay_proc.poll() is None:
            self.relay_proc.send_signal(signal.SIGTERM)
            self.relay_proc.wait(10)

    def node(self, host: str, *, relays: list[str] | None = None, env: dict[str, str] | None = None,
             mdns: bool = False, label: str | None = None) -> LabNode:
        self._count += 1
        name = label or f"n{self._count}"
        home = self.root / name
        home.mkdir(mode=0o700)
        urls = relays if relays is not None else ([self.relay_url] if self.relay_url else [])
        (home / "config.toml").write_text(
            f"[node]\nlabel = \"{name}\"\n\n[net]\nport = {NODE_PORT}\n\n"
            f"[discovery]\nmdns = {'true' if mdns else 'false'}\n\n"
            "[timing]\npresence_interval = 1.0\n\n"
            f"[relay]\nurls = {json.dumps(urls)}\n"
        )
        node_env = {k: v for k, v in os.environ.items() if not k.startswith("SPT_")}
        node_env.update({"SPT_HOME": str(home), "SPT_NO_AUTOSTART": "1", "SPT_NO_SUDO": "1"})
        node_env.update(env or {})
        node = LabNode(self.lab, host, name, home, node_env)
        self.nodes.append(node)
        node.start()
        return node

    def pair(self, subnet: str, *, join_args: tuple[str, ...] = ()) -> tuple[LabNode, LabNode, float]:
        """Fresh nodes on a1 and b1; a1 creates `subnet`, b1 joins it by rendezvous. Returns the
        join's wall time too."""
        a = self.node(self.topo.a)
        b = self.node(self.topo.b)
        a.cli("subnet", "create", subnet, check=True)
        code = fresh_code(a, subnet, margin=6)  # a join that starts near the 30-s step is not caught by it
        started = time.monotonic()
        joined = b.cli("subnet", "join", subnet, "--code", code, "--timeout", "20", *join_args, timeout=60)
        elapsed = time.monotonic() - started
        assert joined.returncode == 0, f"{joined.stdout}{joined.stderr}\n--- a\n{a.log()}\n--- b\n{b.log()}"
        return a, b, elapsed

    def stop_nodes(self) -> None:
        stop_all(self.nodes)
        self.nodes.clear()

    def close(self) -> None:
        self.stop_nodes()
        self.stop_relay()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def reach(netns_lab: Callable[..., Lab]) -> Iterator[Callable[..., ReachLab]]:
    made: list[ReachLab] = []

    def make(kind_a: str = "eim", kind_b: str = "eim", *, hosts_per_lan: int = 1,
             drop_unsolicited: bool = False) -> ReachLab:
        rl = ReachLab(netns_lab(), kind_a, kind_b, hosts_per_lan=hosts_per_lan, drop_unsolicited=drop_unsolicited)
        made.append(rl)
        return rl

    yield make
    for rl in made:
        rl.close()


def logs(*nodes: LabNode) -> str:
    return "\n".join(f"--- {n.name}\n" + "\n".join(n.log().splitlines()[-60:]) for n in nodes)


def start_listener(node: LabNode, endpoint_id: str) -> subprocess.Popen[str]:
    proc = node.popen("ready", endpoint_id)
    assert proc.stderr is not None and proc.stderr.readline().strip() == f"READY:{endpoint_id}"
    return proc


def send_and_receive(sender: LabNode, receiver: LabNode, endpoint_id: str, text: str, timeout: float = 20.0) -> float:
    """`spt send` from `sender` reaches a `spt ready` listener on `receiver`; seconds taken."""
    listener = start_listener(receiver, endpoint_id)
    try:
        wait_for(lambda: listed(sender, endpoint_id), timeout, f"{endpoint_id}'s row on {sender.name}")
        started = time.monotonic()
        sent = sender.cli("send", endpoint_id, "--from", "alice", input=text, timeout=timeout)
        # QUEUED when the path was still being set up (a loaded machine): it must arrive all the same
        assert sent.returncode == 0 and sent.stdout in (f"SENT:{endpoint_id}\n", f"QUEUED:{endpoint_id}\n"), \
            f"{sent.stdout}{sent.stderr}"
        assert listener.stdout is not None
        ready, _, _ = select.select([listener.stdout], [], [], timeout)
        assert ready, "the listener got nothing"
        line = listener.stdout.readline()
        assert text in line, line
        return time.monotonic() - started
    finally:
        listener.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            listener.wait(10)


def path_kind(node: LabNode) -> str:
    path = node.path()
    return str(path["kind"]) if path else "?"


def wait_settled(node: LabNode, timeout: float = 20.0) -> dict[str, Any]:
    """The path once punching has finished one way or the other."""

    def settled() -> dict[str, Any] | None:
        path = node.path()
        if path and (path["kind"] == "direct punched" or (path["kind"].startswith("relayed") and path["reason"] != "punching")):
            return path
        return None

    return wait_for(settled, timeout, f"{node.name}'s path to settle")


# --- paths across NATs ----------------------------------------------------------------------------


def test_two_eim_nats_join_by_rendezvous_and_end_direct_ten_times(reach):
    rl = reach("eim", "eim")
    rl.start_relay()
    outcomes = []
    for trial in range(10):
        rl.lab.flush_conntrack()
        a, b, _ = rl.pair(f"home{trial}")
        try:
            paths = (wait_settled(a), wait_settled(b))
            outcomes.append(tuple(p["kind"] for p in paths))
            assert all(p["kind"] == "direct punched" for p in paths), f"trial {trial}: {paths}\n{logs(a, b)}"
            assert paths[0]["addr"] == f"{rl.topo.public_b}:{47470}"
            assert paths[1]["addr"] == f"{rl.topo.public_a}:{47470}"
            if trial == 0:
                send_and_receive(a, b, "bob", "hello over the punched path")
        finally:
            rl.stop_nodes()
    assert outcomes == [("direct punched", "direct punched")] * 10


def test_a_symmetric_nat_stays_relayed_and_messages_flow_ten_times(reach):
    rl = reach("eim", "symmetric")
    rl.start_relay()
    for trial in range(10):
        rl.lab.flush_conntrack()
        a, b, _ = rl.pair(f"home{trial}")
        try:
            for node in (a, b):
                path = wait_settled(node)
                assert path["kind"] == f"relayed {rl.topo.relay_addr}:47471", f"trial {trial}: {path}\n{logs(a, b)}"
                assert path["reason"] == "symmetric-nat" and path["via"] == f"{rl.topo.relay_addr}:47471"
                assert path["addr"] == f"{rl.topo.relay_addr}:47471"  # the address in use: the relay's
            send_and_receive(a, b, f"bob{trial}", f"hello over the relay {trial}")
        finally:
            rl.stop_nodes()


def test_the_relay_never_sees_a_plaintext_marker(reach):
    rl = reach("eim", "symmetric")
    rl.start_relay()
    a, b, _ = rl.pair("home")
    assert wait_settled(a)["kind"].startswith("relayed")
    marker = "SPT-PLAINTEXT-MARKER-7f3a9c"
    with rl.lab.capture(rl.topo.relay, "udp") as cap:
        send_and_receive(a, b, "bob", marker + " " + "m" * 3000 + " " + marker)
        cap.stop()
    datagrams = cap.udp()
    relayed = [d for d in datagrams if d.payload[:1] in (b"\x01", b"\x02")]
    assert len(relayed) > 5, "the message did not cross the relay"
    assert not any(marker.encode() in d.payload for d in datagrams)
    assert not any(marker.encode()[:12] in d.payload for d in datagrams)


def test_nodes_register_again_after_the_relay_is_killed_and_restarted(reach):
    rl = reach("eim", "symmetric")
    rl.start_relay()
    a, b, _ = rl.pair("home")
    assert wait_settled(a)["kind"].startswith("relayed")
    assert rl.relay_proc is not None
    rl.relay_proc.kill()
    rl.relay_proc.wait(10)
    rl.start_relay()  # same key file, same port: same URL; it remembers nothing
    for node in (a, b):
        wait_for(lambda n=node: n.json("relay", "list")["relays"][0]["state"] == "registered", 40.0,
                 f"{node.name} registered again")
    send_and_receive(a, b, "bob", "after the relay restarted", timeout=60.0)


# --- the relay's gate --------------------------------------------------------------------------


def test_an_allow_list_relay_takes_listed_keys_only_and_relay_add_follows(reach):
    rl = reach("eim", "eim")
    a = rl.node(rl.topo.a, relays=[])
    b = rl.node(rl.topo.b, relays=[])
    allow = rl.root / "allow"
    allow.write_text(f"# only a\n{a.key}\n")
    url = rl.start_relay("--allow", str(allow))
    for node in (a, b):
        added = node.cli("relay", "add", url)
        assert added.stdout == f"RELAY_ADDED:{url}\n", added.stderr
    wait_for(lambda: a.json("relay", "list")["relays"][0]["state"] == "registered", 10.0, "a registered")
    state = wait_for(lambda: (s := b.json("relay", "list")["relays"][0]["state"]) != "connecting" and s, 10.0, "b refused")
    assert "allow-list" in state
    assert b.json("relay", "list")["relays"][0]["reachable"] is False
    removed = b.cli("relay", "remove", url)
    assert removed.stdout == f"RELAY_REMOVED:{url}\n"
    assert b.json("relay", "list")["relays"] == []


def test_the_relay_forwards_nothing_for_a_node_that_did_not_prove_its_key(reach):
    """A guessed token, and a's real token replayed from another address, are both dropped."""
    rl = reach("eim", "eim")
    rl.start_relay()
    a = rl.node(rl.topo.a)
    b = rl.node(rl.topo.b)
    wait_for(lambda: a.json("relay", "list")["relays"][0]["state"] == "registered", 10.0, "a registered")
    with rl.lab.capture(rl.topo.relay, "udp port 47471") as cap:
        # a's own relayed traffic shows its token: a dial of b through the relay
        a.cli("subnet", "create", "home", check=True)
        code = fresh_code(a, "home", margin=6)  # a join that starts near the 30-s step is not caught by it
        assert b.cli("subnet", "join", "home", "--code", code, "--timeout", "20").returncode == 0
        time.sleep(1.0)
        cap.stop()
    sent_by_a = [d.payload for d in cap.udp() if d.payload[:1] == b"\x01" and d.src == rl.topo.public_a]
    assert sent_by_a, "a sent nothing through the relay"
    stolen = sent_by_a[0][33:49]
    b_key = bytes.fromhex(b.key)
    sock = rl.lab.open_socket(rl.topo.b, bind=("0.0.0.0", 40000))
    with rl.lab.capture(rl.topo.b, "udp port 47470") as cap_b:
        for token in (os.urandom(16), stolen):
            sock.sendto(b"\x01" + b_key + token + b"\x40" + os.urandom(200), (rl.topo.relay_addr, 47471))
        notices = []
        sock.settimeout(2.0)
        with contextlib.suppress(TimeoutError):
            for _ in range(2):
                notices.append(sock.recv(64))
        time.sleep(0.5)
        cap_b.stop()
    assert notices and all(n == b"\x03\x01" for n in notices)  # "register first"
    delivered = [d.payload for d in cap_b.udp() if d.payload[:1] == b"\x02" and len(d.payload) == 1 + 32 + 201]
    assert delivered == []


# --- the air gap (§7.7, §9.12) ---------------------------------------------------------------


def ipv4_destinations(pcap: bytes) -> list[tuple[str, str, int]]:
    """(source, destination, protocol) of every IPv4 packet in an Ethernet capture."""
    import socket

    linktype, frames = pcap_frames(pcap)
    assert linktype == 1, linktype
    out = []
    for frame in frames:
        if frame[12:14] != b"\x08\x00" or len(frame) < 34:
            continue
        ip = frame[14:]
        out.append((socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), ip[9]))
    return out


def test_without_the_relay_plugin_nothing_goes_beyond_members_and_mdns(reach):
    rl = reach("eim", "eim", hosts_per_lan=3)
    url = rl.start_relay()  # configured on both nodes, and running: it must still hear nothing
    lab = rl.lab
    hosts = lab.lans[rl.topo.lan_a].hosts
    h1, h2 = hosts[0], hosts[1]
    members = {lab.addr(h1), lab.addr(h2)}
    gap = {"SPT_DISABLE_PLUGINS": "relay"}
    caps = [lab.capture(h, "ip", iface="eth0") for h in (h1, h2)]
    relay_cap = lab.capture(rl.topo.relay, "udp")
    try:
        a = rl.node(h1, relays=[url], env=gap, mdns=True)
        plugins = {p["name"]: p["status"] for p in a.json("plugins", "list")["plugins"]}
        assert plugins["relay"] == "blocked"
        a.cli("subnet", "create", "home", check=True)
        code = fresh_code(a, "home", margin=6)  # a join that starts near the 30-s step is not caught by it
        b = rl.node(h2, relays=[url], env=gap, mdns=True)
        # mDNS runs (adverts, browsing) on both nodes; the join names a's address as a configured
        # peer, because mDNS alone finds a only most of the time in this lab (an mDNS backend
        # issue reported separately)
        joined = b.cli("subnet", "join", "home", "--code", code, "--timeout", "20", "--peer",
                       f"{lab.addr(h1)}:47470", timeout=60)
        assert joined.returncode == 0, joined.stdout + joined.stderr + logs(a, b)
        assert wait_for(lambda: path_kind(b).startswith("direct"), 20.0, "a direct LAN path")
        send_and_receive(a, b, "bob", "air-gapped hello")
        assert b.cli("relay", "list").returncode != 0  # the command is gone with the plugin
    finally:
        pcaps = [c.stop() for c in caps]
        relay_pcap = relay_cap.stop()
    seen = [p for pcap in pcaps for p in ipv4_destinations(pcap)]
    assert seen, "the capture saw nothing"
    allowed = members | {"224.0.0.251", "224.0.0.22"}
    stray = sorted({(src, dst, proto) for src, dst, proto in seen if dst not in allowed})
    assert stray == [], f"packets to non-members: {stray}"
    assert udp_datagrams(relay_pcap) == []
