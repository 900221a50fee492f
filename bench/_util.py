"""Shared helpers for the benchmarks: timing of whole commands and small statistics."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence


def time_command(argv: Sequence[str], runs: int, env: Mapping[str, str] | None = None) -> list[float]:
    """Wall seconds of `runs` runs of `argv`; each must exit 0."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
        samples.append(time.perf_counter() - start)
    return samples


def pct(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)
