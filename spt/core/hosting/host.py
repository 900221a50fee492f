"""The host process of one hosted endpoint: `python -m spt.core.hosting.host SPEC.json`.

It starts the command in a fresh PTY (`pty.fork`: the command leads its own session and process
group), then serves its Unix socket (`wire`) until the command has ended and a short linger
has passed. It is started in a session of its own, so it outlives the daemon that started it;
the next daemon re-adopts it by its socket (SPEC.md §2.3, §8.8: same PIDs, same byte stream).

What it keeps, and why it is here rather than in the daemon: the output numbered by byte offset
with the last `buffer_bytes` for replay and resume, and per viewer id the number of the last
input frame applied (so input resent after any reconnect is applied exactly once, §8.6).

Output is read from the PTY only while every attached writing viewer is less than a buffer
behind: a slow viewer slows the program (as a terminal would) instead of losing bytes. A
read-only viewer never holds the program back: when it falls more than a buffer behind it gets a
`lost` marker and continues from the oldest byte kept. A viewer that is gone does not hold
anything back either; it resumes from its offset, with a `lost` marker if the gap outgrew the
buffer. Input waits (the viewer's socket is not read) while a megabyte of earlier input is
still unwritten, so no input is ever dropped after being counted as applied.

It ends the command (SIGHUP, then SIGKILL) and exits when its socket file is removed, so a
state folder that is deleted never leaves a process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import pty
import signal
import struct
import sys
import termios
from collections import OrderedDict
from pathlib import Path
from typing import Any, Final

from spt.core.hosting.wire import CHUNK, WireError, encode, read_frame

MAX_VIEWERS_REMEMBERED: Final = 1024  # input counters kept per viewer id (oldest dropped)
SOCKET_CHECK_SECONDS: Final = 2.0
EIO_WAIT_SECONDS: Final = 1.0  # output still draining after the command exited
STOP_WRITE_QUEUE: Final = 1024 * 1024  # unwritten input bytes beyond which viewers' input waits
ACK_DELAY: Final = 0.02  # an ack rides the echo's output frame when one follows this soon


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    rows = max(1, min(int(rows), 1000))
    cols = max(1, min(int(cols), 1000))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def exit_code(status: int) -> int:
    """A wait status as a shell shows it: the exit code, or 128+signal."""
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


class _Viewer:
    def __init__(self, host: Host, writer: asyncio.StreamWriter, offset: int, read_only: bool, viewer: str) -> None:
        self.host = host
        self.writer = writer
        self.sent = offset
        self.read_only = read_only
        self.viewer = viewer
        self.ack_due: int | None = None  # acknowledged with the next output, or after ACK_DELAY

    def flush_ack(self) -> None:
        if self.ack_due is not None and not self.writer.is_closing():
            self.writer.write(encode({"t": "ack", "seq": self.ack_due}))
            self.ack_due = None


class Host:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.cap = int(spec.get("buffer_bytes") or 4 * 1024 * 1024)
        self.linger = float(spec.get("linger", 30.0))
        self.socket_path = Path(spec["socket"])
        self.exit_file = Path(spec["exit_file"])
        self.buf = bytearray()
        self.base = 0  # offset of buf[0]
        self.end = 0  # offset after the last byte read
        self.exit: int | None = None
        self.finished = asyncio.Event()  # output drained and exit known
        self.changed = asyncio.Event()
        self.viewers: set[_Viewer] = set()
        self.watchers: set[asyncio.StreamWriter] = set()
        self.applied: OrderedDict[str, int] = OrderedDict()
        self.stopped = False
        self.reading = False
        self.write_queue = bytearray()
        self.writing = False
        self.input_room = asyncio.Event()  # set while the write queue takes more input
        self.input_room.set()
        self.pid = 0
        self.fd = -1

    # -- the command ------------------------------------------------------------------------

    def spawn(self) -> None:
        argv = [str(a) for a in self.spec["argv"]]
        env = {str(k): str(v) for k, v in self.spec["env"].items()}
        cwd = str(self.spec["cwd"])
        pid, fd = pty.fork()
        if pid == 0:  # the child: a new session whose controlling terminal is the PTY
            try:
                os.chdir(cwd)
                os.execvpe(argv[0], argv, env)
            except OSError as exc:
                os.write(2, f"spt: cannot run {argv[0]}: {exc.strerror}\r\n".encode())
            os._exit(127)
        self.pid, self.fd = pid, fd
        _set_winsize(fd, self.spec.get("rows", 24), self.spec.get("cols", 80))
        os.set_blocking(fd, False)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:  # EIO: every holder of the slave side is gone and the output drained
            self._pause()
            asyncio.get_running_loop().create_task(self._reap(drained=True))
            return
        self.buf += data
        self.end += len(data)
        excess = len(self.buf) - self.cap
        if excess > CHUNK * 4:  # trim in steps: each trim moves the whole buffer
            del self.buf[:excess]
            self.base += excess
        self.changed.set()
        self._flow()

    def _lagging(self) -> bool:
        """True when reading on would cost a writing viewer bytes (read-only ones never hold the
        program back: a remote one that stops reading would stall it for the send timeout)."""
        return any(self.end - v.sent > self.cap - CHUNK for v in self.viewers if not v.read_only)

    def _flow(self) -> None:
        """Read while no attached writing viewer would lose bytes; pause otherwise."""
        if self.exit is not None and self.finished.is_set():
            return
        lagging = self._lagging()
        if lagging and self.reading:
            self._pause()
        elif not lagging and not self.reading and not self.finished.is_set():
            asyncio.get_running_loop().add_reader(self.fd, self._on_readable)
            self.reading = True

    def _pause(self) -> None:
        if self.reading:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.reading = False

    def on_sigchld(self) -> None:
        asyncio.get_running_loop().create_task(self._reap(drained=False))

    async def _reap(self, *, drained: bool) -> None:
        if self.exit is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG | os.WUNTRACED | os.WCONTINUED)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid == 0:
                if not drained:
                    return
                # the slave closed but the command lives on (it closed its terminal): keep waiting
                return
            if os.WIFSTOPPED(status):
                self.stopped = True
                return
            if os.WIFCONTINUED(status):
                self.stopped = False
                return
            self.exit = exit_code(status)
        if not drained:
            # The command ended; what it wrote may still be in the PTY. Give the drain a moment
            # (a background child holding the slave open would otherwise keep us waiting).
            deadline = asyncio.get_running_loop().time() + EIO_WAIT_SECONDS
            while self.reading and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
                if self._lagging():
                    deadline += 0.05  # a slow viewer paused reading: wait for it, not for EIO
        if self.finished.is_set():
            return
        self._pause()
        with contextlib.suppress(OSError):
            while True:  # whatever is still readable belongs to the stream
                data = os.read(self.fd, CHUNK)
                if not data:
                    break
                self.buf += data
                self.end += len(data)
        self.finished.set()
        self.changed.set()
        self.input_room.set()  # input waiting for room is not applied now: it stops waiting
        tmp = self.exit_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"exit": self.exit, "end": self.end, "pid": self.pid}))
        os.replace(tmp, self.exit_file)
        for w in list(self.watchers):
            with contextlib.suppress(Exception):
                w.write(encode({"t": "ended", "exit": self.exit, "end": self.end}))

    def _write_input(self, data: bytes) -> None:
        self.write_queue += data
        if len(self.write_queue) >= STOP_WRITE_QUEUE:
            self.input_room.clear()
        if not self.writing and self.exit is None:
            asyncio.get_running_loop().add_writer(self.fd, self._on_writable)
            self.writing = True

    def _on_writable(self) -> None:
        try:
            n = os.write(self.fd, self.write_queue)
            del self.write_queue[:n]
        except BlockingIOError:
            return
        except OSError:
            self.write_queue.clear()
        if len(self.write_queue) < STOP_WRITE_QUEUE:
            self.input_room.set()
        if not self.write_queue:
            asyncio.get_running_loop().remove_writer(self.fd)
            self.writing = False

    def status(self) -> dict[str, Any]:
        return {"t": "status", "pid": self.pid, "host_pid": os.getpid(), "end": self.end,
                "exit": self.exit, "stopped": self.stopped}

    # -- clients ------------------------------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await read_frame(reader)
            if first is None:
                return
            kind = first["t"]
            if kind == "attach":
                await self._attach(first, reader, writer)
            elif kind == "watch":
                self.watchers.add(writer)
                writer.write(encode(self.status()))
                if self.finished.is_set():
                    writer.write(encode({"t": "ended", "exit": self.exit, "end": self.end}))
                await writer.drain()
                await reader.read()  # until the daemon hangs up
            elif kind == "signal":
                sig = int(first.get("sig", 0))
                if self.exit is None and sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP,
                                                 signal.SIGCONT, signal.SIGHUP, signal.SIGINT):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.pid, sig)
                    if sig == signal.SIGSTOP:
                        self.stopped = True
                    elif sig == signal.SIGCONT:
                        self.stopped = False
                writer.write(encode(self.status()))
                await writer.drain()
            else:  # status, or anything unknown
                writer.write(encode(self.status()))
                await writer.drain()
        except (WireError, ConnectionError, ValueError, TypeError, KeyError):
            pass
        finally:
            self.watchers.discard(writer)
            writer.close()

    async def _attach(self, first: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        offset = first.get("offset")
        if first.get("run") not in (None, self.pid):
            offset = None  # the viewer's offsets counted another run of the command: start afresh
        available = max(self.base, self.end - self.cap)
        if offset is None:
            start = available if first.get("replay", True) else self.end
        else:
            start = min(int(offset), self.end)
        viewer_id = str(first.get("viewer") or "")[:64]
        viewer = _Viewer(self, writer, max(start, available), bool(first.get("read_only")), viewer_id)
        writer.write(encode({"t": "hello", "start": viewer.sent, "end": self.end, "pid": self.pid,
                             "applied": self.applied.get(viewer_id, 0)}))
        if start < available:
            writer.write(encode({"t": "lost", "from": start, "to": available}))
        if first.get("rows") and first.get("cols") and self.exit is None and not viewer.read_only:
            _set_winsize(self.fd, first["rows"], first["cols"])  # §8.6: the latest client's size
        self.viewers.add(viewer)
        sender = asyncio.get_running_loop().create_task(self._send(viewer))
        try:
            while True:
                msg = await read_frame(reader)
                if msg is None:
                    break
                if msg["t"] == "input" and not viewer.read_only and viewer_id:
                    seq = int(msg["seq"])
                    # A full queue: stop reading this viewer until the program takes input again
                    # (dropping it here while counting it applied would lose it, §8.6).
                    while len(self.write_queue) >= STOP_WRITE_QUEUE and not self.finished.is_set():
                        await self.input_room.wait()
                    if seq > self.applied.get(viewer_id, 0) and self.exit is None:
                        self._write_input(bytes(msg["data"]))
                        self.applied[viewer_id] = seq
                        self.applied.move_to_end(viewer_id)
                        while len(self.applied) > MAX_VIEWERS_REMEMBERED:
                            self.applied.popitem(last=False)
                    if viewer.ack_due is None:
                        asyncio.get_running_loop().call_later(ACK_DELAY, viewer.flush_ack)
                    viewer.ack_due = seq
                elif msg["t"] == "resize" and self.exit is None and not viewer.read_only:
                    _set_winsize(self.fd, msg["rows"], msg["cols"])
        finally:
            self.viewers.discard(viewer)
            sender.cancel()
            self._flow()

    async def _send(self, viewer: _Viewer) -> None:
        writer = viewer.writer
        try:
            while True:
                while viewer.sent < self.end:
                    if viewer.sent < self.base:  # a read-only viewer fell a buffer behind
                        writer.write(encode({"t": "lost", "from": viewer.sent, "to": self.base}))
                        viewer.sent = self.base
                    lo = viewer.sent - self.base
                    chunk = bytes(self.buf[lo:lo + CHUNK])
                    frame: dict[str, Any] = {"t": "out", "off": viewer.sent, "data": chunk}
                    if viewer.ack_due is not None:  # one packet for the echo and its ack
                        frame["ack"], viewer.ack_due = viewer.ack_due, None
                    writer.write(encode(frame))
                    viewer.sent += len(chunk)
                    await writer.drain()
                    self._flow()
                if self.finished.is_set():
                    writer.write(encode({"t": "ended", "exit": self.exit, "end": self.end}))
                    await writer.drain()
                    return
                self.changed.clear()
                await self.changed.wait()
        except (ConnectionError, OSError):
            writer.close()

    # -- life -----------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self.serve, path=os.fspath(self.socket_path))
        finally:
            os.umask(old)
        inode = self.socket_path.stat().st_ino
        loop.add_signal_handler(signal.SIGCHLD, self.on_sigchld)
        self.spawn()
        self._flow()
        sys.stdout.write(json.dumps({"pid": self.pid, "host_pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
        self.on_sigchld()  # a command that failed at once was reaped before the handler existed
        orphaned = False
        while not self.finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.finished.wait(), SOCKET_CHECK_SECONDS)
            if not self._socket_is_ours(inode):
                orphaned = True
                break
        if orphaned:
            for sig in (signal.SIGHUP, signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, sig)
                await asyncio.sleep(0.2)
            return
        # Linger so that viewers reconnecting after a cut still get the tail and the exit.
        deadline = loop.time() + self.linger
        while loop.time() < deadline and self._socket_is_ours(inode):
            await asyncio.sleep(min(0.5, max(0.0, deadline - loop.time())))
        server.close()
        if self._socket_is_ours(inode):
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    def _socket_is_ours(self, inode: int) -> bool:
        try:
            return self.socket_path.stat().st_ino == inode
        except FileNotFoundError:
            return False


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the daemon's terminal going away is not ours
    asyncio.run(Host(spec).run())


if __name__ == "__main__":
    main()
