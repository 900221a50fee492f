"""Hosted endpoints and `spt rc` across two real daemons (issue 12's must-shows).

The hosted program puts its terminal in raw mode (so the PTY adds nothing to what it writes),
writes numbered lines with a screen redraw every 50 lines, and logs every byte it writes and
every byte it reads. Its output log is the host's transcript; its input log shows each
keystroke applied once.
"""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pyte
import pytest

from spt.testing.nodes import DEFAULT_CONFIG
from spt.testing.wait import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.root]  # creates subnets (elevated)

CONFIG = DEFAULT_CONFIG + "\n[timing]\npresence_interval = 1.0\nidle_timeout = 4.0\n"

PROGRAM = r"""
import os, select, sys, tty
out_log = open(sys.argv[1], "wb"); in_log = open(sys.argv[2], "wb")
count, interval = int(sys.argv[3]), float(sys.argv[4])
tty.setraw(0)
def w(b):
    os.write(1, b); out_log.write(b); out_log.flush()
i = 0
done = False
while not done:
    r, _, _ = select.select([0], [], [], interval)
    if r:
        data = os.read(0, 1024)
        in_log.write(data); in_log.flush()
        w(b"got:" + data + b"\r\n")
        done = b"q" in data
    elif i < count:
        i += 1
        if i % 50 == 0:
            w(b"\x1b[H\x1b[2J")
        w(b"line %06d\r\n" % i)
sys.exit(7)
"""


def row(node, endpoint_id):
    doc = node.json("endpoint", "list")
    rows = [e for s in doc["subnets"] for e in s["endpoints"] if e["id"] == endpoint_id]
    return rows[0] if rows else None


