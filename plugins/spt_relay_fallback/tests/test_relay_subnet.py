"""Relays belong to the subnet (SPEC.md §7.6, issue 15): real daemons and a real relay on loopback.

A relay added on one member reaches the others through its signed presence (and the join
bundle); a member that removes it locally keeps it removed; a relay announced only by a member
that is then pruned is dropped everywhere.
"""

import json
import time

import pytest
from test_relay_nodes import wait_for

from spt.testing.nodes import DEFAULT_CONFIG, fresh_code

pytestmark = pytest.mark.slow


def relays(node):
    return {r["url"]: r for r in node.json("relay", "list")["relays"]}


def test_a_relay_added_on_one_member_reaches_the_others_and_a_local_removal_sticks(spt_nodes, relay_url):
    a, b, c = spt_nodes.subnet(["alpha", "beta", "gamma"])
    assert relays(b) == {}
    added = c.cli("relay", "add", relay_url)
    assert added.stdout == f"RELAY_ADDED:{relay_url}\n"
    # b and a learn it from c's presence and register with it, without a command of their own
    seen = wait_for(lambda: (r := relays(b).get(relay_url)) and r["reachable"] and r, timeout=15)
    assert seen["source"] == "subnet" and seen["state"] == "registered"
    assert wait_for(lambda: relays(a).get(relay_url, {}).get("source") == "subnet", timeout=15)
    assert relay_url not in (b.home / "config.toml").read_text()  # learned, not written into b's config

    removed = b.cli("relay", "remove", relay_url)
    assert removed.stdout == f"RELAY_REMOVED:{relay_url}\n", removed.stderr
    assert relays(b)[relay_url]["state"] == "removed locally"
    c.cli("relay", "add", relay_url, check=True)  # c announces it again: b's choice still holds
    b.cli("daemon", "stop", check=True)
    b.start()
    for _ in range(3):  # several rounds of the 2-s look at what the subnet announces
        assert relays(b)[relay_url]["state"] == "removed locally"
        time.sleep(2.1)
    # and `relay add` on b takes it back, as b's own now
    b.cli("relay", "add", relay_url, check=True)
    assert wait_for(lambda: relays(b).get(relay_url, {}).get("source") == "local", timeout=10)


def test_the_join_bundle_carries_the_subnets_relays_and_a_pruned_members_relay_is_dropped(spt_nodes, relay_url):
    a, c = spt_nodes.subnet(["alpha", "gamma"])
    c.cli("relay", "add", relay_url, check=True)
    wait_for(lambda: relays(a).get(relay_url, {}).get("source") == "subnet", timeout=15)
    # a newcomer joins through a (not c): a's bundle hands it c's relay; it never talked to c yet
    b = spt_nodes("beta", label="beta")
    b.cli("subnet", "join", "home", "--code", fresh_code(a, "home"), "--peer", a.address, check=True)
    assert wait_for(lambda: relays(b).get(relay_url, {}).get("source") == "subnet", timeout=10)

    pruned = a.cli("subnet", "prune", "gamma", "--subnet", "home", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    for node in (a, b):
        assert wait_for(lambda n=node: relay_url not in relays(n), timeout=15), relays(node)
    # a restart does not bring it back from the durable book: only current members count
    b.cli("daemon", "stop", check=True)
    b.start()
    assert relay_url not in relays(b)


def test_a_relay_learned_from_one_subnet_hears_nothing_of_the_nodes_other_subnets(spt_nodes, relay_url):
    """SPEC.md §9.13: a relay run by a member of `work` must not learn that this node serves
    `home`: the node registers its `work` rendezvous tag there, not `home`'s."""
    a, c = spt_nodes.subnet(["alpha", "gamma"], "work")
    a.cli("subnet", "create", "home", check=True)
    c.cli("relay", "add", relay_url, check=True)
    seen = wait_for(lambda: (r := relays(a).get(relay_url)) and r["reachable"] and r, timeout=15)
    assert seen["source"] == "subnet" and seen["subnets"] == ["work"]
    # a stranger at the same relay looks both names up by rendezvous (no --peer, no mDNS)
    config = DEFAULT_CONFIG + f"\n[relay]\nurls = {json.dumps([relay_url])}\n"
    e = spt_nodes("eve", config=config, label="eve")
    wait_for(lambda: (r := relays(e).get(relay_url)) and r["reachable"], timeout=15)
    home = e.cli("subnet", "join", "home", "--code", "000000", "--timeout", "3", timeout=30)
    assert home.returncode == 1 and home.stderr.startswith("JOIN_NOT_FOUND:home"), home.stderr
    work = e.cli("subnet", "join", "work", "--code", "000000", "--timeout", "3", timeout=30)
    assert work.stderr.startswith("JOIN_REJECTED:work"), work.stderr  # found there; the code was wrong
