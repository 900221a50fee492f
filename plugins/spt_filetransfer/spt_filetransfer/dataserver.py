"""The receiver's data connections: its TCP listener, the per-open sessions (keys) and serving
keyed frames into a transfer (docs/design/bulk-path.md, tcp-simultaneous-open.md).

Whatever brought a connection here (the listener, a simultaneous open, a relay's transit), it
serves nothing until the peer proves the session's key: the header names the transfer, the
first frame must open under keys derived from that transfer's key and both sides' salts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Final

from spt.core.errors import SptError
from spt.core.net.sources import source_group
from spt_filetransfer import channel
from spt_filetransfer.db import TransferFailedError
from spt_filetransfer.inbox import Incoming, TransferGoneError

__all__ = ["HANDSHAKE_SECONDS", "MAX_CONNECTIONS", "MAX_PER_OWNER", "ChunkWriter", "DataServer"]

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS: Final = 3.0  # the keyed handshake on a connected socket
IO_SECONDS: Final = 60.0
SESSION_SECONDS: Final = 600.0
MAX_CONNECTIONS: Final = 32  # data connections, and ones being opened (punches, transit joins)
MAX_PER_OWNER: Final = 8
"""Of those, what one member may hold, so one cannot starve the others (its four concurrent
transfers need four, and a replacement each); a listener connection counts against its source
address (an IPv6 /64: `source_group`) until its header names a transfer, then against that
transfer's member."""
WRITE_QUEUE: Final = 4  # verified chunks waiting for the writer thread
WRITE_BATCH: Final = 4  # chunks the writer takes off the queue for one write


