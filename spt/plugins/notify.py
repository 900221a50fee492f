"""Notifications (SPEC.md §8.4, §3.5 `subnet notify`, §3.8 `notif`): a plugin on replicated records.

Three record types in one kind, `notif`, partitioned by subnet (canonical name):
- `notif`: the notification itself (kind, title, body, origin endpoint); its record id is the
  notification id; its author is the origin node.
- `ack`: "acknowledged", naming a notification; any member may write one, and one anywhere
  counts everywhere.
- `surfaced`: the author node showed the notification; others then leave it alone.
Every member of the subnet receives all three, by push at once and by anti-entropy on connect
and every 60 s, so a node that was offline (or joined later) learns them when it connects.

Where a notification shows: the online member with the latest user-activity time (carried in
presence), ties broken by the lower key, falling back to the origin node when nobody has any.
That node runs the renderers (the built-in one spawns `notifications.command` detached), records
`surfaced`, and its next interactive commands print a one-line stderr banner, at most every
10 minutes. Records are kept 30 days after their ack, then dropped everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final

from spt.core.errors import Refusal, RemoteProtocolError, UsageError
from spt.core.identity import NodeId
from spt.hooks import (
    NodeRuntime,
    NotificationRenderer,
    RecordKind,
    Registry,
    ReplicatedRecord,
    hookimpl,
)

log = logging.getLogger(__name__)

KIND: Final = "notif"
LOCAL_PART: Final = "local"  # notifications of a node in no subnet: never shared
KINDS: Final = frozenset({
    "user", "join-lockout", "join-failed", "key-change", "update-consent", "member-pruned",
    "member-left", "dropped-messages", "commune-rejected", "spool-full", "prune-conflict",
})
KEEP_AFTER_ACK_MS: Final = 30 * 24 * 3600 * 1000
BANNER_EVERY: Final = 600.0
SURFACE_CHECK_SECONDS: Final = 2.0
MAX_TITLE: Final = 200
MAX_BODY: Final = 16 * 1024


def _text(data: Mapping[str, Any], name: str, limit: int, *, optional: bool = False) -> str | None:
    value = data.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value.encode("utf-8", "surrogatepass")) > limit:
        raise RemoteProtocolError(name, f"{name} is a string of at most {limit} bytes")
    return value


def check_data(data: Mapping[str, Any]) -> str:
    """Validate a notif record's data; returns its type (notif, ack, surfaced)."""
    kind = data.get("t")
    if kind == "notif":
        if set(data) != {"t", "kind", "title", "body", "endpoint"}:
            raise RemoteProtocolError("notif", "a notification has t, kind, title, body, endpoint")
        if data["kind"] not in KINDS:
            raise RemoteProtocolError(str(data["kind"])[:40], "unknown notification kind")
        _text(data, "title", MAX_TITLE)
        _text(data, "body", MAX_BODY)
        _text(data, "endpoint", 64, optional=True)
    elif kind in ("ack", "surfaced"):
        if set(data) != {"t", "notif"}:
            raise RemoteProtocolError(str(kind), f"an {kind} record has t and notif")
        notif = data["notif"]
        if not isinstance(notif, str) or len(notif) != 32:
            raise RemoteProtocolError("notif", "names a notification by its 32-hex id")
    else:
        raise RemoteProtocolError(repr(kind)[:40], "a notif record's t is notif, ack or surfaced")
    return str(kind)


