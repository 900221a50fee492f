"""The node as a service that comes back after a reboot: systemd units and their state.

`spt daemon install` writes and enables a unit that runs `spt daemon run` in the foreground
(restart on failure; its stderr goes to the journal, and the daemon also appends to the state
folder's log). User mode: a systemd *user* unit for the invoking user. System mode (`--system`):
a system unit running under its own account (`spt`), with its state folder in /var/lib/spt.

What must not: guess. Whether systemd runs here is read from `/run/systemd/system` (what
sd_booted() checks); without it nothing is written and the caller prints what to run at login.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

UNIT_NAME: Final = "spt.service"
SYSTEM_ACCOUNT: Final = "spt"
SYSTEM_STATE: Final = Path("/var/lib/spt")


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def user_unit_dir(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config")
    return Path(base) / "systemd" / "user"


SYSTEM_UNIT_DIR: Final = Path("/etc/systemd/system")


@dataclass(frozen=True)
class Unit:
    path: Path
    text: str
    system: bool

    @property
    def wants_link(self) -> Path:
        """Where `systemctl enable` puts its symlink (WantedBy= target's .wants folder)."""
        target = "multi-user.target" if self.system else "default.target"
        return self.path.parent / f"{target}.wants" / UNIT_NAME


def unit_for(spt_command: list[str], *, system: bool, spt_home: str | None, unit_dir: Path | None = None) -> Unit:
    """The unit file for this spt. `spt_command` is the absolute command (`spt_command_prefix`)."""
    exec_start = shlex.join([*spt_command, "daemon", "run"])
    lines = [
        "[Unit]",
        "Description=spt node daemon (mesh of your machines for agents)",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        "RestartSec=2",
        # the daemon writes its own log to the state folder too; stderr is the journal's copy
        "StandardOutput=journal",
        "StandardError=journal",
        "Environment=SPT_NO_AUTOSTART=1",
    ]
    if system:
        home = spt_home or str(SYSTEM_STATE)
        lines += [
            f"User={SYSTEM_ACCOUNT}",
            f"Group={SYSTEM_ACCOUNT}",
            f"Environment=SPT_HOME={home}",
            f"ReadWritePaths={home}",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=read-only",
            "PrivateTmp=yes",
        ]
    elif spt_home:
        lines.append(f"Environment=SPT_HOME={spt_home}")
    lines += ["", "[Install]", f"WantedBy={'multi-user.target' if system else 'default.target'}", ""]
    folder = unit_dir or (SYSTEM_UNIT_DIR if system else user_unit_dir())
    return Unit(folder / UNIT_NAME, "\n".join(lines), system)


def installed(system: bool, unit_dir: Path | None = None) -> dict[str, object]:
    """What `spt daemon status` reports: the unit's path, whether it exists and is enabled."""
    folder = unit_dir or (SYSTEM_UNIT_DIR if system else user_unit_dir())
    unit = Unit(folder / UNIT_NAME, "", system)
    return {
        "unit": os.fspath(unit.path) if unit.path.exists() else None,
        "installed": unit.path.exists(),
        "enabled": unit.wants_link.is_symlink() or unit.wants_link.exists(),
        "systemd": systemd_running(),
    }


def systemctl(unit: Unit, *args: str) -> subprocess.CompletedProcess[str]:
    command = ["systemctl", *(() if unit.system else ("--user",)), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def verify(unit_path: Path) -> tuple[bool, str] | None:
    """`systemd-analyze verify` on a unit file, or None when the tool is not installed."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return None
    done = subprocess.run([tool, "verify", os.fspath(unit_path)], capture_output=True, text=True, timeout=60, check=False)
    return done.returncode == 0, (done.stderr + done.stdout).strip()


def login_command(spt_command: list[str], spt_home: str | None) -> str:
    """What to run at login where there is no systemd: start the daemon unless it runs."""
    env = f"SPT_HOME={shlex.quote(spt_home)} " if spt_home else ""
    spt = shlex.join(spt_command)
    return f"{env}{spt} daemon status >/dev/null 2>&1 || ({env}nohup {spt} daemon run >/dev/null 2>&1 &)"
