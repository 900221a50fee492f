"""The plugin's own durable state: `<state dir>/filetransfer/transfers.db` (SQLite, WAL).

One row per transfer in either direction; for incoming transfers, the set of verified chunks and
of finished files. Calls are synchronous and short, and safe from any thread (one connection
behind a lock): data threads record verified chunks here in batches.

What must not live here: deciding anything. The service owns states; this only stores them.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from spt.core.errors import SptError

__all__ = ["ACTIVE_STATES", "FINAL_STATES", "DiskFullError", "TransferDb", "TransferFailedError"]

ACTIVE_STATES: Final = ("queued", "offered", "transferring", "verifying")
FINAL_STATES: Final = ("complete", "refused", "failed", "cancelled")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS transfers(
    id TEXT NOT NULL,
    direction TEXT NOT NULL,          -- 'out' or 'in' (a transfer to a local perch has both)
    peer TEXT NOT NULL,               -- the other node's key, hex
    peer_label TEXT NOT NULL DEFAULT '',
    subnet TEXT,                      -- name of the subnet it travels through
    target TEXT NOT NULL,             -- out: the address as typed; in: the perch id
    perch TEXT,                       -- in: the receiving perch; out: the target endpoint id
    sender TEXT,                      -- the sending endpoint's id (--from), if any
    message TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    total INTEGER NOT NULL,
    files INTEGER NOT NULL,
    manifest BLOB NOT NULL,
    sources TEXT,                     -- out: JSON list of absolute source paths
    state TEXT NOT NULL,
    reason TEXT,
    done INTEGER NOT NULL DEFAULT 0,
    sent INTEGER NOT NULL DEFAULT 0,  -- out: chunk bytes written to any data path, all attempts
    path_kind TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished REAL,
    delivered INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(id, direction)
);
CREATE TABLE IF NOT EXISTS chunks(
    tid TEXT NOT NULL, f INTEGER NOT NULL, c INTEGER NOT NULL, PRIMARY KEY(tid, f, c)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files_done(
    tid TEXT NOT NULL, f INTEGER NOT NULL, PRIMARY KEY(tid, f)
) WITHOUT ROWID;
"""

_COLUMNS: Final = frozenset(
    {
        "id", "direction", "peer", "peer_label", "subnet", "target", "perch", "sender", "message",
        "name", "total", "files", "manifest", "sources", "state", "reason", "done", "sent",
        "path_kind", "created", "updated", "finished", "delivered",
    }
)


class TransferFailedError(SptError):
    """An incoming transfer cannot go on: it ends as failed and its partial data is deleted."""

    token = "FILE_FAILED"


class DiskFullError(TransferFailedError):
    """The receiving file system ran out of space (or failed to write)."""

    token = "DISK_FULL"


class TransferDb:
    """Transfers, verified chunks and finished files; every method commits before returning."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # A commit that a power cut rolls back only forgets verified chunks, which are then
        # fetched again; a record that outlives its data is caught by the whole-file check.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._transaction(lambda db: db.execute(sql, params))

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._transaction(lambda db: db.executemany(sql, rows))

    def _transaction(self, work: Any) -> None:
        """Run `work(connection)` in one transaction; a full disk raises DiskFullError."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    work(self._db)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                if "full" in str(exc):
                    raise DiskFullError("", "the receiving disk is full; the partial files were deleted") from exc
                raise

    # -- transfers ------------------------------------------------------------------------

    def insert(self, row: dict[str, Any]) -> None:
        bad = set(row) - _COLUMNS
        if bad:
            raise KeyError(f"unknown transfer columns: {sorted(bad)}")
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self._write(f"INSERT INTO transfers({names}) VALUES({marks})", list(row.values()))

    def update(self, tid: str, direction: str, **fields: Any) -> None:
        bad = set(fields) - _COLUMNS
        if bad:
            raise KeyError(f"unknown transfer columns: {sorted(bad)}")
        sets = ", ".join(f"{k}=?" for k in fields)
        self._write(f"UPDATE transfers SET {sets} WHERE id=? AND direction=?", [*fields.values(), tid, direction])

    def get(self, tid: str, direction: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM transfers WHERE id=? AND direction=?", (tid, direction)).fetchone()
        return dict(row) if row is not None else None

    def find(self, prefix: str) -> list[dict[str, Any]]:
        """Transfers whose id starts with `prefix` (both rows of a local transfer)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM transfers WHERE id >= ? AND id < ? ORDER BY created, direction DESC",
                (prefix, prefix + "g"),
            ).fetchall()
        return [dict(r) for r in rows]

    def rows(self, *, direction: str | None = None, states: Sequence[str] | None = None,
             finished_since: float | None = None) -> list[dict[str, Any]]:
        """Transfers, oldest first; `finished_since` keeps active ones and those finished after it."""
        sql = "SELECT * FROM transfers WHERE 1=1"
        params: list[Any] = []
        if direction is not None:
            sql += " AND direction=?"
            params.append(direction)
        if states is not None:
            sql += f" AND state IN ({', '.join('?' for _ in states)})"
            params.extend(states)
        if finished_since is not None:
            sql += " AND (finished IS NULL OR finished >= ?)"
            params.append(finished_since)
        sql += " ORDER BY created"
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, params).fetchall()]

    def delete_before(self, when: float) -> None:
        with self._lock:
            old = [r[0] for r in self._db.execute(
                "SELECT id FROM transfers WHERE finished IS NOT NULL AND finished < ?", (when,)
            ).fetchall()]
        for tid in old:
            self.forget_chunks(tid)
            self._write("DELETE FROM transfers WHERE id=? AND finished IS NOT NULL", (tid,))

    # -- verified chunks (incoming) --------------------------------------------------------

    def add_chunks(self, tid: str, pairs: Iterable[tuple[int, int]]) -> None:
        self._many("INSERT OR IGNORE INTO chunks(tid, f, c) VALUES(?,?,?)", ((tid, f, c) for f, c in pairs))

    def remove_chunks(self, tid: str, pairs: Iterable[tuple[int, int]]) -> None:
        self._many("DELETE FROM chunks WHERE tid=? AND f=? AND c=?", ((tid, f, c) for f, c in pairs))

    def chunks(self, tid: str) -> list[tuple[int, int]]:
        with self._lock:
            return [(r[0], r[1]) for r in self._db.execute("SELECT f, c FROM chunks WHERE tid=?", (tid,))]

    def file_done(self, tid: str, index: int) -> None:
        self._write("INSERT OR IGNORE INTO files_done(tid, f) VALUES(?,?)", (tid, index))

    def files_done(self, tid: str) -> set[int]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT f FROM files_done WHERE tid=?", (tid,))}

    def forget_chunks(self, tid: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM chunks WHERE tid=?", (tid,))
            db.execute("DELETE FROM files_done WHERE tid=?", (tid,))

        self._transaction(work)
