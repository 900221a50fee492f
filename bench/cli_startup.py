"""Wall time of `spt node show` (daemon running) against `python3 -c pass`, in one run.

    .venv/bin/python bench/cli_startup.py [--runs N]

Target (issue 2): ratio ≤ 4. The two commands run in turn (load on a shared machine falls on
both alike), from compiled bytecode as an installed spt would.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _util import compile_spt, median, pct, row, time_command, time_interleaved

from spt.testing.nodes import NodeFactory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    spt_exe = shutil.which("spt", path=str(Path(sys.executable).parent)) or "spt"
    others = [
        ("spt ready --once (poll)", ["ready", "poller", "--once", "--timeout", "0"]),  # plain, like node show
        ("spt subnet status", ["subnet", "status"]),  # a built-in command through click
        ("spt rc --help", ["rc", "--help"]),  # a plugin's command, found in the cached table
    ]
    factory = NodeFactory()
    try:
        node = factory("bench")
        compile_spt()
        for argv in (["node", "show"], *(a for _, a in others)):
            time_command([spt_exe, *argv], 3, env=node.env)  # warm the page cache and the command table
        commands = [([sys.executable, "-c", "pass"], None, b""), ([spt_exe, "node", "show"], node.env, b"")]
        commands += [([spt_exe, *argv], node.env, b"") for _, argv in others]
        base, spt, *rest = time_interleaved(commands, args.runs)
    finally:
        factory.close()
    b, s = median(base), median(spt)
    print(f"python3 -c pass      median {b * 1000:7.1f} ms  p90 {pct(base, 0.9) * 1000:7.1f} ms")
    print(f"spt node show        median {s * 1000:7.1f} ms  p90 {pct(spt, 0.9) * 1000:7.1f} ms")
    print(f"ratio spt/python     {s / b:7.2f}x   (target <= 4)")
    print("other commands, same runs:")
    for (name, _), samples in zip(others, rest, strict=True):
        print(f"  {name:24} median {median(samples) * 1000:7.1f} ms  ratio {median(samples) / b:5.2f}x")
    row("`spt node show` wall time", s * 1000, "ms", baseline_name="python3 -c pass", baseline=b * 1000, goal="<= 4")

if __name__ == "__main__":
    tempfile.tempdir = os.environ.get("TMPDIR")
    main()
