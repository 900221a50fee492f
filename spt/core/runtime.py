"""`NodeRuntime` for plugins: the daemon's public surface, nothing more (spt.hooks.interfaces)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spt.core.errors import LocalProtocolError, Refusal
from spt.core.identity import NodeId
from spt.core.spool import Message
from spt.hooks.interfaces import (
    BulkTransit,
    DoctorCheck,
    HostedTerminal,
    IncomingPayload,
    MemberPresence,
    MemberRequestHandler,
    MemberStreamHandler,
    NotificationSink,
    OpHandler,
    Replication,
)

if TYPE_CHECKING:
    from spt.core.daemon import Daemon


class Runtime:
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    @property
    def node_id(self) -> NodeId:
        return self._daemon.key.node_id

    @property
    def label(self) -> str:
        return self._daemon.label

    @property
    def port(self) -> int:
        return self._daemon.port

    @property
    def state_dir(self) -> Path:
        return self._daemon.paths.root

    def config_section(self, name: str) -> Mapping[str, Any]:
        return self._daemon.config.section(name)

    def add_op(self, name: str, handler: OpHandler, *, elevated: bool = False) -> None:
        self._daemon.op(name, elevated=elevated)(handler)

    def add_doctor_check(self, name: str, check: DoctorCheck) -> None:
        if name in self._daemon.doctor_checks:
            raise LocalProtocolError(name, "doctor check registered twice")
        self._daemon.doctor_checks[name] = check

    def add_member_request(self, type_name: str, handler: MemberRequestHandler) -> None:
        handlers = self._daemon.members.handlers
        if type_name in handlers:
            raise LocalProtocolError(type_name, "member request type registered twice")
        handlers[type_name] = handler

    def bulk_transits(self) -> Sequence[BulkTransit]:
        return sorted(self._daemon.plugins.registries.bulk_transits, key=lambda t: (t.priority, t.name))

    def resolve(self, address: str) -> Any:
        return self._daemon.endpoints.resolve(address)

    def sender(self, from_id: str | None, target: Any) -> str:
        return self._daemon.endpoints.sender(from_id, target)

    def member_subnet(self, connection: Any, subnet: str) -> bool:
        sub = self._daemon.subnets.by_name(subnet)
        return sub is not None and sub.attached and sub.state().is_member(connection.peer)

    def shared_subnets(self, node: NodeId) -> list[str]:
        return [sub.canonical for sub in self._daemon.members.shared_subnets(node)]

    def perch_visible(self, perch_id: str, subnet: str) -> bool:
        endpoints = self._daemon.endpoints
        perch = endpoints.get(perch_id)
        return perch is not None and any(s.canonical == subnet.lower() for s in endpoints.visible_in(perch))

    def perch_id(self, perch_id: str) -> str | None:
        perch = self._daemon.endpoints.get(perch_id)
        return perch.id if perch is not None else None

    def endpoint_folder(self, perch_id: str) -> Path:
        return self._daemon.paths.endpoints / (self.perch_id(perch_id) or perch_id)

    async def connect_member(self, node: NodeId) -> Any:
        return await self._daemon.members.links.connect_member(node)

    async def deliver(
        self, perch_id: str, event_type: str, body: str, attrs: Sequence[tuple[str, str]], *, sender: str
    ) -> str:
        endpoints = self._daemon.endpoints
        perch = endpoints.get(perch_id)
        if perch is None:
            raise Refusal("NO_PERCH", perch_id)
        sender_id, _, _ = sender.partition("@")
        msg = Message(
            id=os.urandom(16).hex(), type=event_type, from_=sender, sender_node=self.node_id,
            sender_id=sender_id.rpartition(":")[2] or "spt", body=body, attrs=tuple(attrs),
        )
        return await endpoints.accept_event(perch, msg)

    async def deliver_message(self, payload: IncomingPayload) -> str:
        return await self._daemon.endpoints.deliver_incoming(
            payload.value, subnet=payload.subnet, sender_node=payload.sender, from_form=payload.sender_form
        )

    async def deliver_messages(self, payloads: Sequence[IncomingPayload]) -> list[str | Exception]:
        return list(await self._daemon.endpoints.deliver_incoming_many(payloads))

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        self._daemon.members.spawn(coro, what)

    def add_member_stream(self, type_name: str, handler: MemberStreamHandler) -> None:
        streams = self._daemon.members.stream_handlers
        if type_name in streams or type_name in self._daemon.members.handlers:
            raise LocalProtocolError(type_name, "member stream type registered twice")
        streams[type_name] = handler

    def hosted_info(self, perch_id: str) -> Mapping[str, Any] | None:
        return self._daemon.hosting.info(perch_id)

    async def attach_hosted(self, perch_id: str, hello: Mapping[str, Any]) -> HostedTerminal:
        return await self._daemon.hosting.attach(perch_id, hello)

    # -- replicated records, notifications, user activity ----------------------------------

    @property
    def replication(self) -> Replication:
        return self._daemon.replication

    def subnet_names(self) -> list[str]:
        return [s.name for s in self._daemon.subnets.attached()]

    def subnet_members(self, subnet: str) -> list[NodeId]:
        sub = self._daemon.subnets.by_name(subnet)
        if sub is None or not sub.attached:
            return []
        return sorted(sub.state().members)

    def online_activity(self, subnet: str) -> dict[NodeId, int | None]:
        daemon = self._daemon
        sub = daemon.subnets.by_name(subnet)
        if sub is None or not sub.attached:
            return {}
        me = daemon.key.node_id
        now_ms = int(time.time() * 1000)
        ttl_ms = int(daemon.config.offline_after * 1000)
        view = daemon.messaging.views.get(sub.id)
        out: dict[NodeId, int | None] = {me: daemon.user_activity_ms}
        for node in sub.state().members:
            if node == me or view is None or view.is_offline(node, now_ms, ttl_ms=ttl_ms):
                continue
            presence = view.presence(node)
            out[node] = presence.last_activity_ms if presence is not None else None
        return out

    def touch_user_activity(self) -> None:
        self._daemon.touch_user_activity()

    def announce_relays(self, urls: Sequence[str]) -> None:
        daemon = self._daemon
        if tuple(urls) != daemon.announced_relays:
            daemon.announced_relays = tuple(urls)
            daemon.messaging.publish()

    def member_relays(self) -> Mapping[str, Sequence[str]]:
        daemon = self._daemon
        me = daemon.key.node_id
        book = daemon.relay_book
        members: set[NodeId] = set()
        out: dict[str, set[str]] = {}
        for sub in daemon.subnets.attached():
            for node in sub.state().members:
                if node == me:
                    continue
                members.add(node)
                presence = daemon.messaging.presence_of(sub, node)
                if presence is not None:
                    book.learn(node, presence.relays)
                for url in book.announced_by(node):
                    out.setdefault(url, set()).add(sub.canonical)
        book.keep_only(members)
        return {url: sorted(names) for url, names in out.items()}

    def on_network_change(self, listener: Callable[[Any], str | None]) -> None:
        self._daemon.network_listeners.append(listener)

    def raise_notification(self, kind: str, title: str, body: str, *, subnet: str | None = None) -> str | None:
        daemon = self._daemon
        if subnet is not None:
            sub = daemon.subnets.by_name(subnet)
            if sub is None:
                raise Refusal("NO_SUCH_SUBNET", subnet)
            return daemon.notify(sub, kind, title, body)
        # About this node, not one subnet: every attached subnet carries it to the user
        ids = [daemon.notify(sub, kind, title, body) for sub in daemon.subnets.attached()]
        return next((i for i in ids if i), None) if ids else daemon.notify(None, kind, title, body)

    def announce_release(self, version: str | None) -> None:
        messaging = self._daemon.messaging
        if messaging.staged_release != version:
            messaging.staged_release = version
            messaging.publish()

    def member_presence(self) -> Sequence[MemberPresence]:
        daemon = self._daemon
        me = daemon.key.node_id
        offline = daemon.messaging.offline_nodes()
        found: list[MemberPresence] = []
        for sub in daemon.subnets.attached():
            for node, label in sub.state().members.items():
                presence = daemon.messaging.presence_of(sub, node)
                if node == me or node in offline or presence is None or presence.detached:
                    continue
                found.append(MemberPresence(node, label, sub.name, presence.software_version, presence.staged_release))
        return found

    def plugin_status(self) -> Mapping[str, str]:
        return {r.name: str(r.as_json()["status"]) for r in self._daemon.plugins.records}

    def restart(self, executable: str) -> None:
        self._daemon.restart_with(executable)

    def set_notification_sink(self, sink: NotificationSink) -> None:
        self._daemon.notification_sink = sink

    def add_fork_listener(self, listener: Callable[[str, str], None]) -> None:
        """`listener(source_id, new_id)` runs when `spt endpoint fork` made a new local perch."""
        self._daemon.fork_listeners.append(listener)

    def local_endpoints(self) -> list[tuple[str, str | None]]:
        endpoints = self._daemon.endpoints
        out: list[tuple[str, str | None]] = []
        for perch in endpoints.perches():
            home = self._daemon.subnets.held.get(perch.home) if perch.home else None
            out.append((perch.id, home.name if home else None))
        return out

    def effective_sync_subnets(self, perch_id: str) -> list[str]:
        endpoints = self._daemon.endpoints
        perch = endpoints.get(perch_id)
        if perch is None:
            return []
        return [s.name for s, visible, in_scope in endpoints.settings(perch) if visible and in_scope and s.attached]

    def instance_nodes(self, home: str, endpoint_id: str, subnet: str) -> list[NodeId]:
        me = self._daemon.key.node_id
        canonical = subnet.lower()
        return sorted({
            r.node for r in self._daemon.messaging.registry_rows()
            if r.subnet.lower() == canonical and r.visible and r.node != me
            and r.home.lower() == home.lower() and r.endpoint_id.lower() == endpoint_id.lower()
        })

    def endpoint_workdir(self, perch_id: str) -> Path | None:
        # §2.8: `endpoint run --project` (the hosted command's folder), else where it ran `spt ready`
        hosted = self._daemon.store.query("SELECT cwd FROM hosted WHERE perch=?", (perch_id,))
        if hosted and hosted[0]["cwd"]:
            return Path(hosted[0]["cwd"])
        perch = self._daemon.endpoints.get(perch_id)
        return Path(perch.workdir) if perch is not None and perch.workdir else None
