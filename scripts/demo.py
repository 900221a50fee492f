"""The local multi-node demo: spt's main job on one machine, each step timed.

Three nodes (alpha, beta, gamma) run side by side, each with its own SPT_HOME, bound to
127.0.0.1 with mDNS off, so no packet of the demo leaves the machine. alpha creates the subnet
`home`; beta and gamma join it with the six-digit code; then agents on different nodes message
each other by name: send, ring and reply, a queued message, and a file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from spt.testing.nodes import Node, NodeFactory

T = TypeVar("T")


def step(title: str, action: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = action()
    print(f"[{(time.perf_counter() - start) * 1000:8.1f} ms] {title}", flush=True)
    return result


def show(text: str) -> None:
    for line in text.strip().splitlines():
        print(f"             {line}")


EXIT_ELEVATION = 4  # SPEC.md §3.2
NEEDS_ROOT = ("spt demo: creating and joining a subnet needs elevation (SPEC.md §5.7), and this shell "
              "cannot ask for it; run: sudo bash scripts/demo.sh")


def elevation() -> list[str] | None:
    """How elevated steps run: directly as root, else through sudo, asked once up front.

    Like the CLI itself (§5.7), only an interactive terminal is asked for a password; without
    one (or without sudo) the demo says in one line how to run it and exits 4.
    """
    if os.geteuid() == 0:
        return []
    sudo = shutil.which("sudo")
    if sudo is None or not (sys.stdin.isatty() and sys.stderr.isatty()):
        return None
    print("The demo creates a subnet and joins two nodes to it, which spt allows only elevated: "
          "sudo asks once, now.", file=sys.stderr, flush=True)
    if subprocess.run([sudo, "-v"], check=False).returncode != 0:
        return None
    return [sudo, "-n", "env"]


ELEVATE: list[str] = []


def run(node: Node, *args: str, input: str | None = None, elevated: bool = False) -> str:
    if elevated and ELEVATE:
        # the daemon runs as this user; the elevated client acts on it through SPT_HOME (§5.7)
        command = [*ELEVATE, f"SPT_HOME={node.home}", "SPT_NO_AUTOSTART=1", sys.executable, "-m", "spt", *args]
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=60, check=False)
    else:
        result = node.cli(*args, input=input)
    if result.returncode != 0:
        raise SystemExit(f"spt {' '.join(args)} on {node.name} failed ({result.returncode}): {result.stderr.strip()}")
    return (result.stdout + result.stderr).strip()


def main() -> int:
    prefix = elevation()
    if prefix is None:
        print(NEEDS_ROOT, file=sys.stderr)
        return EXIT_ELEVATION
    ELEVATE[:] = prefix
    factory = NodeFactory()
    try:
        alpha, beta, gamma = step(
            "start three nodes: alpha, beta, gamma", lambda: [factory(n, label=n) for n in ("alpha", "beta", "gamma")]
        )
        created = step("alpha: spt subnet create home", lambda: run(alpha, "subnet", "create", "home", elevated=True))
        show("\n".join(line for line in created.splitlines() if line.startswith(("CREATED", "CODE"))))
        code = re.search(r"^CODE:home (\d{6}) ", created, re.M)
        assert code is not None
        for node in (beta, gamma):
            out = step(
                f"{node.name}: spt subnet join home --code {code.group(1)} --peer {alpha.address}",
                lambda node=node: run(node, "subnet", "join", "home", "--code", code.group(1), "--peer", alpha.address,
                                      elevated=True),
            )
            show(out)
        show(step("gamma: spt subnet status --nodes", lambda: run(gamma, "subnet", "status", "--nodes")))

        bob = gamma.popen("ready", "bob")
        step("gamma: agent bob runs `spt ready bob`", lambda: bob.stderr.readline())
        step("alpha: bob's row replicated to alpha", lambda: alpha.wait_listed("bob"))
        show(step("alpha: echo hi | spt send bob --from alice", lambda: run(alpha, "send", "bob", "--from", "alice", input="hi bob")))
        got = bob.stdout.readline().strip()
        show("bob got: " + got)
        sender = re.search(r'from="([^"]+)"', got)
        assert sender is not None
        show(step(f"gamma: bob replies: spt send {sender.group(1)} --from bob (from= leads back)",
                  lambda: run(gamma, "send", sender.group(1), "--from", "bob", input="hi alice")))
        show(step("alpha: spt ready alice --once (alice's perch held the reply)",
                  lambda: run(alpha, "ready", "alice", "--once", "--timeout", "5")))

        def bob_answers() -> None:
            line = bob.stdout.readline()
            sender = re.search(r'from="([^"]+)"', line)
            if sender:
                gamma.cli("send", sender.group(1), "--from", "bob", input="pong")

        answerer = threading.Thread(target=bob_answers, daemon=True)
        answerer.start()
        ring = step("alpha: echo ping | spt ring bob (bob answers with spt send)",
                    lambda: alpha.cli("ring", "bob", "--timeout", "20", input="ping"))
        answerer.join(10)
        show(ring.stdout + ring.stderr)
        bob.terminate()
        bob.wait(10)

        carol = gamma.popen("ready", "carol")
        carol.stderr.readline()
        carol.terminate()
        carol.wait(10)
        step("alpha: carol's row replicated to alpha", lambda: alpha.wait_listed("carol"))
        show(step("alpha: spt send carol (nobody listening)", lambda: run(alpha, "send", "carol", input="see you later")))
        show(step("gamma: spt ready carol --once (the queued message, once)",
                  lambda: run(gamma, "ready", "carol", "--once", "--timeout", "5")))

        if alpha.cli("file", "--help").returncode == 0:
            with tempfile.TemporaryDirectory() as tmp:
                report = Path(tmp) / "report.txt"
                report.write_text("spt demo\n" * 100_000)
                show(step("alpha: spt file send report.txt carol --wait --from alice (900 KB)",
                          lambda: run(alpha, "file", "send", str(report), "carol", "--wait", "--from", "alice")))
            show(step("gamma: carol receives the file event", lambda: run(gamma, "ready", "carol", "--once", "--timeout", "5")))
        print("demo finished: every step above ran on this machine, over loopback only", flush=True)
    finally:
        factory.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.TimeoutExpired as exc:
        sys.exit(f"demo step timed out: {exc}")
