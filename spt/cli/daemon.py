"""`spt daemon run|stop|status`."""

from __future__ import annotations

import os
import time

import click

from spt.cli._output import emit, out, print_json
from spt.cli._state import daemon_call, state


@click.group()
def daemon() -> None:
    """Run, stop or inspect this node's daemon."""


@daemon.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the daemon in the foreground (log lines on stderr)."""
    from spt.core.daemon import configure_logging, run_daemon

    configure_logging()
    run_daemon(state(ctx).blocked)


@daemon.command()
def stop() -> None:
    """Stop the daemon; hosted processes keep running."""
    import fcntl

    from spt.core.ipc import call, connect
    from spt.core.paths import StatePaths

    paths = StatePaths.resolve()
    conn = connect(paths.socket)
    try:
        call(conn, "daemon.stop")
    finally:
        conn.close()
    # The daemon holds an exclusive lock on daemon.lock for its whole life; the kernel drops it
    # when the process ends (even before its parent reaps it), so the lock says when it is gone.
    deadline = time.monotonic() + 10.0
    with open(paths.lock_file, "ab") as lock:
        while time.monotonic() < deadline:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            fcntl.flock(lock, fcntl.LOCK_UN)
            break
    emit("DAEMON_STOPPED")


@daemon.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Version, uptime, node, peers and health of the running daemon."""
    os.environ.setdefault("SPT_NO_AUTOSTART", "1")  # status reports; it never starts one
    doc = daemon_call("daemon.status")
    if state(ctx).json:
        print_json({k: (v["key"] if k == "node" else v) for k, v in doc.items() if k not in ("pid", "port")})
        return
    out(f"version: {doc['version']}")
    out(f"uptime: {doc['uptime_s']:.0f}s")
    out(f"node: {doc['node']['display']}")
    out(f"mode: {doc['mode']}")
    out(f"port: {doc['port']}")
    out(f"subnets: {', '.join(doc['subnets']) or '(none)'}")
    peers = doc["peers"]
    out(f"peers: direct={peers['direct']} relayed={peers['relayed']} none={peers['none']}")
    out(f"hosted: {doc['hosted']}  unread: {doc['unread']}")
    for warning in doc["warnings"]:
        out(f"warning: {warning}")
