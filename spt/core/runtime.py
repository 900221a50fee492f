"""`NodeRuntime` for plugins: the daemon's public surface, nothing more (spt.hooks.interfaces)."""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spt.core.errors import LocalProtocolError, Refusal
from spt.core.identity import NodeId
from spt.core.spool import Message
from spt.hooks.interfaces import (
    BulkTransit,
    HostedTerminal,
    IncomingPayload,
    MemberPresence,
    MemberRequestHandler,
    MemberStreamHandler,
    OpHandler,
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
    def state_dir(self) -> Path:
        return self._daemon.paths.root

    def config_section(self, name: str) -> Mapping[str, Any]:
        return self._daemon.config.section(name)

    def add_op(self, name: str, handler: OpHandler, *, elevated: bool = False) -> None:
        self._daemon.op(name, elevated=elevated)(handler)

    def add_member_request(self, type_name: str, handler: MemberRequestHandler) -> None:
        handlers = self._daemon.members.handlers
        if type_name in handlers:
            raise LocalProtocolError(type_name, "member request type registered twice")
        handlers[type_name] = handler

    def bulk_transits(self) -> Sequence[BulkTransit]:
        return sorted(self._daemon.plugins.registries.bulk_transits, key=lambda t: (t.priority, t.name))

    def resolve(self, address: str) -> Any:
        return self._daemon.endpoints.resolve(address)

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
        return await self._daemon.members.connect_member(node)

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

    def touch_user_activity(self) -> None:
        self._daemon.touch_user_activity()

    def announce_relays(self, urls: Sequence[str]) -> None:
        daemon = self._daemon
        if tuple(urls) != daemon.announced_relays:
            daemon.announced_relays = tuple(urls)
            daemon.messaging.publish()

    def member_relays(self) -> Mapping[str, Sequence[NodeId]]:
        daemon = self._daemon
        me = daemon.key.node_id
        members: set[NodeId] = set()
        for sub in daemon.subnets.attached():
            for node in sub.state().members:
                if node == me:
                    continue
                members.add(node)
                presence = daemon.messaging.presence_of(sub, node)
                if presence is not None:
                    daemon.relay_book.learn(node, presence.relays)
        return daemon.relay_book.by_url(members)

    def on_network_change(self, listener: Callable[[Any], str | None]) -> None:
        self._daemon.network_listeners.append(listener)

    def raise_notification(self, kind: str, title: str, body: str) -> None:
        self._daemon.notify(None, kind, title, body)

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
