"""System mode (SPEC.md §5.7) with real uids (needs root): a daemon under its own account, the
control socket open to a group, each uid seeing only its own perches, gated operations for uid 0.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_elevation import _reachable_by_others

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root"),
    pytest.mark.skipif(not _reachable_by_others(sys.executable),
                       reason="the interpreter is not reachable by other users (scripts/setup.sh uses /usr/bin/python3)"),
]

DAEMON = 65534  # the daemon's own account (nobody)
GROUP = 65530  # the socket's group: agents' uids are in it
ALICE, BOB, OUTSIDER = 65533, 65532, 65531


def as_uid(uid, groups=()):
    def switch():
        os.setgroups(list(groups))
        os.setgid(uid)
        os.setuid(uid)

    return switch


@pytest.fixture
def system_node():
    base = Path(tempfile.mkdtemp(prefix="spt-s-"))
    os.chmod(base, 0o755)
    home = base / "home"
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text(
        '[net]\nport = 0\nbind = "127.0.0.1"\n[discovery]\nmdns = false\n'
        f'[daemon]\nsocket_group = "{GROUP}"\n'
    )
    os.chown(home, DAEMON, DAEMON)
    os.chown(home / "config.toml", DAEMON, DAEMON)
    env = {"PATH": os.environ["PATH"], "SPT_HOME": str(home), "SPT_NO_AUTOSTART": "1", "SPT_NO_SUDO": "1",
           "HOME": str(base)}
    proc = subprocess.Popen([sys.executable, "-m", "spt", "daemon", "run"], env=env,
                            preexec_fn=as_uid(DAEMON, [GROUP]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (home / "spt.sock").exists() and spt(env, "daemon", "status", uid=ALICE).returncode == 0:
            break
        time.sleep(0.1)
    else:
        proc.terminate()
        raise AssertionError("the system-mode daemon did not answer within 20 s")
    yield home, env
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(base)


def spt(env, *args, uid=None, groups=(GROUP,)):
    return subprocess.run([sys.executable, "-m", "spt", *args], env=env, capture_output=True, text=True, timeout=60,
                          preexec_fn=as_uid(uid, groups) if uid is not None else None, stdin=subprocess.DEVNULL)


def local_ids(env, uid=None):
    doc = json.loads(spt(env, "--json", "endpoint", "list", uid=uid).stdout)
    return sorted(p["id"] for p in doc["local"])


def test_system_mode_serves_the_group_and_keeps_each_uids_perches_apart(system_node):
    home, env = system_node
    status = json.loads(spt(env, "--json", "daemon", "status", uid=ALICE).stdout)
    assert status["mode"] == "system"
    assert (home.stat().st_mode & 0o777) == 0o710 and ((home / "spt.sock").stat().st_mode & 0o777) == 0o660
    # each uid makes a perch; each sees its own only, root sees both
    for uid, perch in ((ALICE, "alice"), (BOB, "bob")):
        made = spt(env, "ready", perch, "--once", "--timeout", "0.1", uid=uid)
        assert made.returncode in (0, 1), made.stderr
    assert local_ids(env, ALICE) == ["alice"]
    assert local_ids(env, BOB) == ["bob"]
    assert local_ids(env) == ["alice", "bob"]
    # bob can neither use alice's perch nor take its id, whatever the case
    touched = spt(env, "endpoint", "description", "set", "alice", "mine now", uid=BOB)
    assert touched.returncode != 0 and "NO_PERCH" in touched.stderr + touched.stdout
    taken = spt(env, "ready", "ALICE", "--once", "--timeout", "0.1", uid=BOB)
    assert taken.returncode != 0 and "COLLISION" in taken.stderr + taken.stdout
    # gated operations: uid 0 only
    refused = spt(env, "subnet", "create", "home", uid=ALICE)
    assert refused.returncode == 4 and refused.stderr.startswith("ELEVATION_REQUIRED")
    created = spt(env, "subnet", "create", "home")
    assert created.returncode == 0 and created.stdout.startswith("CREATED:home"), created.stderr
    # a uid outside the group does not get in; nor can it read the store through the folder
    outsider = spt(env, "node", "show", uid=OUTSIDER, groups=())
    assert outsider.returncode != 0
    reader = subprocess.run(["cat", str(home / "spt.db")], capture_output=True, preexec_fn=as_uid(ALICE, [GROUP]), check=False)
    assert reader.returncode != 0  # the group passes through the folder, it does not read it
    doctor = json.loads(spt(env, "--json", "doctor", uid=ALICE).stdout)
    (folder,) = [c for c in doctor["checks"] if c["name"] == "state-folder"]
    assert folder["level"] == "OK" and "system mode" in folder["detail"]


def test_user_mode_says_user(tmp_path):
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text('[net]\nport = 0\nbind = "127.0.0.1"\n[discovery]\nmdns = false\n')
    env = {"PATH": os.environ["PATH"], "SPT_HOME": str(home), "SPT_NO_AUTOSTART": "1", "HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "spt", "daemon", "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = spt(env, "--json", "daemon", "status")
            if out.returncode == 0:
                assert json.loads(out.stdout)["mode"] == "user"
                break
            time.sleep(0.1)
        else:
            raise AssertionError("daemon did not start")
    finally:
        proc.terminate()
        proc.wait(10)


def test_system_mode_endpoint_run_is_refused_to_group_users_and_rc_keeps_to_the_owner(system_node):
    home, env = system_node
    project = str(home.parent)  # reachable by every uid (0755)
    # attacker: a group uid asks the daemon to run its command, which would run as the daemon's account
    run = spt(env, "endpoint", "run", "--id", "shell", "--project", project, "--", "sh", "-c", "id > /tmp/x", uid=ALICE)
    assert run.returncode == 4 and run.stderr.startswith("ELEVATION_REQUIRED: run this in an elevated terminal:\n"), \
        (run.stdout, run.stderr)
    assert run.stderr.splitlines()[1].startswith("sudo ") and "endpoint run --id shell" in run.stderr
    assert local_ids(env) == []  # nothing made, nothing run
    # the daemon's own account may host; its terminal is its own
    made = spt(env, "endpoint", "run", "--id", "hosted", "--project", project, "--",
               "sh", "-c", "echo hello-from-host; sleep 3", uid=DAEMON)
    assert made.returncode == 0 and made.stdout.startswith("ENDPOINT_RUN:hosted"), (made.stdout, made.stderr)
    # attacker: another group uid tries to attach to it, by id and with its exact case changed
    for address in ("hosted", "HOSTED"):
        peek = spt(env, "rc", address, uid=ALICE)
        assert peek.returncode == 1 and "NO_PERCH" in peek.stderr and "hello-from-host" not in peek.stdout, peek
    assert local_ids(env, ALICE) == []
    own = spt(env, "rc", "--read-only", "hosted", uid=DAEMON)
    assert "hello-from-host" in own.stdout and "RC_ENDED" in own.stderr, (own.stdout, own.stderr)
