import pytest

from spt.core.errors import DuplicateNameError, FrozenRegistryError, PluginError
from spt.hooks import Registry


class Thing:
    def __init__(self, name):
        self.name = name


def test_duplicate_name_is_rejected_and_names_both_owners():
    reg = Registry("thing")
    reg.current_owner = "alpha"
    reg.add(Thing("x"))
    reg.current_owner = "beta"
    with pytest.raises(DuplicateNameError) as info:
        reg.add(Thing("x"))
    assert "alpha" in info.value.message and "beta" in info.value.message
    assert reg.owner("x") == "alpha"


def test_frozen_registry_refuses_additions():
    reg = Registry("thing")
    reg.freeze()
    with pytest.raises(FrozenRegistryError):
        reg.add(Thing("late"))


def test_empty_name_is_refused():
    with pytest.raises(PluginError):
        Registry("thing").add(Thing(""))
