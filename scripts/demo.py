"""The local multi-node demo: several nodes on this machine, each with its own SPT_HOME.

Every node binds 127.0.0.1 with mDNS off, so no packet of the demo leaves the machine. Each
step prints its wall time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

from spt.testing.nodes import NodeFactory

T = TypeVar("T")


def step(title: str, action: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = action()
    print(f"[{(time.perf_counter() - start) * 1000:8.1f} ms] {title}")
    return result


def main() -> int:
    factory = NodeFactory()
    try:
        nodes = step("start three nodes (alpha, beta, gamma)", lambda: [factory(n, label=n) for n in ("alpha", "beta", "gamma")])
        for node in nodes:
            shown = step(f"spt node show on {node.name}", lambda node=node: node.cli("node", "show", check=True).stdout)
            print("    " + shown.splitlines()[0])
    finally:
        factory.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
