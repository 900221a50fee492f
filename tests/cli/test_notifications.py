"""Notifications across real daemons (SPEC.md §8.4, §3.5 `subnet notify`, §3.8 `notif`).

Three nodes in one subnet. The user's last interactive command runs on gamma (a real terminal:
the CLI under a pseudo-terminal), so a notification raised on alpha shows on gamma only, once:
gamma runs `notifications.command` and prints the banner, the others record nothing. An ack on
beta clears it everywhere, and a node that was down during the ack learns it when it returns.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from spt.testing.nodes import DEFAULT_CONFIG
from spt.testing.wait import wait_for

pytestmark = pytest.mark.slow

WAIT = 15.0


def interactive(node, *args):
    """Run `spt ARGS` with stdin and stderr on a terminal (SPEC.md §3.1 "interactive");
    returns (exit code, stdout, what the terminal showed)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "spt", *args], stdin=slave, stderr=slave, stdout=subprocess.PIPE,
            env=node.env, timeout=60, check=False,
        )
        os.close(slave)
        slave = -1
        shown = b""
        for _ in range(1000):  # bounded: the child is gone, only its buffered output is left
            ready, _, _ = select.select([master], [], [], 0.05)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        return proc.returncode, proc.stdout.decode(), shown.decode(errors="replace")
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)


def shown_file(node):
    return node.home / "shown.txt"


def config_for(home):
    return DEFAULT_CONFIG + f'\n[notifications]\ncommand = "echo {{notif_id}} {{notif_title}} >> {home}/shown.txt"\n'


def listed(node, *flags):
    return node.json("notif", "list", *flags)["notifications"]


@pytest.fixture
def trio(spt_nodes):
    nodes = []
    for name, label in (("a", "alpha"), ("b", "beta"), ("c", "gamma")):
        home = spt_nodes._root / name
        nodes.append(spt_nodes(name, label=label, config=config_for(home)))
    a, b, c = nodes
    a.cli("subnet", "create", "home", check=True)
    from spt.testing.nodes import fresh_code

    for n in (b, c):
        n.cli("subnet", "join", "home", "--code", fresh_code(a, "home"), "--peer", a.address, check=True)
    for n in nodes:
        wait_for(lambda n=n: all(m["online"] for m in n.json("subnet", "status", "--nodes")["subnets"][0]["members"])
            and len(n.json("subnet", "status", "--nodes")["subnets"][0]["members"]) == 3, WAIT, f"{n.name} to see all three online")
    return a, b, c


def test_a_notification_surfaces_once_where_the_user_was_and_an_ack_anywhere_clears_it(trio):
    a, b, c = trio
    code, _, _ = interactive(c, "whoami")  # the user's last command ran on gamma
    assert code == 0
    c_key = c.key
    # gamma's activity reaches alpha in its presence before the notification is raised
    wait_for(lambda: _activity(a, c_key), WAIT, "alpha to learn gamma's activity from its presence")
    assert _activity(a, a.key) is None and _activity(c, c_key)

    raised = a.cli("subnet", "notify", "--title", "disk nearly full", input="only 2% left on /\n")
    assert raised.returncode == 0, raised.stderr
    assert raised.stdout.startswith("NOTIFIED:")
    notif_id = raised.stdout.strip().split(":", 1)[1]
    assert len(notif_id) == 32

    # every member holds it; gamma showed it (ran notifications.command) and recorded surfaced_at
    for n in (a, b, c):
        rows = wait_for(lambda n=n: listed(n), WAIT, f"{n.name} to hold the notification")
        assert [(r["id"], r["kind"], r["title"], r["body"], r["subnet"]) for r in rows] == [
            (notif_id, "user", "disk nearly full", "only 2% left on /", "home")
        ]
    wait_for(lambda: shown_file(c).exists() and notif_id in shown_file(c).read_text(), WAIT, "gamma to run the command")
    for n in (a, b, c):
        wait_for(lambda n=n: listed(n)[0]["surfaced_at"] == c_key, WAIT, f"{n.name} to learn where it surfaced")
    time.sleep(2.5)  # two surfacing rounds: nobody else shows it
    assert not shown_file(a).exists() and not shown_file(b).exists()
    assert shown_file(c).read_text().count(notif_id) == 1
    assert a.json("daemon", "status")["unread"] == 1

    # gamma's next interactive command prints the one-line banner; the one after does not (10 min)
    _, _, terminal = interactive(c, "whoami")
    assert "spt: 1 unread notification \u2014 spt notif list" in terminal, terminal
    _, _, terminal = interactive(c, "whoami")
    assert "unread notification" not in terminal

    # human list; an ack on beta clears it everywhere
    human = c.cli("notif", "list", check=True).stdout
    assert human.splitlines()[0].startswith(f"{notif_id[:8]}  ") and "disk nearly full" in human
    assert "    only 2% left on /" in human.splitlines()
    acked = b.cli("notif", "ack", notif_id[:8])
    assert acked.stdout == f"ACKED:{notif_id}\n", acked.stderr
    for n in (a, b, c):
        wait_for(lambda n=n: listed(n) == [] and n.json("daemon", "status")["unread"] == 0, WAIT, f"{n.name} to see the ack")
        assert listed(n, "--all")[0]["acked"] is True
    missing = b.cli("notif", "ack", "0123456789abcdef")
    assert missing.returncode == 1 and missing.stderr.startswith("NO_SUCH_NOTIF:0123456789abcdef")


