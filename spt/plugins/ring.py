"""The `ring` payload type: a send whose sender waits for the reply (SPEC.md §4.3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from spt.hooks import IncomingPayload, PayloadContext, PayloadType, Registry, hookimpl
from spt.plugins.send import Send


class Ring(PayloadType):
    name: ClassVar[str] = "ring"
    version: ClassVar[int] = 1
    summary: ClassVar[str] = "a message whose sender waits for the reply"

    @classmethod
    def decode(cls, data: Any) -> Any:
        return Send.decode(data)

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
    registry.add(Ring)
