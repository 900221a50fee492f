"""The `file` plugin: `spt file …` and the transfer service, registered through spt's hooks.

Cheap to import (the CLI loads it to find the `file` command): the service, its crypto and
hashing are imported only when a daemon starts (`spt_runtime_started`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from spt.hooks import (
    CommandRef,
    IncomingPayload,
    NodeRuntime,
    PayloadContext,
    PayloadType,
    Registry,
    hookimpl,
)

if TYPE_CHECKING:
    from spt_filetransfer.service import FileService

_service: FileService | None = None


class FileOffer(PayloadType):
    """The `file` payload type. Offers and data use the plugin's own member requests
    (`file.offer`, `file.open`, `file.chunk`, `file.need`, `file.cancel`); a bare payload of this
    type is answered with a refusal that says so."""

    name: ClassVar[str] = "file"
    version: ClassVar[int] = 1
    summary: ClassVar[str] = "files and folders for an endpoint's inbox"

    @classmethod
    async def handle(cls, ctx: PayloadContext, payload: IncomingPayload) -> Mapping[str, Any]:
        return {"token": "FILE_REFUSED", "reason": "files are offered with the file.offer request"}


@hookimpl
def spt_register_payload_types(registry: Registry[type[PayloadType]]) -> None:
    registry.add(FileOffer)


@hookimpl
def spt_register_commands(registry: Registry[CommandRef]) -> None:
    registry.add(CommandRef("file", "spt_filetransfer.cli:file", "Send files and folders to an endpoint."))


@hookimpl
def spt_runtime_started(runtime: NodeRuntime) -> None:
    global _service
    from spt_filetransfer.service import FileService

    _service = FileService(runtime)
    _service.register()


@hookimpl
def spt_node_stopping() -> None:
    global _service
    if _service is not None:
        _service.stop()
        _service = None