class CommandRenderer(NotificationRenderer):
    """Runs `notifications.command` detached, with the placeholders filled in (shell-quoted)."""

    name: ClassVar[str] = "command"

    def render(self, notification: Mapping[str, Any]) -> str:
        return f"{notification['title']}: {notification['body']}"

    def show(self, notification: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        template = config.get("command")
        if not isinstance(template, str) or not template.strip():
            return
        values = {
            "notif_id": notification["id"], "notif_from": notification["from"] or "",
            "notif_subnet": notification["subnet"] or "", "notif_title": notification["title"],
            "notif_body": notification["body"],
        }
        command = template
        for name, value in values.items():
            command = command.replace("{" + name + "}", shlex.quote(str(value)))
        subprocess.Popen(  # detached: never waited for, never blocks the daemon
            ["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
        )


class Notifications(RecordKind):
    """The `notif` record kind and the notification service of one node."""

    name: ClassVar[str] = KIND
    anti_entropy_seconds: ClassVar[float] = 60.0

    def __init__(self) -> None:
        self.runtime: NodeRuntime | None = None
        self.renderers: Registry[NotificationRenderer] | None = None
        self._last_banner = 0.0
        self._acks: dict[str, int] | None = None  # notification id -> first ack time (ms), cached

    # -- the record kind ------------------------------------------------------------------

    def _members(self, subnet: str) -> list[NodeId]:
        return self.runtime.subnet_members(subnet) if self.runtime is not None else []

    def partitions(self, subnet: str, peer: NodeId) -> Sequence[str]:
        return [subnet.lower()] if peer in self._members(subnet) else []

    def accept(self, record: ReplicatedRecord, *, subnet: str, peer: NodeId) -> bool:
        check_data(record.data)
        return record.part == subnet.lower() and record.author in self._members(subnet)

    def recipients(self, record: ReplicatedRecord) -> Sequence[tuple[str, NodeId]]:
        if record.part == LOCAL_PART or self.runtime is None:
            return ()
        subnet = next((s for s in self.runtime.subnet_names() if s.lower() == record.part), None)
        if subnet is None:
            return ()
        return [(subnet, node) for node in self._members(subnet) if node != self.runtime.node_id]

    def merged(self, records: Sequence[ReplicatedRecord]) -> None:
        self._acks = None
        self.check_surfacing()

    def expired(self, record: ReplicatedRecord, now_ms: int) -> bool:
        notif_id = record.id if record.data.get("t") == "notif" else str(record.data.get("notif"))
        acked = self._ack_time(notif_id)
        if acked is not None:
            return now_ms - acked > KEEP_AFTER_ACK_MS
        return record.data.get("t") != "notif" and now_ms - record.hlc.wall_ms > KEEP_AFTER_ACK_MS and (
            self.runtime is None or self.runtime.replication.get(KIND, notif_id) is None
        )

    def left_subnet(self, subnet: str) -> Sequence[str]:
        self._acks = None
        return [subnet.lower()]

    # -- reading ----------------------------------------------------------------------------

    def _all(self) -> Sequence[ReplicatedRecord]:
        return self.runtime.replication.records(KIND) if self.runtime is not None else []

    def _ack_time(self, notif_id: str) -> int | None:
        if self._acks is None:
            acks: dict[str, int] = {}
            for r in self._all():
                if r.data.get("t") == "ack":
                    key = str(r.data.get("notif"))
                    acks[key] = min(acks.get(key, r.hlc.wall_ms), r.hlc.wall_ms)
            self._acks = acks
        return self._acks.get(notif_id)

    def _held_parts(self) -> set[str]:
        assert self.runtime is not None
        return {s.lower() for s in self.runtime.subnet_names()} | {LOCAL_PART}

    def notifications(self) -> list[dict[str, Any]]:
        """Every held notification of the subnets served here, oldest first, as `notif list --json` rows."""
        if self.runtime is None:
            return []
        records = self._all()
        acked = {str(r.data["notif"]) for r in records if r.data.get("t") == "ack"}
        surfaced: dict[str, str] = {}
        for r in records:  # HLC order: the first `surfaced` names the node
            if r.data.get("t") == "surfaced":
                surfaced.setdefault(str(r.data["notif"]), r.author.hex)
        names = {s.lower(): s for s in self.runtime.subnet_names()}
        parts = self._held_parts()
        out = []
        for r in records:
            if r.data.get("t") != "notif" or r.part not in parts:
                continue
            endpoint = r.data.get("endpoint")
            out.append({
                "id": r.id,
                "subnet": names.get(r.part),
                "kind": r.data["kind"],
                "title": r.data["title"],
                "body": r.data["body"],
                "from": f"{endpoint}@{r.author.hex}" if endpoint else r.author.hex,
                "time": _iso(r.hlc.wall_ms),
                "acked": r.id in acked,
                "surfaced_at": surfaced.get(r.id),
            })
        return out

    def unread(self) -> int:
        return sum(1 for n in self.notifications() if not n["acked"])

    # -- raising and acknowledging -----------------------------------------------------------

    def raise_notification(
        self, subnet: str | None, kind: str, title: str, body: str, *, dedupe_seconds: float = 0,
        event: str | None = None, endpoint: str | None = None,
    ) -> str | None:
        assert self.runtime is not None
        part = subnet.lower() if subnet else LOCAL_PART
        if dedupe_seconds:
            since = int((time.time() - dedupe_seconds) * 1000)
            for r in self.runtime.replication.records(KIND, part):
                if (r.data.get("t") == "notif" and r.data.get("kind") == kind and r.author == self.runtime.node_id
                        and r.hlc.wall_ms > since):
                    return None
        data = {"t": "notif", "kind": kind, "title": title[:MAX_TITLE], "body": body[:MAX_BODY], "endpoint": endpoint}
        check_data(data)
        record_id = hashlib.sha256(f"{part}|{kind}|{event}".encode()).hexdigest()[:32] if event else None
        return self.runtime.replication.publish(KIND, part, data, record_id=record_id).id

    def find(self, prefix: str) -> dict[str, Any]:
        prefix = prefix.lower()
        matches = [n for n in self.notifications() if n["id"].startswith(prefix)] if len(prefix) >= 6 else []
        if len(matches) != 1:
            reason = ("that prefix names several notifications" if matches else "no notification has that id"
                      if len(prefix) >= 6 else "give at least 6 characters of the id (SPEC.md §2.10)")
            raise Refusal("NO_SUCH_NOTIF", prefix, reason)
        return matches[0]

    def ack(self, notification: Mapping[str, Any]) -> None:
        assert self.runtime is not None
        if notification["acked"]:
            return
        part = notification["subnet"].lower() if notification["subnet"] else LOCAL_PART
        self.runtime.replication.publish(KIND, part, {"t": "ack", "notif": notification["id"]})

    # -- surfacing --------------------------------------------------------------------------

    def _surfacing_node(self, notification: Mapping[str, Any]) -> NodeId | None:
        assert self.runtime is not None
        if notification["subnet"] is None:
            return self.runtime.node_id
        activity = self.runtime.online_activity(notification["subnet"])
        known = {n: t for n, t in activity.items() if t is not None}
        if known:
            # Latest activity wins; ties go to the lower key.
            return min(known, key=lambda n: (-known[n], n.hex))
        origin = NodeId.from_hex(notification["from"].rpartition("@")[2])
        return origin if origin in activity else None

    def check_surfacing(self) -> None:
        """Show, once, every unread notification this node is the one to show."""
        if self.runtime is None:
            return
        config = self.runtime.config_section("notifications")
        for n in self.notifications():
            if n["acked"] or n["surfaced_at"] is not None or self._surfacing_node(n) != self.runtime.node_id:
                continue
            part = n["subnet"].lower() if n["subnet"] else LOCAL_PART
            self.runtime.replication.publish(KIND, part, {"t": "surfaced", "notif": n["id"]})
            for renderer in sorted(self.renderers or (), key=lambda r: (r.priority, r.name)):
                try:
                    renderer.show(n, config)
                except Exception:
                    log.exception("a notification renderer failed", extra={"renderer": renderer.name})
            log.info("notification surfaced here", extra={"notif": n["id"][:8], "kind": n["kind"]})

    def banner(self) -> str | None:
        if self.runtime is None or (time.monotonic() - self._last_banner < BANNER_EVERY and self._last_banner):
            return None
        me = self.runtime.node_id.hex
        count = sum(1 for n in self.notifications() if not n["acked"] and n["surfaced_at"] == me)
        if not count:
            return None
        self._last_banner = time.monotonic()
        noun = "notification" if count == 1 else "notifications"
        return f"spt: {count} unread {noun} \u2014 spt notif list"

    async def surface_loop(self) -> None:
        """Presence changes (who is active, who is online) can make this node the one to show."""
        import asyncio

        while True:
            await asyncio.sleep(SURFACE_CHECK_SECONDS)
            try:
                self.check_surfacing()
            except Exception:
                log.exception("notification surfacing failed")

    # -- control operations -------------------------------------------------------------------

    def _subnet_for(self, name: str | None) -> str:
        assert self.runtime is not None
        names = self.runtime.subnet_names()
        if name:
            found = next((s for s in names if s.lower() == name.lower()), None)
            if found is None:
                raise Refusal("NO_SUCH_SUBNET", name, "this node serves no subnet of that name")
            return found
        if len(names) == 1:
            return names[0]
        if not names:
            raise Refusal("NO_SUCH_SUBNET", "", "this node holds no subnet")
        raise Refusal("SUBNET_REQUIRED", "", f"this node holds {len(names)} subnets; pass --subnet",
                      lines=[f"  {s}" for s in sorted(names)])

    def register_ops(self, runtime: NodeRuntime) -> None:
        async def raise_op(call: Any) -> Any:
            body = str(call.args.get("body") or "")
            title = str(call.args.get("title") or "") or (body.strip().splitlines() or [""])[0][:80]
            if not body.strip() and not title:
                raise UsageError("BAD_USAGE", "", "give a body (argument or stdin) or --title")
            if len(body.encode()) > MAX_BODY or len(title.encode()) > MAX_TITLE:
                raise UsageError("BAD_USAGE", "", f"a body is at most {MAX_BODY} bytes, a title {MAX_TITLE}")
            subnet = self._subnet_for(call.args.get("subnet") or None)
            notif_id = self.raise_notification(subnet, "user", title, body)
            return {"id": notif_id}

        async def list_op(call: Any) -> Any:
            subnet = call.args.get("subnet")
            rows = self.notifications()
            if subnet:  # a mistyped name is refused, not answered with an empty list
                subnet = self._subnet_for(str(subnet))
                rows = [n for n in rows if n["subnet"] == subnet]
            if not call.args.get("all"):
                rows = [n for n in rows if not n["acked"]]
            return {"notifications": rows}

        async def ack_op(call: Any) -> Any:
            if call.args.get("all"):
                chosen = [n for n in self.notifications() if not n["acked"]]
            else:
                ids = call.args.get("ids") or []
                if not isinstance(ids, list) or not ids:
                    raise UsageError("BAD_USAGE", "", "name notification ids, or pass --all")
                chosen = [self.find(str(i)) for i in ids]
            for n in chosen:
                self.ack(n)
            return {"acked": [n["id"] for n in chosen]}

        runtime.add_op("notif.raise", raise_op)
        runtime.add_op("notif.list", list_op)
        runtime.add_op("notif.ack", ack_op)


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


SERVICE: Final = Notifications()


@hookimpl
def spt_register_record_kinds(registry: Registry[RecordKind]) -> None:
    registry.add(SERVICE)


@hookimpl
def spt_register_notification_renderers(registry: Registry[NotificationRenderer]) -> None:
    registry.add(CommandRenderer())
    SERVICE.renderers = registry  # read after start-up, frozen: every plugin's renderers


@hookimpl
def spt_runtime_started(runtime: NodeRuntime) -> None:
    SERVICE.runtime = runtime
    SERVICE.register_ops(runtime)
    runtime.set_notification_sink(SERVICE)
    runtime.spawn(SERVICE.surface_loop(), "notification surfacing")
