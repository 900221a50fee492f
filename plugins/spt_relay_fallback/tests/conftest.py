"""Fixtures of the relay plugin's tests."""

import select
import subprocess
import sys

import pytest


@pytest.fixture
def relay_url(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "spt", "relay", "serve", "--listen", "127.0.0.1:0", "--key-file", str(tmp_path / "k")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={"SPT_HOME": str(tmp_path), "PATH": ""},
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline().strip() if ready else ""
        assert line.startswith("RELAY_LISTENING:spt-relay://127.0.0.1:"), line
        yield line.split(":", 1)[1]
    finally:
        proc.terminate()
        proc.wait(10)
