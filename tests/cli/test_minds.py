"""Minds across real daemons (SPEC.md §2.8, §8.3, §3.6 `endpoint mind`).

Five nodes in `home`. `bob` runs on alpha and beta in one project; delta hosts `bob` hidden in
`home`, epsilon hosts it with `home` out of its sync scope. Concurrent communes on alpha and
beta converge to the same entries in the same order on both; delta's and epsilon's stores
receive no mind entry; gamma, creating `bob` afterwards, fetches the live tier.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pytest

from spt.testing.nodes import DEFAULT_CONFIG, fresh_code
from spt.testing.wait import wait_for

pytestmark = pytest.mark.slow

CONFIG = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 1.0\nanti_entropy = 1.0\n"
WAIT = 20.0


def bind(node, endpoint_id, cwd):
    """`spt ready ID --once --timeout 0.2` from `cwd`: creates (or binds) the perch there."""
    done = subprocess.run(
        [sys.executable, "-m", "spt", "ready", endpoint_id, "--once", "--timeout", "0.2"],
        cwd=cwd, env=node.env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr


def mind_rows(node):
    con = sqlite3.connect(f"file:{node.home / 'spt.db'}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute("SELECT count(*) FROM replicated WHERE kind='mind'").fetchone()[0]
    finally:
        con.close()


def entries(node, endpoint_id="bob", *flags):
    doc = node.json("endpoint", "mind", endpoint_id, *flags)
    live = [(e["id"], e["body"]) for e in doc["live"]]
    project = [(e["id"], e["body"]) for e in doc["project"]["entries"]] if doc["project"] else []
    return live, project


def folder(node, endpoint_id="bob"):
    return node.home / "endpoints" / endpoint_id


def test_concurrent_communes_converge_and_go_nowhere_else(spt_nodes, tmp_path):
    project = tmp_path / "proj"
    (project / ".spt").mkdir(parents=True)
    (project / ".spt" / "project").write_text("shared-project\n")
    a, b, c, d, e = (spt_nodes(n, label=n, config=CONFIG) for n in ("alpha", "beta", "gamma", "delta", "eps"))
    a.cli("subnet", "create", "home", check=True)
    for n in (b, c, d, e):
        n.cli("subnet", "join", "home", "--code", fresh_code(a, "home"), "--peer", a.address, check=True)
    for n in (a, b, d, e):
        bind(n, "bob", project)
    d.cli("endpoint", "visibility", "hide", "bob", "home", check=True)
    e.cli("endpoint", "sync-scope", "remove", "bob", "home", check=True)
    e_key = e.key
    wait_for(lambda: {r["node"]["key"] for s in a.json("endpoint", "list")["subnets"] for r in s["endpoints"]
                        if r["id"] == "bob"} >= {b.key, e_key}, WAIT, "alpha to see bob on beta and epsilon")

    # concurrent communes on both instances
    (folder(a) / "bob-commune.md").write_text("# live\nalpha: refactoring the parser\n# project\nalpha: parser uses PEG\n")
    (folder(b) / "bob-commune.md").write_text("# live\nbeta: writing tests\n# project\nbeta: tests live in t/\n")
    for n in (a, b):
        wait_for(lambda n=n: not (folder(n) / "bob-commune.md").exists(), WAIT, f"{n.name} to take its commune")
    want_live = {"alpha: refactoring the parser", "beta: writing tests"}
    want_project = {"alpha: parser uses PEG", "beta: tests live in t/"}

    def converged():
        ea, eb = entries(a), entries(b)
        return ea == eb and {x[1] for x in ea[0]} == want_live and {x[1] for x in ea[1]} == want_project and ea

    live, proj = wait_for(converged, WAIT, "alpha and beta to hold the same entries in the same order")
    assert len(live) == 2 and len(proj) == 2
    human = a.cli("endpoint", "mind", "bob", check=True).stdout
    assert human.startswith("<live-context>\n") and '<project-context project="shared-project">' in human
    assert human.index(live[0][1]) < human.index(live[1][1])  # HLC order, then id

    # gamma creates bob afterwards: its new instance fetches the live tier (and its project's)
    bind(c, "bob", project)
    wait_for(lambda: entries(c) == (live, proj), WAIT, "gamma's new instance to fetch bob's mind")

    # hidden on delta, out of scope on epsilon: after several anti-entropy rounds, nothing arrived
    time.sleep(3)
    assert mind_rows(d) == 0 and mind_rows(e) == 0
    assert entries(d) == ([], []) and entries(e) == ([], [])
    # a live entry written now is pushed to the instances in the sync set only
    (folder(a) / "bob-commune.md").write_text("# live\nalpha: done with the parser\n")
    wait_for(lambda: len(entries(c)[0]) == 3 and len(entries(b)[0]) == 3, WAIT, "the new live entry to reach beta and gamma")
    time.sleep(1.5)
    assert mind_rows(d) == 0 and mind_rows(e) == 0


def test_commune_rejections_fork_and_reading(spt_nodes, tmp_path):
    a = spt_nodes("alpha", label="alpha", config=CONFIG)
    a.cli("subnet", "create", "home", check=True)
    bind(a, "bob", tmp_path)
    bind(a, "carol", tmp_path)

    # malformed: not UTF-8 → renamed, a reason next to it, a commune-rejected notification
    (folder(a) / "bob-commune.md").write_bytes(b"# live\n\xff\xfe broken\n")
    rejected = folder(a) / "bob-commune.rejected.md"
    wait_for(rejected.exists, WAIT, "the malformed commune to be rejected")
    assert not (folder(a) / "bob-commune.md").exists()
    assert "UTF-8" in (folder(a) / "bob-commune.rejected.reason.txt").read_text()
    notes = wait_for(lambda: [n for n in a.json("notif", "list")["notifications"] if n["kind"] == "commune-rejected"], WAIT, "the commune-rejected notification")
    assert notes[0]["subnet"] == "home" and "UTF-8" in notes[0]["body"]

    # huge: refused unread, the daemon unharmed
    with open(folder(a) / "bob-commune.md", "wb") as fh:
        fh.truncate(64 * 1024 * 1024)  # sparse: 64 MiB of NULs
    wait_for(lambda: not (folder(a) / "bob-commune.md").exists(), WAIT, "the huge commune to be refused")
    assert "limit" in (folder(a) / "bob-commune.rejected.reason.txt").read_text()
    assert a.json("daemon", "status")["unread"] == 2
    nothing = a.cli("endpoint", "mind", "bob")
    assert nothing.returncode == 1 and nothing.stderr.startswith("NO_CONTEXT:bob")

    # a good one; text before the first heading goes to the project tier (here a local-only
    # project: a folder with neither .spt/project nor a git origin)
    (folder(a) / "bob-commune.md").write_text("I review code in this folder\n# live\nreviewing PR 7\n")
    wait_for(lambda: entries(a) != ([], []), WAIT, "bob's commune to be taken")
    assert [body for _, body in entries(a)[0]] == ["reviewing PR 7"]
    assert [body for _, body in entries(a)[1]] == ["I review code in this folder"]
    assert a.json("endpoint", "mind", "bob")["project"]["id"].startswith("local-")
    assert entries(a, "bob", "--tier", "live")[1] == []

    # fork seeds the new identity with a one-time copy that records its origin
    assert a.cli("endpoint", "fork", "bob", "bobby", check=True).stdout.startswith("FORKED:bobby")
    forked = a.json("endpoint", "mind", "bobby")["live"]
    source = a.json("endpoint", "mind", "bob")["live"]
    assert [e["body"] for e in forked] == [e["body"] for e in source]
    assert [e["forked_from"] for e in forked] == [f"bob:{e['id']}" for e in source]
    assert {e["id"] for e in forked}.isdisjoint({e["id"] for e in source})
    copied = a.json("endpoint", "mind", "bobby", "--project", str(tmp_path))["project"]["entries"]
    assert [e["body"] for e in copied] == ["I review code in this folder"]

    empty = a.cli("endpoint", "mind", "carol")
    assert empty.returncode == 1 and empty.stderr.startswith("NO_CONTEXT:carol")
    missing = a.cli("endpoint", "mind", "nobody")
    assert missing.returncode == 1 and missing.stderr.startswith("NO_PERCH:nobody")
