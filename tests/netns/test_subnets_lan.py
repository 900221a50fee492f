"""Joining by name on a LAN: three hosts in a namespace lab, real mDNS inside the lab only, no
`--peer` (SPEC.md §5.2). Needs root, `ip` and `iptables`; skips without them."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.slow]

CONFIG = """\
[net]
port = 47470
[discovery]
mdns = true
"""


class LabNode:
    """A node daemon inside one lab host, with its own state folder; the CLI runs there too."""

    def __init__(self, lab, host, root, label):
        self.lab, self.host, self.label = lab, host, label
        self.home = root / host
        self.home.mkdir(mode=0o700)
        (self.home / "config.toml").write_text(CONFIG + f'\n[node]\nlabel = "{label}"\n')
        base = {k: v for k, v in os.environ.items() if not k.startswith("SPT_")}
        self.env = {**base, "SPT_HOME": str(self.home), "SPT_NO_AUTOSTART": "1", "SPT_NO_SUDO": "1"}
        self.proc = None

    def start(self):
        with open(self.home / "daemon.log", "ab") as log:
            self.proc = self.lab.popen(self.host, [sys.executable, "-m", "spt", "daemon", "run"], env=self.env,
                                       stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # the control socket answers before discovery has started: wait for the log line
            if "daemon started" in self.log() and self.cli("daemon", "status").returncode == 0:
                return
            assert self.proc.poll() is None, self.log()
            time.sleep(0.05)
        raise AssertionError(f"{self.host} did not start:\n{self.log()}")

    def cli(self, *args, timeout=60.0):
        return self.lab.run(self.host, [sys.executable, "-m", "spt", *args], env=self.env, check=False,
                            timeout=timeout)

    def json(self, *args):
        import json

        result = self.cli("--json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self):
        path = self.home / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def lan_nodes(netns_lab):
    lab = netns_lab()
    lan = lab.lan(3)
    root = Path(tempfile.mkdtemp(prefix="spt-lan-"))
    nodes = [LabNode(lab, host, root, label) for host, label in zip(lan.hosts, ("alpha", "beta", "gamma"), strict=True)]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


def current_code(node):
    """The code from `show-code`, waiting out the last seconds of a step (bounded)."""
    for _ in range(3):
        shown = node.cli("subnet", "show-code", "home", "--no-qr").stdout
        m = re.search(r"^CODE:home (\d{6}) (\d+)s$", shown, re.M)
        assert m, shown
        if int(m.group(2)) >= 4:
            return m.group(1)
        time.sleep(int(m.group(2)) + 0.2)
    raise AssertionError("no code with time left")


def test_three_hosts_join_by_name_over_mdns_and_entries_reach_a_member_cut_off_from_their_author(lan_nodes):
    started = time.monotonic()
    a, b, c = lan_nodes
    created = a.cli("subnet", "create", "home")
    assert created.returncode == 0, created.stderr
    for node in (b, c):
        if node is c:  # a name that answers on the LAN is refused, within the short name check
            began = time.monotonic()
            taken = c.cli("subnet", "create", "home")
            assert taken.returncode == 1 and taken.stderr.startswith("NAME_TAKEN:home"), taken.stderr
            assert time.monotonic() - began < 5
        joined = node.cli("subnet", "join", "home", "--code", current_code(a), "--timeout", "10")
        assert joined.returncode == 0, f"{joined.stderr}\n{node.log()[-3000:]}"
        assert joined.stdout.splitlines()[0] == "JOINED:home"
    keys = {n.label: n.json("node", "show")["key"] for n in lan_nodes}
    deadline = time.monotonic() + 15
    for node in lan_nodes:
        while True:
            [sub] = node.json("subnet", "status", "--nodes")["subnets"]
            seen = {m["label"]: m["key"] for m in sub["members"]}
            if seen == keys and all(m["online"] for m in sub["members"]):
                break
            assert time.monotonic() < deadline, f"{node.label} sees {sub['members']}"
            time.sleep(0.2)
        # every peer is reached on the LAN address mDNS gave, not through a static peer
        for m in sub["members"]:
            if not m["self"]:
                assert m["path"]["kind"] == "direct lan" and m["path"]["addr"].startswith("10.10."), m
    assert time.monotonic() - started < 30

    # alpha's label entry cannot reach gamma (the link is cut); beta passes it on
    cut = a.lab.cut(a.host, c.host)
    try:
        renamed = a.cli("node", "label", "set", "alpha-2")
        assert renamed.returncode == 0, renamed.stderr
        deadline = time.monotonic() + 10
        while "alpha-2" not in {m["label"] for m in c.json("subnet", "status", "--nodes")["subnets"][0]["members"]}:
            assert time.monotonic() < deadline, f"gamma never learned alpha's new label:\n{c.log()[-3000:]}"
            time.sleep(0.2)
    finally:
        cut.heal()
