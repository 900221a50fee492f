"""The relay with real daemons on loopback: `spt relay serve/add/list/remove`, rendezvous joins."""

import json
import time

import pytest

from spt.testing.nodes import DEFAULT_CONFIG, fresh_code
from spt.testing.wait import wait_for

pytestmark = pytest.mark.slow


def test_relay_add_list_remove_edit_the_config_and_the_daemon_follows(spt_nodes, relay_url):
    node = spt_nodes("n")
    assert node.cli("relay", "list").stdout.startswith("(no relays: add one with spt relay add URL")
    added = node.cli("relay", "add", relay_url)
    assert (added.returncode, added.stdout) == (0, f"RELAY_ADDED:{relay_url}\n")
    assert relay_url in (node.home / "config.toml").read_text()
    assert "mdns = false" in (node.home / "config.toml").read_text()
    relay = wait_for(lambda: (r := node.json("relay", "list")["relays"]) and r[0]["reachable"] and r[0])
    assert relay["url"] == relay_url and relay["state"] == "registered" and relay["source"] == "local"
    assert relay["reflexive"].startswith("127.0.0.1:") and relay["mapping"] == "endpoint-independent"
    removed = node.cli("relay", "remove", relay_url)
    assert removed.stdout == f"RELAY_REMOVED:{relay_url}\n"
    assert node.json("relay", "list")["relays"] == []
    again = node.cli("relay", "remove", relay_url)
    assert again.returncode == 1 and again.stderr.startswith("NOT_CONFIGURED:")
    bad = node.cli("relay", "add", "spt-relay://127.0.0.1:1#nothex")
    assert bad.returncode != 0 and "RELAYKEYHEX" in bad.stderr


@pytest.mark.root  # creates a subnet (elevated)
def test_a_join_finds_the_member_by_rendezvous_at_the_relay(spt_nodes, relay_url):
    config = DEFAULT_CONFIG + f"\n[relay]\nurls = {json.dumps([relay_url])}\n"
    a = spt_nodes("a", config=config, label="alpha")
    b = spt_nodes("b", config=config, label="beta")
    a.cli("subnet", "create", "home", check=True)
    code = fresh_code(a, "home", margin=6)  # a join that starts near the 30-s step is not caught by it
    wait_for(lambda: b.json("relay", "list")["relays"][0]["reachable"])
    joined = b.cli("subnet", "join", "home", "--code", code, "--timeout", "15")  # no --peer, no mDNS
    assert joined.stdout == "JOINED:home\n", joined.stderr


def test_a_join_that_reaches_the_member_by_two_paths_at_once_completes(spt_nodes, relay_url):
    # --peer (direct) and the relay's rendezvous (relayed) both find alpha: two join hellos to one
    # member at once, which once waited on each other until a 15-s stream timeout
    config = DEFAULT_CONFIG + f"\n[relay]\nurls = {json.dumps([relay_url])}\n"
    a = spt_nodes("a", config=config, label="alpha")
    b = spt_nodes("b", config=config, label="beta")
    a.cli("subnet", "create", "home", check=True)
    wait_for(lambda: all(n.json("relay", "list")["relays"][0]["reachable"] for n in (a, b)))
    started = time.monotonic()
    joined = b.cli("subnet", "join", "home", "--code", fresh_code(a, "home", margin=6), "--peer", a.address,
                   "--timeout", "20")
    assert joined.stdout == "JOINED:home\n", joined.stderr
    assert time.monotonic() - started < 10
