"""The file-transfer service of one running node: both the sending and the receiving side.

Made by `spt_runtime_started`; it talks to the node only through the `NodeRuntime` contract.
Beside it: `datapaths.py` (which TCP connection the data takes, both ends), `dataserver.py` (the
receiver's data connections: listener, sessions, frames into the transfer), `simopen.py`.

The exchange (SPEC.md §8.5), all control over the pinned member connection:
1. `file.offer` carries the transfer id, target perch, sender, message and manifest. The receiver
   checks, in order: perch visible in the subnet; size, concurrency, inbox quota and free space;
   path safety. It answers with the verified-chunk bitmaps (empty at first), or a refusal.
   Offers are idempotent, which is how every resume starts.
2. `file.open` opens the data path. The receiver opens (once) a TCP listener on the address its
   QUIC socket is bound to and hands over a fresh per-open key. The sender then tries, in order,
   the receiver's listener, a TCP simultaneous open through both NATs (`file.punch`) and a bulk
   transit through a relay (`file.transit`); the first TCP connection that completes the keyed
   handshake carries the data (`datapaths.py` says how, and what a failed try costs). TCP is
   measured ~20× faster than the QUIC path here (bench/files.py). Without one, or with
   `SPT_FILE_DATA_PATH=quic`, chunks travel as `file.chunk` requests.
3. After each round of chunks, `file.need` returns what is verified; missing or bad chunks are
   sent again, at most `MAX_BAD_ROUNDS` rounds in a row without progress.
4. `file.cancel` tells the other side that a transfer was cancelled.

Sending is durable: a transfer is recorded before FILE_QUEUED is answered, and a driver task
per transfer retries with bounded backoff until it completes, is refused, fails or is
cancelled, across restarts of either daemon.

Test and benchmark knobs (environment of the sending daemon): `SPT_FILE_DATA_PATH` (`auto`,
`tcp`, `punched`, `transit`, `quic`: datapaths.py) and `SPT_FILE_MAX_RATE` (bytes per second, 0
for no cap).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, overload

import blake3
import msgspec

from spt.core.errors import PeerError, Refusal, RemoteProtocolError, SptError, UsageError
from spt.core.identity import NodeId
from spt.core.proto.body import check_body
from spt.core.proto.resolve import LocalTarget, RemoteTarget
from spt.core.types import check_endpoint_id
from spt.hooks import NodeRuntime
from spt_filetransfer import channel
from spt_filetransfer.datapaths import DATA_PATHS, DataPaths, TcpPath
from spt_filetransfer.dataserver import DataServer
from spt_filetransfer.db import ACTIVE_STATES, FINAL_STATES, DiskFullError, TransferDb, TransferFailedError
from spt_filetransfer.inbox import (
    Incoming,
    TransferGoneError,
    open_transfer_dir,
    remove_transfer_dir,
)
from spt_filetransfer.manifest import CHUNK, Manifest, manifest_problem
from spt_filetransfer.scan import scan
from spt_filetransfer.wire import as_map, check_tid

__all__ = ["FileService"]

log = logging.getLogger(__name__)

GIB: Final = 1024**3
DEFAULT_MAX_TRANSFER: Final = 8 * GIB
DEFAULT_MAX_CONCURRENT: Final = 4
DEFAULT_INBOX_QUOTA: Final = 20 * GIB
SPACE_MARGIN: Final = 64 * 1024 * 1024  # free space kept beyond the transfer, plus 1 %

REQUEST_TIMEOUT: Final = 10.0
RETRY_TIMEOUT: Final = 3.0  # after a failure the old connection may be dead: ask briefly, retry
CHUNK_TIMEOUT: Final = 60.0
DIAL_TIMEOUT: Final = 10.0
FIRST_OFFER_WAIT: Final = 5.0  # then FILE_QUEUED: the driver keeps trying in the background
TCP_IO_TIMEOUT: Final = 60.0
QUIC_WINDOW: Final = 8  # chunk requests in flight on the QUIC path
MAX_BAD_ROUNDS: Final = 3
BACKOFF_MIN: Final = 0.5
BACKOFF_MAX: Final = 30.0
GIVE_UP_SECONDS: Final = 7 * 24 * 3600.0
KEEP_FINISHED_SECONDS: Final = 30 * 24 * 3600.0
LIST_FINISHED_SECONDS: Final = 7 * 24 * 3600.0
STATUS_FINISHED_SECONDS: Final = 3600.0
TICK: Final = 0.5

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


# --- small helpers ------------------------------------------------------------------------


class _Refused(Exception):
    """The receiver refused the offer: final."""

    def __init__(self, token: str, reason: str) -> None:
        super().__init__(reason)
        self.token = token
        self.reason = reason


class _Fatal(Exception):
    """The transfer cannot succeed (source changed, chunks keep failing, receiver failed)."""


class _Cancelled(Exception):
    """The transfer was cancelled on either side."""


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))




def _str(body: Mapping[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise RemoteProtocolError(key, f"{key!r} is a string")
    return value


def _remote_reason(exc: Any) -> str:
    """The explanation of a RequestError without its `TOKEN:subject ` head."""
    message = str(getattr(exc, "remote_message", "") or "")
    code = str(getattr(exc, "code", ""))
    if message.startswith(f"{code}:") or message.startswith(f"{code} "):
        head, _, rest = message.partition(" ")
        return rest or head
    return message or code


def _bits_set(bits: bytes, index: int) -> bool:
    byte = index >> 3
    return byte < len(bits) and bool(bits[byte] & (1 << (index & 7)))


def _env_rate() -> int:
    try:
        return max(0, int(os.environ.get("SPT_FILE_MAX_RATE", "0")))
    except ValueError:
        return 0


def _env_path() -> str:
    value = os.environ.get("SPT_FILE_DATA_PATH", "auto").lower()
    return value if value in DATA_PATHS else "auto"


class _Pacer:
    """A byte-rate cap for the sender (test and benchmark knob); `delay(n)` is seconds to wait."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._start = time.monotonic()
        self._bytes = 0

    def delay(self, n: int) -> float:
        if not self.rate:
            return 0.0
        self._bytes += n
        due = self._start + self._bytes / self.rate
        return max(0.0, due - time.monotonic())


