"""Run every benchmark and write one table (figure, baseline, ratio, goal) to bench/RESULTS.md.

    sudo .venv/bin/python bench/all.py [--quick] [--only NAME ...] [--out bench/RESULTS.md]

Each bench runs as its own process (stdin closed, bounded in time) and records its headline
figures through `_util.row` into a file named by SPT_BENCH_ROWS; its full output is kept under
the table. Benches that need root (the namespace labs) print a skip note without it. Figures are
ratios against baselines measured in the same run, on this machine; the table says which machine
and commit. Not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _util import ROWS_ENV, goal_met

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# name -> (full arguments, --quick arguments, time limit in seconds)
BENCHES: dict[str, tuple[list[str], list[str], float]] = {
    "cli_startup": ([], ["--runs", "10"], 300),
    "transport": ([], ["--quick"], 900),
    "messaging": ([], ["--quick"], 600),
    "files": ([], ["--mb", "256", "--runs", "5", "--quic-mb", "16"], 1800),
    "channel": ([], ["--mb", "128", "--runs", "5"], 600),
    "join": ([], ["--runs", "3"], 600),
    "reach": ([], ["--quick"], 900),
    "nat_files": ([], ["--mb", "32", "--runs", "3"], 900),
    "scale": (["--simulate", "100,500", "--trials", "3"],
              ["--simulate", "100,500", "--loss", "0,0.01", "--nodes", "20", "--idle", "5"], 1200),
    "rc": ([], ["--quick"], 900),
    "update_apply": ([], [], 600),
    "fuzz": ([], ["--inputs", "100000", "--garbage-seconds", "5"], 1800),
    "replication": ([], ["--quick"], 1200),
}


def run_one(name: str, args: list[str], limit: float) -> tuple[list[dict[str, Any]], str, float]:
    """Rows, output and wall seconds of one bench."""
    with tempfile.NamedTemporaryFile(prefix=f"spt-rows-{name}-", suffix=".jsonl", delete=False) as fh:
        rows_path = Path(fh.name)
    env = {**os.environ, ROWS_ENV: str(rows_path)}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH / f"{name}.py"), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=limit,
        )
        output = done.stdout + (f"\n[stderr, exit {done.returncode}]\n{done.stderr[-3000:]}" if done.returncode else "")
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output = out + f"\n[stopped after {limit:.0f} s]"
    elapsed = time.perf_counter() - started
    try:
        lines = rows_path.read_text().splitlines()
    finally:
        rows_path.unlink(missing_ok=True)
    return [json.loads(line) for line in lines if line.strip()], output, elapsed


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| figure | value | baseline | ratio | goal | met |", "|---|---:|---|---:|---|:-:|"]
    for r in rows:
        on_value = r.get("goal_on", "ratio" if r["baseline"] else "value") == "value"
        measured = r["value"] if on_value else r["ratio"]
        met = goal_met(r["goal"], measured)
        baseline = f"{r['baseline_name']} {fmt(r['baseline'], r['unit'])}".strip() if r["baseline"] else ""
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else ""
        goal = r["goal"] + ((f" {r['unit']}" if on_value else "×") if r["goal"] else "")
        figure = r["figure"] + (f" ({r['note']})" if r.get("note") else "")
        mark = {True: "yes", False: "**no**", None: ""}[met]
        lines.append(f"| {figure} | {fmt(r['value'], r['unit'])} | {baseline} | {ratio} | {goal} | {mark} |")
    return lines


def commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these benches")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    outputs: list[str] = []
    for name, (full, quick, limit) in BENCHES.items():
        if args.only and name not in args.only:
            continue
        bench_args = quick if args.quick else full
        print(f"== {name} {' '.join(bench_args)}", flush=True)
        got, output, elapsed = run_one(name, bench_args, limit)
        print(output, flush=True)
        for r in got:
            r["bench"] = name
        rows += got
        outputs.append(f"### {name}.py {' '.join(bench_args)} ({elapsed:.0f} s)\n\n```\n{output.strip()}\n```\n")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = [
        "# Benchmark results",
        "",
        f"`{' '.join(['python', 'bench/all.py', *sys.argv[1:]])}` on {now}; commit {commit()};"
        f" {os.cpu_count()} CPUs, {'root' if os.geteuid() == 0 else 'not root (namespace labs skipped)'}.",
        "Each ratio is the figure over a baseline measured in the same run on the same machine;"
        " `met` compares the ratio (or the figure, where there is no baseline) with the goal of issue 14.",
        "",
        *table(rows),
        "",
        "## Full output",
        "",
        *outputs,
    ]
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
