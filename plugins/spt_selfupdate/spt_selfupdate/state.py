"""The plugin's durable state: `<state dir>/selfupdate/update.db` (SQLite) and the release folders.

Keys of the `kv` table (JSON values):
- `highest_applied`: the highest version ever applied here (anti-rollback floor);
- `trust`: `{"primary", "revoked"}` after a recovery-signed rotation (absent: the embedded set);
- `policy`: "consent" or "auto";
- `staged`: `{"version", "signed_by", "source"}` of the staged release;
- `trial`: the apply in progress (`{"version", "previous", "previous_python", "plugins", "pid"}`);
- `last_apply`: `{"version", "previous", "outcome", "reason", "time", "reported"}`.

Folders under `<state dir>/selfupdate/`: `staged/<v>/` (verified release files), `incoming/<v>/`
(partial downloads, kept for resume; a member's only from the member named in `.partial-from`),
`served/<v>/` (the release this node applied, still offered to peers). The watchdog (another
process, the previous version's code) writes here too, so each call opens its own short transaction.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from spt.core.errors import DaemonDown
from spt_selfupdate.trust import TrustedKeys, embedded_keys


class UpdateState:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "selfupdate"
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.staged_dir = self.root / "staged"
        self.incoming_dir = self.root / "incoming"
        self.served_dir = self.root / "served"
        for d in (self.staged_dir, self.incoming_dir, self.served_dir):
            d.mkdir(exist_ok=True)
        self.closed = False
        self.db = sqlite3.connect(self.root / "update.db", timeout=10, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv(key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def close(self) -> None:
        self.closed = True
        self.db.close()

    def get(self, key: str) -> Any:
        if self.closed:  # the node is stopping (a restart into a new version, say)
            raise DaemonDown("", "the daemon is stopping")
        row = self.db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set(self, key: str, value: Any) -> None:
        if self.closed:
            raise DaemonDown("", "the daemon is stopping")
        if value is None:
            self.db.execute("DELETE FROM kv WHERE key=?", (key,))
        else:
            self.db.execute(
                "INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, json.dumps(value)),
            )

    # -- trust ------------------------------------------------------------------------------

    def trusted_keys(self) -> TrustedKeys:
        base = embedded_keys()
        rotated = self.get("trust")
        if not rotated:
            return base
        return TrustedKeys(str(rotated["primary"]), base.recovery, frozenset(rotated["revoked"]))

    def accept_rotation(self, keys: TrustedKeys, new_primary: str, version: str, manifest: bytes, sig: bytes) -> None:
        """Trust `new_primary` from now on; the signed rotation is kept to pass on to members."""
        after = keys.rotated(new_primary)
        self.set("trust", {
            "primary": after.primary, "revoked": sorted(after.revoked),
            "rotation": {"version": version, "manifest": manifest.hex(), "sig": sig.hex()},
        })

    def rotation(self) -> tuple[str, bytes, bytes] | None:
        """(version, manifest, signature) of the last rotation accepted here, if any."""
        rotated = self.get("trust")
        if not rotated or not rotated.get("rotation"):
            return None
        r = rotated["rotation"]
        return str(r["version"]), bytes.fromhex(r["manifest"]), bytes.fromhex(r["sig"])

    # -- release folders -------------------------------------------------------------------

    def staged_path(self) -> Path | None:
        staged = self.get("staged")
        if not staged:
            return None
        path = self.staged_dir / str(staged["version"])
        return path if path.is_dir() else None

    def servable(self) -> tuple[str, Path] | None:
        """The release this node can pass on: the staged one, else the one it applied."""
        staged = self.get("staged")
        if staged and (self.staged_dir / staged["version"]).is_dir():
            return str(staged["version"]), self.staged_dir / staged["version"]
        for path in sorted(self.served_dir.iterdir(), reverse=True):
            if (path / "manifest.json").exists():
                return path.name, path
        return None

    def stage(self, version: str, source_dir: Path, info: dict[str, Any]) -> None:
        """Move verified files into `staged/<v>` (one rename), replacing an older staged release."""
        target = self.staged_dir / version
        if target.exists():
            shutil.rmtree(target)
        source_dir.rename(target)
        old = self.get("staged")
        self.set("staged", {"version": version, **info})
        if old and old["version"] != version:
            shutil.rmtree(self.staged_dir / str(old["version"]), ignore_errors=True)

    def unstage_to_served(self, version: str) -> None:
        """After a successful apply, the release stays available to peers under `served/`."""
        src = self.staged_dir / version
        if src.is_dir():
            for old in self.served_dir.iterdir():
                shutil.rmtree(old, ignore_errors=True)
            src.rename(self.served_dir / version)
        staged = self.get("staged")
        if staged and staged["version"] == version:
            self.set("staged", None)