def _activity(node, key):
    """The user-activity time `node` holds for member `key` (carried in presence)."""
    members = node.json("subnet", "status", "--nodes")["subnets"][0]["members"]
    return next(m["last_activity"] for m in members if m["key"] == key)


def test_an_offline_node_learns_the_ack_when_it_reconnects(trio):
    a, b, c = trio
    notif_id = a.cli("subnet", "notify", "backup failed", check=True).stdout.strip().split(":", 1)[1]
    wait_for(lambda: [r["id"] for r in listed(c)] == [notif_id], WAIT, "gamma to hold the notification")
    c.stop()
    assert a.cli("notif", "ack", "--all").stdout == f"ACKED:{notif_id}\n"
    wait_for(lambda: listed(b) == [], WAIT, "beta to see the ack")
    c.start()
    wait_for(lambda: listed(c) == [] and listed(c, "--all")[0]["acked"], WAIT, "gamma to learn the ack on reconnect")


def test_subnet_notify_refusals(spt_nodes):
    lone = spt_nodes("z", label="zulu")
    none = lone.cli("subnet", "notify", "hello")
    assert none.returncode == 1 and none.stderr.startswith("NO_SUCH_SUBNET:"), none.stderr
    lone.cli("subnet", "create", "home", check=True)
    lone.cli("subnet", "create", "work", check=True)
    several = lone.cli("subnet", "notify", "hello")
    assert several.returncode == 1 and several.stderr.startswith("SUBNET_REQUIRED:"), several.stderr
    wrong = lone.cli("subnet", "notify", "hello", "--subnet", "nope")
    assert wrong.returncode == 1 and wrong.stderr.startswith("NO_SUCH_SUBNET:nope")
    ok = lone.cli("subnet", "notify", "hello", "--subnet", "work")
    assert ok.returncode == 0 and ok.stdout.startswith("NOTIFIED:")
    assert [r["subnet"] for r in listed(lone)] == ["work"]
    empty = lone.cli("subnet", "notify", "--subnet", "work", input="")
    assert empty.returncode == 2


def test_notif_list_shows_the_origin_as_a_display_form_and_refuses_an_unknown_subnet(spt_nodes):
    lone = spt_nodes("z", label="zulu")
    lone.cli("subnet", "create", "home", check=True)
    notif_id = lone.cli("subnet", "notify", "--title", "hello", input="there", check=True).stdout.strip().split(":")[1]
    # SPEC.md §2.1: every human view shows a node as LABEL (xxxxxxxx…), not a bare key prefix
    first = lone.cli("notif", "list", check=True).stdout.splitlines()[0]
    assert first.split("  ")[3] == f"zulu ({lone.key[:8]}\u2026)", first
    assert [r["id"] for r in listed(lone, "--subnet", "HOME")] == [notif_id]  # names match without regard to case
    short = lone.cli("notif", "ack", notif_id[:5])  # SPEC.md §2.10: prefixes of at least 6; it exists, so say that
    assert short.returncode == 1 and short.stderr == f"NO_SUCH_NOTIF:{notif_id[:5]} give at least 6 characters of the id (SPEC.md §2.10)\n"
    # a mistyped subnet is refused like everywhere else (endpoint list --subnet), not an empty list
    for args in (["notif", "list", "--subnet", "hoem"], ["--json", "notif", "list", "--subnet", "hoem"]):
        wrong = lone.cli(*args)
        assert (wrong.returncode, wrong.stdout) == (1, "") and wrong.stderr.startswith("NO_SUCH_SUBNET:hoem"), wrong.stderr
