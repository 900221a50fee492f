"""The node runtime: one per state folder, started by `spt daemon run`.

It owns the node key, the store, the node's one UDP socket and the control socket, loads the
plugins, and serves the operations the CLI asks for. Services register their operations with
`Daemon.op`; an operation marked `elevated` is refused unless the caller's uid, as the kernel
reports it for the control socket (SO_PEERCRED), is 0.

Every per-request handler is guarded: an exception is logged with its traceback and answered as
an error; the daemon keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from spt import __version__
from spt.core import trace
from spt.core.caller import CALLER_UID
from spt.core.config import NodeConfig, load_config
from spt.core.doctor import answer_clock
from spt.core.doctor import register_ops as register_doctor_ops
from spt.core.endpoints import Endpoints
from spt.core.endpoints import register_ops as register_endpoint_ops
from spt.core.errors import ConfigError, ElevationRequired, LocalProtocolError, Refusal, SptError, UsageError
from spt.core.hosting.service import Hosting
from spt.core.hosting.service import register_ops as register_hosting_ops
from spt.core.identity import NodeId, NodeKey
from spt.core.ipc import MAX_LINE, encode_line, read_request
from spt.core.members import Members
from spt.core.members import register_ops as register_member_ops
from spt.core.messaging import Messaging
from spt.core.net.netwatch import NetWatcher, NetworkChange
from spt.core.paths import StatePaths
from spt.core.payloads import Payloads
from spt.core.proto.join import iso_utc
from spt.core.proto.membership import make_label
from spt.core.proto.resolve import RemoteTarget, Row
from spt.core.relaybook import RelayBook
from spt.core.replication import Replication
from spt.core.resting import Resting
from spt.core.resting import register_ops as register_resting_ops
from spt.core.runtime import Runtime
from spt.core.store import Store, load_or_create_key
from spt.core.subnets import HeldSubnet, Subnets, rendezvous_tag
from spt.core.subnets import register_ops as register_subnet_ops
from spt.core.types import check_label, label_from_hostname
from spt.hooks import Candidate, DiscoveryBackend, NotificationSink
from spt.hooks.interfaces import DoctorCheck
from spt.manager import PluginSystem, blocked_names, build_plugin_manager

log = logging.getLogger(__name__)

# mDNS browses all the time, so a subnet announced nearby is already known when `subnet create`
# asks; a wait, at most this long, covers only a daemon started a moment ago (its backends say
# how long they still need: `settled_in`). A fixed 0.15 s wait was most of `subnet create`'s
# 272 ms (issue 14: <= 200 ms).
NAME_CHECK_SECONDS: Final = 0.15
USER_ACTIVITY_WRITE: Final = 10.0


@dataclass
class Call:
    """One control-socket request as a handler sees it."""

    op: str
    args: Mapping[str, Any]
    uid: int
    interactive: bool
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def emit(self, event: Mapping[str, Any]) -> None:
        """Send one event line to the caller (streams: envelopes, progress)."""
        self.writer.write(encode_line({"event": dict(event)}))
        await self.writer.drain()
        trace.mark("ctl", self.op, "event")

    async def receive(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The caller's next line (acks), or None when it hung up."""
        async with asyncio.timeout(timeout):
            raw = await self.reader.readline()
        if not raw:
            return None
        msg = json.loads(raw)
        return msg if isinstance(msg, dict) else None


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True)
class Op:
    handler: Handler
    elevated: bool


