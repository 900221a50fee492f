"""Endpoints and subnets on one node: homing, HOME_REFUSED, visibility, sync scope, listing.

`spt subnet create` is elevated; CI runs as root. Without root these tests skip.
"""


import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,  # spt subnet create needs an elevated caller
]


def create(node, name):
    result = node.cli("subnet", "create", name, "--allow-duplicate-name")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_homing_home_refused_visibility_and_scope(spt_nodes):
    node = spt_nodes("h")
    early = node.cli("ready", "early", "--once", "--timeout", "0")
    assert early.stdout == "TIMEOUT\n"
    assert node.json("endpoint", "list")["local"][0]["home"] is None  # homeless, local-only

    assert "HOMED:early home\n" in create(node, "home")
    doc = node.json("endpoint", "list")
    assert doc["local"][0]["home"] == "home"
    assert doc["local"][0]["visible_in"] == ["home"] and doc["local"][0]["scope"] == ["home"]
    [sub] = doc["subnets"]
    assert sub["name"] == "home" and len(sub["id"]) == 32
    [row] = sub["endpoints"]
    assert set(row) == {"id", "home", "node", "state", "ready", "alive", "hosted", "description", "offline_reason"}
    assert row["id"] == "early" and row["home"] == "home" and row["state"] == "active"
    assert row["node"]["key"] == node.key and set(row["node"]) == {"label", "key"}
    assert node.json("subnet", "status")["subnets"][0]["endpoints"] == 1

    assert "HOMED:" not in create(node, "work")
    refused = node.cli("ready", "newbie", "--once", "--timeout", "0")
    assert refused.returncode == 1
    assert refused.stderr == "HOME_REFUSED: this node holds 2 subnets (home, work); pass --subnet <name>\n"
    assert node.cli("endpoint", "fork", "early", "twin").stderr.startswith("HOME_REFUSED:")
    homed = node.cli("ready", "newbie", "--subnet", "work", "--once", "--timeout", "0")
    assert homed.stdout == "TIMEOUT\n"
    assert node.cli("ready", "early", "--once", "--timeout", "0").returncode == 0  # a re-bind keeps its home

    assert (
        node.cli("endpoint", "visibility", "list", "early").stdout
        == "home  visible  home  in-scope\nwork  hidden\n"
    )
    assert node.cli("send", "work:early", input="x").stderr.startswith("NO_PERCH:work:early")
    assert node.cli("endpoint", "visibility", "show", "early", "work").stdout == "VISIBLE:early work\n"
    assert node.cli("send", "work:early", input="via work").stdout == "QUEUED:work:early\n"
    vis = node.json("endpoint", "visibility", "list", "early")
    assert vis["subnets"][1] == {"subnet": "work", "visible": True, "home": False, "in_scope": False}
    assert node.cli("endpoint", "visibility", "hide", "early", "work").stdout == "HIDDEN:early work\n"
    listed = {s["name"]: [r["id"] for r in s["endpoints"]] for s in node.json("endpoint", "list")["subnets"]}
    assert listed == {"home": ["early"], "work": ["newbie"]}
    only_work = node.json("endpoint", "list", "--subnet", "work")["subnets"]
    assert [s["name"] for s in only_work] == ["work"]

    added = node.cli("endpoint", "sync-scope", "add", "early", "work")
    assert added.stdout == "SCOPE_ADDED:early work\n" and "hidden" in added.stderr
    assert (
        node.cli("endpoint", "sync-scope", "list", "early").stdout == "home\nwork  (hidden: nothing syncs)\n"
    )
    scope = node.json("endpoint", "sync-scope", "list", "early")
    assert scope["scope"] == ["home", "work"] and scope["effective"] == ["home"]
    assert (
        node.cli("endpoint", "sync-scope", "remove", "early", "work").stdout == "SCOPE_REMOVED:early work\n"
    )
    assert node.cli("endpoint", "visibility", "hide", "early", "nowhere").stderr.startswith(
        "NO_SUCH_SUBNET:nowhere"
    )

    assert (
        node.cli("endpoint", "fork", "early", "twin", "--subnet", "work").stdout == "FORKED:twin from=early\n"
    )
    twin = next(p for p in node.json("endpoint", "list")["local"] if p["id"] == "twin")
    assert (twin["home"], twin["state"], twin["visible_in"]) == ("work", "unbound", ["work"])
    held = node.cli("ready", "early", "--once").stdout
    assert held.count("\n") == 1 and held.endswith(">via work</EVENT>\n")
