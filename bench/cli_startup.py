"""Wall time of `spt node show` (daemon running) against `python3 -c pass`, in one run.

    .venv/bin/python bench/cli_startup.py [--runs N]

Target (issue 2): ratio ≤ 4. The two commands run in turn (load on a shared machine falls on
both alike), from compiled bytecode as an installed spt would. Other commands are timed in the
same runs; `spt subnet create` (issue 14: ≤ 200 ms, QR code included) only as root, since it is
an elevated command, and `--debug` sends a plain command through click for comparison. Also as
root: `ready --once`, `send`, `ring` and `whoami` on a node that holds HELD_SUBNETS subnets, beside the
same commands on the node that holds none (what they cost per subnet held, issue 14).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _util import compile_spt, median, pct, row, time_command, time_interleaved

from spt.testing.nodes import NodeFactory

HELD_SUBNETS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    spt_exe = shutil.which("spt", path=str(Path(sys.executable).parent)) or "spt"
    others: list[tuple[str, Callable[[int], list[str]]]] = [
        ("spt ready --once (poll)", lambda _: ["ready", "poller", "--once", "--timeout", "0"]),  # plain, like node show
        ("spt subnet status", lambda _: ["subnet", "status"]),  # plain
        ("spt subnet status (click)", lambda _: ["--debug", "subnet", "status"]),  # the same through click
        ("spt rc --help", lambda _: ["rc", "--help"]),  # a plugin's command, found in the cached table
    ]
    creates: list[tuple[str, Callable[[int], list[str]]]] = []
    # (name, argv, stdin, env), each on the node with no subnet and on the one with HELD_SUBNETS;
    # as an agent would (SPT_AGENT_ID=poller) or with no identity (a new transient sender each time)
    agent, nobody = {"SPT_AGENT_ID": "poller"}, {}
    per_subnet: list[tuple[str, Callable[[int], list[str]], bytes, dict[str, str]]] = []
    if os.geteuid() == 0:
        per_subnet = [
            ("spt ready --once", lambda _: ["ready", "poller", "--once", "--timeout", "0"], b"", agent),
            ("spt send", lambda _: ["send", "poller"], b"hi", agent),
            ("spt send, no identity", lambda _: ["send", "poller"], b"hi", nobody),
            ("spt ring --timeout 0", lambda _: ["ring", "poller", "--timeout", "0"], b"hi", agent),  # TIMEOUT at once
            ("spt whoami", lambda _: ["whoami"], b"", agent),
        ]
        creates = [
            ("spt subnet create", lambda run: ["subnet", "create", f"plain{run}"]),  # plain; a new subnet each run
            ("spt subnet create (click)", lambda run: ["--debug", "subnet", "create", f"click{run}"]),
        ]
    factory = NodeFactory()
    try:
        node = factory("bench")
        # the subnets created pile up on a node of their own: `ready` and `subnet status` cost
        # more with every subnet held, and would be timed on a different node each run
        creator = factory("bench-create") if creates else node
        holder = factory("bench-held") if per_subnet else node
        for i in range(HELD_SUBNETS if per_subnet else 0):
            holder.cli("subnet", "create", f"held{i}", check=True)
        if per_subnet:  # the poller is homed in one of them, and drains what the sends leave
            holder.cli("ready", "poller", "--subnet", "held0", "--once", "--timeout", "0", check=True)
        compile_spt()
        for argv in (["node", "show"], *(a(-1) for _, a in others)):
            time_command([spt_exe, *argv], 3, env=node.env)  # warm the page cache and the command table
        for _, words in creates:
            time_command([spt_exe, *words(-1)], 1, env=creator.env)
        for _, words, stdin, who in per_subnet:
            for n in (node, holder):
                time_command([spt_exe, *words(-1)], 1, env={**n.env, **who}, input=stdin)
        commands: list[tuple[list[str] | Callable[[int], list[str]], dict[str, str] | None, bytes]] = [
            ([sys.executable, "-c", "pass"], None, b""), ([spt_exe, "node", "show"], node.env, b"")
        ]

        def spt_argv(words: Callable[[int], list[str]]) -> Callable[[int], list[str]]:
            return lambda run: [spt_exe, *words(run)]

        commands += [(spt_argv(words), node.env, b"") for _, words in others]
        commands += [(spt_argv(words), creator.env, b"") for _, words in creates]
        others += creates
        for name, words, stdin, who in per_subnet:
            commands += [(spt_argv(words), {**n.env, **who}, stdin) for n in (node, holder)]
            others += [(f"{name} (0 subnets)", words), (f"{name} ({HELD_SUBNETS} subnets)", words)]
        base, spt, *rest = time_interleaved(commands, args.runs)
    finally:
        factory.close()
    b, s = median(base), median(spt)
    print(f"python3 -c pass      median {b * 1000:7.1f} ms  p90 {pct(base, 0.9) * 1000:7.1f} ms")
    print(f"spt node show        median {s * 1000:7.1f} ms  p90 {pct(spt, 0.9) * 1000:7.1f} ms")
    print(f"ratio spt/python     {s / b:7.2f}x   (target <= 4)")
    print("other commands, same runs:")
    for (name, _), samples in zip(others, rest, strict=True):
        print(f"  {name:34} median {median(samples) * 1000:7.1f} ms  ratio {median(samples) / b:5.2f}x")
    row("`spt node show` wall time", s * 1000, "ms", baseline_name="python3 -c pass", baseline=b * 1000, goal="<= 4")

if __name__ == "__main__":
    tempfile.tempdir = os.environ.get("TMPDIR")
    main()
