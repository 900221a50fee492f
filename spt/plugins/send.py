"""The `send` payload type: a message for a perch, delivered live first, else spooled."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from spt.core.errors import RemoteProtocolError
from spt.hooks import IncomingPayload, PayloadContext, PayloadType, Registry, hookimpl


class Send(PayloadType):
    name: ClassVar[str] = "send"
    version: ClassVar[int] = 1
    summary: ClassVar[str] = "a message to an endpoint"

    @classmethod
    def decode(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("body"), str):
            raise RemoteProtocolError("send", "a send payload is a map with a string 'body'")
        return data

    @classmethod
    async def handle(cls, ctx: PayloadContext, payload: IncomingPayload) -> Mapping[str, Any]:
        return {"token": await ctx.deliver_message(payload)}

    @classmethod
    async def handle_batch(
        cls, ctx: PayloadContext, payloads: Sequence[IncomingPayload]
    ) -> Sequence[Mapping[str, Any] | Exception]:
        # one spool write for the whole batch
        return [t if isinstance(t, Exception) else {"token": t} for t in await ctx.deliver_messages(payloads)]


@hookimpl
def spt_register_payload_types(registry: Registry[type[PayloadType]]) -> None:
    registry.add(Send)
