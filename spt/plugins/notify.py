"""The `notify` payload type: notification records replicated subnet-wide (SPEC.md §8.4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from spt.core.errors import RemoteProtocolError
from spt.hooks import IncomingPayload, PayloadContext, PayloadType, Registry, hookimpl


class Notify(PayloadType):
    name: ClassVar[str] = "notify"
    version: ClassVar[int] = 1
    summary: ClassVar[str] = "a user-facing notification record"

    @classmethod
    def decode(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise RemoteProtocolError("notify", "a notify payload is a map with a string 'id'")
        return data

    @classmethod
    async def handle(cls, ctx: PayloadContext, payload: IncomingPayload) -> Mapping[str, Any]:
        return {"token": "STORED"}


@hookimpl
def spt_register_payload_types(registry: Registry[type[PayloadType]]) -> None:
    registry.add(Notify)
