"""Registers the self-updater."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from spt import __version__
from spt.hooks import Registry, Updater, hookimpl


class SelfUpdater(Updater):
    name: ClassVar[str] = "selfupdate"

    def status(self) -> Mapping[str, Any]:
        return {"current": __version__, "staged": None, "policy": "consent", "source": None}


@hookimpl
def spt_register_updaters(registry: Registry[Updater]) -> None:
    registry.add(SelfUpdater())
