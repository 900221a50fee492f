"""The two mind-sync tiers (SPEC.md §8.3): live (pushed eagerly) and project (anti-entropy)."""

from __future__ import annotations

from typing import ClassVar

from spt.hooks import Registry, SyncTier, hookimpl


class LiveTier(SyncTier):
    name: ClassVar[str] = "live"
    eager: ClassVar[bool] = True


class ProjectTier(SyncTier):
    name: ClassVar[str] = "project"
    eager: ClassVar[bool] = False


@hookimpl
def spt_register_sync_tiers(registry: Registry[SyncTier]) -> None:
    registry.add(LiveTier())
    registry.add(ProjectTier())