def proc_state(pid):
    """The process's state letter (R, S, T stopped, Z zombie), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def local(node, endpoint_id):
    return next(p for p in node.json("endpoint", "list")["local"] if p["id"] == endpoint_id)


class Viewer:
    """`spt rc` as a subprocess: its stdout collected in a thread."""

    def __init__(self, node, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spt", "rc", *args], env=node.env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.out = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            data = os.read(self.proc.stdout.fileno(), 65536)
            if not data:
                return
            self.out += data

    def type(self, data: bytes):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def finish(self, timeout=60):
        self.proc.wait(timeout)
        self._reader.join(10)
        return self.proc.stderr.read().decode()


def screen_of(data: bytes) -> list[str]:
    screen = pyte.Screen(80, 24)
    stream = pyte.ByteStream(screen)
    stream.feed(data)
    return [line.rstrip() for line in screen.display]


@pytest.fixture
def pair(spt_nodes):
    return spt_nodes.subnet(["alpha", "beta"], config=CONFIG)


def test_rc_across_a_cut_and_two_restarts_is_byte_identical_and_input_applied_once(pair, tmp_path):
    a, b = pair
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    out_log, in_log = tmp_path / "out.log", tmp_path / "in.log"
    run = a.cli("endpoint", "run", "--id", "prog", "--", sys.executable, str(prog), str(out_log), str(in_log),
                "1500", "0.01", check=True)
    first, second = run.stdout.splitlines()
    assert first.startswith("ENDPOINT_RUN:prog pid=")
    assert second == "ENDPOINT_RUN_STARTED:prog (attach with spt rc prog)"
    pid = int(first.split("pid=")[1])
    assert local(a, "prog")["alive"] is True and local(a, "prog")["pid"] == pid
    wait_for(lambda: (r := row(b, "prog")) and r["alive"] and r["hosted"], what="prog alive and hosted at beta")
    assert row(b, "prog")["state"] == "unbound"

    driver = Viewer(b, "prog")
    watcher = Viewer(b, "prog", "--read-only")
    typed = bytearray()

    def type_some(n):
        for _ in range(n):
            key = bytes([ord("a") + len(typed) % 16])  # never "q"
            typed.extend(key)
            driver.type(key)
            watcher.type(b"z")  # read-only: never reaches the program
            time.sleep(0.1)

    wait_for(lambda: b"line 000100" in driver.out, what="output at beta")
    type_some(5)
    a.kill(signal.SIGKILL)  # the QUIC path dies with the daemon; the host process does not
    type_some(5)  # typed through the cut
    time.sleep(1.0)
    a.start()
    assert local(a, "prog")["pid"] == pid and local(a, "prog")["alive"]
    wait_for(lambda: len(in_log.read_bytes()) >= 10, timeout=60, what="the keys typed through the cut")
    a.cli("daemon", "stop", check=True)  # a graceful restart: the host is re-adopted, same pid
    type_some(3)
    a.start()
    assert local(a, "prog")["pid"] == pid
    os.kill(pid, 0)
    wait_for(lambda: b"line 001500" in driver.out and b"line 001500" in watcher.out, timeout=60,
             what="every line at both viewers")
    driver.type(b"q")
    assert "RC_ENDED:prog exit=7" in driver.finish()
    assert "RC_ENDED:prog exit=7" in watcher.finish()

    host = out_log.read_bytes()
    assert hashlib.sha256(bytes(driver.out)).hexdigest() == hashlib.sha256(host).hexdigest()
    assert hashlib.sha256(bytes(watcher.out)).hexdigest() == hashlib.sha256(host).hexdigest()
    assert in_log.read_bytes() == bytes(typed) + b"q"  # each key once, in order; no "z"
    screen = screen_of(host)
    assert "line 001500" in screen  # what a terminal shows after the redraws
    assert all(line == "" or line.startswith(("line ", "got:")) for line in screen)
    wait_for(lambda: row(b, "prog") and not row(b, "prog")["alive"], what="alive=false at beta")


def test_refusals_not_hosted_rc_refused_and_unknown_verbs(pair, tmp_path):
    a, b = pair
    a.cli("endpoint", "run", "--id", "private", "--no-remote-attach", "--", "sleep", "60", check=True)
    listener = a.popen("ready", "plain")
    assert listener.stderr.readline().strip() == "READY:plain"
    wait_for(lambda: row(b, "private") and row(b, "plain"), what="rows at beta")
    refused = b.cli("rc", "private")
    assert refused.returncode == 1 and refused.stderr.startswith("RC_REFUSED:private")
    not_hosted = b.cli("rc", "plain")
    assert not_hosted.returncode == 1 and not_hosted.stderr.startswith("NOT_HOSTED:plain")
    assert b.cli("rc", "nobody").stderr.startswith("NO_PERCH:nobody")
    collision = a.cli("endpoint", "run", "--id", "private", "--", "sleep", "1")
    assert collision.returncode == 1 and collision.stderr.startswith("COLLISION:private")
    for group in ("endpoint", "subnet", "node"):
        bad = a.cli(group, "frobnicate")
        assert bad.returncode == 2 and "frobnicate" in bad.stderr
    pid = local(a, "private")["pid"]
    assert a.cli("endpoint", "purge", "private", "--yes").stdout == "PURGED:private\n"
    wait_for(lambda: proc_state(pid) in (None, "Z"), what="the hosted process stopped by purge")
    listener.terminate()
    listener.wait(10)


HOLDER = r"""
# a hosted agent: polls spt ready and logs every delivery
while true; do spt ready --once --timeout 30 >> "$1" 2>/dev/null || sleep 0.2; done
"""


def test_remote_suspend_warm_and_wake_hold_active_only_messages_and_release_each_once(pair, tmp_path):
    a, b = pair
    script = tmp_path / "agent.sh"
    script.write_text(HOLDER)
    got = tmp_path / "got.txt"
    spt_bin = os.path.dirname(sys.executable)
    env_path = f"{spt_bin}:{os.environ.get('PATH', '')}"
    run = a.cli("endpoint", "run", "--id", "agent", "--", "sh", str(script), str(got), env={"PATH": env_path},
                check=True)
    pid = int(run.stdout.split("pid=")[1].split()[0])
    wait_for(lambda: (r := row(b, "agent")) and r["state"] == "active" and r["ready"], what="agent bound at beta")

    assert b.cli("endpoint", "suspend", "--warm", "agent").stdout == "DORMANT:agent\n"
    wait_for(lambda: row(b, "agent")["state"] == "dormant", what="dormant at beta")
    assert proc_state(pid) == "T"  # stopped, not ended
    assert b.cli("send", "--active-only", "agent", input="held-1").stdout == "QUEUED:agent\n"
    assert b.cli("endpoint", "wake", "agent").stdout == "WOKE:agent\n"
    wait_for(lambda: row(b, "agent")["state"] == "active", what="active again at beta")
    wait_for(lambda: "held-1" in got.read_text(), what="held-1 released on wake")
    assert local(a, "agent")["pid"] == pid

    assert b.cli("endpoint", "suspend", "--grace", "1", "agent").stdout == "SUSPENDED:agent\n"
    wait_for(lambda: (r := row(b, "agent")) and r["state"] == "suspended" and not r["alive"], what="suspended")
    assert proc_state(pid) in (None, "Z")
    assert b.cli("send", "--active-only", "agent", input="held-2").stdout == "QUEUED:agent\n"
    assert b.cli("endpoint", "wake", "agent").stdout == "WOKE:agent\n"  # the remembered command, fresh PTY
    wait_for(lambda: (r := row(b, "agent")) and r["state"] == "active" and r["alive"], what="woken at beta")
    assert local(a, "agent")["pid"] != pid
    wait_for(lambda: "held-2" in got.read_text(), what="held-2 released on wake")
    time.sleep(1.5)
    text = got.read_text()
    assert text.count("held-1") == 1 and text.count("held-2") == 1
    a.cli("endpoint", "purge", "agent", "--yes", check=True)


def test_an_attacker_member_cannot_attach_where_the_endpoint_is_not_visible_to_it(pair, tmp_path):
    """§9.20 as the attacker: beta (member of home only) forges rc.attach streams to alpha with its
    own key, bypassing its daemon's resolution. Only the visible endpoint answers."""
    import asyncio

    from spt.core.identity import NodeId
    from spt.core.net.transport import AllowKeys, Transport
    from spt.core.store import load_or_create_key

    a, b = pair
    a.cli("subnet", "create", "work", check=True)  # alpha alone is in work
    homeless = a.cli("endpoint", "run", "--", "sleep", "1")  # two subnets, no --subnet, no terminal
    assert homeless.returncode == 1
    assert homeless.stderr.splitlines() == [
        "MULTI_SUBNET_HOME: this node holds 2 subnets; pass --subnet <name>", "  home", "  work"]
    for endpoint_id, subnet in (("secret", "work"), ("hidden", "home"), ("shown", "home")):
        a.cli("endpoint", "run", "--id", endpoint_id, "--subnet", subnet, "--", "sleep", "60", check=True)
    a.cli("endpoint", "visibility", "hide", "hidden", "home", check=True)
    a_key = NodeId.from_hex(a.key)
    host, port = a.address.split(":")
    b_key, _ = load_or_create_key(b.home / "node.key")

    async def attempt(subnet, endpoint_id):
        forged = Transport(b_key, host="127.0.0.1", port=0, accept=AllowKeys([a_key]))
        await forged.start()
        try:
            conn = await forged.connect(a_key, [(host, int(port))])
            stream = conn.open_stream()
            await stream.send("rc.attach", {"subnet": subnet, "id": endpoint_id, "offset": None, "viewer": "x"})
            first = await stream.recv(timeout=10)
            return first.type, first.body
        finally:
            await forged.close()

    async def attempts():
        return [await attempt(s, e) for s, e in (("work", "secret"), ("home", "secret"), ("home", "hidden"),
                                                 ("home", "shown"))]

    results = asyncio.run(attempts())
    assert results[0][0] == "error" and results[0][1]["code"] == "NOT_A_MEMBER"  # refused by the dispatcher
    for kind, body in results[1:3]:  # a member of home: the endpoint looks missing from there
        assert kind == "error" and body["code"] == "NO_PERCH"
    assert results[3][0] == "rc.hello"  # the forged client itself is sound: a visible endpoint answers
    for endpoint_id in ("secret", "hidden", "shown"):
        a.cli("endpoint", "purge", endpoint_id, "--yes")


