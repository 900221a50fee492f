"""At a real terminal (SPEC.md §3.1 "interactive"): Ctrl-C and Ctrl-D give the same answer on the
plain path and through click, never "internal error" (§3.2); prompts the spec promises are asked."""

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
        # as a shell starts a foreground job: SIGINT delivered and handled by default, whatever
        # the pytest worker that forked had (an ignored or blocked signal survives exec)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)
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


def test_interactive_endpoint_run_on_a_node_in_two_subnets_proposes_the_home(spt_nodes):
    """SPEC.md §2.5: interactive `endpoint run` proposes the subnet last used as a home and asks;
    it refused with MULTI_SUBNET_HOME as if non-interactive (the daemon's refusal arrives as a
    TokenError, and the prompt waited for a Refusal)."""
    node = spt_nodes("n")
    node.cli("subnet", "create", "home", check=True)
    node.cli("subnet", "create", "work", check=True)
    node.cli("endpoint", "run", "--id", "first", "--subnet", "work", "--", "sleep", "30", check=True)
    screen, code = at_a_terminal(node, "endpoint", "run", "--id", "second", "--", "sleep", "30",
                                 until="Home subnet for this endpoint", keys=b"\r")  # take the proposal
    assert code == 0 and "ENDPOINT_RUN:second pid=" in screen, screen
    assert "(work, home) [work]" in screen, screen  # proposed first: the last home used here
    local = {p["id"]: p["home"] for p in node.json("endpoint", "list")["local"]}
    assert local == {"first": "work", "second": "work"}
    refused = node.cli("endpoint", "run", "--id", "third", "--", "sleep", "30")  # not a terminal: the refusal
    assert refused.returncode == 1 and refused.stderr.startswith("MULTI_SUBNET_HOME:"), refused.stderr
    for perch in ("first", "second"):
        node.cli("endpoint", "purge", perch, "--yes", check=True)
