"""Printing: status tokens on stdout, hints on stderr, JSON documents for read commands.

Tokens are byte-stable contract (SPEC.md §3.3): scripts and agent adapters grep for them.
"""

from __future__ import annotations

import json
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

    from spt.core.errors import SptError


def emit(token: str, subject: str = "", detail: str = "", *, err: bool = False) -> None:
    """Print `TOKEN:subject detail` (or the bare token) on stdout, or stderr with `err`."""
    line = f"{token}:{subject}" if subject else token
    if detail:
        line = f"{line} {detail}"
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def report(exc: SptError) -> int:
    """Print an error's token line and candidate lines on stderr; returns its exit code."""
    sys.stderr.write(exc.status_line() + "\n")
    for line in exc.lines:
        sys.stderr.write(line + "\n")
    return exc.instance_exit_code


def hint(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
