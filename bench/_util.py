"""Shared helpers for the benchmarks: timing of whole commands and small statistics."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence


def time_command(
    argv: Sequence[str], runs: int, env: Mapping[str, str] | None = None, *, input: bytes = b"", timeout: float = 60
) -> list[float]:
    """Wall seconds of `runs` runs of `argv`; each must exit 0 within `timeout`.

    stdin is `input` (empty by default), never the bench's own terminal or stdin.
    """
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, input=input, capture_output=True, env=env, timeout=timeout)
        samples.append(time.perf_counter() - start)
    return samples


def time_interleaved(
    commands: Sequence[tuple[Sequence[str] | Callable[[int], Sequence[str]], Mapping[str, str] | None, bytes]],
    runs: int, *, timeout: float = 60,
) -> list[list[float]]:
    """`time_command` for several (argv, env, input) commands, one run of each in turn, so that
    load from elsewhere on a shared machine falls on all of them alike; samples per command.
    An argv may be a function of the run's number (a command that must differ each time)."""
    samples: list[list[float]] = [[] for _ in commands]
    for run in range(runs):
        for i, (argv, env, input) in enumerate(commands):
            samples[i] += time_command(argv(run) if callable(argv) else argv, 1, env, input=input, timeout=timeout)
    return samples


def compile_spt() -> None:
    """Write spt's bytecode, as installing it does (pip compiles a wheel's modules at install).

    A start-up figure is about an installed spt: an editable tree run under
    PYTHONDONTWRITEBYTECODE=1 would compile every module it loads, at every start.
    """
    import compileall
    import os

    import spt

    compileall.compile_dir(os.path.dirname(spt.__file__), quiet=1)


def pct(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


# --- rows for bench/all.py ---------------------------------------------------------------------
# Each bench prints its own figures and, when SPT_BENCH_ROWS names a file, also appends one JSON
# line per headline figure there; bench/all.py runs every bench and turns those lines into
# bench/RESULTS.md. `goal` is ">= x" (higher is better) or "<= x" (lower is better) and applies to
# `ratio` (value / baseline) when there is a baseline, else (or with goal_on="value") to `value`.

ROWS_ENV = "SPT_BENCH_ROWS"


def row(
    figure: str,
    value: float,
    unit: str,
    *,
    baseline_name: str = "",
    baseline: float | None = None,
    goal: str = "",
    goal_on: str = "",
    note: str = "",
) -> None:
    """Record one headline figure for bench/all.py (a no-op when run alone)."""
    import json
    import os

    path = os.environ.get(ROWS_ENV)
    if not path:
        return
    ratio = value / baseline if baseline else None
    on_value = goal_on == "value" or not baseline
    record = {"figure": figure, "value": value, "unit": unit, "baseline_name": baseline_name,
              "baseline": baseline, "ratio": ratio, "goal": goal, "goal_on": "value" if on_value else "ratio",
              "note": note}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def goal_met(goal: str, measured: float | None) -> bool | None:
    """Whether `measured` meets `goal` (">= 1.0", "<= 3"); None when either is missing."""
    if not goal or measured is None:
        return None
    op, _, bound = goal.partition(" ")
    limit = float(bound)
    return measured >= limit if op == ">=" else measured <= limit