class DataServer:
    """Sessions opened by `file.open`, the listener, and the data connections being served."""

    def __init__(
        self, bind: str, *, incoming: Callable[[str], Incoming | None],
        record_path: Callable[[str, str], None], failed: Callable[[str, str], None],
    ) -> None:
        self.host = bind if bind not in ("", "0.0.0.0", "::") else ""
        self._incoming = incoming
        self._record_path = record_path
        self._failed = failed
        self.sessions: dict[str, tuple[bytes, float, str]] = {}  # tid -> key, expiry, member
        self.listener: socket.socket | None = None
        self.socks: dict[socket.socket, str] = {}  # -> its slot's owner
        self._held: dict[str, int] = {}  # owner (a member's key hex, or "addr " + host) -> slots
        self.by_tid: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._closing = False

    def open_session(self, tid: str, member: str) -> bytes:
        """A fresh key for the transfer's data connections (handed to the sender over QUIC);
        `member` is the sender's key in hex, whose share of the slots they count against."""
        key = channel.new_key()
        with self._lock:
            self.sessions[tid] = (key, time.monotonic() + SESSION_SECONDS, member)
        return key

    def has_session(self, tid: str) -> bool:
        with self._lock:
            session = self.sessions.get(tid)
        return session is not None and session[1] >= time.monotonic()

    def take_slot(self, owner: str) -> bool:
        """Hold a data connection slot for `owner` (then `serve` it, or `give_slot` back);
        False when all are taken or `owner` holds its share."""
        with self._lock:
            return self._take(owner)

    def give_slot(self, owner: str) -> None:
        with self._lock:
            self._give(owner)

    def _take(self, owner: str) -> bool:  # under the lock
        held = self._held.get(owner, 0)
        if held >= MAX_PER_OWNER or sum(self._held.values()) >= MAX_CONNECTIONS:
            return False
        self._held[owner] = held + 1
        return True

    def _give(self, owner: str) -> None:  # under the lock
        held = self._held.pop(owner, 0) - 1
        if held > 0:
            self._held[owner] = held

    def forget(self, tid: str) -> None:
        """The transfer completed: no more data connections for it."""
        with self._lock:
            self.sessions.pop(tid, None)

    def end(self, tid: str) -> None:
        """The transfer ended otherwise: forget its session and cut its data connection."""
        with self._lock:
            self.sessions.pop(tid, None)
            sock = self.by_tid.pop(tid, None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._closing = True
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.listener.close()
        with self._lock:
            socks = list(self.socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def ensure_listener(self) -> int | None:
        """The listener's port (opened at the first call), or None when it cannot be opened."""
        if self.listener is not None:
            return int(self.listener.getsockname()[1])
        try:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.create_server((self.host, 0), family=family, backlog=64)
        except OSError as exc:
            log.warning("cannot open the TCP data listener; transfers use QUIC", extra={"reason": str(exc)})
            return None
        self.listener = sock
        threading.Thread(target=self._accept_loop, args=(sock,), name="spt-file-listen", daemon=True).start()
        log.info("file data listener open", extra={"port": sock.getsockname()[1]})
        return int(sock.getsockname()[1])

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closing:
            try:
                sock, addr = listener.accept()
            except OSError:
                return
            owner = f"addr {source_group(str(addr[0]))}"
            if not self.take_slot(owner):
                sock.close()
                continue
            try:
                threading.Thread(target=self.serve, args=(sock, "tcp", owner), name="spt-file-data", daemon=True).start()
            except BaseException:
                sock.close()
                self.give_slot(owner)
                raise

    def serve(self, sock: socket.socket, kind: str, owner: str) -> None:
        """Serve one data connection until it ends (blocking; on its own thread): the keyed
        handshake, then verified chunks into the transfer. `kind` is the path recorded; the
        connection holds a slot `owner` took, which passes to the transfer's member."""
        with self._lock:
            self.socks[sock] = owner
        tid = ""
        try:
            sock.settimeout(HANDSHAKE_SECONDS + 2)
            head = bytearray(channel.HEADER_LEN)
            channel.recv_exact(sock, memoryview(head))
            raw_tid, client_salt = channel.read_client_header(bytes(head))
            tid = raw_tid.hex()
            with self._lock:
                session = self.sessions.get(tid)
            if session is None or session[1] < time.monotonic() or not self._pass_slot(sock, session[2]):
                return
            server_salt = os.urandom(channel.SALT)
            sock.sendall(server_salt)
            c2s, s2c = channel.derive_keys(session[0], raw_tid, client_salt, server_salt)
            # payloads in use: WRITE_QUEUE queued, WRITE_BATCH (and one held back) at the
            # writer, one the data thread verifies
            rx = channel.Receiver(c2s, channel.C2S, buffers=WRITE_QUEUE + WRITE_BATCH + 2)
            tx = channel.Sender(s2c, channel.S2C)
            f, c, _ = rx.recv(sock)
            if f != channel.CONTROL or c != channel.HELLO:
                raise channel.ChannelError("hello", "the first data frame is not a hello")
            inc = self._incoming(tid)
            if inc is None:
                return
            tx.send(sock, channel.CONTROL, channel.OK)
            with self._lock:
                old = self.by_tid.get(tid)
                self.by_tid[tid] = sock
            if old is not None:  # one data connection per transfer: the newest wins
                with contextlib.suppress(OSError):
                    old.shutdown(socket.SHUT_RDWR)
            self._record_path(tid, kind)
            sock.settimeout(IO_SECONDS)
            writer = ChunkWriter(inc)
            try:
                while True:
                    f, c, payload = rx.recv(sock)
                    if f == channel.CONTROL:
                        if c == channel.END:
                            writer.drain()
                            inc.flush()
                            tx.send(sock, channel.CONTROL, channel.END_ACK)
                            continue
                        raise channel.ChannelError("control", f"unknown control frame {c}")
                    if inc.verify(f, c, payload, running=True):  # a bad chunk is dropped: the sender's next round resends it
                        writer.put(f, c, payload)
            finally:
                writer.close()
        except TransferFailedError as exc:
            self._failed(tid, exc.message)
        except TransferGoneError:
            pass
        except (OSError, ConnectionError, SptError) as exc:
            log.debug("data connection ended", extra={"tid": tid, "reason": str(exc)})
        except Exception:
            log.exception("data connection failed", extra={"tid": tid})
        finally:
            inc2 = self._incoming(tid) if tid else None
            if inc2 is not None:
                with contextlib.suppress(OSError, SptError):
                    inc2.flush()
            with self._lock:
                held_by = self.socks.pop(sock, None)
                if held_by is not None:
                    self._give(held_by)
                if tid and self.by_tid.get(tid) is sock:
                    del self.by_tid[tid]
            with contextlib.suppress(OSError):
                sock.close()

    def _pass_slot(self, sock: socket.socket, member: str) -> bool:
        """The slot of `sock` now counts against `member`; False (slot given up) over its share."""
        with self._lock:
            owner = self.socks[sock]
            if owner == member:
                return True
            self._give(owner)
            if self._take(member):
                self.socks[sock] = member
                return True
            del self.socks[sock]
            return False


class ChunkWriter:
    """Writes verified chunks on its own thread while the data thread reads, opens, verifies and
    hashes the next frames (BLAKE3 and the disk each get a thread: both release the GIL).
    Consecutive chunks waiting in the queue go to disk in one write of up to WRITE_BATCH chunks."""

    def __init__(self, inc: Incoming) -> None:
        self.inc = inc
        self.queue: queue.Queue[tuple[int, int, memoryview] | None] = queue.Queue(maxsize=WRITE_QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="spt-file-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        held: list[tuple[int, int, memoryview] | None] = []  # taken from the queue, not in the last batch
        while True:
            item = held.pop() if held else self.queue.get()
            if item is None:
                self.queue.task_done()
                return
            f, first, data = item
            run = [data]
            while len(run) < WRITE_BATCH:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or nxt[0] != f or nxt[1] != first + len(run):
                    held.append(nxt)  # the stop mark, or a chunk that starts the next batch
                    break
                run.append(nxt[2])
            try:
                if self.error is None:
                    self.inc.store_run(f, first, run, aligned=True, hashed=True)  # payloads of channel.Receiver are page-aligned
            except BaseException as exc:  # handed to the data thread at its next put or drain
                self.error = exc
            finally:
                for _ in run:
                    self.queue.task_done()

    def put(self, f: int, c: int, data: memoryview) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((f, c, data))

    def drain(self) -> None:
        self.queue.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Let the queued chunks finish, then stop the thread."""
        self.queue.put(None)
        self.thread.join(timeout=30)
