"""`spt doctor`: one line per check, `OK|WARN|FAIL <check>: <detail>` (SPEC.md §7.5).

Checks what the node can judge on its own: version, state-folder permissions and mode, the bound
UDP port, plugin failures, each peer's path (and why it is not direct), pending key changes,
join lockouts, clock offsets reported by joins, and queued traffic.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Any

from spt import __version__

if TYPE_CHECKING:
    from spt.core.daemon import Call, Daemon


def checks(daemon: Daemon, cli_version: str | None) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []

    def add(level: str, name: str, detail: str) -> None:
        out.append({"name": name, "level": level, "detail": detail})

    if cli_version and cli_version != __version__:
        add("WARN", "version", f"the CLI is {cli_version}, the daemon {__version__}; restart the daemon")
    else:
        add("OK", "version", __version__)
    mode = stat.S_IMODE(os.stat(daemon.paths.root).st_mode)
    key_mode = stat.S_IMODE(os.stat(daemon.paths.key_file).st_mode)
    # system mode lets the socket's group through the folder (x), never read or list it
    allowed = 0o010 if daemon.mode == "system" else 0
    if mode & 0o077 & ~allowed or key_mode & 0o077:
        want = "710" if allowed else "700"
        add("FAIL", "state-folder", f"{daemon.paths.root} is {mode:o}, node.key {key_mode:o}; both must be private ({want}/600)")
    elif daemon.mode == "system":
        add("OK", "state-folder", f"{daemon.paths.root} (system mode: owned by the daemon's account uid {os.getuid()}; "
            f"the socket is open to group {daemon.config.socket_group}, and each uid sees only its own perches)")
    else:
        add("OK", "state-folder", f"{daemon.paths.root} (user mode: agents of this uid can read it)")
    add("OK", "udp-port", f"bound {', '.join(daemon.addresses())}")
    change = daemon.last_network_change
    if daemon.netwatch is None:
        add("OK", "network", f"bound to {daemon.config.bind}: not watching for network changes")
    elif change is None:
        how = "netlink" if daemon.netwatch.netlink else "polling"
        add("OK", "network", f"no change seen since start (watching by {how}); now {daemon.netwatch.state.describe()}")
    else:
        add("OK", "network", f"last change {change['at']}: {change['change']}; did: {'; '.join(change['actions'])}")
    for record in daemon.plugins.records:
        if record.status == "failed":
            add("WARN", f"plugin {record.name}", f"failed: {record.reason}")
    for sub in daemon.subnets.held.values():
        joins = daemon.join_state(sub)
        if joins["state"] == "locked":
            add("WARN", f"joins {sub.name}", f"locked until {joins['locked_until']}; `spt subnet unlock {sub.name}`")
        elif joins["failed_last_hour"]:
            add("WARN", f"joins {sub.name}", f"{joins['failed_last_hour']} failed attempts in the last hour")
        if sub.seed is None or sub.epoch != sub.state().epoch:
            add("WARN", f"seed {sub.name}", "this node lacks the current joining secret; it cannot answer joins yet")
        for key, label in sorted(sub.state().members.items(), key=lambda kv: kv[1]):
            if key == daemon.key.node_id:
                continue
            path = daemon.members.path_view(key, sub)
            where = f"{path['kind']}" + (f" {path['addr']}" if path.get("addr") else "")
            why = f" ({path['reason']})" if path.get("reason") else ""
            level = "OK" if path["kind"].startswith("direct") else "WARN"
            add(level, f"peer {key.display(label)} in {sub.name}", where + why)
    pending = daemon.store.query("SELECT COUNT(*) AS n FROM key_changes")[0]["n"]
    if pending:
        add("WARN", "key-changes", f"{pending} pending; compare fingerprints, then `spt node trust accept`")
    queued = len(daemon.endpoints.pending_outgoing(limit=10_000))
    if queued:
        add("WARN", "outgoing-spool", f"{queued} messages wait for a path to their node")
    return out


def register_ops(daemon: Daemon) -> None:
    @daemon.op("doctor")
    async def doctor(call: Call) -> Any:
        found = checks(daemon, call.args.get("cli_version"))
        return {"ok": not any(c["level"] == "FAIL" for c in found), "checks": found}
