"""The `rc` plugin: remote attach to hosted endpoints (SPEC.md §8.6), `spt rc ADDRESS`.

Built only on what every plugin gets (`spt.hooks`): a control operation for the CLI, a stream
type of its own on member connections (`rc.attach`), and the runtime's access to a hosted
endpoint's PTY (`NodeRuntime.attach_hosted`). Cheap to import: the service loads when a daemon
starts, the client when `spt rc` runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spt.hooks import CommandRef, NodeRuntime, Registry, hookimpl

if TYPE_CHECKING:
    from spt.plugins.rc.service import RcService

_service: RcService | None = None


@hookimpl
def spt_register_commands(registry: Registry[CommandRef]) -> None:
    registry.add(CommandRef("rc", "spt.plugins.rc.cli:rc", "Watch and drive a hosted endpoint's terminal."))


@hookimpl
def spt_runtime_started(runtime: NodeRuntime) -> None:
    global _service
    from spt.plugins.rc.service import RcService

    _service = RcService(runtime)
    _service.register()
