"""Self-update costs, measured in one run against a plain daemon restart as the baseline.

    .venv/bin/python bench/update_apply.py

Prints: building a full release from this checkout (offline, `--deps installed`), its size,
the offline install into a versioned environment, and the daemon's downtime across `spt update
apply` (stop → exec into the new version → self-check passed) against `spt daemon stop` + start.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "spt_selfupdate" / "tests"))
from _util import row
from spt_selfupdate.release import build_release
from su_helpers import TestKeys

from spt.testing.nodes import DEFAULT_CONFIG, NodeFactory

CHECKOUT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="spt-bench-update-") as tmp:
        base = Path(tmp)
        keys = TestKeys(base)
        started = time.monotonic()
        release = build_release(CHECKOUT, "0.1.1", base / "src", keys.primary, deps="installed")
        build_s = time.monotonic() - started
        bundle = release / "spt-0.1.1.sptupdate"
        size_mb = bundle.stat().st_size / 1e6
        factory = NodeFactory()
        try:
            node = factory("bench", config=DEFAULT_CONFIG + f'\n[update]\nroot = "{base / "install"}"\n', env=keys.env)
            started = time.monotonic()
            node.stop()
            node.start()
            restart_s = time.monotonic() - started
            node.cli("update", "fetch", "--file", str(bundle), check=True)
            started = time.monotonic()
            node.cli("update", "apply", check=True, timeout=300)
            apply_s = time.monotonic() - started
            last = json.loads(node.cli("update", "status", "--json", check=True).stdout)["last_apply"]
            install_s = next(float(ln.split("seconds=")[1].split()[0]) for ln in node.log().splitlines()
                             if "release installed" in ln)
        finally:
            factory.close()
    print(f"release build (4 wheels + deps, offline)  {build_s:6.1f} s   bundle {size_mb:.1f} MB")
    print(f"offline install into versions/<v>          {install_s:6.1f} s")
    print(f"spt update apply, command to APPLIED       {apply_s:6.1f} s")
    print(f"daemon back after the restart (apply)      {last['back_after_s']:6.2f} s")
    print(f"baseline: daemon stop + start              {restart_s:6.2f} s")
    print(f"ratio apply downtime / plain restart       {last['back_after_s'] / restart_s:6.2f}x")
    row("daemon downtime across `spt update apply`", last["back_after_s"], "s",
        baseline_name="`spt daemon stop` + start", baseline=restart_s,
        note=f"install {install_s:.1f} s, build {build_s:.1f} s, bundle {size_mb:.1f} MB")
    row("daemon back after an apply (SPEC: within 10 s)", last["back_after_s"], "s", goal="<= 10")


if __name__ == "__main__":
    main()
