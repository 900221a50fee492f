"""A listener draining a backlog: messages per second one `spt ready` hands out and has acked.

    .venv/bin/python bench/drain.py [--messages N]

One node; N messages are spooled for perch bob (`msg.send_many`, 100 per call) while nobody
listens, then one listener on the control protocol (what `spt ready` does, minus process
start-up) acks each envelope as its last line arrives, until all N were handed out. Each
message leaves the spool only in the commit of its ack (group commit), as always.
"""

from __future__ import annotations

import argparse
import time

from spt.core.ipc import call, connect
from spt.testing.nodes import NodeFactory


def drain(messages: int) -> float:
    factory = NodeFactory()
    try:
        node = factory("solo")
        node.cli("ready", "bob", "--once", "--timeout", "0.1")
        for start in range(0, messages, 100):
            conn = connect(node.home / "spt.sock")
            try:
                batch = [{"address": "bob", "body": f"m{start + i}"} for i in range(min(100, messages - start))]
                call(conn, "msg.send_many", {"from": "me", "messages": batch})
            finally:
                conn.close()
        conn = connect(node.home / "spt.sock")
        begin = time.perf_counter()
        conn.send({"v": 1, "op": "endpoint.ready", "args": {"id": "bob", "timeout": 0.5}, "interactive": False})
        acked, elapsed = 0, 0.0
        for msg in conn.lines(timeout=120):
            event = msg.get("event", {})
            if event.get("last"):
                conn.send({"ack": event["msg"]})
                acked += 1
                if acked == messages:
                    elapsed = time.perf_counter() - begin
            if "result" in msg or "error" in msg:
                break
        conn.close()
        if acked != messages:
            raise SystemExit(f"only {acked} of {messages} handed out")
        return messages / elapsed
    finally:
        factory.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=800)
    args = parser.parse_args()
    print(f"one listener draining a backlog of {args.messages}: {drain(args.messages):.0f} msg/s")


if __name__ == "__main__":
    main()
