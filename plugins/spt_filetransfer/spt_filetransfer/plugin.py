"""Registers the `file` payload type."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from spt.hooks import IncomingPayload, PayloadContext, PayloadType, Registry, hookimpl


class FileOffer(PayloadType):
    name: ClassVar[str] = "file"
    version: ClassVar[int] = 1
    summary: ClassVar[str] = "files and folders for an endpoint's inbox"

    @classmethod
    async def handle(cls, ctx: PayloadContext, payload: IncomingPayload) -> Mapping[str, Any]:
        return {"token": "FILE_REFUSED", "reason": "this node does not accept transfers yet"}


@hookimpl
def spt_register_payload_types(registry: Registry[type[PayloadType]]) -> None:
    registry.add(FileOffer)
