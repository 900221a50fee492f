"""Where a LAN file transfer's time goes: CPU of both daemons by kind of work, and wall phases.

    .venv/bin/python bench/files_profile.py [--mb 256] [--runs 3]

Two daemons on loopback; `--runs` transfers of one file of random bytes through the control
socket (no CLI start-up: that is `bench/cli_startup.py`'s figure). For each transfer it prints
the wall time, the phases the daemons log (scan done and offer sent, file renamed into place,
FILE_SENT) and the CPU each daemon used. With `perf` on the PATH and root, both daemons are
sampled for the whole run and their CPU is split into BLAKE3, AES-GCM, copies into the page
cache (buffered writes), other kernel copies (reads, sockets), fsync/writeback, the Python
interpreter and the rest, in ms per transfer. A diagnosis tool, not a target.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from files import make_file

from spt.testing.nodes import Node, NodeFactory, fresh_code

# first match wins: (category, substring of a perf symbol or shared object)
CATEGORIES = (
    ("BLAKE3 hashing", "blake3"),
    ("AES-GCM", "aes_gcm"),
    ("AES-GCM", "gcm_"),
    ("copy into page cache (buffered write)", "copy_folio_from_iter"),
    ("other kernel copies (reads, sockets)", "copy_to_iter"),
    ("other kernel copies (reads, sockets)", "copy_from_iter"),
    ("other kernel copies (reads, sockets)", "copy_page_to_iter"),
    ("Python interpreter", "python3"),
    ("Python interpreter", "_PyEval"),
    ("SQLite", "sqlite"),
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send(node: Node, path: Path) -> str:
    doc = node.ipc("file.send", {"paths": [str(path)], "address": "sink", "message": "", "from": None, "wait": True},
                   timeout=300)
    if doc.get("token") != "FILE_SENT":
        raise RuntimeError(f"send failed: {doc}")
    return str(doc["tid"])


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def phases(nodes: dict[str, Node], tid: str, start: float) -> str:
    """`<side> <event> +ms` for the transfer's log lines, in time order."""
    events = []
    for side, node in nodes.items():
        for line in node.log().splitlines():
            m = _STAMP.match(line)
            if m is None or tid not in line or "spt_filetransfer" not in line:
                continue
            when = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            what = line.split("spt_filetransfer.service: ", 1)[-1].split(" tid=")[0]
            events.append((when, f"{side} {what} +{(when - start) * 1000:.0f}"))
    return ", ".join(text for _, text in sorted(events))


def perf_breakdown(data: Path, runs: int) -> None:
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio", "-g", "none",
         "--percent-limit", "0", "-F", "period,dso,sym"],
        capture_output=True, text=True, check=False,
    )
    totals: collections.Counter[str] = collections.Counter()
    for line in report.stdout.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        period, _, rest = line.strip().partition(" ")
        if not period.isdigit():
            continue
        kind = next((name for name, needle in CATEGORIES if needle in rest), None)
        if kind is None:
            kind = "other kernel work" if "[kernel" in rest else "other user space"
        totals[kind] += int(period)
    whole = sum(totals.values())
    if not whole:
        print(f"perf gave no samples: {report.stderr.strip()[:200]}")
        return
    print(f"CPU of both daemons by kind (perf, ms per transfer; {whole / 1e6 / runs:.0f} ms in all):")
    for kind, value in totals.most_common():
        print(f"  {kind:40} {value / 1e6 / runs:6.0f}   {100 * value / whole:4.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256, help="file size in MiB")
    parser.add_argument("--runs", type=int, default=3, help="transfers to time and sample")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spt-bench-fprof-"))
    factory = NodeFactory()
    perf: subprocess.Popen[bytes] | None = None
    try:
        src = work / "payload.bin"
        make_file(src, args.mb)
        warm = work / "warm.bin"
        make_file(warm, 1)
        a, b = factory("a", label="alpha"), factory("b", label="beta")
        a.cli("subnet", "create", "bench", check=True)
        b.cli("subnet", "join", "bench", "--code", fresh_code(a, "bench"), "--peer", a.address, check=True)
        b.cli("ready", "sink", "--once", "--timeout", "0.1")
        deadline = time.monotonic() + 30
        while True:  # the perch's row replicates to the sender
            try:
                send(a, warm)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert a.proc is not None and b.proc is not None
        if shutil.which("perf") and os.geteuid() == 0:
            perf = subprocess.Popen(
                ["perf", "record", "-F", "999", "-o", str(work / "perf.data"), "-p", f"{a.proc.pid},{b.proc.pid}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        else:
            print("perf: not run (needs perf on the PATH and root); wall and CPU totals only")
        inbox = b.home / "endpoints" / "sink" / "inbox"
        walls = []
        for _ in range(args.runs):
            os.sync()
            cpu_a, cpu_b = cpu_seconds(a.proc.pid), cpu_seconds(b.proc.pid)
            start = time.time()
            tid = send(a, src)
            wall = time.time() - start
            walls.append(wall)
            cpu_a, cpu_b = cpu_seconds(a.proc.pid) - cpu_a, cpu_seconds(b.proc.pid) - cpu_b
            print(f"{args.mb} MiB in {wall * 1000:.0f} ms ({src.stat().st_size / wall / 1e6:.0f} MB/s); "
                  f"CPU sender {cpu_a * 1000:.0f} ms, receiver {cpu_b * 1000:.0f} ms; "
                  f"{phases({'sender': a, 'receiver': b}, tid, start)}")
            shutil.rmtree(inbox, ignore_errors=True)
        print(f"median {statistics.median(walls) * 1000:.0f} ms")
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
            perf = None
            perf_breakdown(work / "perf.data", args.runs)
    finally:
        if perf is not None and perf.poll() is None:
            perf.kill()
        factory.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
