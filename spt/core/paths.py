"""Where a node keeps its state: the files of the state folder (SPEC.md §2.1).

Imported by every CLI command, so it imports only `os` and `sys`: `pathlib` loads when a
`StatePaths` is made, and `state_root` (all a control call needs) does without it. `typing` and
`platformdirs` cost more start-up time than a whole `spt send` spends on its work.
"""

from __future__ import annotations

import os
import sys

from spt.core.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from typing import Final

SOCKET_PATH_MAX: Final = 107  # sun_path holds 108 bytes including the NUL


def user_data_dir(env: Mapping[str, str] | None = None) -> str:
    """The platform's per-user data folder for spt (SPEC.md §2.1).

    On Linux that is the XDG rule, written out here because importing platformdirs costs more
    than all of `spt send` (a test checks both agree); elsewhere platformdirs decides.
    """
    env = os.environ if env is None else env
    if sys.platform.startswith("linux"):
        base = env.get("XDG_DATA_HOME", "")
        if not os.path.isabs(base):  # the XDG spec: a relative value is invalid and ignored
            base = os.path.expanduser("~/.local/share")
        return os.path.join(base, "spt")
    import platformdirs

    return platformdirs.user_data_dir("spt", appauthor=False)


def state_root(env: Mapping[str, str] | None = None) -> str:
    """The state folder: `SPT_HOME` when set, else the per-user data folder; under `sudo`, the
    invoking user's (SPEC.md §5.7: an elevated command acts on the user's node, not root's)."""
    env = os.environ if env is None else env
    home = env.get("SPT_HOME")
    if home:
        home = os.path.expanduser(home)
        return home if os.path.isabs(home) else os.path.join(os.getcwd(), home)
    default = user_data_dir(env)
    sudo_user = env.get("SUDO_USER")
    if sudo_user and sudo_user != "root" and hasattr(os, "geteuid") and os.geteuid() == 0:
        import pwd

        try:
            user_home = pwd.getpwnam(sudo_user).pw_dir
        except KeyError:
            return default
        own_home = os.path.expanduser("~")
        if os.path.commonpath([default, own_home]) == own_home:
            return os.path.join(user_home, os.path.relpath(default, own_home))
        return os.path.join(user_home, ".local", "share", "spt")
    return default


class StatePaths:
    """The files of one node's state folder."""

    __slots__ = ("root",)

    def __init__(self, root: Path) -> None:
        self.root = root

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StatePaths) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def __repr__(self) -> str:
        return f"StatePaths({str(self.root)!r})"

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None) -> StatePaths:
        """The state folder `state_root` names."""
        from pathlib import Path

        return cls(Path(state_root(env)))

    @property
    def key_file(self) -> Path:
        return self.root / "node.key"

    @property
    def db_file(self) -> Path:
        return self.root / "spt.db"

    @property
    def socket(self) -> Path:
        return self.root / "spt.sock"

    @property
    def log_file(self) -> Path:
        return self.root / "daemon.log"

    @property
    def lock_file(self) -> Path:
        return self.root / "daemon.lock"

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def endpoints(self) -> Path:
        return self.root / "endpoints"

    def ensure(self) -> None:
        """Create the folder, private to its owner (it holds the key and the store)."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if len(os.fsencode(self.socket)) > SOCKET_PATH_MAX:
            raise ConfigError(
                str(self.root),
                f"the state folder path is too long for a control socket ({SOCKET_PATH_MAX} bytes); "
                "choose a shorter SPT_HOME",
            )
