"""The node as a service: the systemd unit, `daemon status` saying installed/enabled, a restart
through the unit's own command bringing the node back with its subnets, and `daemon logs`."""

import configparser
import os
import select
import shlex
import subprocess
import sys
import time

import pytest

from spt.core import service

pytestmark = pytest.mark.slow


def unit_of(node, *args, env=None):
    printed = node.cli("daemon", "install", "--print", *args, env=env)
    assert printed.returncode == 0, printed.stderr
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys keep their case
    parser.read_string(printed.stdout)
    return printed.stdout, parser


def test_the_user_unit_runs_the_daemon_in_the_foreground_and_restarts_on_failure(spt_nodes, tmp_path):
    node = spt_nodes("u", start=False)
    text, unit = unit_of(node)
    exec_start = shlex.split(unit["Service"]["ExecStart"])
    assert exec_start == [sys.executable, "-m", "spt", "daemon", "run"]
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "default.target"
    assert f"Environment=SPT_HOME={node.home}" in text  # set in the test kit, so it travels
    assert "User=" not in text
    path = tmp_path / "spt.service"
    path.write_text(text)
    checked = service.verify(path)
    if checked is not None:  # where systemd-analyze exists, it must accept the unit
        ok, detail = checked
        assert ok, detail


def test_the_system_unit_runs_under_its_own_account(spt_nodes):
    node = spt_nodes("s", start=False)
    text, unit = unit_of(node, "--system", env={"SPT_HOME": ""})
    assert unit["Service"]["User"] == unit["Service"]["Group"] == "spt"
    assert "Environment=SPT_HOME=/var/lib/spt" in text
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(service.systemd_running(), reason="systemd runs here: the unit is really installed instead")
def test_without_systemd_install_says_so_and_prints_the_login_command(spt_nodes):
    node = spt_nodes("n", start=False)
    result = node.cli("daemon", "install")
    assert result.returncode == 1
    first, second = result.stderr.splitlines()[:2]
    assert first.startswith("NO_SYSTEMD: systemd is not running on this machine")
    assert "daemon run" in second and f"SPT_HOME={node.home}" in second
    assert node.cli("daemon", "uninstall").stderr.startswith("NOT_INSTALLED:")


def test_daemon_status_says_whether_the_service_is_installed_and_enabled(spt_nodes, tmp_path):
    node = spt_nodes("d")
    config = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert node.json("daemon", "status")["service"]["installed"] is False
    assert "service: not installed" in node.cli("daemon", "status", env=config).stdout
    # what `daemon install` leaves behind where systemd runs: the unit and systemctl's enable link
    units = tmp_path / "systemd" / "user"
    (units / "default.target.wants").mkdir(parents=True)
    (units / "spt.service").write_text(node.cli("daemon", "install", "--print").stdout)
    (units / "default.target.wants" / "spt.service").symlink_to(units / "spt.service")
    shown = node.cli("daemon", "status", "--json", env=config)
    import json

    doc = json.loads(shown.stdout)["service"]
    assert (doc["installed"], doc["enabled"], doc["unit"]) == (True, True, str(units / "spt.service"))
    assert "service: installed, enabled" in node.cli("daemon", "status", env=config).stdout


@pytest.mark.root  # subnet create and join are elevated
def test_a_restart_through_the_unit_brings_the_node_back_with_its_subnets(spt_nodes):
    alpha, beta = spt_nodes.subnet(["alpha", "beta"])
    _, unit = unit_of(beta)
    command = shlex.split(unit["Service"]["ExecStart"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPT_")}
    for line in unit["Service"].get("Environment", "").splitlines() or []:
        key, _, value = line.partition("=")
        env[key] = value
    env.update({k: v for k, v in beta.env.items() if k == "SPT_HOME"})
    assert beta.cli("daemon", "stop").returncode == 0  # the service stops
    assert beta.cli("subnet", "status").returncode == 3
    # systemd would start ExecStart= with the unit's environment: do exactly that
    with open(beta.home / "service.out", "ab") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and beta.cli("daemon", "status").returncode != 0:
            time.sleep(0.1)
        assert [s["name"] for s in beta.json("subnet", "status")["subnets"]] == ["home"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            members = alpha.json("subnet", "status", "--nodes")["subnets"][0]["members"]
            if next(m for m in members if m["label"] == "beta")["online"]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("alpha does not see beta online again")
    finally:
        proc.terminate()
        proc.wait(15)


def test_daemon_logs_shows_the_log_and_debug_raises_the_level_live(spt_nodes):
    node = spt_nodes("l")
    tail = node.cli("daemon", "logs", "-n", "3")
    assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 3
    assert tail.stdout.splitlines() == node.log().splitlines()[-3:]
    follow = node.popen("daemon", "logs", "-f", "-n", "1")
    try:
        # the follower shows the log's last line first: from then on it is following, so the
        # level change below cannot slip in before it started (reads are bounded in time)
        assert read_line(follow, 10.0), "the follower printed nothing"
        raised = node.cli("daemon", "logs", "--debug", "-n", "0")
        assert raised.returncode == 0 and raised.stderr == "LOG_LEVEL:DEBUG\n"
        changed = " INFO spt.core.daemon: log level changed level=DEBUG"
        seen: list[str] = []
        deadline = time.monotonic() + 10
        while not any(changed in line for line in seen) and time.monotonic() < deadline:
            seen.append(read_line(follow, max(0.0, deadline - time.monotonic())))
        assert any(changed in line for line in seen), seen
        node.cli("endpoint", "list")  # the daemon now logs control requests at DEBUG
        deadline = time.monotonic() + 10
        while " DEBUG " not in node.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert " DEBUG " in node.log()
    finally:
        follow.terminate()
        follow.wait(10)
    assert node.cli("daemon", "logs", "--level", "info", "-n", "0").stderr == "LOG_LEVEL:INFO\n"


def read_line(proc, timeout: float) -> str:
    """One line of `proc`'s stdout, or "" when none comes within `timeout` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""
