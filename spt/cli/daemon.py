"""`spt daemon run|stop|status|logs|install|uninstall`."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from spt.cli._output import emit, hint, out, print_json
from spt.cli._state import daemon_call, state
from spt.core.errors import Refusal


@click.group(epilog="""\b
Examples:
  spt daemon status                 # running? version, peers, service installed/enabled
  spt daemon logs -f --debug        # follow the log, the daemon raised to DEBUG live
  spt daemon install                # come back after a reboot (systemd user unit)
""")
def daemon() -> None:
    """Run, stop or inspect this node's daemon."""


@daemon.command()
@click.option("--debug", is_flag=True, help="Start at DEBUG level (spt daemon logs --level info lowers it).")
@click.pass_context
def run(ctx: click.Context, debug: bool) -> None:
    """Run the daemon in the foreground (log lines on stderr and in the state folder's log)."""
    from spt.core.daemon import configure_logging, run_daemon
    from spt.core.paths import StatePaths

    paths = StatePaths.resolve()
    paths.ensure()
    configure_logging(log_file=paths.log_file, level="DEBUG" if debug else None)
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
    from spt.core import service

    os.environ.setdefault("SPT_NO_AUTOSTART", "1")  # status reports; it never starts one
    doc = daemon_call("daemon.status")
    unit = service.installed(system=doc["mode"] == "system")
    if state(ctx).json:
        doc = {k: (v["key"] if k == "node" else v) for k, v in doc.items() if k not in ("pid", "port")}
        print_json({**doc, "service": unit})
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
    if unit["installed"]:
        out(f"service: installed, {'enabled' if unit['enabled'] else 'not enabled'} ({unit['unit']})")
    else:
        out("service: not installed (spt daemon install makes it come back after a reboot)")
    for warning in doc["warnings"]:
        out(f"warning: {warning}")


@daemon.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C ends).")
@click.option("-n", "lines", type=click.IntRange(min=0), default=40, show_default=True, help="Lines to show first.")
@click.option("--debug", is_flag=True, help="Raise the running daemon to DEBUG now (no restart).")
@click.option("--level", type=click.Choice(["debug", "info", "warning", "error"]), help="Set the running daemon's level.")
def logs(follow: bool, lines: int, debug: bool, level: str | None) -> None:
    """Show the daemon's log (the state folder's daemon.log, as the daemon writes it)."""
    from spt.core.paths import StatePaths

    if debug or level:
        os.environ.setdefault("SPT_NO_AUTOSTART", "1")
        chosen = daemon_call("daemon.log_level", {"level": "DEBUG" if debug else str(level).upper()})["level"]
        hint(f"LOG_LEVEL:{chosen}")
    path = StatePaths.resolve().log_file
    try:
        fh = open(path, "rb")  # noqa: SIM115 - followed below
    except FileNotFoundError:
        raise Refusal("NO_LOG", str(path), "the daemon has not written a log here yet (spt daemon run starts one)") from None
    with fh:
        sys.stdout.write(_tail(fh, lines))
        sys.stdout.flush()
        while follow:
            chunk = fh.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.2)


def _tail(fh: Any, lines: int) -> str:
    """The last `lines` lines of an open binary file, leaving it positioned at its end."""
    fh.seek(0, 2)
    end = fh.tell()
    if lines == 0:
        return ""
    block, data = 8192, b""
    pos = end
    while pos > 0 and data.count(b"\n") <= lines:
        step = min(block, pos)
        pos -= step
        fh.seek(pos)
        data = fh.read(step) + data
    fh.seek(end)
    return b"\n".join(data.split(b"\n")[-lines - 1:]).decode("utf-8", "replace").lstrip("\n") if data else ""


@daemon.command()
@click.option("--system", is_flag=True, help="A system unit under its own account (`spt`) [elevated].")
@click.option("--print", "print_only", is_flag=True, help="Print the unit file and change nothing.")
def install(system: bool, print_only: bool) -> None:
    """Make the node come back after a reboot: write and enable a systemd unit."""
    from spt.cli._state import require_elevation, spt_command_prefix
    from spt.core import service

    home = os.environ.get("SPT_HOME") or None
    unit = service.unit_for(spt_command_prefix(), system=system, spt_home=home)
    if print_only:
        sys.stdout.write(unit.text)
        return
    if system:
        require_elevation()
    if not service.systemd_running():
        raise Refusal("NO_SYSTEMD", "", "systemd is not running on this machine, so nothing was installed; "
                      "to start the node at login, add this line to your ~/.profile:",
                      lines=[service.login_command(spt_command_prefix(), home)])
    if system:
        _system_account(home or str(service.SYSTEM_STATE))
    else:
        _stop_running_daemon()  # the service takes over; two daemons cannot share a state folder
    unit.path.parent.mkdir(parents=True, exist_ok=True)
    unit.path.write_text(unit.text)
    checked = service.verify(unit.path)
    if checked is not None and not checked[0]:
        hint(f"warning: systemd-analyze verify: {checked[1]}")
    for args in (("daemon-reload",), ("enable", "--now", service.UNIT_NAME)):
        done = service.systemctl(unit, *args)
        if done.returncode != 0:
            raise Refusal("INSTALL_FAILED", str(unit.path), f"systemctl {' '.join(args)}: {done.stderr.strip()}")
    emit("DAEMON_INSTALLED", str(unit.path), "enabled")
    if not system:
        hint(f"To start it at boot rather than at your login, run once: loginctl enable-linger {os.environ.get('USER', '$USER')}")


@daemon.command()
@click.option("--system", is_flag=True, help="The system unit [elevated].")
def uninstall(system: bool) -> None:
    """Disable and remove the systemd unit (the node's state is kept)."""
    from spt.cli._state import require_elevation
    from spt.core import service

    if system:
        require_elevation()
    unit = service.unit_for([], system=system, spt_home=None)
    if not unit.path.exists():
        raise Refusal("NOT_INSTALLED", str(unit.path), "no spt unit is installed there (spt daemon install)")
    if service.systemd_running():
        service.systemctl(unit, "disable", "--now", service.UNIT_NAME)
    unit.path.unlink()
    if service.systemd_running():
        service.systemctl(unit, "daemon-reload")
    emit("DAEMON_UNINSTALLED", str(unit.path))


def _stop_running_daemon() -> None:
    from spt.core.errors import DaemonDown

    try:
        os.environ["SPT_NO_AUTOSTART"] = "1"
        daemon_call("daemon.stop")
    except DaemonDown:
        return
    time.sleep(0.5)


def _system_account(home: str) -> None:
    """The `spt` account and its private state folder, made once (system mode, §5.7)."""
    import pwd
    import shutil
    import subprocess

    from spt.core import service

    try:
        account = pwd.getpwnam(service.SYSTEM_ACCOUNT)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise Refusal("INSTALL_FAILED", service.SYSTEM_ACCOUNT, "no useradd to create the service account") from None
        subprocess.run([useradd, "--system", "--home-dir", home, "--shell", "/usr/sbin/nologin",
                        service.SYSTEM_ACCOUNT], check=True, capture_output=True, timeout=60)
        account = pwd.getpwnam(service.SYSTEM_ACCOUNT)
    os.makedirs(home, mode=0o700, exist_ok=True)
    os.chown(home, account.pw_uid, account.pw_gid)
