"""Timestamps along a message's path, for benches: `SPT_TRACE=<file>` in a daemon's environment
appends one line per point passed, `<CLOCK_MONOTONIC ns> <node label> <point>`.

The clock is the host's, shared by every process on it, so the lines of two daemons and of the
bench that drives them make one timeline (`bench/ring.py` reads it to say where a ring's time
goes). Off (the default), a point costs one comparison.
"""

from __future__ import annotations

import os
import time

_fd: int | None = None
_label = ""


def start(label: str) -> None:
    """Trace into the file `SPT_TRACE` names, if it is set, with lines labelled `label`."""
    global _fd, _label
    path = os.environ.get("SPT_TRACE")
    if path and _fd is None:
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _label = label.replace(" ", "_") or "-"


def mark(*point: object) -> None:
    """This node passes `point` now (any thread; one short append, atomic under O_APPEND). Its
    parts are joined with spaces only when tracing, so a call costs no formatting when off."""
    if _fd is not None:
        text = " ".join(map(str, point)).replace("\n", "\\n")  # a peer's frame type is one line here
        os.write(_fd, f"{time.monotonic_ns()} {_label} {text}\n".encode())