def _peer_uid(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def interface_addresses() -> list[str]:
    """The IPv4 addresses of this host's (this namespace's) interfaces, loopback last."""
    import array

    siocgifaddr = 0x8915
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            buf = array.array("B", struct.pack("256s", name.encode()[:15]))
            try:
                fcntl.ioctl(s.fileno(), siocgifaddr, buf)
            except OSError:
                continue
            found.append(socket.inet_ntoa(bytes(buf[20:24])))
    return sorted(found, key=lambda a: (a.startswith("127."), a))


class Daemon:
    def __init__(self, paths: StatePaths, config: NodeConfig, plugins: PluginSystem) -> None:
        self.paths = paths
        self.config = config
        self.plugins = plugins
        self.ops: dict[str, Op] = {}
        self.doctor_checks: dict[str, DoctorCheck] = {}  # plugins' `spt doctor` lines, by name
        self.started_at = time.time()
        self._stopping = asyncio.Event()
        self.user_activity_at: float | None = None
        self._user_activity_written = 0.0
        self._label: str | None = None
        self._lock_file: IO[bytes] | None = None
        self.exec_after_stop: list[str] | None = None  # set by a restart into another version
        self.store: Store
        self.key: NodeKey
        self.members: Members
        self.messaging: Messaging
        self.payloads: Payloads
        self.replication: Replication
        self.notification_sink: NotificationSink | None = None
        self.fork_listeners: list[Callable[[str, str], None]] = []
        self._activity_published = 0.0
        self._ipc_server: asyncio.AbstractServer | None = None
        self.subnets: Subnets
        self.endpoints: Endpoints
        self.hosting: Hosting
        self.resting: Resting
        self.discovery: list[DiscoveryBackend] = sorted(
            plugins.registries.discovery_backends, key=lambda b: (b.priority, b.name)
        )
        # Relays this node announces to its subnets (the relay plugin sets them; SPEC.md §7.6).
        self.announced_relays: tuple[str, ...] = ()
        self.relay_book: RelayBook
        self.netwatch: NetWatcher | None = None
        self.network_listeners: list[Callable[[NetworkChange], str | None]] = []
        self.last_network_change: dict[str, Any] | None = None
        self._register_core_ops()

    # -- operations -----------------------------------------------------------------------

    def op(self, name: str, *, elevated: bool = False) -> Callable[[Handler], Handler]:
        """Register a control operation; duplicate names are a bug."""

        def register(handler: Handler) -> Handler:
            if name in self.ops:
                raise LocalProtocolError(name, "control operation registered twice")
            self.ops[name] = Op(handler, elevated)
            return handler

        return register

    def _register_core_ops(self) -> None:
        self.op("ping")(self._ping)
        self.op("node.show")(self._node_show)
        self.op("node.label.set")(self._node_label_set)
        self.op("daemon.status")(self._daemon_status)
        self.op("daemon.stop")(self._daemon_stop)
        self.op("daemon.log_level")(self._daemon_log_level)

    @property
    def label(self) -> str:
        # read by every resolution snapshot (each control call and member request that sends):
        # kept in memory; only node.label.set changes it while the daemon runs
        if self._label is None:
            self._label = self.store.get_meta("label") or self.config.label or label_from_hostname(socket.gethostname())
        return self._label

    @property
    def port(self) -> int:
        return self.members.port

    def addresses(self) -> list[str]:
        """`host:port` forms of where the node listens now (what `--peer` takes)."""
        return [f"{h}:{self.port}" for h in self.host_addresses()]

    async def _ping(self, call: Call) -> Any:
        return {"version": __version__, "pid": os.getpid(), "key": self.key.node_id.hex}

    async def _node_show(self, call: Call) -> Any:
        nid = self.key.node_id
        return {
            "label": self.label,
            "key": nid.hex,
            "display": nid.display(self.label),
            "fingerprint": nid.fingerprint,
            "addresses": self.addresses(),
            "subnets": [{"name": s.name, "id": s.id.hex()} for s in self.subnets.held.values()],
        }

    async def _node_label_set(self, call: Call) -> Any:
        label = check_label(str(call.args.get("label", "")))
        with self.store.transaction():
            self.store.set_meta("label", label)
        self._label = label
        # SPEC.md §3.9: the new label reaches every held subnet through its log.
        for sub in self.subnets.attached():  # a detached subnet gets the change at attach
            entry = make_label(self.key, parents=sub.log.valid_heads(), label=label, hlc=self.subnets.stamp())
            self.members.logs.merge(sub, [entry])
            self.members.spawn(self.members.logs.push_entries(sub, [entry]), "push label")
        return {"label": label}

    @property
    def mode(self) -> str:
        """`system` when the control socket is open to a group (config daemon.socket_group,
        SPEC.md §5.7), else `user`."""
        return "system" if self.config.socket_group is not None else "user"

    async def _daemon_status(self, call: Call) -> Any:
        warnings = [f"plugin {r.name} failed: {r.reason}" for r in self.plugins.records if r.status == "failed"]
        for sub in self.subnets.held.values():  # what an attack on the join port or the log leaves
            joins = self.join_state(sub)
            if joins["state"] == "locked":
                warnings.append(f"joins to {sub.name} locked until {joins['locked_until']}")
            if self.members.logs.conflicts_of(sub):
                warnings.append(f"prune conflicts in {sub.name}; see spt doctor")
        pending = len(self.members.claims.pending())
        if pending:
            warnings.append(f"{pending} key-change claims pending; see spt node trust list")
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "node": {"label": self.label, "key": self.key.node_id.hex, "display": self.key.node_id.display(self.label)},
            "mode": self.mode,
            "pid": os.getpid(),
            "port": self.port,
            "subnets": [s.name for s in self.subnets.held.values()],
            "peers": self._peer_counts(),
            "hosted": self.hosting.count_alive(),
            "unread": self.unread(),
            "warnings": warnings,
        }

    def _peer_counts(self) -> dict[str, int]:
        """Member nodes by the kind of path in use now (SPEC.md §3.10 `daemon status`)."""
        counts = {"direct": 0, "relayed": 0, "none": 0}
        seen: set[NodeId] = set()
        for sub in self.subnets.held.values():
            for node in sub.state().members:
                if node == self.key.node_id or node in seen:
                    continue
                seen.add(node)
                kind = self.members.links.path_view(node, sub)["kind"]
                counts["direct" if kind.startswith("direct") else "relayed" if kind.startswith("relayed") else "none"] += 1
        return counts

    async def _daemon_log_level(self, call: Call) -> Any:
        """`spt daemon logs --debug|--level`: the running daemon's level, changed in place."""
        level = str(call.args.get("level", "")).upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise UsageError("BAD_USAGE", level, "the level is debug, info, warning or error")
        logging.getLogger().setLevel(level)
        log.info("log level changed", extra={"level": level})
        return {"level": level}

    async def _daemon_stop(self, call: Call) -> Any:
        asyncio.get_running_loop().call_soon(self._stopping.set)
        return {"stopped": True}

    # -- network changes (SPEC.md §7.6) ------------------------------------------------------

    def network_changed(self, change: NetworkChange) -> None:
        """The machine moved (or gained an address): tell peers, re-dial, let plugins react."""
        actions = ["presence re-sent"]
        self.messaging.publish()
        if change.moved:
            count = self.members.links.redial_all(f"network changed: {change.describe()}")
            actions.append(f"{count} member connection(s) re-dialled")
        for listener in list(self.network_listeners):
            try:
                done = listener(change)
            except Exception:
                log.exception("a plugin failed to react to a network change")
                continue
            if done:
                actions.append(done)
        for backend in self.discovery:
            self.members.spawn(backend.refresh(), f"{backend.name} refresh after a network change")
        actions.append("discovery refreshed")
        self.last_network_change = {
            "at": iso_utc(int(change.at * 1000)), "change": change.describe(), "now": change.after.describe(), "actions": actions,
        }
        log.info("reacted to a network change", extra={"actions": "; ".join(actions)})

    # -- discovery ------------------------------------------------------------------------

    def host_addresses(self) -> list[str]:
        host = self.config.bind
        return interface_addresses() if host in ("0.0.0.0", "") else [host]

    def advertised_tags(self) -> list[bytes]:
        return self.subnets.advertised_tags()

    def config_section(self, name: str) -> Mapping[str, Any]:
        return self.config.section(name)

    @property
    def node_id(self) -> NodeId:
        return self.key.node_id

    async def _start_discovery(self) -> None:
        for backend in self.discovery:
            try:
                await backend.start(self)
            except Exception:
                # A broken backend costs its own discovery, never the node.
                log.exception("discovery backend failed to start", extra={"backend": backend.name})

    async def find_candidates(self, tag: bytes, timeout: float, extra: Sequence[Candidate] = ()) -> list[Candidate]:
        """Ask every discovery backend at once for holders of `tag`; duplicates dropped."""

        async def ask(backend: DiscoveryBackend) -> Sequence[Candidate]:
            try:
                return await backend.find(tag, timeout)
            except Exception:
                log.exception("discovery backend failed", extra={"backend": backend.name})
                return []

        results = await asyncio.gather(*(ask(b) for b in self.discovery))
        seen: set[tuple[str, int]] = set()
        found: list[Candidate] = []
        for cand in [*extra, *(c for batch in results for c in batch)]:
            if (cand.host, cand.port) not in seen and (cand.host, cand.port) not in self._own_addrs():
                seen.add((cand.host, cand.port))
                found.append(cand)
        return found

    def _own_addrs(self) -> set[tuple[str, int]]:
        return {(h, self.port) for h in [*self.host_addresses(), "127.0.0.1"]}

    async def subnets_changed(self) -> None:
        """Held or attached subnets changed: refresh what discovery announces (every backend at
        once: a relay's refresh is a round trip, and `subnet create` answers after them all)."""

        async def refresh(backend: DiscoveryBackend) -> None:
            try:
                await backend.refresh()
            except Exception:
                log.exception("discovery backend failed to refresh", extra={"backend": backend.name})

        await asyncio.gather(*(refresh(b) for b in self.discovery))

    async def check_name_free(self, name: str) -> None:
        """SPEC.md §3.5: NAME_TAKEN when a subnet of that name answers nearby (mDNS adverts)."""
        tag = rendezvous_tag(name)
        wait = min(NAME_CHECK_SECONDS, max((b.settled_in() for b in self.discovery), default=0.0))
        found = await self.find_candidates(tag, wait)
        if any(tag in c.tags for c in found):
            raise Refusal("NAME_TAKEN", name, "a subnet of that name answers on the LAN; pass --allow-duplicate-name to create another")

    def on_first_subnet(self, sub: HeldSubnet) -> list[str]:
        """Home endpoints made before any subnet (SPEC.md §2.5); returns their ids."""
        return self.endpoints.home_homeless(sub)

    def subnet_status(self, sub: HeldSubnet, *, nodes: bool, include_former: bool) -> dict[str, Any]:
        st = sub.state()
        doc: dict[str, Any] = {
            "name": sub.name,
            "id": sub.id.hex(),
            "attached": sub.attached,
            "nodes": len(st.members),
            "endpoints": self.endpoints.count_visible(sub),
            "joins": self.join_state(sub),
            "conflicts": self.members.logs.conflicts_of(sub),
        }
        if nodes:
            members = []
            for key, label in sorted(st.members.items(), key=lambda kv: (kv[1].lower(), kv[0].hex)):
                members.append(self.member_view(sub, key, label))
            if include_former:
                for key, former in sorted(st.former.items(), key=lambda kv: kv[0].hex):
                    members.append({"label": former.label, "key": key.hex, "standing": former.reason, "online": False,
                                    "detached": False, "self": key == self.key.node_id, "version": None,
                                    "last_seen": None, "path": None})
            doc["members"] = members
        return doc

    def member_view(self, sub: HeldSubnet, key: NodeId, label: str) -> dict[str, Any]:
        is_self = key == self.key.node_id
        presence = None if is_self else self.messaging.presence_of(sub, key)
        heard = None if is_self else self.messaging.view(sub).last_heard(key)
        detached = (not sub.attached) if is_self else bool(presence and presence.detached)
        activity = self.user_activity_ms if is_self else (presence.last_activity_ms if presence else None)
        return {
            "label": label,
            "key": key.hex,
            "standing": "member",
            "online": is_self or (not detached and key not in self.messaging.offline_nodes()
                                  and (heard is not None or self.members.transport.connection(key) is not None)),
            "detached": detached,
            "self": is_self,
            "version": __version__ if is_self else (presence.software_version if presence else None),
            "last_seen": iso_utc(heard) if heard is not None else None,
            "path": None if is_self else self.members.links.path_view(key, sub),
            "last_activity": iso_utc(activity) if activity is not None else None,  # §8.4, from presence
        }

    def join_state(self, sub: HeldSubnet) -> dict[str, Any]:
        status = self.members.joins.join_status(sub)
        return {
            "state": status.state,
            "failed_last_hour": status.failed_last_hour,
            "locked_until": iso_utc(status.locked_until_ms) if status.locked_until_ms is not None else None,
        }

    # -- what the membership layer tells the node -----------------------------------------

    def join_failed(self, sub: HeldSubnet, joiner: NodeId, source: str) -> None:
        """A wrong code was tried here; a notification of kind join-failed follows (rate-limited)."""
        status = self.members.joins.join_status(sub)
        if status.is_locked:
            self.notify(sub, "join-lockout", f"joins to {sub.name} are locked",
                        f"{status.failed_last_hour} failed attempts in the last hour; `spt subnet unlock {sub.name}` ends it",
                        dedupe_seconds=3600)
        else:
            self.notify(sub, "join-failed", f"a join to {sub.name} failed",
                        f"{joiner.short} from {source} entered a wrong code", dedupe_seconds=600)

    def notify(
        self, sub: HeldSubnet | None, kind: str, title: str, body: str, *, dedupe_seconds: float = 0,
        event: str | None = None,
    ) -> str | None:
        """Raise a notification for the user (SPEC.md §8.4). The notify plugin, when loaded,
        replicates it subnet-wide; without it the record stays in this node's store. `event` names
        one event several members observe (a key change): they then raise one notification."""
        log.warning("notification", extra={"kind": kind, "title": title})
        if self.notification_sink is not None:
            return self.notification_sink.raise_notification(
                sub.name if sub else None, kind, title, body, dedupe_seconds=dedupe_seconds, event=event
            )
        now = time.time()
        with self.store.transaction():
            if dedupe_seconds:
                recent = self.store.db.execute(
                    "SELECT 1 FROM notifications WHERE kind=? AND subnet IS ? AND time > ?",
                    (kind, sub.id if sub else None, now - dedupe_seconds),
                ).fetchone()
                if recent:
                    return None
            notif_id = os.urandom(16).hex()
            self.store.db.execute(
                "INSERT INTO notifications(id, subnet, kind, title, body, origin, time) VALUES(?,?,?,?,?,?,?)",
                (notif_id, sub.id if sub else None, kind, title, body, self.key.node_id.hex, now),
            )
        return notif_id

    def fork_mind(self, source_id: str, new_id: str) -> None:
        """`spt endpoint fork` made `new_id` from `source_id`: plugins seed it (minds, §4.7)."""
        for listener in self.fork_listeners:
            try:
                listener(source_id, new_id)
            except Exception:
                log.exception("a fork listener failed", extra={"source": source_id, "new": new_id})

    def unread(self) -> int:
        if self.notification_sink is not None:
            return self.notification_sink.unread()
        return int(self.store.query("SELECT COUNT(*) AS n FROM notifications WHERE acked=0")[0]["n"])

    def peer_synced(self, conn: Any) -> None:
        """A member connection finished its log sync; services exchange their state now."""
        self.members.spawn(self.messaging.sync(conn), "registry sync")
        self.members.spawn(self.replication.sync(conn), "replication sync")

    def outgoing_queued(self) -> None:
        """A message was put in the outgoing spool (and committed)."""
        self.messaging.wake_drain()

    def peer_disconnected(self, node: NodeId) -> None:
        """The member connection to `node` closed: what waits for it is tried again at once,
        over whichever path dials now (a relay when the direct path died)."""
        self.messaging.retry_now(node)

    def membership_changed(self, sub: HeldSubnet) -> None:
        """Members joined, left or were pruned in `sub`."""
        self.messaging.membership_changed(sub)
        self.messaging.publish()

    # -- what the endpoints service asks of the network (spt.core.messaging) --------------

    async def forward_message(self, target: RemoteTarget, payload: Mapping[str, Any]) -> str:
        return await self.messaging.forward_message(target, payload)

    def forward_messages(self, target: RemoteTarget, payloads: Sequence[Mapping[str, Any]]) -> list[asyncio.Future[str]]:
        return self.messaging.forward_messages(target, payloads)

    async def remote_request(self, node: NodeId, subnet: str, kind: str, args: Mapping[str, Any]) -> dict[str, Any]:
        return await self.messaging.remote_request(node, subnet, kind, args)

    def registry_rows(self) -> list[Row]:
        return self.messaging.registry_rows()

    def touch_user_activity(self) -> None:
        """SPEC.md §8.4: a person acted here (interactive command, rc keystroke). Kept in memory
        and written to the store at most every USER_ACTIVITY_WRITE seconds (keystrokes are many)."""
        now = time.time()
        self.user_activity_at = now
        if now - self._user_activity_written >= USER_ACTIVITY_WRITE:
            self._user_activity_written = now
            with self.store.transaction():
                self.store.set_meta("user_activity", repr(now))
        if now - self._activity_published >= 1.0:
            # Presence carries the time (§8.4): re-sign and push it now, so the member the user
            # just touched is where a notification raised a moment later surfaces.
            self._activity_published = now
            self.on_endpoint_changed("")

    @property
    def user_activity_ms(self) -> int | None:
        return None if self.user_activity_at is None else int(self.user_activity_at * 1000)

    def hosted_alive(self, perch_id: str) -> bool:
        return self.hosting.alive(perch_id)

    def hosted_pid(self, perch_id: str) -> int | None:
        return self.hosting.pid(perch_id)

    def offline_nodes(self) -> set[NodeId]:
        return self.messaging.offline_nodes()

    def offline_reasons(self) -> dict[NodeId, str]:
        return self.messaging.offline_reasons()

    def on_endpoint_changed(self, perch_id: str) -> None:
        """A local perch changed (its id), or with "" this node's presence (user activity)."""
        try:
            self.messaging.publish(perch=perch_id or None)
        except Exception:
            # Publishing is best effort here; the next presence round publishes again.
            log.exception("publishing registry rows failed", extra={"perch": perch_id})

    def departed(self, sub: HeldSubnet, reason: str) -> list[str]:
        """This node left or was pruned: drop the subnet's state; returns orphaned endpoint ids."""
        orphaned = self.endpoints.orphan(sub)
        self.messaging.forget(sub)
        self.replication.forget(sub)
        self.subnets.forget(sub)
        self.store.set_meta(f"departed:{sub.id.hex()}", json.dumps({"name": sub.name, "reason": reason}))
        self.members.links.keep_members_connected()
        return orphaned

    # -- lifecycle ------------------------------------------------------------------------

    def _take_lock(self) -> None:
        self._lock_file = open(self.paths.lock_file, "ab")  # noqa: SIM115 - held for the daemon's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                "DAEMON_RUNNING", str(self.paths.root), "a daemon already runs for this state folder"
            ) from None

    async def start(self) -> None:
        self.paths.ensure()
        self._take_lock()
        self.key, created = load_or_create_key(self.paths.key_file)
        self.store = Store(self.paths.db_file)
        trace.start(self.label)
        self.relay_book = RelayBook(self.store)
        self.subnets = Subnets(self)
        register_subnet_ops(self, self.subnets)
        self.endpoints = Endpoints(self)
        register_endpoint_ops(self, self.endpoints)
        self.resting = Resting(self.endpoints, self)
        register_resting_ops(self, self.resting)
        self.hosting = Hosting(self)
        register_hosting_ops(self, self.hosting)
        if created:
            log.info("node key created", extra={"node": self.key.node_id.short})
        self.members = Members(self)
        register_member_ops(self, self.members)
        await self.members.start()
        activity = self.store.get_meta("user_activity")
        self.user_activity_at = float(activity) if activity else None
        self.messaging = Messaging(self)
        self.messaging.start()
        # re-adopt host processes that outlived the last daemon (a run that ended meanwhile is
        # published, so the registry is up before this)
        await self.hosting.start()
        self.replication = Replication(self)
        self.replication.start()
        await self._start_discovery()
        self.plugins.pm.hook.spt_node_started(node_id=self.key.node_id.hex, port=self.port)
        register_doctor_ops(self)
        self.members.handlers["clock"] = answer_clock
        runtime = Runtime(self)
        self.payloads = Payloads(self, runtime)
        self.plugins.pm.hook.spt_runtime_started(runtime=runtime)
        if self.config.bind in ("0.0.0.0", ""):  # a node bound to one address cannot move
            self.netwatch = NetWatcher(self.host_addresses, self.network_changed)
            self.netwatch.start()
        # The control socket opens last: a command that autostarted the daemon finds every
        # operation (plugins' included) registered.
        with contextlib.suppress(FileNotFoundError):
            self.paths.socket.unlink()
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            self._ipc_server = await asyncio.start_unix_server(self._serve_client, path=os.fspath(self.paths.socket), limit=MAX_LINE)
        finally:
            os.umask(old_umask)
        os.chmod(self.paths.socket, 0o600)
        if self.config.socket_group is not None:
            self._open_to_group(self.config.socket_group)
        log.info("daemon started", extra={"node": self.key.node_id.short, "port": self.port, "pid": os.getpid()})

    def _open_to_group(self, group: str) -> None:
        """System mode: the group may reach the socket (0660) and pass through the state folder to
        it (0710), never list or read the folder; everything else in it stays the daemon's."""
        import grp

        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError("daemon.socket_group", f"no group named {group!r}") from None
        os.chown(self.paths.root, -1, gid)
        os.chmod(self.paths.root, 0o710)
        os.chown(self.paths.socket, -1, gid)
        os.chmod(self.paths.socket, 0o660)
        log.info("system mode: control socket open to a group", extra={"gid": gid})

    async def run(self) -> None:
        """Start, serve until stopped (daemon.stop, SIGTERM, SIGINT), then shut down."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            await self._stopping.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self._stopping.set()

    def restart_with(self, executable: str) -> None:
        """Stop, then exec `executable -m spt <same arguments>` (run_daemon does the exec)."""
        # -P: the new interpreter must import the new version, never an `spt` folder that
        # happens to be in the daemon's working directory.
        self.exec_after_stop = [executable, "-P", "-m", "spt", *sys.argv[1:]]
        asyncio.get_running_loop().call_soon(self._stopping.set)

    async def shutdown(self) -> None:
        self.plugins.pm.hook.spt_node_stopping()
        if self.netwatch is not None:
            await self.netwatch.stop()
        await self.endpoints.close()  # streams end (and last acks land) before the store closes
        await self.hosting.close()  # hosted processes keep running; the next daemon adopts them
        for backend in self.discovery:
            try:
                await backend.stop()
            except Exception:
                log.exception("discovery backend failed to stop", extra={"backend": backend.name})
        if self._ipc_server is not None:
            self._ipc_server.close()
            with contextlib.suppress(FileNotFoundError):
                self.paths.socket.unlink()
        await self.members.close()
        await self.endpoints.commits.close()  # a group commit in flight lands before the store closes
        self.store.close()
        log.info("daemon stopped")

    # -- the control socket ---------------------------------------------------------------

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = _peer_uid(writer)
            try:
                raw = await reader.readline()
            except ValueError:  # a line over MAX_LINE: no request is that long
                raw = b"\n"
            if not raw:
                return
            if uid not in (0, os.getuid()) and self.config.socket_group is None:
                # User mode: the socket is 0600, so only root or our own uid get here; belt and
                # braces. (System mode lets the group in; each uid then sees only its perches.) The
                # request is read first so the caller reliably gets this answer, not a reset.
                await self._answer(writer, {"error": SptError("", "this control socket belongs to another user").to_wire()})
                return
            try:
                op_name, args, interactive = read_request(raw)
            except ValueError:
                err = UsageError("BAD_REQUEST", "", "malformed control request; is the CLI the same version as the daemon?")
                await self._answer(writer, {"error": err.to_wire()})
                return
            call = Call(op_name, args, uid, interactive, reader, writer)
            trace.mark("ctl", op_name, "in")
            answer = await self._dispatch(call)
            trace.mark("ctl", op_name, "answers")
            await self._answer(writer, answer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the CLI went away: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, call: Call) -> dict[str, Any]:
        op = self.ops.get(call.op)
        if op is None:
            return {"error": UsageError("BAD_REQUEST", call.op, "unknown control operation").to_wire()}
        if op.elevated and call.uid != 0:
            log.warning("elevated operation refused", extra={"op": call.op, "uid": call.uid})
            return {"error": ElevationRequired("", ElevationRequired.MESSAGE).to_wire()}
        if call.interactive:
            self.touch_user_activity()
        log.debug("control request", extra={"op": call.op, "uid": call.uid})
        # system mode: the operation sees only the caller's perches (spt.core.caller)
        token = CALLER_UID.set(call.uid if self.config.socket_group is not None else None)
        try:
            answer: dict[str, Any] = {"result": await op.handler(call)}
            if call.interactive and self.notification_sink is not None:
                banner = self.notification_sink.banner()
                if banner:
                    answer["banner"] = banner
            return answer
        except SptError as exc:
            return {"error": exc.to_wire()}
        except (ConnectionError, asyncio.IncompleteReadError):
            raise
        except Exception as exc:
            log.exception("operation failed", extra={"op": call.op})
            return {"error": {"token": "INTERNAL", "exit": 5, "subject": "", "message": f"{type(exc).__name__}: {exc}", "lines": []}}
        finally:
            CALLER_UID.reset(token)

    async def _answer(self, writer: asyncio.StreamWriter, msg: Mapping[str, Any]) -> None:
        writer.write(encode_line(msg))
        await writer.drain()


def configure_logging(stream: IO[str] | None = None, *, log_file: Path | None = None, level: str | None = None) -> None:
    """Daemon log lines: time, level, logger, message and the structured fields.

    They go to `stream` (stderr: the journal under systemd) and to `log_file` as well, unless
    stderr already is that file (auto-start appends it there), so `spt daemon logs` always
    has them in one format.
    """

    class Fmt(logging.Formatter):
        _skip = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

        def format(self, record: logging.LogRecord) -> str:
            fields = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in self._skip)
            base = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"
            out = f"{base} {fields}" if fields else base
            if record.exc_info:
                out += "\n" + self.formatException(record.exc_info)
            return out

    handler = logging.StreamHandler(stream)
    handler.setFormatter(Fmt())
    handlers: list[logging.Handler] = [handler]
    if log_file is not None and not _is_stderr(log_file):
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(Fmt())
        handlers.append(to_file)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel((level or os.environ.get("SPT_LOG_LEVEL", "INFO")).upper())


def _is_stderr(path: Path) -> bool:
    try:
        mine, theirs = os.fstat(2), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def run_daemon(cli_blocks: tuple[str, ...] = ()) -> None:
    """The body of `spt daemon run`."""
    paths = StatePaths.resolve()
    paths.ensure()
    config = load_config(paths)
    if config.socket_group is not None:
        os.umask(0o077)  # system mode: the group passes through the state folder; nothing in it is theirs to read
    plugins = build_plugin_manager(blocked=blocked_names(cli_blocks, config.disabled_plugins))
    daemon = Daemon(paths, config, plugins)
    asyncio.run(daemon.run())
    # The store is closed and the loop gone: what is left is garbage the process is about to
    # drop. Frozen, the interpreter's exit does not walk it (~0.13 s of CPU per stop, seconds on
    # a busy machine; a test suite stops daemons hundreds of times).
    gc.freeze()
    if daemon.exec_after_stop:
        # A restart into another version keeps the pid (service managers and the updater's
        # watchdog follow it); every descriptor is close-on-exec, the state lock included.
        logging.shutdown()
        os.execv(daemon.exec_after_stop[0], daemon.exec_after_stop)
