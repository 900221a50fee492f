"""The air gap (SPEC §7.7, §9.12; issue 11 must-show 5): a build without the relay distribution
sends unicast only to members, plus link-local mDNS, whatever its configuration names.

`scripts/airgap.sh` runs this (and a representative part of the suite) in a virtualenv where
`spt-relay-fallback` is not installed at all; in the ordinary virtualenv the same test runs with
the plugin disabled (`SPT_DISABLE_PLUGINS=relay`), so both builds are covered.
"""

from __future__ import annotations

import importlib.util
import socket
import time

import pytest

from spt.testing.netns import pcap_frames
from spt.testing.nodes import LabNodes, fresh_code
from spt.testing.traffic import Listener, check_stream

pytestmark = [pytest.mark.lab, pytest.mark.slow]

RELAY_INSTALLED = importlib.util.find_spec("spt_relay_fallback") is not None
UPDATE_SOURCE = "http://10.200.3.2:8080/releases"  # a non-member: nothing may ever go there


def ipv4_packets(pcap: bytes) -> list[tuple[str, str, int]]:
    """(source, destination, protocol) of every IPv4 packet in an Ethernet capture."""
    linktype, frames = pcap_frames(pcap)
    assert linktype == 1, linktype
    return [(socket.inet_ntoa(f[26:30]), socket.inet_ntoa(f[30:34]), f[23])
            for f in frames if f[12:14] == b"\x08\x00" and len(f) >= 34]


def test_the_air_gapped_build_sends_only_to_members_and_mdns(netns_lab):
    lab = netns_lab()
    t = lab.two_nats("eim", "eim", hosts_per_lan=2)
    h1, h2 = lab.lans[t.lan_a].hosts[:2]
    members = {lab.addr(h1), lab.addr(h2)}
    relay_url = f"spt-relay://{t.relay_addr}:47471#{'ab' * 32}"  # configured, never to be used
    config = (f'\n[discovery]\nmdns = true\n\n[relay]\nurls = ["{relay_url}"]\n\n'
              f'[update]\nsource = "{UPDATE_SOURCE}"\n')
    nodes = LabNodes(lab, config="")
    nodes.config = nodes.config.replace("[discovery]\nmdns = false\n", "") + config
    env = {} if not RELAY_INSTALLED else {"SPT_DISABLE_PLUGINS": "relay"}
    caps = [lab.capture(h, "ip", iface="eth0") for h in (h1, h2)]
    outside = lab.capture(t.relay, "")  # the core side: the relay host hears nothing at all
    try:
        a = nodes(h1, env=env)
        b = nodes(h2, env=env)
        plugins = {p["name"]: p["status"] for p in a.json("plugins", "list")["plugins"]}
        if RELAY_INSTALLED:
            assert plugins["relay"] == "blocked"
        else:
            assert "relay" not in plugins, plugins
            assert a.cli("relay", "list").returncode != 0  # the command went with the plugin
        a.cli("subnet", "create", "home", check=True)
        b.cli("subnet", "join", "home", "--code", fresh_code(a, "home"), "--peer", a.lab_address,
              "--timeout", "20", check=True)
        listener = Listener(b, "bob")
        try:
            deadline = time.monotonic() + 20
            while not any(e["id"] == "bob" for s in a.json("endpoint", "list")["subnets"] for e in s["endpoints"]):
                assert time.monotonic() < deadline, "bob's row never reached a"
                time.sleep(0.2)
            for i in range(20):
                a.ipc("msg.send", {"address": "bob", "from": "alice", "body": f"gap{i:05d}"})
            deadline = time.monotonic() + 20
            while len(listener.bodies("gap")) < 20 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            listener.close()
        check_stream(listener.bodies("gap"), "gap", range(20))
        time.sleep(2.0)  # presence, sync and any periodic check get their turn on the wire
    finally:
        pcaps = [c.stop() for c in caps]
        heard_outside = outside.stop()
    seen = [p for pcap in pcaps for p in ipv4_packets(pcap)]
    assert len(seen) > 50, "the capture saw too little to mean anything"
    allowed = members | {"224.0.0.251", "224.0.0.22"}
    stray = sorted({(src, dst, proto) for src, dst, proto in seen if dst not in allowed})
    assert stray == [], f"packets to non-members: {stray}"
    assert pcap_frames(heard_outside)[1] == [], "something reached the relay host on the core"
