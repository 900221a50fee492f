"""A receiver on a small file system: refused before writing; a disk that fills mid-way fails cleanly.

The receiving node's SPT_HOME is a 160 MiB tmpfs mounted for the test, which needs root: marked
`root`, so it skips as a normal user and fails as root when the mount is refused.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
from ft_helpers import CONFIG, inbox, join_pair, one, random_file, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.root]

MIB = 1 << 20


@pytest.fixture
def small_receiver(spt_nodes):
    a = spt_nodes("a", label="alpha", config=CONFIG, env={"SPT_FILE_MAX_RATE": str(10 * MIB)})
    b = spt_nodes("b", label="beta", config=CONFIG, start=False)
    config = (b.home / "config.toml").read_text()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160m,mode=0700", "tmpfs", str(b.home)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        (b.home / "config.toml").write_text(config)
        b.start()
        join_pair(a, b)
        yield a, b
    finally:
        b.kill()
        subprocess.run(["umount", "-l", str(b.home)], check=False)


def test_too_small_is_refused_before_writing_and_a_full_disk_fails_cleanly(small_receiver, tmp_path):
    a, b = small_receiver
    big = random_file(tmp_path / "big.bin", 150)
    refused = a.cli("file", "send", str(big), "bob")
    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.startswith("FILE_REFUSED:") and "not enough free disk space" in refused.stderr
    tid = refused.stderr.split(":", 1)[1].split()[0]
    assert one(a, tid)["state"] == "refused"
    assert not (inbox(b) / tid).exists()

    folder = tmp_path / "two"
    folder.mkdir()
    random_file(folder / "first.bin", 20)
    random_file(folder / "second.bin", 40)
    sending = a.popen("file", "send", str(folder), "bob", "--wait")
    try:
        # Stop the receiver once data arrived (the first file's partial exists; all 60 MiB take
        # 6 s at the sender's rate, this polls every 5 ms), fill what is left while it cannot
        # write, then let it go on: at least the second file's 40 MiB are still due and meet a
        # full disk, whatever the machine's load (the filler no longer races the writes).
        first = wait_for(lambda: next(inbox(b).rglob("first.bin.partial"), None), every=0.005,
                         what="data at the receiver")
        tid = first.relative_to(inbox(b)).parts[0]
        b.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: _stopped(b.proc.pid), timeout=5, every=0.005, what="the receiver stopped")
            assert not (first.parent / "second.bin").exists(), "inconclusive: the second file had landed"
            fs = os.statvfs(b.home)
            fd = os.open(b.home / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
            try:  # all but 1 MiB, which the receiver's database may need to record the failure
                os.posix_fallocate(fd, 0, fs.f_bavail * fs.f_frsize - MIB)
            finally:
                os.close(fd)
        finally:
            b.proc.send_signal(signal.SIGCONT)
        stdout, stderr = sending.communicate(timeout=60)
    finally:
        if sending.poll() is None:
            sending.kill()
    assert sending.returncode == 1, (stdout, stderr)
    assert stderr.startswith(f"FILE_FAILED:{tid} ") and "disk is full" in stderr
    assert one(b, tid)["state"] == "failed" and "disk is full" in one(b, tid)["reason"]
    assert not (inbox(b) / tid).exists()  # no partial file, and nothing that looks complete


def _stopped(pid: int) -> bool:
    """Every thread of `pid` has stopped (a signal stops a process some time after kill() returns)."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(FileNotFoundError):
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
    return bool(states) and all(state in "tT" for state in states)
