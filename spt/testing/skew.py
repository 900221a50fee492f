"""``python -m spt.testing.skew SECONDS ARGS…``: run ``spt ARGS…`` with this process's wall clock
(`time.time`) moved by SECONDS. A fault point for tests (a member whose clock is off), kept out
of product code; monotonic clocks are untouched, as they are on a machine whose clock is wrong."""

from __future__ import annotations

import runpy
import sys
import time


def main() -> None:
    offset = float(sys.argv[1])
    real = time.time
    time.time = lambda: real() + offset
    sys.argv = ["spt", *sys.argv[2:]]
    runpy.run_module("spt", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
