"""`spt doctor`: one line per check, `OK|WARN|FAIL <check>: <detail>` (SPEC.md §7.5).

Checks what the node can judge on its own: version, state-folder permissions and mode, the bound
UDP port, plugin failures, mDNS and its interfaces, each peer's path (and why it is not direct),
the clock offset to each connected member (asked now), pending key changes, join lockouts,
spool and inbox usage against their limits, staged updates (as the updater reports them), and
in an air-gapped build (no relay plugin) every destination the node would ever contact. Plugins
add their own lines (`NodeRuntime.add_doctor_check`: the relay plugin's relays). Every line that
is not OK says what to do next.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from spt import __version__
from spt.core.errors import PeerError, SptError

if TYPE_CHECKING:
    from spt.core.daemon import Call, Daemon
    from spt.core.identity import NodeId

log = logging.getLogger(__name__)

CLOCK_WARN_MS: Final = 2000  # §5.4: offsets over 2 s are flagged
CLOCK_TIMEOUT: Final = 2.0
USAGE_WARN: Final = 0.8  # warn from 80 % of a limit
INBOX_SCAN_FILES: Final = 100_000  # bound the walk of a huge inbox
DEFAULT_INBOX_QUOTA: Final = 20 * 1024**3

# what to do about a peer whose path is not direct (SPEC.md §7.5 reasons)
PATH_ADVICE: Final = {
    "peer-offline": "start spt on that machine or check its network",
    "detached": "run `spt subnet attach` on the detached side",
    "no-direct-address": "add a relay (`spt relay add`) or make the peer reachable, e.g. net.static_peers",
    "symmetric-nat": "relayed is the best path behind this NAT; nothing to do",
    "udp-blocked": "allow UDP to the peer, or use a relay with a TCP listener",
    "punch-timeout": "relayed until punching succeeds; it retries by itself",
    "punching": "relayed until punching succeeds; it retries by itself",
    "relay-only-config": "relayed by configuration; nothing to do",
    "relay-disabled": "install the relay plugin or configure a reachable address",
}



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
            failed = joins["failed_last_hour"]
            add("WARN", f"joins {sub.name}", f"{failed} failed attempt{'s' if failed > 1 else ''} in the last hour")
        conflicts = daemon.members.logs.conflicts_of(sub)
        if conflicts:
            add("WARN", f"prunes {sub.name}", f"{len(conflicts)} prune conflicts: histories disagree on who was removed "
                "first; see the prune-conflict notifications and prune from a member you trust")
        if sub.seed is None or sub.epoch != sub.state().epoch:
            add("WARN", f"seed {sub.name}", "this node lacks the current joining secret; it cannot answer joins yet")
        for key, label in sorted(sub.state().members.items(), key=lambda kv: kv[1]):
            if key == daemon.key.node_id:
                continue
            path = daemon.members.links.path_view(key, sub)
            where = f"{path['kind']}" + (f" {path['addr']}" if path.get("addr") else "")
            why = f" ({path['reason']})" if path.get("reason") else ""
            level = "OK" if path["kind"].startswith("direct") else "WARN"
            advice = f"; {PATH_ADVICE[path['reason']]}" if level == "WARN" and path.get("reason") in PATH_ADVICE else ""
            add(level, f"peer {key.display(label)} in {sub.name}", where + why + advice)
    pending = daemon.store.query("SELECT COUNT(*) AS n FROM key_changes")[0]["n"]
    if pending:
        add("WARN", "key-changes", f"{pending} pending; compare fingerprints, then `spt node trust accept`")
    queued = len(daemon.endpoints.pending_outgoing(limit=10_000))
    if queued:
        add("WARN", "outgoing-spool", f"{queued} messages wait for a path to their node; they go once it is online")
    _mdns(daemon, add)
    _spools(daemon, add)
    _inboxes(daemon, add)
    _updates(daemon, add)
    _air_gap(daemon, add)
    for name, check in list(daemon.doctor_checks.items()):
        try:
            for level, check_name, detail in check():
                add(level, check_name, detail)
        except Exception as exc:  # a plugin's check must not break the others
            log.exception("doctor check failed", extra={"check": name})
            add("WARN", name, f"the check itself failed ({type(exc).__name__}); see `spt daemon logs`")
    return out


Add = Callable[[str, str, str], None]


def _plugin_ok(daemon: Daemon, name: str) -> bool:
    return any(r.name == name and r.status == "ok" for r in daemon.plugins.records)


def _mdns(daemon: Daemon, add: Add) -> None:
    if not daemon.config.mdns:
        add("OK", "mdns", "off (discovery.mdns = false); joins find members through --peer, static peers or relays")
        return
    if not _plugin_ok(daemon, "mdns"):
        add("WARN", "mdns", "on in the config but the mdns plugin is not running; see `spt plugins list --all`")
        return
    where = ", ".join(daemon.config.mdns_interfaces) if daemon.config.mdns_interfaces else "all interfaces"
    add("OK", "mdns", f"announcing and listening on {where} (discovery.mdns_interfaces)")


def _spools(daemon: Daemon, add: Add) -> None:
    limit = daemon.config.spool_max_bytes
    for perch in daemon.endpoints.perches():
        count, size = daemon.endpoints.spool.held(perch.id)
        if size >= USAGE_WARN * limit:
            add("WARN", f"spool {perch.id}", f"{count} messages, {size} of {limit} bytes; run `spt ready {perch.id}` to drain it")


def _inboxes(daemon: Daemon, add: Add) -> None:
    if not _plugin_ok(daemon, "file"):
        return
    quota = int(daemon.config.section("file").get("inbox_quota_bytes", DEFAULT_INBOX_QUOTA))
    worst = ("", 0)
    for perch in daemon.endpoints.perches():
        used = _folder_bytes(daemon.endpoints.folder(perch) / "inbox")
        if used >= worst[1]:
            worst = (perch.id, used)
        if used >= USAGE_WARN * quota:
            add("WARN", f"inbox {perch.id}", f"{used} of {quota} bytes (file.inbox_quota_bytes); move received files out of "
                f"{daemon.endpoints.folder(perch) / 'inbox'}")
    if worst[0]:
        add("OK", "inboxes", f"fullest: {worst[0]} at {worst[1]} of {quota} bytes")


def _folder_bytes(folder: Path) -> int:
    total, seen = 0, 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            seen += 1
            if seen > INBOX_SCAN_FILES:
                return total
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _updates(daemon: Daemon, add: Add) -> None:
    updaters = list(daemon.plugins.registries.updaters)
    if not updaters:
        add("OK", "updates", "no update plugin installed; nothing can be staged")
        return
    for updater in updaters:
        try:
            status = dict(updater.status())
        except Exception as exc:
            add("WARN", f"updates {updater.name}", f"status failed ({type(exc).__name__}); see `spt daemon logs`")
            continue
        staged = status.get("staged")
        if staged:
            version = staged.get("version", "?") if isinstance(staged, dict) else staged
            add("WARN", "updates", f"spt {version} is staged and waits for consent; run `spt update apply` (elevated)")
        else:
            add("OK", "updates", f"none staged (current {status.get('current', __version__)})")


def _air_gap(daemon: Daemon, add: Add) -> None:
    """SPEC.md §7.7: without the relay plugin, list every destination the node could contact."""
    if any(r.name.startswith("relay") for r in daemon.plugins.records):
        return
    static = list(daemon.config.static_peers)
    ignored = list(daemon.config.relay_urls) + ([str(daemon.config.section("update").get("source"))]
                                                if daemon.config.section("update").get("source") else [])
    where = "members' addresses" + (f", static peers {', '.join(static)}" if static else "")
    where += ", link-local mDNS" if daemon.config.mdns else ""
    add("OK", "air-gap", f"no relay plugin: this node contacts only {where}")
    if ignored:
        add("WARN", "air-gap", f"configured but never contacted here: {', '.join(ignored)}; remove them from config.toml")


async def clock_checks(daemon: Daemon) -> list[dict[str, str]]:
    """The wall-clock offset to each connected member, asked now over the member connection."""
    out: list[dict[str, str]] = []
    seen: set[NodeId] = set()
    for sub in daemon.subnets.attached():
        for key, label in sorted(sub.state().members.items(), key=lambda kv: kv[1]):
            if key == daemon.key.node_id or key in seen:
                continue
            seen.add(key)
            conn = daemon.members.transport.connection(key)
            if conn is None:
                continue  # its path line already says why
            name = f"clock {key.display(label)}"
            start = time.time()
            try:
                reply = await conn.request("clock", {"subnet": sub.id.hex()}, timeout=CLOCK_TIMEOUT)
            except (PeerError, SptError, TimeoutError, ConnectionError) as exc:
                out.append({"name": name, "level": "WARN", "detail": f"could not ask ({exc}); an older spt there lacks it"})
                continue
            end = time.time()
            body = reply.body if isinstance(reply.body, dict) else {}
            wall = body.get("wall_ms")
            if not isinstance(wall, int):
                out.append({"name": name, "level": "WARN", "detail": "the answer carried no time"})
                continue
            offset = wall - (start + end) / 2 * 1000
            rtt = (end - start) * 1000
            detail = f"offset {offset / 1000:+.2f} s (rtt {rtt:.0f} ms)"
            if abs(offset) > CLOCK_WARN_MS:
                out.append({"name": name, "level": "WARN",
                            "detail": detail + "; joins near a code change may fail: enable time sync (timedatectl set-ntp true) on the machine that is off"})
            else:
                out.append({"name": name, "level": "OK", "detail": detail})
    return out


async def answer_clock(conn: Any, frame: Any) -> tuple[str, Any]:
    """A member asks our wall clock (for its `spt doctor`)."""
    return "clock", {"wall_ms": int(time.time() * 1000)}


def register_ops(daemon: Daemon) -> None:
    @daemon.op("doctor")
    async def doctor(call: Call) -> Any:
        found = checks(daemon, call.args.get("cli_version"))
        found += await clock_checks(daemon)
        return {"ok": not any(c["level"] == "FAIL" for c in found), "checks": found}
