"""`spt rc` in a real terminal (tmux): the hosted PTY follows the viewer's size, the detach key
restores the terminal's mode and prints RC_DETACHED. tmux is one of setup.sh's packages; the
test is marked `root` so that CI (root) must run it and a plain user's run skips it visibly."""

import shlex
import shutil
import subprocess
import sys

import pytest

from spt.testing.wait import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.root]

SIZE_PRINTER = r"""
import os, time
last = None
for _ in range(1200):
    size = os.get_terminal_size(0)
    if size != last:
        print(f"size {size.lines} {size.columns}", flush=True)
        last = size
    time.sleep(0.05)
"""


def test_rc_follows_the_terminal_size_and_restores_the_terminal_on_detach(spt_nodes, tmp_path):
    tmux = shutil.which("tmux")
    assert tmux, "tmux is missing: bash scripts/setup.sh installs it"
    a = spt_nodes("a")
    prog = tmp_path / "size.py"
    prog.write_text(SIZE_PRINTER)
    a.cli("endpoint", "run", "--id", "sz", "--", sys.executable, str(prog), check=True)
    sock, after = tmp_path / "tmux.sock", tmp_path / "stty-after"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in a.env.items() if k.startswith(("SPT_", "PATH", "HOME")))
    inner = (f"env {env} {shlex.quote(sys.executable)} -m spt rc sz; "
             f"stty -a > {shlex.quote(str(after))}; sleep 60")

    def tm(*args):
        return subprocess.run([tmux, "-S", str(sock), "-f", "/dev/null", *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout

    tm("new-session", "-d", "-x", "100", "-y", "30", "sh", "-c", inner)
    try:
        def pane():
            return tm("capture-pane", "-p")

        def size():
            h, w = tm("display", "-p", "#{pane_height} #{pane_width}").split()
            return f"size {h} {w}"

        first = size()
        wait_for(lambda: first in pane(), what=f"the hosted program to see {first}")
        tm("resize-window", "-x", "120", "-y", "40")
        second = size()
        assert second != first
        wait_for(lambda: second in pane(), what=f"the hosted program to see {second}")
        tm("send-keys", "C-]")
        wait_for(lambda: "RC_DETACHED:sz" in pane(), what="RC_DETACHED")
        wait_for(lambda: after.exists() and after.stat().st_size > 0, what="stty after detach")
        modes = after.read_text().split()
        assert "icanon" in modes and "echo" in modes and "-icanon" not in modes  # cooked again
        assert a.json("endpoint", "list")["local"][0]["alive"] is True  # detaching ends nothing
    finally:
        subprocess.run([tmux, "-S", str(sock), "kill-server"], capture_output=True, timeout=10)
        a.cli("endpoint", "purge", "sz", "--yes")
