"""The apply watchdog: `python -m spt_selfupdate.watchdog`, started by the daemon that applies.

It runs from the *previous* version's interpreter, outside the daemon, so it survives whatever
the new version does. For at most `--timeout` seconds (30) it asks the daemon at the state
folder's control socket who it is: once the answer is the new version and its `update.selfcheck`
passes, the apply counts (`last_apply.outcome = applied`, the anti-rollback floor rises) and the
watchdog exits. If the daemon's process dies, or the time runs out, or the self-check fails, it
kills what is left of the new daemon, flips `current` back, records `failed` with the reason, and
becomes the previous version's daemon itself (exec), so the node is never left without one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Final

from spt.core.errors import SptError
from spt.core.ipc import call, connect
from spt_selfupdate.install import flip_current
from spt_selfupdate.state import UpdateState

POLL: Final = 0.1


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not reaped by its parent, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _ask(socket_path: Path, op: str) -> dict[str, object] | str:
    """The daemon's answer to `op`, or why there is none."""
    try:
        conn = connect(socket_path)
    except SptError as exc:
        return exc.status_line()
    try:
        result = call(conn, op, {}, timeout=5.0)
        return result if isinstance(result, dict) else f"unexpected answer {result!r:.60}"
    except (SptError, OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        conn.close()


def watch(state_dir: Path, pid: int, version: str, timeout: float) -> str | None:
    """None once the new daemon is healthy, else why it is not."""
    socket_path = state_dir / "spt.sock"
    deadline = time.monotonic() + timeout
    last: object = "no answer"
    while time.monotonic() < deadline:
        if not _alive(pid):
            return "the new daemon exited"
        pong = last = _ask(socket_path, "ping")
        if isinstance(pong, dict) and pong.get("version") == version and pong.get("pid") == pid:
            check = last = _ask(socket_path, "update.selfcheck")
            if isinstance(check, dict):
                return None if check.get("ok") else f"self-check failed: {check.get('reason')}"
        time.sleep(POLL)
    return f"no healthy daemon within {timeout:g} s (last answer: {str(last)[:120]})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spt_selfupdate.watchdog")
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--pid", required=True, type=int)
    parser.add_argument("--version", required=True)
    parser.add_argument("--previous", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)

    reason = watch(args.state, args.pid, args.version, args.timeout)
    state = UpdateState(args.state)
    trial = state.get("trial") or {}
    record = {"version": args.version, "previous": args.previous, "time": time.time(), "reported": False}
    if reason is None:
        floor = state.get("highest_applied")
        from spt_selfupdate.trust import parse_version

        if floor is None or parse_version(args.version) > parse_version(str(floor)):
            state.set("highest_applied", args.version)
        state.unstage_to_served(args.version)
        back = round(time.time() - float(trial.get("restart_at") or time.time()), 2)
        state.set("last_apply", {**record, "outcome": "applied", "reason": None, "back_after_s": back})
        state.set("trial", None)
        print(f"spt update watchdog: {args.version} is up", file=sys.stderr, flush=True)
        return 0

    print(f"spt update watchdog: {args.version} failed ({reason}); switching back to {args.previous}",
          file=sys.stderr, flush=True)
    if _alive(args.pid):
        os.kill(args.pid, signal.SIGKILL)
    for _ in range(100):  # bounded: the kernel frees the lock as the process dies
        if not _alive(args.pid):
            break
        time.sleep(POLL)
    flip_current(args.root, args.previous)
    state.set("last_apply", {**record, "outcome": "failed", "reason": reason})
    state.set("trial", None)
    state.close()
    python = str(trial.get("previous_python") or sys.executable)
    argv_rest = [str(a) for a in trial.get("argv") or ["daemon", "run"]]
    os.execv(python, [python, "-P", "-m", "spt", *argv_rest])  # -P: as Daemon.restart_with
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
