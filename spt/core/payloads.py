"""Payload types from plugins, carried to the perch they address (SPEC.md §1, §8.1).

A payload type (`spt.hooks.PayloadType`) is found in the frozen registry by its wire name. The
sender resolves an address like a message; a local target is handled here, a remote one travels
as a `payload` member request through the resolution subnet. The receiving node checks that the
sender is a member, that the perch is visible there and that it knows the type — a type it lacks
is refused with a token that names it, never a crash — then asks `spt_accept_payload` (any
False refuses) and runs the type's `handle`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from spt.core.errors import Refusal, RemoteProtocolError, SptError
from spt.core.members import remote_refusal
from spt.core.net.connections import Connection, RequestError
from spt.core.proto.frames import Frame
from spt.core.proto.resolve import LocalTarget, shortest_from_form
from spt.core.spool import BATCH_HELD_BACK, HELD_BACK
from spt.hooks import IncomingPayload, PayloadType

if TYPE_CHECKING:
    from spt.core.daemon import Call, Daemon
    from spt.core.runtime import Runtime

log = logging.getLogger(__name__)

PAYLOAD_TIMEOUT: Final = 10.0
MESSAGE_TYPES: Final = ("send", "ring")
FINAL_REFUSALS: Final = ("NO_PERCH", "UNKNOWN_PAYLOAD_TYPE")  # the target will never take it


class Payloads:
    def __init__(self, daemon: Daemon, runtime: Runtime) -> None:
        self.daemon = daemon
        self.runtime = runtime
        self.types = daemon.plugins.registries.payload_types
        daemon.members.handlers["payload"] = self._handle_remote
        daemon.op("payload.send")(self._op_send)

    def names(self) -> list[str]:
        return sorted(t.name for t in self.types)

    def _type(self, name: str) -> type[PayloadType]:
        if name in MESSAGE_TYPES:
            # messages carry ids, windows and reply matching: they travel as `msg.deliver`
            raise Refusal("BAD_PAYLOAD_TYPE", name, "messages are sent with spt send / spt ring")
        return self._registered(name)

    def _registered(self, name: str) -> type[PayloadType]:
        payload_type = self.types.get(name)
        if payload_type is None:
            raise Refusal("UNKNOWN_PAYLOAD_TYPE", name, "this node has no plugin for that payload type")
        return payload_type

    async def handle(self, incoming: IncomingPayload) -> Mapping[str, Any]:
        """Policy hook, then the type's handler, for a payload addressed to a local perch."""
        return await self._accepted(incoming).handle(self.runtime, incoming)

    def _accepted(self, incoming: IncomingPayload) -> type[PayloadType]:
        """The payload's type, once the policy hook let it in (else Refusal PAYLOAD_REFUSED)."""
        payload_type = self._registered(incoming.type_name)
        answers = self.daemon.plugins.pm.hook.spt_accept_payload(payload=incoming)
        if any(answer is False for answer in answers):
            raise Refusal("PAYLOAD_REFUSED", incoming.type_name, "a plugin on the receiving node refused it")
        return payload_type

    async def handle_many(self, incomings: Sequence[IncomingPayload]) -> list[Mapping[str, Any] | Exception]:
        """Payloads that arrived together (`msg.deliver_batch`), in order: per payload its reply
        or its refusal. Each run of one type goes to that type's `handle_batch`, one run after
        another (a later run never overtakes an earlier one); the policy hook is asked per payload.

        Once a payload for a perch is refused with a retryable token (SPOOL_FULL, a policy
        hook's refusal: anything but FINAL_REFUSALS), the later ones for that perch are refused
        with the same token and not handled: handled, they would reach the perch ahead of it,
        which comes later by the sender's retry (§4.2 step 7). Spool writes record their own
        refusals in `spool.BATCH_HELD_BACK`, set here for the handlers (and their tasks)."""
        results: list[Mapping[str, Any] | Exception] = []
        held_back: dict[str, str] = {}
        context = BATCH_HELD_BACK.set(held_back)
        try:
            run: list[IncomingPayload] = []
            for incoming in incomings:
                if run and incoming.type_name != run[0].type_name:
                    results += await self._handle_run(run, held_back)
                    run = []
                run.append(incoming)
            if run:
                results += await self._handle_run(run, held_back)
        finally:
            BATCH_HELD_BACK.reset(context)
        return results

    async def _handle_run(
        self, run: Sequence[IncomingPayload], held_back: dict[str, str]
    ) -> list[Mapping[str, Any] | Exception]:
        """Payloads of one type, in order (`handle_many`)."""
        outcomes: dict[int, Mapping[str, Any] | Exception] = {}
        accepted: list[int] = []
        payload_type: type[PayloadType] | None = None
        for index, incoming in enumerate(run):
            token = held_back.get(incoming.perch.lower())
            try:
                if token is not None:
                    raise Refusal(token, incoming.perch, HELD_BACK)
                payload_type = self._accepted(incoming)
            except Refusal as exc:
                outcomes[index] = self._failure(exc, incoming, held_back)
            else:
                accepted.append(index)
        if payload_type is not None:
            batch = [run[i] for i in accepted]
            try:
                replies = list(await payload_type.handle_batch(self.runtime, batch))
                if len(replies) != len(batch):
                    raise RuntimeError(f"{payload_type.name}.handle_batch gave {len(replies)} replies to {len(batch)}")
            except Exception as exc:
                replies = [exc] * len(batch)
            for index, incoming, reply in zip(accepted, batch, replies, strict=True):
                outcomes[index] = self._failure(reply, incoming, held_back) if isinstance(reply, Exception) else reply
        return [outcomes[i] for i in range(len(run))]

    def _failure(self, exc: Exception, incoming: IncomingPayload, held_back: dict[str, str]) -> Exception:
        """What a payload's failure answers (a plugin's own failure as PAYLOAD_FAILED), noting a
        retryable refusal in `held_back`."""
        if isinstance(exc, Refusal) and exc.instance_token not in FINAL_REFUSALS:
            held_back.setdefault(incoming.perch.lower(), exc.instance_token)
        if isinstance(exc, SptError):
            return exc
        log.error("payload handler failed", extra={"type": incoming.type_name}, exc_info=exc)
        return Refusal("PAYLOAD_FAILED", incoming.type_name, f"the receiving plugin failed: {type(exc).__name__}")

    async def _op_send(self, call: Call) -> Any:
        """Send a plugin payload: `{"type", "address", "value", "from"}`; answers the reply mapping."""
        type_name = str(call.args.get("type", ""))
        payload_type = self._type(type_name)
        address = str(call.args.get("address", ""))
        sender_id = str(call.args.get("from") or "spt")
        value = payload_type.encode(call.args.get("value"))
        target = self.daemon.endpoints.resolve(address)
        me = self.daemon.key.node_id
        if isinstance(target, LocalTarget):
            incoming = IncomingPayload(type_name, me, "", target.perch.id, sender_id, payload_type.decode(value))
            return dict(await self.handle(incoming))
        sub = self.daemon.subnets.by_name(target.subnet)
        if sub is None:
            raise Refusal("NO_SUCH_SUBNET", target.subnet)
        body = {"subnet": sub.id.hex(), "type": type_name, "perch": target.row.endpoint_id, "from": sender_id, "value": value}
        async with asyncio.timeout(PAYLOAD_TIMEOUT):
            conn = await self.daemon.members.links.connect_member(target.node.key)
            try:
                reply = await conn.request("payload", body, timeout=PAYLOAD_TIMEOUT)
            except RequestError as exc:
                raise remote_refusal(exc, address) from exc
        return reply.body if isinstance(reply.body, dict) else {"reply": reply.body}

    async def _handle_remote(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = frame.body if isinstance(frame.body, dict) else {}
        sub = self.daemon.members.require_member(conn, body.get("subnet"))
        type_name, perch_id = str(body.get("type", "")), str(body.get("perch", ""))
        payload_type = self._type(type_name)
        if not self.runtime.perch_visible(perch_id, sub.name):
            raise Refusal("NO_PERCH", perch_id)
        value = payload_type.decode(body.get("value"))
        sender_form = shortest_from_form(
            str(body.get("from") or "spt"), conn.peer, self.daemon.endpoints.snapshot(), via_subnet=sub.name
        )
        incoming = IncomingPayload(type_name, conn.peer, sub.name, perch_id, sender_form, value)
        try:
            return "payload.result", dict(await self.handle(incoming))
        except RemoteProtocolError:
            raise
        except SptError:
            raise
        except Exception as exc:
            log.exception("payload handler failed", extra={"type": type_name})
            raise Refusal("PAYLOAD_FAILED", type_name, f"the receiving plugin failed: {type(exc).__name__}") from exc
