"""`spt plugins list` and a deliberately broken plugin installed beside spt."""

import json
import os
import subprocess
import sys

import pytest

from spt.testing.nodes import installed_plugin


def run_spt(*args, env=None):
    return subprocess.run([sys.executable, "-m", "spt", *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.relay
def test_lists_builtins_and_the_three_distributions_ok():
    doc = json.loads(run_spt("--json", "plugins", "list").stdout)
    by_name = {p["name"]: p for p in doc["plugins"]}
    for name in ("quic", "static_peers", "mdns", "send", "ring", "notify", "mind_sync"):
        assert by_name[name]["status"] == "ok" and by_name[name]["dist"] == "spt"
    assert by_name["relay"]["dist"] == "spt-relay-fallback"
    assert by_name["file"]["dist"] == "spt-filetransfer"
    assert by_name["selfupdate"]["dist"] == "spt-selfupdate"
    assert all(p["status"] == "ok" for p in doc["plugins"])
    human = run_spt("plugins", "list").stdout
    assert human.splitlines()[0].split() == ["NAME", "DIST", "VERSION", "STATUS", "PROVIDES"]


@pytest.mark.relay  # blocks the relay by name
def test_disabling_by_flag_and_env():
    doc = json.loads(run_spt("--json", "-p", "no:ring", "plugins", "list").stdout)
    assert {p["name"]: p["status"] for p in doc["plugins"]}["ring"] == "blocked"
    env = {**os.environ, "SPT_DISABLE_PLUGINS": "relay,file"}
    doc = json.loads(run_spt("--json", "plugins", "list", env=env).stdout)
    status = {p["name"]: p["status"] for p in doc["plugins"]}
    assert status["relay"] == "blocked" and status["file"] == "blocked" and status["ring"] == "ok"


@pytest.fixture
def broken_plugin_path(tmp_path):
    """A real installed distribution (dist-info + entry point) whose module fails to import."""
    return installed_plugin(tmp_path / "site", "broken", {
        "plugin.py": "raise ImportError('this plugin is broken on purpose')\n"}, version="1.2.3")


@pytest.mark.slow
def test_a_broken_installed_plugin_is_reported_and_spt_still_starts(broken_plugin_path, spt_nodes):
    env = {**os.environ, "PYTHONPATH": str(broken_plugin_path)}
    doc = json.loads(run_spt("--json", "plugins", "list", env=env).stdout)
    broken = next(p for p in doc["plugins"] if p["name"] == "broken")
    assert broken["status"] == "failed: ImportError: this plugin is broken on purpose"
    assert broken["dist"] == "spt-broken" and broken["version"] == "1.2.3"
    human = run_spt("plugins", "list", env=env).stdout
    assert "failed: ImportError: this plugin is broken on purpose" in human

    node = spt_nodes("a", env={"PYTHONPATH": str(broken_plugin_path)})
    status = node.json("daemon", "status")
    assert any("broken" in w and "ImportError" in w for w in status["warnings"])
    assert node.cli("node", "show").returncode == 0


def test_a_plugin_disabled_by_flag_takes_its_command_with_it(tmp_path):
    """`-p no:file` as `SPT_DISABLE_PLUGINS=file` does: click looks `file` up before the root
    command has run, so the flag must be known by then (it was not, and `file` still ran)."""
    env = {**os.environ, "SPT_HOME": str(tmp_path), "SPT_NO_AUTOSTART": "1"}
    assert "No such command" not in run_spt("file", "--help", env=env).stderr  # and the command cache is written
    for args in (["-p", "no:file", "file", "list"], ["-p", "no:selfupdate", "update", "status"]):
        result = run_spt(*args, env=env)
        assert result.returncode == 2 and f"No such command '{args[2]}'" in result.stderr, result.stderr
    by_env = run_spt("file", "list", env={**env, "SPT_DISABLE_PLUGINS": "file"})
    assert by_env.returncode == 2 and "No such command 'file'" in by_env.stderr
    # and the command list does not offer it (--help is eager: -p must be read before it)
    listed = run_spt("-p", "no:file", "--help", env=env).stdout
    assert "\n  update " in listed and "\n  file " not in listed, listed
