"""Elevation gates and the control socket's owner check, with real uids (needs root)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


def _reachable_by_others(path):
    """True when every folder above the interpreter lets other users through."""
    p = Path(os.path.realpath(path))
    return all(os.stat(d).st_mode & 0o001 for d in p.parents)


pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,  # switching uids needs root
    pytest.mark.skipif(not _reachable_by_others(sys.executable),
                       reason="the interpreter is not reachable by other users (scripts/setup.sh uses /usr/bin/python3)"),
]

USER = 65534  # nobody
OTHER = 65533


def as_uid(uid):
    def switch():
        os.setgid(uid)
        os.setuid(uid)

    return switch


@pytest.fixture
def user_node():
    """A daemon running as an unprivileged uid in a state folder that uid owns."""
    base = Path(tempfile.mkdtemp(prefix="spt-e-"))
    os.chmod(base, 0o755)
    home = base / "home"
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text('[net]\nport = 0\nbind = "127.0.0.1"\n[discovery]\nmdns = false\n')
    os.chown(home, USER, USER)
    os.chown(home / "config.toml", USER, USER)
    env = {"PATH": os.environ["PATH"], "SPT_HOME": str(home), "SPT_NO_AUTOSTART": "1", "HOME": str(base)}
    proc = subprocess.Popen([sys.executable, "-m", "spt", "daemon", "run"], env=env, preexec_fn=as_uid(USER),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    # Ready means answering, not merely bound: the daemon sets the socket's mode right after
    # binding, which would undo a test's chmod made in between.
    while time.monotonic() < deadline:
        if (home / "spt.sock").exists() and '"result"' in raw_request(home / "spt.sock", "ping", {}, USER).stdout:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the daemon did not answer within 15 s")
    yield home, env
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(base)


def spt(env, *args, uid=None):
    return subprocess.run([sys.executable, "-m", "spt", *args], env=env, capture_output=True, text=True,
                          timeout=60, preexec_fn=as_uid(uid) if uid is not None else None, stdin=subprocess.DEVNULL)


def raw_request(sock_path, op, args, uid):
    """Speak the control protocol directly, claiming whatever a client might claim."""
    code = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(json.dumps({'v': 1, 'op': sys.argv[2], 'args': json.loads(sys.argv[3]),"
        " 'interactive': True, 'uid': 0, 'elevated': True}).encode() + b'\\n')\n"
        "print(s.makefile().readline())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(sock_path), op, json.dumps(args)], capture_output=True,
                         text=True, timeout=30, preexec_fn=as_uid(uid))
    return out


def test_ungated_commands_work_for_the_owner(user_node):
    _home, env = user_node
    shown = spt(env, "node", "show", uid=USER)
    assert shown.returncode == 0, shown.stderr
    assert spt(env, "subnet", "status", uid=USER).stdout.strip() == "no subnets"


@pytest.mark.parametrize("args", [["subnet", "create", "home"], ["subnet", "join", "home", "--code", "123456"],
                                  ["subnet", "show-code"]])
def test_gated_commands_print_the_exact_elevated_command_and_exit_4(user_node, args):
    home, env = user_node
    result = spt(env, *args, uid=USER)
    assert result.returncode == 4
    lines = result.stderr.splitlines()
    assert lines[0] == "ELEVATION_REQUIRED: run this in an elevated terminal:"
    assert lines[1] == f"sudo SPT_HOME={home} {sys.executable} -m spt {' '.join(args)}"


def test_the_daemon_refuses_gated_operations_whatever_the_client_claims(user_node):
    home, _ = user_node
    out = raw_request(home / "spt.sock", "subnet.create", {"name": "home"}, USER)
    answer = json.loads(out.stdout)
    assert answer["error"]["token"] == "ELEVATION_REQUIRED"
    assert answer["error"]["exit"] == 4
    # nothing was created
    out = raw_request(home / "spt.sock", "subnet.status", {}, USER)
    assert json.loads(out.stdout)["result"]["subnets"] == []


def test_root_may_run_gated_operations_on_the_users_daemon(user_node):
    _home, env = user_node
    created = spt(env, "subnet", "create", "home")  # as root: what `sudo` gives
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("CREATED:home id=")


def test_another_user_cannot_use_the_control_socket(user_node):
    _home, env = user_node
    result = spt(env, "node", "show", uid=OTHER)
    assert result.returncode == 3
    assert "belongs to another user" in result.stderr


def test_the_daemon_checks_the_peer_uid_even_if_the_socket_mode_is_loosened(user_node):
    home, _ = user_node
    os.chmod(home, 0o755)
    os.chmod(home / "spt.sock", 0o666)
    out = raw_request(home / "spt.sock", "node.show", {}, OTHER)
    assert out.stdout, out.stderr
    answer = json.loads(out.stdout)
    assert "error" in answer and "another user" in answer["error"]["message"]
