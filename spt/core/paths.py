"""Where a node keeps its state: the files of the state folder (SPEC.md §2.1).

Imported by every CLI command, so it stays on the standard library's cheapest modules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from spt.core.errors import ConfigError

SOCKET_PATH_MAX: Final = 107  # sun_path holds 108 bytes including the NUL


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
        """`SPT_HOME` when set, else the platform's per-user data folder: under `sudo`, the
        invoking user's (SPEC.md §5.7: an elevated command acts on the user's node, not root's)."""
        env = os.environ if env is None else env
        home = env.get("SPT_HOME")
        if home:
            return cls(Path(home).expanduser().absolute())
        import platformdirs

        default = Path(platformdirs.user_data_dir("spt", appauthor=False))
        sudo_user = env.get("SUDO_USER")
        if sudo_user and sudo_user != "root" and hasattr(os, "geteuid") and os.geteuid() == 0:
            import pwd

            try:
                user_home = Path(pwd.getpwnam(sudo_user).pw_dir)
            except KeyError:
                return cls(default)
            try:
                return cls(user_home / default.relative_to(Path.home()))
            except ValueError:
                return cls(user_home / ".local" / "share" / "spt")
        return cls(default)

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
