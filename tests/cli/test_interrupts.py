"""Ctrl-C and Ctrl-D at a terminal: the same answer on the plain path and through click, and
never "internal error" (SPEC.md §3.1 interactive use, §3.2 exit codes)."""

import os
import pty
import select
import signal
import sys
import time

import pytest

from spt.testing.nodes import skip_unless_root

pytestmark = pytest.mark.slow


def at_a_terminal(node, *args, until, keys=None, sig=None, timeout=20.0):
    """Run `spt ARGS…` on a new pseudo-terminal (stdin, stdout and stderr, as in a shell); once
    `until` is on the screen, type `keys` or send `sig`. Returns (screen text, exit code)."""
    skip_unless_root(args)
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once, nothing else (it is a fork of pytest)
        os.execve(sys.executable, [sys.executable, "-m", "spt", *args], node.env)
    screen = b""
    deadline = time.monotonic() + timeout
    acted = False
    status = None
    try:
        while time.monotonic() < deadline:
            if not acted and until.encode() in screen:
                time.sleep(0.2)  # the read or the prompt is waiting by now
                if keys is not None:
                    os.write(fd, keys)
                if sig is not None:
                    os.kill(pid, sig)
                acted = True
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                screen += chunk
                if chunk:
                    continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            status = None
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"spt {' '.join(args)} did not end: {screen!r}")
    finally:
        os.close(fd)
    return screen.decode().replace("\r\n", "\n"), os.waitstatus_to_exitcode(status)


def test_ctrl_c_at_the_join_code_prompt_is_an_abort_not_an_internal_error(spt_nodes):
    node = spt_nodes("n")
    for global_options in ((), ("--debug",)):  # the plain path, then click
        screen, code = at_a_terminal(node, *global_options, "subnet", "join", "home", until="Code shown on a member",
                                     sig=signal.SIGINT)
        assert "internal error" not in screen and screen.endswith("Aborted.\n"), screen
        assert code == 130, screen
        screen, code = at_a_terminal(node, *global_options, "subnet", "join", "home", until="Code shown on a member",
                                     keys=b"\x04")  # Ctrl-D: the prompt ends without a code
        assert "internal error" not in screen and screen.endswith("Aborted.\n") and code == 1, screen


def test_ctrl_c_while_send_reads_the_terminal_is_the_same_on_both_paths(spt_nodes):
    node = spt_nodes("n")
    node.cli("ready", "bob", "--once", "--timeout", "0", check=True)
    answers = [at_a_terminal(node, *global_options, "send", "bob", until="Ctrl-D", sig=signal.SIGINT)
               for global_options in ((), ("--debug",))]
    assert answers[0] == answers[1]
    screen, code = answers[0]
    assert screen.endswith("\nAborted.\n") and code == 130, screen
    # nothing was sent: an interrupted body is not a message
    assert node.cli("ready", "bob", "--once", "--timeout", "0").stdout == "TIMEOUT\n"
