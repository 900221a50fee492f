"""The daemon as users run it: real processes, each with its own SPT_HOME."""

import os
import stat
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_two_daemons_run_at_once_with_different_keys(spt_nodes):
    a, b = spt_nodes("a"), spt_nodes("b")
    show_a, show_b = a.json("node", "show"), b.json("node", "show")
    assert show_a["key"] != show_b["key"]
    assert len(show_a["key"]) == 64
    assert show_a["addresses"] and all(x.startswith("127.0.0.1:") for x in show_a["addresses"])
    assert show_a["addresses"] != show_b["addresses"]  # each bound its own UDP port
    human = a.cli("node", "show", check=True).stdout
    assert human.startswith("NODE: ") and f"({show_a['key'][:8]}\u2026)" in human


def test_key_file_is_private_and_survives_restart(spt_nodes):
    a = spt_nodes("a")
    key = a.key
    mode = stat.S_IMODE(os.stat(a.home / "node.key").st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(a.home / "spt.sock").st_mode) == 0o600
    a.cli("daemon", "stop", check=True)
    a.start()
    assert a.key == key


def test_label_set_and_bad_label(spt_nodes):
    a = spt_nodes("a")
    ok = a.cli("node", "label", "set", "desk-1")
    assert ok.returncode == 0 and ok.stdout.strip() == "LABELED:desk-1"
    assert a.json("node", "show")["label"] == "desk-1"
    bad = a.cli("node", "label", "set", "has space")
    assert bad.returncode == 2 and bad.stderr.startswith("BAD_LABEL:has space")


def test_stop_then_status_is_daemon_down_exit_3(spt_nodes):
    a = spt_nodes("a")
    stopped = a.cli("daemon", "stop")
    assert stopped.stdout.strip() == "DAEMON_STOPPED"
    down = a.cli("daemon", "status")
    assert down.returncode == 3 and down.stderr.startswith("DAEMON_DOWN")
    # a new user's next guess, `spt daemon start`, is no command: the refusal says what starts it
    for args in (["daemon", "status"], ["whoami"], ["--debug", "whoami"], ["notif", "list"]):
        again = a.cli(*args)
        assert again.returncode == 3 and "spt daemon run" in again.stderr and "SPT_NO_AUTOSTART=1" in again.stderr
    assert a.proc.wait(10) == 0


def test_commands_autostart_the_daemon_unless_told_not_to(spt_nodes):
    a = spt_nodes("a", start=False)
    assert a.cli("node", "show").returncode == 3  # SPT_NO_AUTOSTART=1 in the fixture
    started = a.cli("node", "show", env={"SPT_NO_AUTOSTART": "0"})
    try:
        assert started.returncode == 0, started.stderr
        assert (a.home / "daemon.log").read_text().count("daemon started") == 1
    finally:
        a.cli("daemon", "stop")


def test_a_second_daemon_on_the_same_folder_refuses(spt_nodes):
    a = spt_nodes("a")
    second = subprocess.run([sys.executable, "-m", "spt", "daemon", "run"], env=a.env, capture_output=True, text=True, timeout=30)
    assert second.returncode == 2 and "DAEMON_RUNNING" in second.stderr
    assert a.cli("daemon", "status").returncode == 0


def test_daemon_status_json_keys(spt_nodes):
    a = spt_nodes("a")
    doc = a.json("daemon", "status")
    assert set(doc) >= {"version", "uptime_s", "node", "mode", "subnets", "peers", "hosted", "unread", "warnings"}
    assert doc["node"] == a.key


def test_spt_port_env_binds_that_port(spt_nodes):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = spt_nodes("a", env={"SPT_PORT": str(port)})
    assert a.json("node", "show")["addresses"] == [f"127.0.0.1:{port}"]


def test_bad_config_is_a_clear_error(spt_nodes):
    a = spt_nodes("a", start=False, config="[net]\nprot = 1\n")
    result = subprocess.run([sys.executable, "-m", "spt", "daemon", "run"], env=a.env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "BAD_CONFIG:net.prot unknown key" in result.stderr


@pytest.mark.root  # creates a subnet (elevated)
def test_doctor_reports_each_check_and_peer_paths(spt_nodes):
    a, b = spt_nodes.subnet(["alpha", "beta"])
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        doc = a.json("doctor")
        peers = [c for c in doc["checks"] if c["name"].startswith("peer beta")]
        if peers and peers[0]["level"] == "OK":
            break
        time.sleep(0.2)
    assert doc["ok"] is True
    names = {c["name"] for c in doc["checks"]}
    assert {"version", "state-folder", "udp-port"} <= names
    assert peers[0]["detail"].startswith("direct")
    human = a.cli("doctor")
    assert human.returncode == 0
    assert all(line.split()[0] in ("OK", "WARN", "FAIL") for line in human.stdout.splitlines())
    assert a.json("daemon", "status")["peers"]["direct"] == 1
    b.kill()
    a.cli("daemon", "stop")
    a.start()
    down = a.json("doctor")
    assert [c["level"] for c in down["checks"] if c["name"].startswith("peer beta")] == ["WARN"]


def test_doctor_fails_on_a_readable_key_file(spt_nodes):
    a = spt_nodes("a")
    os.chmod(a.home / "node.key", 0o644)
    result = a.cli("doctor")
    assert result.returncode == 1
    assert any(line.startswith("FAIL state-folder:") for line in result.stdout.splitlines())


def test_a_listener_keeps_listening_across_a_daemon_restart(spt_nodes):
    """SPEC.md §8.8: a restart (an update) does not end `spt ready`; it reconnects without a
    second READY and the next message arrives."""
    import signal

    a = spt_nodes("a")
    listener = a.popen("ready", "bob")
    try:
        assert listener.stderr.readline().strip() == "READY:bob"
        a.stop()
        a.start()
        assert a.cli("send", "bob", input="after the restart").stdout.startswith(("SENT:bob", "QUEUED:bob"))
        assert "after the restart" in listener.stdout.readline()
        assert listener.poll() is None
    finally:
        listener.send_signal(signal.SIGTERM)
        _, err = listener.communicate(timeout=10)
    assert "READY:" not in err  # said once, read above