class _Meter:
    """Rate over the last few seconds, from samples the ticker takes."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=10)

    def sample(self, now: float, done: int) -> None:
        self.samples.append((now, done))

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return max(0.0, (d1 - d0) / (t1 - t0)) if t1 > t0 else 0.0


# --- the sending side of one transfer --------------------------------------------------------


class Outgoing:
    """A transfer this node sends, while the daemon runs: live progress and its driver task."""

    def __init__(self, row: Mapping[str, Any], local: bool) -> None:
        self.tid: str = row["id"]
        self.row = dict(row)
        self.manifest = Manifest.from_wire(_decode(row["manifest"]))
        self.sources: list[str] = json.loads(row["sources"])
        self.node = NodeId.from_hex(row["peer"])
        self.local = local
        self.state: str = row["state"]
        self.reason: str | None = row["reason"]
        self.base_done: int = row["done"]
        self.round_sent = 0
        self.sent: int = row["sent"]
        self.path_kind: str | None = row["path_kind"]
        self.first_offer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.finished = asyncio.Event()
        self.cancel_event = threading.Event()
        self.sock: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_progress = time.time()
        self.failures = 0
        self.remote_state = ""
        self.verified_high = row["done"]  # the most the receiver ever reported verified
        self._src: tuple[int, int] | None = None
        self._src_lock = threading.Lock()

    @property
    def total(self) -> int:
        return self.manifest.total

    @property
    def done(self) -> int:
        return min(self.total, self.base_done + self.round_sent)

    @overload
    def read_chunk(self, f: int, c: int) -> bytes: ...

    @overload
    def read_chunk(self, f: int, c: int, into: bytearray, *, check: bool = True) -> memoryview: ...

    def read_chunk(self, f: int, c: int, into: bytearray | None = None, *, check: bool = True) -> bytes | memoryview:
        """Chunk `c` of file `f` from the source, checked against the manifest (blocking).

        With `into` (at least CHUNK bytes), the chunk is read into it and returned as a view.
        `check=False` skips the hash (only the length is checked): for a first send, where the
        receiver verifies every chunk anyway and a source changed since the offer shows up as
        chunks it refused, which the next round reads with the check and reports.
        """
        entry = self.manifest.files[f]
        with self._src_lock:
            if self._src is None or self._src[0] != f:
                self.close_source()
                try:
                    fd = os.open(self.sources[f], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError as exc:
                    raise _Fatal(f"cannot read {self.sources[f]}: {exc.strerror or exc}") from exc
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise _Fatal(f"{self.sources[f]} is no longer a regular file")
                self._src = (f, fd)
            fd = self._src[1]
            if into is None:
                data: bytes | memoryview = os.pread(fd, entry.chunk_len(c), c * CHUNK)
            else:  # the TCP path reuses one buffer: no fresh 1 MiB object per chunk
                view = memoryview(into)[: entry.chunk_len(c)]
                data = view[: os.preadv(fd, [view], c * CHUNK)]
        if len(data) != entry.chunk_len(c) or (check and blake3.blake3(data).digest() != entry.chunks[c]):
            raise _Fatal(f"{self.sources[f]} changed since it was offered; send it again")
        return data

    def close_source(self) -> None:
        if self._src is not None:
            with contextlib.suppress(OSError):
                os.close(self._src[1])
            self._src = None

    def cancel(self) -> None:
        self.cancel_event.set()
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self.task is not None and not self.task.done():
            self.task.cancel()


# --- the service -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sender:
    """What `NodeRuntime.member_subnet` reads of a connection: the peer."""

    peer: NodeId


class FileService:
    """Ops for the CLI, request handlers for members, drivers, the TCP listener, housekeeping."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime
        self.loop = asyncio.get_running_loop()
        self.db = TransferDb(runtime.state_dir / "filetransfer" / "transfers.db")
        cfg = runtime.config_section("file")
        self.max_transfer = int(cfg.get("max_transfer_bytes", DEFAULT_MAX_TRANSFER))
        self.max_concurrent = int(cfg.get("max_concurrent_per_peer", DEFAULT_MAX_CONCURRENT))
        self.inbox_quota = int(cfg.get("inbox_quota_bytes", DEFAULT_INBOX_QUOTA))
        self.bind = str(runtime.config_section("net").get("bind", "0.0.0.0"))
        self.data_path = _env_path()
        self.paths = DataPaths(self)
        self.max_rate = _env_rate()
        self.executor = ThreadPoolExecutor(max_workers=24, thread_name_prefix="spt-file")
        self.outgoing: dict[str, Outgoing] = {}
        self.incoming: dict[str, Incoming] = {}
        self.ended: dict[str, tuple[str, str]] = {}  # incoming ended while the record could not be written
        self.meters: dict[tuple[str, str], _Meter] = {}
        self.peer_slots: dict[str, asyncio.Semaphore] = {}
        self.server = DataServer(
            self.bind, incoming=self.incoming.get,
            record_path=lambda tid, kind: self.db.update(tid, "in", path_kind=kind),
            failed=lambda tid, why: self._finish_incoming(tid, "failed", why),
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._persisted: dict[tuple[str, str], int] = {}
        self._senders: dict[str, tuple[str, str]] = {}  # incoming tid -> (sender key hex, subnet named)
        self._closing = False

    # -- start and stop ---------------------------------------------------------------------

    def register(self) -> None:
        rt = self.rt
        rt.add_op("file.send", self.op_send)
        rt.add_op("file.status", self.op_status)
        rt.add_op("file.list", self.op_list)
        rt.add_op("file.cancel", self.op_cancel)
        rt.add_member_request("file.offer", self.req_offer)
        rt.add_member_request("file.open", self.req_open)
        rt.add_member_request("file.chunk", self.req_chunk)
        rt.add_member_request("file.need", self.req_need)
        rt.add_member_request("file.cancel", self.req_cancel)
        rt.add_member_request("file.transit", self.paths.req_transit)
        rt.add_member_request("file.punch", self.paths.req_punch)
        self._spawn(self._resume(), "resume transfers")
        self._spawn(self._ticker(), "transfer meters")

    def _spawn(self, coro: Any, what: str) -> asyncio.Task[Any]:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("file-transfer background work failed", extra={"what": what})

        task = self.loop.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def stop(self) -> None:
        """The node is stopping: stop drivers and data threads; verified chunks are recorded."""
        self._closing = True
        for out in list(self.outgoing.values()):
            out.cancel_event.set()
            if out.sock is not None:
                with contextlib.suppress(OSError):
                    out.sock.shutdown(socket.SHUT_RDWR)
            out.close_source()
        for task in list(self._tasks):
            task.cancel()
        self.server.stop()
        for inc in list(self.incoming.values()):
            inc.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.db.close()

    async def _resume(self) -> None:
        own = self.rt.node_id.hex
        for row in self.db.rows(direction="in", states=ACTIVE_STATES):
            try:
                self._load_incoming(row)
            except (OSError, SptError) as exc:
                log.warning("an incoming transfer could not be resumed", extra={"tid": row["id"], "reason": str(exc)})
                self._finish_incoming(row["id"], "failed", f"could not resume: {exc}")
        for row in self.db.rows(direction="in", states=("complete",)):
            if not row["delivered"]:
                self._spawn(self._deliver(row["id"]), "deliver file event")
        for row in self.db.rows(direction="out", states=ACTIVE_STATES):
            self._start_outgoing(row, local=row["peer"] == own)
        self.db.delete_before(time.time() - KEEP_FINISHED_SECONDS)

    def _load_incoming(self, row: Mapping[str, Any]) -> Incoming:
        tid = row["id"]
        manifest = Manifest.from_wire(_decode(row["manifest"]))
        inc = Incoming(
            self.db, tid, manifest, self.rt.endpoint_folder(row["perch"]),
            on_complete=self._incoming_complete,
        )
        inc.load()
        self._senders[tid] = (row["peer"], str(row["subnet"]))
        try:
            inc.finish_verified_files()
        except (SptError, OSError) as exc:  # e.g. a full disk; the next chunk retries the finish
            log.warning("could not finish a verified file after restart", extra={"tid": tid, "reason": str(exc)})
        self.incoming[tid] = inc
        self.meters[(tid, "in")] = _Meter()
        if inc.complete:
            inc.state = "complete"
            self._incoming_complete(tid)
        return inc

    async def _ticker(self) -> None:
        last_persist = 0.0
        while not self._closing:
            await asyncio.sleep(TICK)
            try:
                last_persist = self._tick(last_persist)
            except (SptError, OSError) as exc:  # e.g. a full disk: try again at the next tick
                log.warning("could not record transfer progress", extra={"reason": str(exc)})

    def _tick(self, last_persist: float) -> float:
        """Sample the meters; every 5 s, record progress and expire idle transfers."""
        now = time.monotonic()
        for tid, out in list(self.outgoing.items()):
            self.meters.setdefault((tid, "out"), _Meter()).sample(now, out.done)
        for tid, inc in list(self.incoming.items()):
            self.meters.setdefault((tid, "in"), _Meter()).sample(now, inc.done_bytes)
        self._cut_removed_senders()
        if now - last_persist >= 5.0:
            last_persist = now
            # `updated` moves only with progress: it is what expiry of abandoned transfers reads
            for tid, out in list(self.outgoing.items()):
                if out.state in ACTIVE_STATES and self._persisted.get((tid, "out")) != out.sent:
                    self._persisted[(tid, "out")] = out.sent
                    self.db.update(tid, "out", done=out.done, sent=out.sent, updated=time.time())
            for tid, inc in list(self.incoming.items()):
                if inc.state in ACTIVE_STATES and self._persisted.get((tid, "in")) != inc.done_bytes:
                    self._persisted[(tid, "in")] = inc.done_bytes
                    self.db.update(tid, "in", done=inc.done_bytes, state=inc.state, updated=time.time())
            self._expire_idle()
        return last_persist

    def _cut_removed_senders(self) -> None:
        """End incoming transfers whose sender no longer shares their subnet (pruned, or it left):
        their data connection is not the member connection a prune closes, so it is cut here."""
        own = self.rt.node_id.hex
        for tid in list(self.incoming):
            peer, subnet = self._senders.get(tid, (own, ""))
            # judged as file.offer was: the subnet by the name the sender gave, its member now
            if peer != own and not self.rt.member_subnet(_Sender(NodeId.from_hex(peer)), subnet):
                self._finish_incoming(tid, "failed", f"the sender is no longer a member of {subnet}")

    def _expire_idle(self) -> None:
        cutoff = time.time() - GIVE_UP_SECONDS
        for row in self.db.rows(direction="in", states=ACTIVE_STATES):
            if row["updated"] < cutoff:
                self._finish_incoming(row["id"], "failed", "the sender did not come back for 7 days")

    # -- CLI operations ---------------------------------------------------------------------

    async def op_send(self, call: Any) -> Any:
        args = call.args
        paths = args.get("paths")
        address = args.get("address")
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise UsageError("BAD_USAGE", "", "give at least one file or folder and an address")
        if not isinstance(address, str) or not address:
            raise UsageError("BAD_USAGE", "", "give the address to send to")
        message = check_body(str(args.get("message") or ""))
        from_id = args.get("from") or None
        if from_id is not None:
            from_id = check_endpoint_id(str(from_id))
        target = self.rt.resolve(address)
        manifest, sources = await self.loop.run_in_executor(self.executor, scan, [os.path.abspath(p) for p in paths])
        # as `spt send` does: else the envelope's from (`spt@node`, or a --from with no perch) led nowhere
        from_id = self.rt.sender(from_id, target)
        tid = os.urandom(16).hex()
        now = time.time()
        if isinstance(target, LocalTarget):
            peer, label, subnet, perch = self.rt.node_id.hex, self.rt.label, target.perch.home, target.perch.id
        elif isinstance(target, RemoteTarget):
            peer, label, subnet, perch = target.node.key.hex, target.node.label, target.subnet, target.row.endpoint_id
        else:  # pragma: no cover - resolve returns one of the two
            raise Refusal("NO_PERCH", address)
        row = {
            "id": tid, "direction": "out", "peer": peer, "peer_label": label, "subnet": subnet,
            "target": address, "perch": perch, "sender": from_id, "message": message,
            "name": manifest.name, "total": manifest.total, "files": len(manifest.files),
            "manifest": _encode(manifest.to_wire()), "sources": json.dumps(sources),
            "state": "queued", "created": now, "updated": now,
        }
        self.db.insert(row)
        log.info("transfer queued", extra={"tid": tid, "peer": peer[:8], "files": len(manifest.files), "bytes": manifest.total})
        out = self._start_outgoing(self.db.get(tid, "out") or row, local=isinstance(target, LocalTarget))
        try:
            await asyncio.wait_for(asyncio.shield(out.first_offer), FIRST_OFFER_WAIT)
        except TimeoutError:
            pass  # still trying: the transfer waits in the queue
        except _Refused as exc:
            if exc.token == "NO_PERCH":
                raise Refusal("NO_PERCH", address, exc.reason) from None
            raise Refusal("FILE_REFUSED", tid, exc.reason) from None
        if not args.get("wait"):
            return {"token": "FILE_QUEUED", "tid": tid}
        return await self._wait(call, out)

    async def _wait(self, call: Any, out: Outgoing) -> Any:
        while not out.finished.is_set():
            await call.emit({"progress": self._view_out(out)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(out.finished.wait(), TICK)
        await call.emit({"progress": self._view_out(out)})
        if out.state == "complete":
            return {"token": "FILE_SENT", "tid": out.tid}
        if out.state == "refused":
            raise Refusal("FILE_REFUSED", out.tid, out.reason or "refused")
        if out.state == "cancelled":
            raise Refusal("FILE_CANCELLED", out.tid, out.reason or "the transfer was cancelled")
        raise Refusal("FILE_FAILED", out.tid, out.reason or "the transfer failed")

    async def op_status(self, call: Any) -> Any:
        tid = call.args.get("tid")
        if tid:
            return {"transfers": [self._view(row) for row in self._find(str(tid))]}
        rows = self.db.rows(finished_since=time.time() - STATUS_FINISHED_SECONDS)
        return {"transfers": [self._view(r) for r in rows]}

    async def op_list(self, call: Any) -> Any:
        args = call.args
        direction = "in" if args.get("incoming") else "out" if args.get("outgoing") else None
        if args.get("all"):
            rows = self.db.rows(direction=direction, finished_since=time.time() - LIST_FINISHED_SECONDS)
        else:
            rows = self.db.rows(direction=direction, states=ACTIVE_STATES)
        return {"transfers": [self._view(r) for r in rows]}

    async def op_cancel(self, call: Any) -> Any:
        rows = self._find(str(call.args.get("tid") or ""))
        tid = rows[0]["id"]
        if all(r["state"] == "cancelled" for r in rows):
            return {"token": "FILE_CANCELLED", "tid": tid}
        if all(r["state"] in FINAL_STATES for r in rows):
            raise Refusal("FILE_FINISHED", tid, f"the transfer is already {rows[0]['state']}")
        for row in rows:  # a transfer to a local perch has an outgoing and an incoming row
            if row["state"] in ACTIVE_STATES:
                self._cancel_local(row, "cancelled here")
                if row["peer"] != self.rt.node_id.hex:
                    self._spawn(self._tell_cancel(NodeId.from_hex(row["peer"]), tid, row["subnet"]), "tell cancel")
        return {"token": "FILE_CANCELLED", "tid": tid}

    def _find(self, tid: str) -> list[dict[str, Any]]:
        """The rows of one transfer, by id or unique id prefix (at least 4 characters)."""
        tid = tid.lower()
        found = self.db.find(tid) if len(tid) >= 4 else []
        ids = {r["id"] for r in found}
        if len(ids) > 1:
            raise UsageError("AMBIGUOUS", tid, "several transfers start with that; give more of the id")
        if not found:
            raise Refusal("NO_SUCH_TRANSFER", tid, "no transfer has that id (see spt file list --all)")
        return found

    def _cancel_local(self, row: Mapping[str, Any], reason: str) -> None:
        tid = row["id"]
        if row["direction"] == "out":
            out = self.outgoing.get(tid)
            if out is not None:
                out.state, out.reason = "cancelled", reason
                out.cancel()
                out.finished.set()
                if not out.first_offer.done():
                    out.first_offer.set_result("cancelled")
            self.db.update(tid, "out", state="cancelled", reason=reason, finished=time.time(), updated=time.time())
            self.outgoing.pop(tid, None)
        else:
            self._finish_incoming(tid, "cancelled", reason)
        log.info("transfer cancelled", extra={"tid": tid, "reason": reason})

    async def _tell_cancel(self, node: NodeId, tid: str, subnet: str) -> None:
        """Best effort, a few tries: the peer also learns it at its next offer or need."""
        delay = 1.0
        for _ in range(6):
            try:
                conn = await asyncio.wait_for(self.rt.connect_member(node), DIAL_TIMEOUT)
                await conn.request("file.cancel", {"tid": tid, "subnet": subnet}, timeout=REQUEST_TIMEOUT)
                return
            except (SptError, OSError, TimeoutError):
                await asyncio.sleep(delay)
                delay *= 2

    # -- views ------------------------------------------------------------------------------

    def _view(self, row: Mapping[str, Any]) -> dict[str, Any]:
        tid = row["id"]
        out = self.outgoing.get(tid) if row["direction"] == "out" else None
        if out is not None:
            return self._view_out(out)
        inc = self.incoming.get(tid) if row["direction"] == "in" else None
        state, done = row["state"], row["done"]
        if inc is not None and row["state"] in ACTIVE_STATES:
            state, done = inc.state, inc.done_bytes
        return self._doc(row, state, done, row["reason"], row["path_kind"], row["sent"])

    def _view_out(self, out: Outgoing) -> dict[str, Any]:
        return self._doc(out.row, out.state, out.done, out.reason, out.path_kind, out.sent)

    def _doc(self, row: Mapping[str, Any], state: str, done: int, reason: str | None, path: str | None, sent: int) -> dict[str, Any]:
        tid = row["id"]
        total = row["total"]
        meter = self.meters.get((tid, row["direction"]))
        active = state in ACTIVE_STATES
        rate = meter.rate() if meter is not None and active else 0.0
        eta = round((total - done) / rate, 1) if active and rate > 0 else None
        incoming = row["direction"] == "in"
        return {
            "id": tid,
            "direction": "incoming" if incoming else "outgoing",
            "peer": row["peer"],
            "peer_label": row["peer_label"],
            "target": row["perch"] if incoming else row["target"],
            "state": state,
            "done": done if state != "complete" else total,
            "total": total,
            "rate": round(rate, 1),
            "eta_s": eta,
            "path": path,
            "name": row["name"],
            "files": row["files"],
            "sent": sent,
            "reason": reason,
            "inbox": f"inbox/{tid}" if incoming else None,
            "created": _iso(row["created"]),
            "finished": _iso(row["finished"]),
        }

    # -- sending ----------------------------------------------------------------------------

    def _start_outgoing(self, row: Mapping[str, Any], *, local: bool) -> Outgoing:
        out = Outgoing(row, local)
        self.outgoing[out.tid] = out
        self.meters[(out.tid, "out")] = _Meter()
        out.task = self._spawn(self._drive(out), "send transfer")
        return out

    def _set_out(self, out: Outgoing, state: str, *, reason: str | None = None, path: str | None = None) -> None:
        out.state = state
        out.reason = reason
        if path is not None:
            out.path_kind = path
        final = state in FINAL_STATES
        now = time.time()
        self.db.update(
            out.tid, "out", state=state, reason=reason, done=out.total if state == "complete" else out.done,
            sent=out.sent, path_kind=out.path_kind, updated=now, finished=now if final else None,
        )
        if final:
            out.finished.set()
            out.close_source()
            self.outgoing.pop(out.tid, None)
            if not out.first_offer.done():
                out.first_offer.set_result(state)
            log.info("transfer ended", extra={"tid": out.tid, "state": state, "reason": reason or "", "sent": out.sent})

    async def _drive(self, out: Outgoing) -> None:
        delay = BACKOFF_MIN
        slots = self.peer_slots.setdefault(out.row["peer"], asyncio.Semaphore(max(1, self.max_concurrent)))
        while True:
            if slots.locked() and not out.first_offer.done():
                out.first_offer.set_result("queued")
            async with slots:
                progress_before = out.verified_high
                try:
                    if out.local:
                        await self._attempt_local(out)
                    else:
                        await self._attempt(out)
                    return
                except asyncio.CancelledError:
                    if out.state not in FINAL_STATES and not self._closing:
                        self._set_out(out, "cancelled", reason="cancelled")
                    raise
                except _Refused as exc:
                    if not out.first_offer.done():
                        out.first_offer.set_exception(exc)
                        out.first_offer.exception()  # retrieved: the op may have stopped waiting
                    self._set_out(out, "refused", reason=exc.reason)
                    return
                except _Cancelled as exc:
                    self._set_out(out, "cancelled", reason=str(exc) or "cancelled")
                    return
                except _Fatal as exc:
                    self._set_out(out, "failed", reason=str(exc))
                    return
                except (SptError, OSError, TimeoutError, ConnectionError) as exc:
                    if self._closing or out.cancel_event.is_set():
                        return
                    out.failures += 1
                    why = getattr(exc, "message", "") or str(exc) or type(exc).__name__
                    self._set_out(out, "queued", reason=f"waiting for the peer: {why}")
                    if not out.first_offer.done():
                        out.first_offer.set_result("queued")
                    log.info("transfer interrupted; will retry", extra={"tid": out.tid, "reason": why, "delay": delay})
                finally:
                    if out.sock is not None:
                        with contextlib.suppress(OSError):
                            out.sock.close()
                        out.sock = None
                    out.close_source()
            if out.verified_high > progress_before:
                out.last_progress = time.time()
                delay = BACKOFF_MIN
            elif time.time() - out.last_progress > GIVE_UP_SECONDS:
                self._set_out(out, "failed", reason="the peer could not be reached for 7 days")
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _status(self, out: Outgoing, body: Any) -> list[tuple[int, int]]:
        """Apply a receiver status (`file.offer`/`open`/`need` reply); returns the chunks still needed.

        Raises _Cancelled / _Fatal when the receiver ended the transfer; returns [] when complete.
        """
        status = as_map(body, "file status")
        state = status.get("state")
        out.remote_state = str(state)
        if state == "cancelled":
            raise _Cancelled("cancelled by the receiver")
        if state == "failed":
            raise _Fatal(f"the receiver failed: {status.get('reason') or 'no reason given'}")
        if state == "unknown":
            raise _Fatal("the receiver no longer knows this transfer")
        if state == "complete":
            out.base_done, out.round_sent = out.total, 0
            out.verified_high = out.total
            return []
        bitmaps = status.get("bitmaps")
        if not isinstance(bitmaps, list) or len(bitmaps) != len(out.manifest.files):
            raise RemoteProtocolError("file status", "bitmaps do not match the manifest")
        needed: list[tuple[int, int]] = []
        verified = 0
        for f, entry in enumerate(out.manifest.files):
            bits = bitmaps[f] if isinstance(bitmaps[f], bytes) else b""
            for c in range(len(entry.chunks)):
                if _bits_set(bits, c):
                    verified += entry.chunk_len(c)
                else:
                    needed.append((f, c))
        out.base_done, out.round_sent = verified, 0
        out.verified_high = max(out.verified_high, verified)
        return needed

    def _offer_body(self, out: Outgoing) -> dict[str, Any]:
        row = out.row
        return {
            "tid": out.tid, "subnet": row["subnet"], "to": row["perch"], "from": row["sender"],
            "label": self.rt.label, "message": row["message"], "manifest": out.manifest.to_wire(),
        }

    async def _request(self, conn: Any, type_name: str, body: Any, timeout: float = REQUEST_TIMEOUT) -> Any:
        """A member request; refusals of the receiver become _Refused / _Cancelled / _Fatal."""
        try:
            reply = await conn.request(type_name, body, timeout=timeout)
        except PeerError as exc:
            code = getattr(exc, "code", None)
            if code is None:
                raise
            reason = _remote_reason(exc)
            if code in ("FILE_REFUSED", "NO_PERCH", "NOT_A_MEMBER", "NOT_HERE"):
                raise _Refused(code, reason) from None
            if code == "unknown-type":
                raise _Refused("FILE_REFUSED", "the receiving node does not accept files (no file-transfer plugin)") from None
            if code == "FILE_CANCELLED":
                raise _Cancelled(reason) from None
            if code in ("FILE_FAILED", "DISK_FULL", "PROTOCOL_ERROR", "BAD_FRAME"):
                raise _Fatal(reason) from None
            raise
        return reply.body

    async def _attempt(self, out: Outgoing) -> None:
        conn = await asyncio.wait_for(self.rt.connect_member(out.node), DIAL_TIMEOUT)
        if out.state == "queued":
            self._set_out(out, "offered")
        timeout = RETRY_TIMEOUT if out.failures else REQUEST_TIMEOUT
        needed = self._status(out, await self._request(conn, "file.offer", self._offer_body(out), timeout))
        out.failures = 0  # the connection answers
        if not out.first_offer.done():
            out.first_offer.set_result("accepted")
        if out.remote_state == "complete":
            self._set_out(out, "complete")
            return
        path: TcpPath | None = None
        try:
            opened = await self._request(conn, "file.open", {
                "tid": out.tid, "subnet": out.row["subnet"], "tcp": self.data_path != "quic",
                "seen": f"{conn.remote_addr[0]}:{conn.remote_addr[1]}",
            })
            needed = self._status(out, opened)
            path = await self.paths.connect(conn, out, opened)
            kind = path.kind if path is not None else "quic"
            idle_rounds = 0
            rounds = 0
            while out.remote_state != "complete":
                before = out.base_done
                if needed:
                    self._set_out(out, "transferring", path=kind)
                    if path is not None:
                        # the first round skips the sender's hash: the receiver verifies each chunk
                        check = rounds > 0
                        await self.loop.run_in_executor(
                            self.executor, functools.partial(self._tcp_round, out, path, needed, check=check)
                        )
                        rounds += 1
                    else:
                        await self._quic_round(conn, out, needed)
                    self._set_out(out, "verifying", path=kind)
                else:  # everything is verified; the receiver is still checking whole files
                    self._set_out(out, "verifying", path=kind)
                    await asyncio.sleep(0.2)
                needed = self._status(out, await self._request(conn, "file.need", {"tid": out.tid, "subnet": out.row["subnet"]}))
                idle_rounds = 0 if out.base_done > before else idle_rounds + 1
                if needed and idle_rounds >= MAX_BAD_ROUNDS:
                    raise _Fatal("chunks keep failing verification at the receiver")
                if not needed and idle_rounds >= 50:
                    raise _Fatal("the receiver did not finish verifying")
            self._set_out(out, "complete", path=kind)
        finally:
            if path is not None:
                with contextlib.suppress(OSError):
                    path.sock.close()
                out.sock = None

    def _tcp_round(self, out: Outgoing, path: TcpPath, needed: Sequence[tuple[int, int]], *, check: bool) -> None:
        """Send `needed` chunks over the TCP path, then wait for the receiver's END_ACK (blocking).

        `check`: hash each chunk before sending it (rounds that resend what the receiver refused).
        """
        pacer = _Pacer(self.max_rate)
        sock = path.sock
        sock.settimeout(TCP_IO_TIMEOUT)
        buf = bytearray(CHUNK)
        for f, c in needed:
            if out.cancel_event.is_set():
                raise _Cancelled("cancelled")
            data = out.read_chunk(f, c, buf, check=check)
            path.tx.send(sock, f, c, data)
            out.round_sent += len(data)
            out.sent += len(data)
            wait = pacer.delay(len(data))
            if wait:
                time.sleep(wait)
        path.tx.send(sock, channel.CONTROL, channel.END)
        sock.settimeout(max(TCP_IO_TIMEOUT, 300.0))
        while True:
            f, c, _ = path.rx.recv(sock)
            if f == channel.CONTROL and c == channel.END_ACK:
                return

    async def _quic_round(self, conn: Any, out: Outgoing, needed: Sequence[tuple[int, int]]) -> None:
        pacer = _Pacer(self.max_rate)
        window = asyncio.Semaphore(QUIC_WINDOW)
        failures: list[BaseException] = []

        async def one(f: int, c: int) -> None:
            try:
                data = await self.loop.run_in_executor(self.executor, out.read_chunk, f, c)
                await self._request(
                    conn, "file.chunk", {"tid": out.tid, "subnet": out.row["subnet"], "f": f, "c": c, "d": data}, CHUNK_TIMEOUT
                )
                out.round_sent += len(data)
                out.sent += len(data)
            except BaseException as exc:  # collected and re-raised below, after the window drains
                failures.append(exc)
            finally:
                window.release()

        tasks: list[asyncio.Task[None]] = []
        try:
            for f, c in needed:
                if out.cancel_event.is_set():
                    raise _Cancelled("cancelled")
                await window.acquire()
                if failures:
                    window.release()
                    break
                tasks.append(self.loop.create_task(one(f, c)))
                wait = pacer.delay(out.manifest.files[f].chunk_len(c))
                if wait:
                    await asyncio.sleep(wait)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        if failures:
            raise failures[0]

    async def _attempt_local(self, out: Outgoing) -> None:
        """The target perch is on this node: the same checks and chunk path, without a network."""
        self._set_out(out, "offered")
        row = out.row
        body = self._accept_offer(
            self.rt.node_id, self.rt.label, row["subnet"], row["perch"], row["sender"], row["message"],
            out.manifest, out.tid, local=True,
        )
        needed = self._status(out, body)
        if not out.first_offer.done():
            out.first_offer.set_result("accepted")
        inc = self.incoming.get(out.tid)
        if needed and inc is not None:
            self._set_out(out, "transferring", path="local")

            def copy() -> None:
                for f, c in needed:
                    if out.cancel_event.is_set():
                        raise _Cancelled("cancelled")
                    data = out.read_chunk(f, c)
                    if not inc.accept(f, c, data):
                        raise _Fatal("a chunk failed verification while copied locally")
                    out.round_sent += len(data)
                    out.sent += len(data)
                inc.flush()

            try:
                await self.loop.run_in_executor(self.executor, copy)
            except TransferFailedError as exc:
                self._finish_incoming(out.tid, "failed", exc.message)
                raise _Fatal(exc.message) from None
        self._status(out, self._status_body(out.tid))
        if out.remote_state != "complete":
            raise _Fatal("the local copy did not complete")
        self._set_out(out, "complete", path="local")

    # -- receiving --------------------------------------------------------------------------

    def _status_body(self, tid: str) -> dict[str, Any]:
        if tid in self.ended:
            state, reason = self.ended[tid]
            return {"state": state, "reason": reason}
        inc = self.incoming.get(tid)
        if inc is not None:
            if inc.state == "complete":
                return {"state": "complete"}
            return {"state": inc.state, "bitmaps": inc.bitmaps()}
        row = self.db.get(tid, "in")
        if row is None:
            return {"state": "unknown"}
        if row["state"] == "complete":
            return {"state": "complete"}
        if row["state"] in FINAL_STATES:
            return {"state": row["state"], "reason": row["reason"]}
        return {"state": row["state"], "bitmaps": []}

    async def req_offer(self, conn: Any, frame: Any) -> tuple[str, Any]:
        body = as_map(frame.body, "file.offer")
        tid = check_tid(body.get("tid"))
        subnet = _str(body, "subnet") or ""
        to = _str(body, "to") or ""
        sender = _str(body, "from", optional=True)
        label = _str(body, "label") or ""
        message = _str(body, "message") or ""
        try:
            check_body(message)
            if sender is not None:
                check_endpoint_id(sender)
        except UsageError as exc:
            raise RemoteProtocolError("file.offer", exc.message) from None
        manifest = Manifest.from_wire(body.get("manifest"))
        if not self.rt.member_subnet(conn, subnet):
            raise Refusal("NOT_A_MEMBER", conn.peer.short, f"not a member of subnet {subnet!r} here")
        if not self.rt.perch_visible(to, subnet):
            raise Refusal("NO_PERCH", to, f"no perch {to!r} is visible in {subnet!r} on this node")
        return "file.status", self._accept_offer(conn.peer, label, subnet, to, sender, message, manifest, tid, local=False)

    def _refuse(self, tid: str, reason: str) -> Refusal:
        log.info("transfer refused", extra={"tid": tid, "reason": reason})
        return Refusal("FILE_REFUSED", tid, reason)

    def _accept_offer(
        self, peer: NodeId, label: str, subnet: str | None, to: str, sender: str | None, message: str,
        manifest: Manifest, tid: str, *, local: bool,
    ) -> dict[str, Any]:
        # first of all: `Bob` and `bob` are one perch, so one row key, one folder, one quota
        to = self.rt.perch_id(to) or to
        row = self.db.get(tid, "in")
        if row is not None:
            known = Manifest.from_wire(_decode(row["manifest"]))
            if row["peer"] != peer.hex or known.digest() != manifest.digest() or row["perch"] != to:
                raise self._refuse(tid, "that transfer id is already used by another transfer")
            if row["state"] in ACTIVE_STATES:
                self.db.update(tid, "in", updated=time.time())  # the sender is back
                if tid not in self.incoming and tid not in self.ended:
                    self._load_incoming(row)
            return self._status_body(tid)
        if not local and self.db.get(tid, "out") is not None:
            raise self._refuse(tid, "that transfer id is already used by another transfer")
        total = manifest.total
        # 1. per-peer limits, before anything is written
        if total > self.max_transfer:
            raise self._refuse(tid, f"too large: {total} bytes, over this node's limit of {self.max_transfer} (file.max_transfer_bytes)")
        active = [r for r in self.db.rows(direction="in", states=ACTIVE_STATES) if r["id"] != tid]
        from_peer = sum(1 for r in active if r["peer"] == peer.hex)
        if from_peer >= self.max_concurrent:
            raise self._refuse(tid, f"too many transfers from this node at once ({from_peer}; file.max_concurrent_per_peer is {self.max_concurrent})")
        folder = self.rt.endpoint_folder(to)
        pending = {r["id"]: r["total"] - self._done_of(r) for r in active}
        used = _inbox_usage(folder / "inbox", skip=set(pending)) + sum(
            v for k, v in pending.items() if next(r for r in active if r["id"] == k)["perch"] == to
        )
        if used + total > self.inbox_quota:
            raise self._refuse(tid, f"the inbox of {to} is over its quota: {used} + {total} bytes > {self.inbox_quota} (file.inbox_quota_bytes)")
        free = _free_space(folder)
        need = total + SPACE_MARGIN + total // 100 + sum(pending.values())
        if free < need:
            raise self._refuse(tid, f"not enough free disk space: {total} bytes offered, {free} free, {need} needed with the margin")
        # 2. path safety
        problem = manifest_problem(manifest)
        if problem is not None:
            raise self._refuse(tid, f"unsafe path: {problem}")
        try:
            fd = open_transfer_dir(folder, tid, create=True, fresh=True)
        except Refusal as exc:
            raise self._refuse(tid, f"unsafe path: {exc.subject} {exc.message}") from None
        os.close(fd)
        now = time.time()
        self.db.insert({
            "id": tid, "direction": "in", "peer": peer.hex, "peer_label": label,
            "subnet": subnet, "target": to, "perch": to,
            "sender": sender, "message": message,
            "name": manifest.name, "total": total, "files": len(manifest.files),
            "manifest": _encode(manifest.to_wire()), "state": "offered", "created": now, "updated": now,
            "path_kind": "local" if local else None,
        })
        inc = Incoming(self.db, tid, manifest, folder, on_complete=self._incoming_complete)
        self.incoming[tid] = inc
        self._senders[tid] = (peer.hex, subnet or "")
        self.meters.setdefault((tid, "in"), _Meter())
        log.info("transfer accepted", extra={"tid": tid, "peer": peer.short, "perch": to, "files": len(manifest.files), "bytes": total})
        try:
            inc.finish_empty_files()
        except (OSError, SptError) as exc:
            self._finish_incoming(tid, "failed", str(exc))
            raise self._refuse(tid, f"cannot create the files: {exc}") from None
        return self._status_body(tid)

    def _done_of(self, row: Mapping[str, Any]) -> int:
        inc = self.incoming.get(row["id"])
        return inc.done_bytes if inc is not None else int(row["done"])

    def _from_form(self, sender: str | None, node: NodeId, label: str, subnet: str | None, *, local: bool) -> str:
        """The envelope's `from`: the shortest address that leads back to the sender here (§3.4)."""
        sid = sender or "spt"
        if local:
            return sid
        forms = [(0, sid), (0, f"{sid}@{label}"), (1, f"{sid}@{node.short}")]
        if subnet:
            forms += [(0, f"{subnet}:{sid}"), (0, f"{subnet}:{sid}@{label}"), (1, f"{subnet}:{sid}@{node.short}")]
        for _, text in sorted(forms, key=lambda f: (f[0], len(f[1]))):
            try:
                target = self.rt.resolve(text)
            except (SptError, ValueError):
                continue
            if isinstance(target, RemoteTarget) and target.node.key == node and target.row.endpoint_id.lower() == sid.lower():
                return text
        # nothing resolves yet (no row for the sender, e.g. no --from): qualify it fully, with
        # the label when it names that one node here (NO_PERCH then means the node part resolved)
        qualifier = node.short
        if label:
            try:
                self.rt.resolve(f"{sid}@{label}")
            except SptError as exc:
                if exc.instance_token == "NO_PERCH":
                    qualifier = label
            except ValueError:
                pass
        return f"{subnet}:{sid}@{qualifier}" if subnet else f"{sid}@{qualifier}"

    def _peer_row(self, conn: Any, body: Mapping[str, Any], tid: str, direction: str) -> dict[str, Any] | None:
        """The transfer's row when it is this peer's and in the subnet the request named (the
        daemon checked the peer's membership of that one before the handler ran)."""
        row = self.db.get(tid, direction)
        named = body.get("subnet")
        if row is None or row["peer"] != conn.peer.hex:
            return None
        if not isinstance(named, str) or named.lower() != str(row["subnet"]).lower():
            return None
        return row

    def _incoming_for(self, conn: Any, body: Mapping[str, Any], tid: str) -> Incoming:
        if tid in self.ended:
            raise Refusal("FILE_FAILED", tid, self.ended[tid][1])
        inc = self.incoming.get(tid)
        row = self._peer_row(conn, body, tid, "in")
        if row is None:
            raise Refusal("FILE_UNKNOWN", tid, "no such incoming transfer from this node")
        if inc is None:
            if row["state"] == "cancelled":
                raise Refusal("FILE_CANCELLED", tid, row["reason"] or "cancelled")
            if row["state"] in FINAL_STATES:
                raise Refusal("FILE_FAILED", tid, f"the transfer is {row['state']}")
            inc = self._load_incoming(row)
        return inc

    async def req_open(self, conn: Any, frame: Any) -> tuple[str, Any]:
        body = as_map(frame.body, "file.open")
        tid = check_tid(body.get("tid"))
        row = self._peer_row(conn, body, tid, "in")
        if row is None:
            raise Refusal("FILE_UNKNOWN", tid, "no such incoming transfer from this node")
        if row["state"] in ACTIVE_STATES and tid not in self.incoming and tid not in self.ended:
            self._load_incoming(row)
        reply = self._status_body(tid)
        if body.get("tcp") and reply.get("state") not in FINAL_STATES:
            port = self.server.ensure_listener()
            reply.update(key=self.server.open_session(tid, conn.peer.hex))  # keys every path, the listener's or not
            # behind a NAT (the sender reaches us at an address we do not have) the listener's
            # port is closed to it: the sender goes straight to a simultaneous open
            if port is not None and self.paths.listener_reachable(body.get("seen"), str(conn.remote_addr[0])):
                reply.update(port=port)
        return "file.status", reply

    async def req_chunk(self, conn: Any, frame: Any) -> tuple[str, Any]:
        body = as_map(frame.body, "file.chunk")
        tid = check_tid(body.get("tid"))
        f, c, data = body.get("f"), body.get("c"), body.get("d")
        if not isinstance(f, int) or not isinstance(c, int) or not isinstance(data, bytes):
            raise RemoteProtocolError("file.chunk", "a chunk is {tid, f, c, d: bytes}")
        inc = self._incoming_for(conn, body, tid)
        if inc.state == "offered":
            self.db.update(tid, "in", path_kind="quic")
        try:
            ok = await self.loop.run_in_executor(self.executor, inc.accept, f, c, data)
        except TransferFailedError as exc:
            self._finish_incoming(tid, "failed", exc.message)
            raise Refusal("FILE_FAILED", tid, exc.message) from None
        except TransferGoneError as exc:
            raise Refusal("FILE_CANCELLED", tid, exc.message) from None
        return "ok", {"ok": ok}

    async def req_need(self, conn: Any, frame: Any) -> tuple[str, Any]:
        body = as_map(frame.body, "file.need")
        tid = check_tid(body.get("tid"))
        if self._peer_row(conn, body, tid, "in") is None:
            return "file.status", {"state": "unknown"}
        inc = self.incoming.get(tid)
        if inc is not None:
            await self.loop.run_in_executor(self.executor, inc.flush)
        return "file.status", self._status_body(tid)

    async def req_cancel(self, conn: Any, frame: Any) -> tuple[str, Any]:
        body = as_map(frame.body, "file.cancel")
        tid = check_tid(body.get("tid"))
        for direction in ("in", "out"):
            row = self._peer_row(conn, body, tid, direction)
            if row is not None and row["state"] in ACTIVE_STATES:
                self._cancel_local(row, "cancelled by the peer")
        return "ok", {}

    def _incoming_complete(self, tid: str) -> None:
        """Every file has its final name (called from whichever thread finished the last one)."""
        now = time.time()
        inc = self.incoming.get(tid)
        total = inc.manifest.total if inc is not None else None
        self.db.update(tid, "in", state="complete", done=total if total is not None else 0, finished=now, updated=now)
        log.info("transfer complete", extra={"tid": tid})
        self.loop.call_soon_threadsafe(self._after_complete, tid)

    def _after_complete(self, tid: str) -> None:
        self.incoming.pop(tid, None)
        self._senders.pop(tid, None)
        self.server.forget(tid)
        self._spawn(self._deliver(tid), "deliver file event")

    def _finish_incoming(self, tid: str, state: str, reason: str) -> None:
        """End an incoming transfer as failed or cancelled; partial data is deleted (thread-safe)."""
        row = self.db.get(tid, "in")
        if row is None:
            return
        self.ended[tid] = (state, reason)
        inc = self.incoming.pop(tid, None)
        self._senders.pop(tid, None)
        try:
            if inc is not None:
                inc.discard(state)
            else:
                remove_transfer_dir(self.rt.endpoint_folder(row["perch"]), tid)
                self.db.forget_chunks(tid)
        except DiskFullError:
            log.warning("could not drop the chunk record of an ended transfer", extra={"tid": tid})
        self.server.end(tid)
        now = time.time()
        try:
            self.db.update(tid, "in", state=state, reason=reason, finished=now, updated=now)
            del self.ended[tid]
        except DiskFullError:
            log.warning("could not record the end of a transfer; kept in memory", extra={"tid": tid})
        log.info("incoming transfer ended", extra={"tid": tid, "state": state, "reason": reason})

    async def _deliver(self, tid: str) -> None:
        row = self.db.get(tid, "in")
        if row is None or row["delivered"]:
            return
        manifest = Manifest.from_wire(_decode(row["manifest"]))
        tops = {f.path.split("/", 1)[0] for f in manifest.files}
        single = len(manifest.files) == 1 and manifest.files[0].path == manifest.name
        digest = manifest.files[0].hash if single else manifest.digest()
        path = f"inbox/{tid}/{manifest.name}" if len(tops) == 1 else f"inbox/{tid}"
        attrs = [
            ("id", tid), ("name", manifest.name), ("size", str(manifest.total)), ("files", str(len(manifest.files))),
            ("hash", f"blake3:{digest.hex()}"), ("path", path),
        ]
        # `from` is worked out now, not at the offer: the sender's row has had time to arrive
        peer = NodeId.from_hex(row["peer"])
        sender = self._from_form(row["sender"], peer, row["peer_label"], row["subnet"], local=peer == self.rt.node_id)
        await self.rt.deliver(row["perch"], "file", row["message"] or "", attrs, sender=sender)
        self.db.update(tid, "in", delivered=1)


def _inbox_usage(inbox: Path, *, skip: set[str]) -> int:
    """Bytes under `inbox`, not following symlinks; folders of transfers in `skip` are left out."""
    total = 0
    stack = [inbox]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if folder == inbox and entry.name in skip:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def _free_space(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return 0
        raise
