"""A receiver on a small file system: refused before writing; a disk that fills mid-way fails cleanly.

The receiving node's SPT_HOME is a 160 MiB tmpfs mounted for the test, which needs root: marked
`root`, so it skips as a normal user and fails as root when the mount is refused.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess

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
        tid = wait_for(lambda: next((t["id"] for t in _incoming(b) if t["done"] > 0), None), what="data at the receiver")
        filler = b.home / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # take what is left, so that the second file cannot be reserved (the first one is
            # still being written: what is free shrinks meanwhile, so ask again for less)
            for attempt in range(20):
                fs = os.statvfs(b.home)
                try:
                    os.posix_fallocate(fd, 0, fs.f_bavail * fs.f_frsize - (attempt + 1) * MIB)
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
            else:
                raise AssertionError("could not fill the receiver's disk")
        finally:
            os.close(fd)
        stdout, stderr = sending.communicate(timeout=60)
    finally:
        if sending.poll() is None:
            sending.kill()
    assert sending.returncode == 1, (stdout, stderr)
    assert stderr.startswith(f"FILE_FAILED:{tid} ") and "disk is full" in stderr
    assert one(b, tid)["state"] == "failed" and "disk is full" in one(b, tid)["reason"]
    assert not (inbox(b) / tid).exists()  # no partial file, and nothing that looks complete


def _incoming(node):
    result = node.cli("file", "list", "--incoming", "--json")
    return json.loads(result.stdout)["transfers"] if result.returncode == 0 else []
