import tomllib
from pathlib import Path

import pytest

from spt.hooks import PayloadType, hookimpl
from spt.manager import BUILTIN_PLUGINS, ESSENTIAL_PLUGINS, build_plugin_manager

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_table_matches_the_entry_points():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = meta["project"]["entry-points"]["spt.plugins"]
    assert dict(BUILTIN_PLUGINS) == declared


def test_builtins_all_load_and_provide_something(spt_pm):
    records = {r.name: r for r in spt_pm.records}
    assert set(records) == {name for name, _ in BUILTIN_PLUGINS}
    for record in records.values():
        assert record.status == "ok", record
        assert record.provides, record
    assert "send" in spt_pm.registries.payload_types
    assert spt_pm.registries.payload_types.frozen


def test_blocked_plugin_is_not_loaded_and_is_listed_blocked():
    system = build_plugin_manager(autoload=False, blocked=["ring"])
    assert system.record("ring").status == "blocked"
    assert "ring" not in system.registries.payload_types


def test_essential_plugin_cannot_be_blocked():
    system = build_plugin_manager(autoload=False, blocked=list(ESSENTIAL_PLUGINS))
    assert system.record("quic").status == "ok"
    assert "quic" in system.registries.connectors


class _Dup(PayloadType):
    name = "send"

    @classmethod
    async def handle(cls, ctx, payload):
        return {}


class DuplicatePayload:
    @hookimpl
    def spt_register_payload_types(self, registry):
        registry.add(_Dup)


class MisspelledHook:
    @hookimpl
    def spt_register_payload_typo(self, registry):
        pass


class RaisingPlugin:
    @hookimpl
    def spt_register_connectors(self, registry):
        raise RuntimeError("boom at registration")


@pytest.mark.parametrize(
    ("plugin", "reason_part"),
    [
        (DuplicatePayload(), "DuplicateNameError"),
        (MisspelledHook(), "spt_register_payload_typo"),
        (RaisingPlugin(), "boom at registration"),
    ],
)
def test_a_broken_plugin_is_recorded_failed_and_the_rest_still_work(register_plugin, plugin, reason_part):
    system = register_plugin(("broken", plugin))
    record = system.record("broken")
    assert record.status == "failed"
    assert reason_part in record.reason + record.detail
    # the built-ins are untouched: the original `send` still owns its name
    assert system.registries.payload_types.owner("send") == "send"
    assert all(r.status == "ok" for r in system.records if r.name != "broken")
