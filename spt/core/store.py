"""Durable node state: the 0600 key file and the SQLite store (WAL, versioned migrations).

Synchronous calls only; the daemon runs them on its loop (they are short) and never from two
threads at once. The one exception is `GroupCommit`, the writer of spooled messages: its own
thread with its own connection (SQLite serialises the two writers; WAL lets readers go on).
Every change that must survive `kill -9` is committed before it is announced.
Schema changes are appended to `MIGRATIONS`, never edited: `PRAGMA user_version` records how
many have run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from spt.core import trace
from spt.core.errors import IdentityError
from spt.core.identity import NodeKey

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: node metadata
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: subnets, their membership logs, join failure records, pending key changes, peer addresses
    """
    CREATE TABLE subnets (
        id BLOB PRIMARY KEY,
        name TEXT NOT NULL,
        canonical TEXT NOT NULL UNIQUE,
        attached INTEGER NOT NULL DEFAULT 1,
        seed BLOB,
        seed_epoch INTEGER,
        joined_at REAL NOT NULL
    );
    CREATE TABLE log_entries (
        subnet BLOB NOT NULL REFERENCES subnets(id) ON DELETE CASCADE,
        hash BLOB NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (subnet, hash)
    );
    CREATE TABLE join_records (
        id BLOB PRIMARY KEY,
        subnet BLOB NOT NULL REFERENCES subnets(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        time REAL NOT NULL,
        data BLOB NOT NULL
    );
    CREATE TABLE key_changes (
        subnet BLOB NOT NULL REFERENCES subnets(id) ON DELETE CASCADE,
        old BLOB NOT NULL,
        new BLOB NOT NULL,
        since REAL NOT NULL,
        old_signed INTEGER NOT NULL,
        PRIMARY KEY (subnet, old)
    );
    CREATE TABLE peer_addrs (
        node BLOB NOT NULL,
        host TEXT NOT NULL,
        port INTEGER NOT NULL,
        source TEXT NOT NULL,
        seen REAL NOT NULL,
        PRIMARY KEY (node, host, port)
    );
    CREATE TABLE notifications (
        id TEXT PRIMARY KEY,
        subnet BLOB,
        kind TEXT NOT NULL,
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        origin TEXT NOT NULL,
        time REAL NOT NULL,
        acked INTEGER NOT NULL DEFAULT 0
    );
    """,
    # 3: perches, their per-subnet visibility and scope, spools, seen ids, ring records, outgoing
    """
    CREATE TABLE perches (
        id TEXT NOT NULL PRIMARY KEY COLLATE NOCASE,
        home BLOB REFERENCES subnets(id) ON DELETE SET NULL,
        state TEXT NOT NULL,
        busy INTEGER NOT NULL DEFAULT 0,
        hosted INTEGER NOT NULL DEFAULT 0,
        description TEXT NOT NULL DEFAULT '',
        transient INTEGER NOT NULL DEFAULT 0,
        expires REAL,
        forked_from TEXT,
        created REAL NOT NULL
    );
    CREATE TABLE perch_subnets (
        perch TEXT NOT NULL COLLATE NOCASE REFERENCES perches(id) ON DELETE CASCADE,
        subnet BLOB NOT NULL REFERENCES subnets(id) ON DELETE CASCADE,
        visible INTEGER NOT NULL,
        in_scope INTEGER NOT NULL,
        PRIMARY KEY (perch, subnet)
    );
    CREATE TABLE spool (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        perch TEXT NOT NULL COLLATE NOCASE REFERENCES perches(id) ON DELETE CASCADE,
        msg_id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        sender TEXT NOT NULL,
        sender_node BLOB NOT NULL,
        sender_id TEXT NOT NULL,
        attrs TEXT NOT NULL,
        body TEXT NOT NULL,
        win TEXT NOT NULL,
        reply_to TEXT,
        size INTEGER NOT NULL,
        arrived REAL NOT NULL,
        mac BLOB NOT NULL,
        quarantined INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX spool_by_perch ON spool(perch, seq);
    CREATE TABLE seen_messages (
        msg_id TEXT PRIMARY KEY,
        perch TEXT NOT NULL,
        delivered INTEGER NOT NULL DEFAULT 0,
        time REAL NOT NULL
    );
    CREATE TABLE rings_in (
        ring_id TEXT PRIMARY KEY,
        recipient TEXT NOT NULL COLLATE NOCASE REFERENCES perches(id) ON DELETE CASCADE,
        sender_node BLOB NOT NULL,
        sender_id TEXT NOT NULL COLLATE NOCASE,
        received INTEGER NOT NULL DEFAULT 0,
        answered INTEGER NOT NULL DEFAULT 0,
        time REAL NOT NULL
    );
    CREATE TABLE outgoing (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        msg_id TEXT NOT NULL UNIQUE,
        node BLOB NOT NULL,
        subnet BLOB NOT NULL REFERENCES subnets(id) ON DELETE CASCADE,
        payload TEXT NOT NULL,
        created REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_try REAL NOT NULL DEFAULT 0
    );
    """,
    # 4: hosted endpoints: the remembered command and the pids of the current run (SPEC.md §2.3, §4.6)
    """
    CREATE TABLE hosted (
        perch TEXT NOT NULL PRIMARY KEY COLLATE NOCASE REFERENCES perches(id) ON DELETE CASCADE,
        argv TEXT NOT NULL,
        env TEXT NOT NULL,
        cwd TEXT NOT NULL,
        remote_attach INTEGER NOT NULL DEFAULT 1,
        pid INTEGER,
        host_pid INTEGER,
        exit INTEGER,
        started REAL NOT NULL
    );
    """,
    # 5: system mode (SPEC.md §5.7): the uid that made a perch; NULL for the daemon's own account
    """
    ALTER TABLE perches ADD COLUMN owner INTEGER;
    """,
    # 6: replicated records (spt.core.replication) and the folder a perch last bound from (minds)
    """
    CREATE TABLE replicated (
        kind TEXT NOT NULL,
        id TEXT NOT NULL,
        part TEXT NOT NULL,
        author TEXT NOT NULL,
        hlc TEXT NOT NULL,
        raw BLOB NOT NULL,
        received REAL NOT NULL,
        PRIMARY KEY (kind, id)
    );
    CREATE INDEX replicated_by_part ON replicated(kind, part, id);
    CREATE INDEX replicated_by_hlc ON replicated(kind, hlc, id);
    ALTER TABLE perches ADD COLUMN workdir TEXT;
    """,
    # 7: issue 10: every key-change claim is kept (a claim never replaces another), with its source
    """
    CREATE TABLE key_changes_new (
        subnet BLOB NOT NULL REFERENCES subnets(id) ON DELETE CASCADE,
        old BLOB NOT NULL,
        new BLOB NOT NULL,
        since REAL NOT NULL,
        old_signed INTEGER NOT NULL,
        source TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (subnet, old, new)
    );
    INSERT INTO key_changes_new(subnet, old, new, since, old_signed)
        SELECT subnet, old, new, since, old_signed FROM key_changes;
    DROP TABLE key_changes;
    ALTER TABLE key_changes_new RENAME TO key_changes;
    """,
    # 8: issue 14: the bytes each perch's spool holds, kept by triggers (a SUM over the spool on
    # every arrival grew with the backlog)
    """
    CREATE TABLE spool_held (
        perch TEXT NOT NULL PRIMARY KEY COLLATE NOCASE REFERENCES perches(id) ON DELETE CASCADE,
        bytes INTEGER NOT NULL
    );
    INSERT INTO spool_held(perch, bytes) SELECT perch, SUM(size) FROM spool GROUP BY perch;
    CREATE TRIGGER spool_held_in AFTER INSERT ON spool BEGIN
        INSERT INTO spool_held(perch, bytes) VALUES(NEW.perch, NEW.size)
            ON CONFLICT(perch) DO UPDATE SET bytes=bytes+excluded.bytes;
    END;
    CREATE TRIGGER spool_held_out AFTER DELETE ON spool BEGIN
        UPDATE spool_held SET bytes=bytes-OLD.size WHERE perch=OLD.perch;
    END;
    """,
    # 9: issue 14: a reply looks up the ring it answers among the unanswered ones (it scanned
    # every ring of the last 30 days, per send)
    """
    CREATE INDEX rings_unanswered ON rings_in(recipient, sender_node, sender_id, time) WHERE answered=0;
    """,
    # 10: the newest presence of each member that settled a deletion of its registry rows, which
    # refuses replays of the deleted rows after a restart (spt.core.proto.registry, rule 6)
    """
    CREATE TABLE registry_presence (
        subnet BLOB NOT NULL REFERENCES subnets(id) ON DELETE CASCADE,
        node BLOB NOT NULL,
        version INTEGER NOT NULL,
        raw TEXT NOT NULL,
        PRIMARY KEY (subnet, node)
    );
    """,
    # 11: issue 14: no UNIQUE index on spool.msg_id. A message id is random, so each spooled
    # message dirtied a page of that index of its own: half the WAL bytes a group commit wrote
    # and fsynced (~12 KB per message with a large spool). Nothing looks a held message up by
    # id, and a copy never reaches the spool: seen_messages (msg_id its primary key, inserted in
    # the same savepoint as the row) refuses it. SQLite drops a constraint only with its table,
    # so the table is rebuilt, keeping each row's seq and the AUTOINCREMENT counter.
    """
    CREATE TABLE spool_new (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        perch TEXT NOT NULL COLLATE NOCASE REFERENCES perches(id) ON DELETE CASCADE,
        msg_id TEXT NOT NULL,
        type TEXT NOT NULL,
        sender TEXT NOT NULL,
        sender_node BLOB NOT NULL,
        sender_id TEXT NOT NULL,
        attrs TEXT NOT NULL,
        body TEXT NOT NULL,
        win TEXT NOT NULL,
        reply_to TEXT,
        size INTEGER NOT NULL,
        arrived REAL NOT NULL,
        mac BLOB NOT NULL,
        quarantined INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO spool_new SELECT * FROM spool;
    DELETE FROM sqlite_sequence WHERE name='spool_new';
    INSERT INTO sqlite_sequence(name, seq) SELECT 'spool_new', seq FROM sqlite_sequence WHERE name='spool';
    DROP TABLE spool;
    ALTER TABLE spool_new RENAME TO spool;
    CREATE INDEX spool_by_perch ON spool(perch, seq);
    CREATE TRIGGER spool_held_in AFTER INSERT ON spool BEGIN
        INSERT INTO spool_held(perch, bytes) VALUES(NEW.perch, NEW.size)
            ON CONFLICT(perch) DO UPDATE SET bytes=bytes+excluded.bytes;
    END;
    CREATE TRIGGER spool_held_out AFTER DELETE ON spool BEGIN
        UPDATE spool_held SET bytes=bytes-OLD.size WHERE perch=OLD.perch;
    END;
    """,
)


T = TypeVar("T")
GROUP_COMMIT_MAX: Final = 256  # writes committed together at most (the rest wait for the next commit)


def load_or_create_key(path: Path) -> tuple[NodeKey, bool]:
    """The node key from its 0600 file, made on first start; returns (key, created)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        key = NodeKey.generate()
        tmp = path.with_name(path.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key.private_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return key, True
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise IdentityError(str(path), f"key file is readable by others (mode {mode:o}); run chmod 600 on it")
    return NodeKey.from_private_bytes(raw), False


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration script (a trigger's body holds `;` of its own)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a committed message survives power loss
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA busy_timeout=5000")
    return db


class Store:
    """One SQLite database per node."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = _connect(path)
        os.chmod(path, 0o600)
        self._migrate()

    def group_commit(self) -> GroupCommit:
        """A group-commit writer on this store's database (its own thread and connection)."""
        return GroupCommit(self.path)

    def _migrate(self) -> None:
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise IdentityError(
                str(self.path), f"store schema {version} is newer than this spt knows ({len(MIGRATIONS)})"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction():
                for statement in _statements(script):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={number}")

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return list(self.db.execute(sql, params).fetchall())

    def close(self) -> None:
        self.db.close()


class GroupCommit:
    """One writer for the hot durable writes (spooled messages): group commit.

    Writes queued while the writer commits go together into its next transaction, so one fsync
    covers all of them, and each caller resumes only after the transaction holding its write
    committed (nothing is answered before it is on disk, so exactly-once is unchanged). The
    writer is one thread with its own connection to the same database: the fsync happens off
    the event loop, which keeps taking messages meanwhile; a lone write waits for nothing.

    A write is a synchronous function of the writer's connection, called inside its open
    transaction on the writer thread (it must touch nothing but that connection and immutable
    values); each runs in its own savepoint, so one that raises (e.g. SPOOL_FULL) is undone
    alone and its caller gets the exception. A batch holds at most `max_batch` writes.
    """

    def __init__(self, path: Path, *, max_batch: int = GROUP_COMMIT_MAX) -> None:
        self.max_batch = max_batch
        self._db = _connect(path)
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spt-commit")
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._lock = threading.Lock()  # the queue and `_busy`, shared with the writer thread
        self._busy = False  # the writer thread holds a batch (it takes the next itself)
        self._starting = False
        self._closed = False
        self.commits = 0  # transactions run, and the writes they carried (benches and tests read them)
        self.writes = 0

    async def run(self, write: Callable[[sqlite3.Connection], T]) -> T:
        """Run `write` in the writer's next transaction; its result once that transaction committed."""
        return await self.submit(write)

    async def run_each(self, writes: Sequence[Callable[[sqlite3.Connection], T]]) -> list[T | Exception]:
        """`run` for several writes at once (a batch of messages): each in its own savepoint,
        in order, all in one transaction; per write its result or its exception, once committed.
        One future for all of them, and no savepoint around theirs: nested in another one, each
        write's pages went to a sub-journal that outgrew memory into a temporary file."""
        return await self.submit(_Each(writes))

    def submit(self, write: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """`run` for a caller that does not wait: `write` is queued now, behind every write
        submitted before it (so a later write sees its effect), and the future completes once
        its transaction committed."""
        if self._closed:
            raise sqlite3.ProgrammingError("the store's writer is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._queue.append((write, future))
            start = not self._busy and not self._starting
            self._starting = self._starting or start
        if start:
            # at the loop's next turn: writes submitted together (a batch of messages from one
            # request) then share the first transaction too, not only those behind it
            future.get_loop().call_soon(self._start)
        return future

    def _take(self) -> list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]:
        """The next batch from the queue (with the lock held); callers gone are skipped (a
        future's state read from the writer thread: at worst a write whose caller just left
        runs, as it would had the caller left during the commit)."""
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        return [(write, future) for write, future in batch if not future.done()]

    def _start(self) -> None:
        with self._lock:
            self._starting = False
            if self._busy or self._closed:
                return
            batch = self._take()
            if not batch:
                return
            self._busy = True
        self._thread.submit(self._run, batch, asyncio.get_running_loop())

    def _run(
        self, batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """On the writer thread: commit batches while writes wait. The next batch begins as soon
        as one committed, without a turn of the event loop in between (under load that turn
        took as long as the commit's own writing); the loop only hears the outcomes."""
        while batch:
            try:
                outcomes: list[tuple[bool, Any]] = self._commit([w for w, _ in batch])
            except BaseException as exc:  # the commit failed: every write of the batch with it
                outcomes = [(False, exc)] * len(batch)
            loop.call_soon_threadsafe(self._finished, batch, outcomes)
            with self._lock:
                batch = [] if self._closed else self._take()
                self._busy = bool(batch)

    def _finished(
        self, batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]],
        outcomes: list[tuple[bool, Any]],
    ) -> None:
        trace.mark("commit resumed")
        self.commits += 1
        self.writes += len(batch)
        for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

    def _commit(self, writes: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        """On the writer thread: one transaction for the batch (raises when it did not commit)."""
        db = self._db
        outcomes: list[tuple[bool, Any]] = []
        trace.mark("commit begin", len(writes))
        db.execute("BEGIN IMMEDIATE")
        try:
            for write in writes:
                if isinstance(write, _Each):  # its writes have savepoints of their own
                    outcomes.append((True, write(db)))
                else:
                    outcomes.append(_in_savepoint(db, write))
            trace.mark("commit fsync")
            db.execute("COMMIT")
            trace.mark("commit done")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT (I/O error) can leave it open: the next batch must begin anew
                db.execute("ROLLBACK")
            raise
        return outcomes

    async def close(self) -> None:
        """Let the batch in flight commit, refuse the queued ones, and close the connection."""
        with self._lock:
            self._closed = True
            queued, self._queue = self._queue, []
        for _, future in queued:
            if not future.done():
                future.set_exception(sqlite3.ProgrammingError("the store's writer is closed"))
        await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
        self._thread.shutdown(wait=False)


class _Each:
    """Writes queued as one (`GroupCommit.run_each`), each run in its own savepoint."""

    __slots__ = ("writes",)

    def __init__(self, writes: Sequence[Callable[[sqlite3.Connection], Any]]) -> None:
        self.writes = writes

    def __call__(self, db: sqlite3.Connection) -> list[Any]:
        return [value for _, value in (_in_savepoint(db, w) for w in self.writes)]


def _in_savepoint(db: sqlite3.Connection, write: Callable[[sqlite3.Connection], Any]) -> tuple[bool, Any]:
    """`write(db)` in a savepoint of its own: (True, its result), or (False, its exception) with
    the write undone."""
    db.execute("SAVEPOINT group_write")
    try:
        return True, write(db)
    except Exception as exc:
        db.execute("ROLLBACK TO group_write")
        return False, exc
    finally:
        db.execute("RELEASE group_write")
