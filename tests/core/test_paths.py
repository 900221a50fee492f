"""The state folder: `spt.core.paths` writes the XDG rule out instead of importing platformdirs
(which costs more start-up time than a whole `spt send`); it must name the same folder."""

import sys

import platformdirs
import pytest

from spt.core.paths import StatePaths, state_root, user_data_dir


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the XDG rule is written out for Linux only")
@pytest.mark.parametrize("xdg", [None, "", "/srv/data", "relative/data", "~/data", "/srv/data/"])
def test_the_per_user_data_folder_is_platformdirs_one(monkeypatch, tmp_path, xdg):
    monkeypatch.setenv("HOME", str(tmp_path))
    if xdg is None:
        monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_DATA_HOME", xdg)
    assert user_data_dir() == platformdirs.user_data_dir("spt", appauthor=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the XDG rule is written out for Linux only")
@pytest.mark.parametrize("xdg", ["relative/data", "~/data", "./data"])
def test_a_relative_xdg_data_home_is_ignored(monkeypatch, tmp_path, xdg):
    """The XDG spec: a relative XDG_DATA_HOME is invalid and ignored (`~` is not expanded, so
    `~/data` is relative too); the default `~/.local/share` is used, silently."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", xdg)
    assert user_data_dir() == str(tmp_path / ".local" / "share" / "spt")
    assert state_root({"XDG_DATA_HOME": xdg, "HOME": str(tmp_path)}) == str(tmp_path / ".local" / "share" / "spt")


def test_spt_home_wins_and_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert state_root({"SPT_HOME": "node"}) == str(tmp_path / "node")
    assert state_root({"SPT_HOME": "/x/y", "XDG_DATA_HOME": "/srv"}) == "/x/y"
    assert StatePaths.resolve({"SPT_HOME": "node"}).socket == tmp_path / "node" / "spt.sock"
    if sys.platform.startswith("linux"):
        assert state_root({"XDG_DATA_HOME": "/srv"}) == "/srv/spt"
