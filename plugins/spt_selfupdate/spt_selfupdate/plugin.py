"""The `selfupdate` plugin: `spt update …` and the updater service, registered through spt's hooks.

Cheap to import (the CLI loads it to find the `update` command): the service, its crypto and
the network code are imported only when a daemon starts. Registration checks the trusted key
set, so a broken set shows in `spt plugins list` as a failed plugin instead of trusting less.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from spt import __version__
from spt.hooks import CommandRef, NodeRuntime, Registry, Updater, hookimpl

if TYPE_CHECKING:
    from spt_selfupdate.service import UpdateService

_service: UpdateService | None = None


class SelfUpdater(Updater):
    """The updater as other code sees it; `status()` reads the running service when there is one."""

    name: ClassVar[str] = "selfupdate"

    def status(self) -> Mapping[str, Any]:
        if _service is None:
            return {"current": __version__, "staged": None, "policy": "consent", "source": None}
        staged = _service.state.get("staged")
        return {
            "current": __version__,
            "staged": staged["version"] if staged else None,
            "policy": _service.state.get("policy") or "consent",
            "source": _service.source,
        }


@hookimpl
def spt_register_updaters(registry: Registry[Updater]) -> None:
    from spt_selfupdate.trust import embedded_keys

    embedded_keys()  # raises on a bad key set: the plugin is then listed as failed, with the reason
    registry.add(SelfUpdater())


@hookimpl
def spt_register_commands(registry: Registry[CommandRef]) -> None:
    registry.add(CommandRef("update", "spt_selfupdate.cli:update", "Fetch, verify, stage and apply signed releases."))


@hookimpl
def spt_runtime_started(runtime: NodeRuntime) -> None:
    global _service
    from spt_selfupdate.service import UpdateService

    _service = UpdateService(runtime)
    _service.register()


@hookimpl
def spt_node_stopping() -> None:
    global _service
    if _service is not None:
        _service.stop()
        _service = None
