"""``python -m spt.testing.labcheck``: build a small netns lab and use every tool the lab tests
need; exit 1 with the reason when it cannot be built. `scripts/test.sh` runs it first as root, so
CI fails (rather than skips) on a machine without the lab."""

from __future__ import annotations

import subprocess
import sys

from spt.testing.netns import LabError, self_check


def main() -> int:
    try:
        timings = self_check()
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        print(f"LAB_UNAVAILABLE: {exc}", file=sys.stderr)
        return 1
    print(f"LAB_OK: built and checked in {timings['self_check']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