def test_run_refuses_a_program_that_does_not_exist_before_making_a_perch(spt_nodes, tmp_path):
    node = spt_nodes("n")
    script = tmp_path / "agent.sh"
    script.write_text("#!/bin/sh\nsleep 30\n")  # not executable yet
    for command in (["/nonexistent/agent"], ["no-such-program-spt-qa", "--flag"], [str(script)]):
        refused = node.cli("endpoint", "run", "--id", "typo", "--", *command)
        assert (refused.returncode, refused.stdout) == (2, ""), refused.stdout + refused.stderr
        assert refused.stderr.startswith(f"BAD_COMMAND:{command[0]} no such program"), refused.stderr
    assert [p["id"] for p in node.json("endpoint", "list")["local"]] == []  # nothing half-made
    script.chmod(0o755)
    ran = node.cli("endpoint", "run", "--id", "agent", "--project", str(tmp_path), "--", "./agent.sh")
    assert ran.returncode == 0 and ran.stdout.startswith("ENDPOINT_RUN:agent pid="), ran.stderr
    assert node.cli("endpoint", "purge", "agent", "--yes").returncode == 0
    # a relative PATH entry is looked up from the command's working folder, as execvpe does
    # there, not from the daemon's (it refused this one with BAD_COMMAND)
    on_path = node.cli("endpoint", "run", "--id", "pathed", "--project", str(tmp_path), "--", "agent.sh",
                       env={"PATH": f".:{os.environ.get('PATH', os.defpath)}"})
    assert on_path.returncode == 0 and on_path.stdout.startswith("ENDPOINT_RUN:pathed pid="), on_path.stderr
    assert node.cli("endpoint", "purge", "pathed", "--yes").returncode == 0
