"""Applying a real release: built by the maintainer tool from this checkout (wheels of spt and its
plugins at a bumped version, plus every dependency packed from this environment: no network),
installed offline into `<root>/versions/<v>/`, switched to by one rename, the daemon restarted
into it with the same pid while a `spt ready` listener keeps receiving and a hosted endpoint's
process keeps its pid. A release whose daemon
fails its self-check (it lost a plugin that worked before) is switched back by the watchdog and
reported as APPLY_FAILED.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import threading
import time
from pathlib import Path

import pytest
import spt_selfupdate
from spt_selfupdate.release import build_release

from spt.testing.nodes import DEFAULT_CONFIG, Node

pytestmark = pytest.mark.slow

CHECKOUT = Path(spt_selfupdate.__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def releases(test_keys, tmp_path_factory):
    src = tmp_path_factory.mktemp("releases")
    started = time.monotonic()
    good = build_release(CHECKOUT, "0.1.1", src, test_keys.primary, deps="installed")
    # A release that lost the file plugin: it installs and starts, but fails the self-check.
    bad = build_release(CHECKOUT, "0.1.2", src, test_keys.primary, deps="installed", without=["spt-filetransfer"])
    print(f"built two releases in {time.monotonic() - started:.1f} s")
    return good / "spt-0.1.1.sptupdate", bad / "spt-0.1.2.sptupdate"


class Lines:
    """Lines of a stream, read by a thread, so a test can wait for one with a timeout."""

    def __init__(self, stream) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.q.put(line)

    def wait(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"{needle!r} did not arrive; saw {self.seen}")


def send(node: Node, body: str) -> None:
    assert node.cli("send", "bob", input=body, check=True).stdout.startswith("SENT:bob")


def daemon_pid(node: Node) -> int:
    """The pid of the daemon that started last, from its log line."""
    line = [ln for ln in node.log().splitlines() if "daemon started" in ln][-1]
    return int(line.split("pid=")[1].split()[0])


def update_status(node: Node) -> dict:
    return json.loads(node.cli("update", "status", "--json", check=True).stdout)


@pytest.mark.relay  # its releases bundle every spt distribution, the relay's included
def test_apply_switches_versions_and_a_bad_release_rolls_back(spt_nodes, test_keys, releases, tmp_path):
    good, bad = releases
    root = tmp_path / "install"
    node = spt_nodes("beta", label="beta", config=DEFAULT_CONFIG + f'\n[update]\nroot = "{root}"\n', env=test_keys.env)
    pid = daemon_pid(node)
    assert node.proc is not None and pid == node.proc.pid
    listener = node.popen("ready", "bob")
    later_pid = None
    try:
        out, err = Lines(listener.stdout), Lines(listener.stderr)
        err.wait("READY:bob")
        send(node, "one")
        out.wait("one")

        ran = node.cli("endpoint", "run", "--id", "worker", "--", "sleep", "600", check=True).stdout
        hosted_pid = int(ran.split("pid=")[1].split()[0])

        assert node.cli("update", "fetch", "--file", str(good), check=True).stdout == "STAGED:0.1.1\n"
        started = time.monotonic()
        result = node.cli("update", "apply", timeout=180)
        took = time.monotonic() - started
        assert result.stdout == "APPLIED:0.1.1\n", result
        assert node.json("daemon", "status")["version"] == "0.1.1"
        assert daemon_pid(node) == pid and node.proc.poll() is None  # same process, new version
        last = update_status(node)["last_apply"]
        assert last["outcome"] == "applied" and last["back_after_s"] < 10, last
        print(f"apply took {took:.1f} s; the daemon was back {last['back_after_s']} s after the restart")
        assert os.readlink(root / "current") == "versions/0.1.1"
        assert (root / "versions" / "0.1.0").is_symlink()  # the running install was adopted for rollback
        assert (root / "versions" / "0.1.1" / ".complete").exists()
        send(node, "two")
        out.wait("two")
        assert listener.poll() is None
        os.kill(hosted_pid, 0)  # the hosted process was never interrupted…
        worker = next(e for e in node.json("endpoint", "list")["local"] if e["id"] == "worker")
        assert worker["alive"] is True  # …and the new daemon re-adopted its host

        assert node.cli("update", "fetch", "--file", str(bad), check=True).stdout == "STAGED:0.1.2\n"
        result = node.cli("update", "apply", timeout=180)
        assert result.returncode == 1, result
        assert result.stderr.startswith("APPLY_FAILED:self-check (kept 0.1.1)"), result.stderr
        assert "file" in result.stderr
        later_pid = daemon_pid(node)  # the watchdog became the previous version's daemon
        assert node.json("daemon", "status")["version"] == "0.1.1"
        assert os.readlink(root / "current") == "versions/0.1.1"
        last = update_status(node)["last_apply"]
        assert (last["version"], last["outcome"]) == ("0.1.2", "failed") and "file" in last["reason"]
        assert "failed and was rolled back" in node.log()
        assert update_status(node)["staged"] is None  # no longer offered to members
        send(node, "three")
        out.wait("three")
        assert listener.poll() is None
        assert sum("READY:" in line for line in err.seen) == 1  # reconnected twice, announced once
    finally:
        listener.send_signal(signal.SIGTERM)
        with contextlib.suppress(Exception):
            listener.wait(10)
        if later_pid and later_pid != pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(later_pid, signal.SIGTERM)
