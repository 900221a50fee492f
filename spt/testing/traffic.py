"""Message traffic for fault tests and the soak bench: numbered streams in, envelopes out.

- `Stream` sends numbered messages (`<tag>00042`) from one node to an address in a thread,
  over the control socket (no CLI start-up per message). Every error reply is recorded with
  its token and retried explicitly with the same message id, so receivers drop a copy that did
  get through before the error (SPEC §4.2.5). Some messages can be rings or `--active-only`;
  with `batch` > 1 they go `batch` at a time in one `msg.send_many` call (plain sends).
- `Listener` is a live `spt ready` whose envelopes are collected (with arrival times) by a
  reader thread; `drain()` empties a perch with `ready --once` (what releases held messages).
- `check_stream()` asserts a received sequence is complete, unique and in order.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from spt.testing.nodes import Node

ENVELOPE = re.compile(r'<EVENT type="msg" from="([^"]*)"([^>]*)>([^<]*)</EVENT>')


@dataclass
class Received:
    body: str
    sender: str
    attrs: str
    at: float  # time.monotonic() when the line was read


def envelopes(text: str, at: float = 0.0) -> list[Received]:
    return [Received(m.group(3), m.group(1), m.group(2), at) for m in ENVELOPE.finditer(text)]


@dataclass
class Sent:
    index: int
    kind: str  # "send" or "ring"
    window: str
    token: str
    started: float
    took: float


@dataclass
class Stream:
    """Send `count` numbered messages from `node` to `address` as `from_id`, in a thread.

    `plan(i)` gives ("send" | "ring", window) for message i (default: plain sends). `rate` caps
    messages per second (None: as fast as the daemon answers). Errors whose token is in
    `retry_on` are recorded in `errors` and the same message (same id) is sent again, at most
    `max_attempts` times; any other error stops the stream and is kept in `failure`.
    """

    node: Node
    address: str
    from_id: str
    tag: str
    count: int
    plan: Callable[[int], tuple[str, str]] = lambda i: ("send", "default")
    rate: float | None = None
    retry_on: frozenset[str] = frozenset({"DAEMON_DOWN"})
    max_attempts: int = 200
    retry_pause: float = 0.05
    ring_timeout: float = 0.2
    batch: int = 1  # > 1: messages go this many per msg.send_many call, a batch retried whole
    sent: list[Sent] = field(default_factory=list)
    replies: list[Received] = field(default_factory=list)  # replies handed to this stream's rings
    errors: list[tuple[int, str]] = field(default_factory=list)
    failure: BaseException | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def body(self, i: int) -> str:
        return f"{self.tag}{i:05d}"

    def start(self) -> Stream:
        self._thread = threading.Thread(target=self._run, name=f"stream:{self.tag}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> Stream:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"stream {self.tag}: {len(self.sent)}/{self.count} sent after {timeout:g} s")
        if self.failure is not None:
            status = getattr(self.failure, "status_line", None)
            why = status() if callable(status) else repr(self.failure)
            raise AssertionError(f"stream {self.tag} failed at {len(self.sent)}: {why}")
        return self

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def _one(self, i: int, kind: str, window: str, msg_id: str) -> str:
        args: dict[str, Any] = {"address": self.address, "from": self.from_id, "body": self.body(i),
                                "window": window}
        if kind == "ring":
            args["timeout"] = self.ring_timeout

            def on_event(event: dict[str, Any]) -> None:
                if "line" in event:
                    self.replies.extend(envelopes(str(event["line"]), time.monotonic()))

            result = self.node.ipc("msg.ring", args, timeout=self.ring_timeout + 30, on_event=on_event)
        else:
            args["id"] = msg_id
            result = self.node.ipc("msg.send", args, timeout=30)
        return str(result["token"])

    def _run(self) -> None:
        from spt.core.errors import SptError

        begun = time.monotonic()
        if self.batch > 1:
            self._run_batches()
            return
        try:
            for i in range(self.count):
                if self._stop.is_set():
                    return
                if self.rate:
                    pause = begun + i / self.rate - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                kind, window = self.plan(i)
                msg_id = os.urandom(16).hex()
                started = time.monotonic()
                for attempt in range(self.max_attempts):
                    try:
                        token = self._one(i, kind, window, msg_id)
                        break
                    except SptError as exc:
                        if exc.instance_token not in self.retry_on or attempt == self.max_attempts - 1:
                            raise
                        self.errors.append((i, exc.instance_token))
                        time.sleep(self.retry_pause)
                self.sent.append(Sent(i, kind, window, token, started, time.monotonic() - started))
        except BaseException as exc:
            self.failure = exc


    def _run_batches(self) -> None:
        """Batches of `batch` messages, each with its id; a batch whose call failed, or in which
        a message was refused with a token in `retry_on`, is sent again whole with the same ids
        (the receivers drop the copies of those that got through)."""
        from spt.core.errors import SptError

        try:
            for first in range(0, self.count, self.batch):
                if self._stop.is_set():
                    return
                indexes = range(first, min(first + self.batch, self.count))
                messages = [{"address": self.address, "body": self.body(i), "id": os.urandom(16).hex()}
                            for i in indexes]
                started = time.monotonic()
                for attempt in range(self.max_attempts):
                    try:
                        result = self.node.ipc("msg.send_many", {"from": self.from_id, "messages": messages}, timeout=30)
                        refused = [r["error"]["token"] for r in result["results"] if "error" in r]
                        if not refused:
                            break
                        if set(refused) - self.retry_on or attempt == self.max_attempts - 1:
                            raise AssertionError(f"batch at {first} refused: {refused}")
                        self.errors.append((first, refused[0]))
                    except SptError as exc:
                        if exc.instance_token not in self.retry_on or attempt == self.max_attempts - 1:
                            raise
                        self.errors.append((first, exc.instance_token))
                    time.sleep(self.retry_pause)
                took = time.monotonic() - started
                for i, answer in zip(indexes, result["results"], strict=True):
                    self.sent.append(Sent(i, "send", "default", str(answer["token"]), started, took))
        except BaseException as exc:
            self.failure = exc


class Listener:
    """A live `spt ready <endpoint>` on `node`, its envelopes collected by a reader thread."""

    def __init__(self, node: Node, endpoint_id: str, *, timeout: float = 20.0) -> None:
        self.node = node
        self.endpoint_id = endpoint_id
        self.received: list[Received] = []
        self.proc = node.popen("ready", endpoint_id)
        assert self.proc.stderr is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stderr], [], [], timeout)
        line = self.proc.stderr.readline().strip() if ready else ""
        if line != f"READY:{endpoint_id}":
            self.proc.kill()
            raise AssertionError(f"spt ready {endpoint_id} on {node.name}: {line!r}")
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name=f"ready:{endpoint_id}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            got = envelopes(line, time.monotonic())
            with self._lock:
                self.received.extend(got)

    def bodies(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [r.body for r in self.received if r.body.startswith(prefix)]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> list[Received]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._thread.join(10)
        return list(self.received)


def drain(node: Node, endpoint_id: str, *, rounds: int = 50, timeout: float = 1.0) -> list[Received]:
    """What `spt ready --once` hands out, repeated until it answers TIMEOUT (bounded)."""
    out: list[Received] = []
    for _ in range(rounds):
        done = node.cli("ready", endpoint_id, "--once", "--timeout", str(timeout), timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"ready --once {endpoint_id}: {done.returncode} {done.stderr}")
        if done.stdout.strip() == "TIMEOUT":
            return out
        out += envelopes(done.stdout, time.monotonic())
    raise AssertionError(f"{endpoint_id} still had messages after {rounds} drains")


def check_stream(bodies: Sequence[str], tag: str, expected: Iterable[int], *, ordered: bool = True) -> None:
    """`bodies` holds each of `tag` + index for `expected` exactly once (in that order when
    `ordered`); raises AssertionError naming the missing, duplicated and misplaced ones."""
    want = list(expected)
    got = [int(b[len(tag):]) for b in bodies if b.startswith(tag)]
    seen: dict[int, int] = {}
    for n in got:
        seen[n] = seen.get(n, 0) + 1
    missing = sorted(set(want) - set(seen))
    dups = sorted(n for n, c in seen.items() if c > 1)
    extra = sorted(set(seen) - set(want))
    problems = []
    if missing:
        problems.append(f"{len(missing)} lost (first {missing[:10]})")
    if dups:
        problems.append(f"{len(dups)} duplicated (first {dups[:10]})")
    if extra:
        problems.append(f"{len(extra)} unexpected (first {extra[:10]})")
    position = {n: k for k, n in enumerate(want)}
    in_order = sorted(got, key=position.__getitem__)
    if ordered and not problems and got != in_order:
        first = next(k for k, (a, b) in enumerate(zip(got, in_order, strict=True)) if a != b)
        problems.append(f"out of order from position {first}: {got[max(0, first - 3):first + 3]}")
    if problems:
        raise AssertionError(f"stream {tag}: " + "; ".join(problems))


def stalls(times: Sequence[float]) -> float:
    """The longest gap between consecutive arrival times (0 for fewer than two)."""
    ordered = sorted(times)
    return max((b - a for a, b in itertools.pairwise(ordered)), default=0.0)


@contextlib.contextmanager
def listening(node: Node, endpoint_id: str) -> Any:
    listener = Listener(node, endpoint_id)
    try:
        yield listener
    finally:
        listener.close()


def listed(node: Node, endpoint_id: str) -> list[dict[str, Any]]:
    """The rows of `endpoint_id` in `node`'s `spt endpoint list` (empty until its row arrives)."""
    doc = node.json("endpoint", "list")
    return [e for s in doc["subnets"] for e in s["endpoints"] if e["id"] == endpoint_id]
