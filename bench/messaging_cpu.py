"""Daemon CPU per durable message, alpha -> beta, from /proc (robust to a loaded machine).

    .venv/bin/python bench/messaging_cpu.py [--seconds 5] [--shapes batched,one4,one16]

Runs `bench/messaging.py`'s sustained shapes on a fresh pair of daemons: `batched` (4 senders x
16 messages per `msg.send_many` call), `one4` and `one16` (4 or 16 senders, one `msg.send` per
control call). For each: messages per second, and each daemon's CPU (utime+stime of all its
threads) per message, split into the event loop's thread and the others (the group-commit
writer). For an A/B against another tree, run it from a folder without `spt/` in it (`python -m`
puts the working folder first on the daemons' path) with that tree on PYTHONPATH, alternately.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from messaging import sustained, sustained_batched

import spt
from spt.testing.nodes import NodeFactory

TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> dict[str, float]:
    """CPU seconds of `pid`'s threads: the main thread (the event loop) and the rest."""
    out = {"loop": 0.0, "others": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        out["loop" if tid == str(pid) else "others"] += (int(fields[11]) + int(fields[12])) / TICK
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--shapes", default="batched,one4,one16")
    args = parser.parse_args()
    print(f"spt from {Path(spt.__file__).parent}")
    factory = NodeFactory()
    try:
        alpha, beta = factory.subnet(["alpha", "beta"])
        beta.cli("ready", "sink", "--once", "--timeout", "0.1")
        alpha.wait_listed("sink")
        sustained_batched(alpha, 1.0, 4, 16)  # warm up: connection, caches
        for shape in args.shapes.split(","):
            assert alpha.proc is not None and beta.proc is not None
            before = [cpu(n.proc.pid) for n in (alpha, beta)]
            start = time.monotonic()
            if shape == "batched":
                rate = sustained_batched(alpha, args.seconds, 4, 16)
            else:
                rate = sustained(alpha, args.seconds, int(shape.removeprefix("one")))
            count = rate * (time.monotonic() - start)
            after = [cpu(n.proc.pid) for n in (alpha, beta)]
            per = [{k: (a[k] - b[k]) / count * 1e3 for k in a} for a, b in zip(after, before, strict=True)]
            print(f"{shape:8s} {rate:7.0f} msg/s  CPU ms/msg  alpha {sum(per[0].values()):.3f}"
                  f" (loop {per[0]['loop']:.3f})  beta {sum(per[1].values()):.3f} (loop {per[1]['loop']:.3f},"
                  f" writer {per[1]['others']:.3f})  load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        factory.close()


if __name__ == "__main__":
    main()
