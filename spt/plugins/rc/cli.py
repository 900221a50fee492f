"""`spt rc ADDRESS`: the viewer. It keeps what makes a cut invisible (SPEC.md §8.6):

- the offset of the next output byte it expects: every (re)attach asks for exactly that, and a
  frame overlapping what was already written is trimmed, so nothing shows twice or goes missing;
  when the host no longer has those bytes it prints how many were lost, never skipping silently;
- its input frames, numbered from 1, kept until the host acknowledges them and resent after a
  reconnect (the host applies each number once per viewer id, which is random per `spt rc` run);
- the terminal: raw mode while attached, restored on every way out.

It reconnects by itself, through its own daemon, for up to RECONNECT_SECONDS without contact.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Final

import click

from spt.core.errors import DaemonDown, SptError, UsageError

RECONNECT_SECONDS: Final = 300.0
RETRY_MIN: Final = 0.1
RETRY_MAX: Final = 2.0
FINAL_REFUSALS: Final = frozenset({"RC_REFUSED", "NOT_HOSTED", "BAD_USAGE", "BAD_ADDRESS"})


def parse_detach_key(text: str) -> int:
    """`^]`, `ctrl-]`, `C-a` or a single character → the byte the terminal sends."""
    t = text.strip()
    for prefix in ("^", "ctrl-", "ctrl+", "c-"):
        if t.lower().startswith(prefix) and len(t) == len(prefix) + 1:
            return ord(t[-1].upper()) & 0x1F
    if len(t) == 1:
        return ord(t)
    raise UsageError("BAD_USAGE", text, "a detach key is one character or Ctrl plus one (^] or ctrl-])")


class Viewer:
    def __init__(self, address: str, *, read_only: bool, replay: bool, detach_key: int) -> None:
        self.address = address
        self.read_only = read_only
        self.replay = replay
        self.detach_key = bytes([detach_key])
        self.viewer = os.urandom(8).hex()
        self.offset: int | None = None
        self.run_pid: int | None = None  # offsets and input numbers belong to one run of the command
        self.pending: OrderedDict[int, bytes] = OrderedDict()
        self.next_seq = 1
        self.lock = threading.Lock()
        self.conn: Any = None
        self.synced = False
        self.detached = threading.Event()
        self.out_fd = sys.stdout.fileno()

    # -- input --------------------------------------------------------------------------------

    def _send(self, msg: dict[str, Any]) -> None:
        """Send on the current connection (caller holds the lock); a failure waits for the resend."""
        if self.conn is None:
            return
        try:
            self.conn.send({"rc": msg})
        except OSError:
            self.synced = False

    def _input_line(self, seq: int, data: bytes) -> dict[str, Any]:
        return {"t": "input", "seq": seq, "data": base64.b64encode(data).decode("ascii")}

    def type(self, data: bytes) -> None:
        """Bytes from the keyboard: up to the detach key they are input; the key detaches."""
        cut = data.find(self.detach_key)
        if cut >= 0:
            data = data[:cut]
        if data and not self.read_only:
            with self.lock:
                seq, self.next_seq = self.next_seq, self.next_seq + 1
                self.pending[seq] = data
                if self.synced:
                    self._send(self._input_line(seq, data))
        if cut >= 0:
            self.detach()

    def resize(self) -> None:
        size = self._size()
        if size is not None:
            with self.lock:
                if self.synced:
                    self._send({"t": "resize", "rows": size[0], "cols": size[1]})

    def detach(self) -> None:
        # no lock: this runs in signal handlers, possibly while the main thread holds it
        self.detached.set()
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(2)

    def _stdin_loop(self) -> None:
        fd = sys.stdin.fileno()
        while not self.detached.is_set():
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return  # end of input: keep watching (a pipe, or /dev/null)
            self.type(data)

    # -- output -------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.out_fd, view)
            view = view[n:]

    def _on_event(self, ev: dict[str, Any]) -> int | None:
        kind = ev.get("t")
        if kind == "hello":
            with self.lock:
                if self.run_pid is not None and ev.get("pid") != self.run_pid:
                    self.offset = None  # the command was started afresh (wake): a new stream
                    self.pending.clear()  # keys meant for the old process are not replayed
                self.run_pid = ev.get("pid")
                if self.offset is None:
                    self.offset = int(ev["start"])
                applied = int(ev.get("applied") or 0)
                for seq in [s for s in self.pending if s <= applied]:
                    del self.pending[seq]
                for seq, data in self.pending.items():  # in order, before anything new
                    self._send(self._input_line(seq, data))
                self.synced = True
        elif kind == "out":
            if isinstance(ev.get("ack"), int):  # an ack riding the output frame
                self._on_event({"t": "ack", "seq": ev["ack"]})
            off, data = int(ev["off"]), base64.b64decode(ev["data"])
            assert self.offset is not None
            if off + len(data) > self.offset:
                if off > self.offset:  # cannot happen: the host sends in order from our offset
                    self._lost(off - self.offset)
                    self.offset = off
                self._write(data[self.offset - off:])
                self.offset = off + len(data)
        elif kind == "lost":
            lo, hi = int(ev["from"]), int(ev["to"])
            if self.offset is not None and hi > self.offset:
                self._lost(hi - max(lo, self.offset))
                self.offset = hi
        elif kind == "ack":
            with self.lock:
                for seq in [s for s in self.pending if s <= int(ev["seq"])]:
                    del self.pending[seq]
        elif kind == "ended":
            code = ev.get("exit")
            return int(code) if isinstance(code, int) else -1
        return None

    def _lost(self, count: int) -> None:
        sys.stderr.write(f"\r\n[spt rc: {count} bytes of output were lost (more than the host keeps)]\r\n")
        sys.stderr.flush()

    # -- the connection loop ------------------------------------------------------------------

    def _size(self) -> tuple[int, int] | None:
        try:
            size = os.get_terminal_size(self.out_fd)
        except OSError:
            return None
        return size.lines, size.columns

    def run(self) -> tuple[str, int | None]:
        """Attach, and re-attach after every break; ("detached"|"ended", exit)."""
        from spt.core.ipc import PROTOCOL_VERSION, connect_or_start
        from spt.core.paths import StatePaths

        root = StatePaths.resolve().root
        autostart = os.environ.get("SPT_NO_AUTOSTART") != "1"
        attached_once = False
        last_contact = time.monotonic()
        delay = RETRY_MIN
        while not self.detached.is_set():
            if time.monotonic() - last_contact > RECONNECT_SECONDS:
                raise DaemonDown("", f"no contact with the endpoint for {RECONNECT_SECONDS:.0f} s; gave up")
            try:
                conn = connect_or_start(root, autostart=autostart and not attached_once)
            except DaemonDown:
                if not attached_once:
                    raise
                self.detached.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            args: dict[str, Any] = {"address": self.address, "offset": self.offset, "replay": self.replay,
                                    "read_only": self.read_only, "viewer": self.viewer, "run": self.run_pid}
            size = self._size()
            if size is not None:
                args.update(rows=size[0], cols=size[1])
            with self.lock:
                self.conn, self.synced = conn, False
            try:
                conn.send({"v": PROTOCOL_VERSION, "op": "rc.attach", "args": args, "interactive": False})
                for msg in conn.lines(None):
                    if "event" in msg:
                        ev = msg["event"].get("rc") or {}
                        if ev.get("t") == "hello":
                            attached_once, delay = True, RETRY_MIN
                        last_contact = time.monotonic()
                        code = self._on_event(ev)
                        if code is not None:
                            return "ended", code
                    elif "error" in msg:
                        err = SptError.from_wire(msg["error"])
                        if not attached_once or err.instance_token in FINAL_REFUSALS:
                            raise err
                    else:
                        result = msg.get("result") or {}
                        if "ended" in result:
                            return "ended", result["ended"]
            except (DaemonDown, OSError, ValueError):
                pass  # the daemon went away or the socket was shut for a detach: loop decides
            finally:
                with self.lock:
                    self.conn, self.synced = None, False
                with contextlib.suppress(OSError):
                    conn.close()
            if not self.detached.is_set():
                self.detached.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
        return "detached", None


@click.command()
@click.argument("address")
@click.option("--read-only", is_flag=True, help="Watch only; keystrokes are not sent.")
@click.option("--detach-key", default="^]", show_default=True, help="The key that detaches (^X or one character).")
@click.option("--no-replay", is_flag=True, help="Start from now, not with the buffered output.")
@click.pass_context
def rc(ctx: click.Context, address: str, read_only: bool, detach_key: str, no_replay: bool) -> None:
    """Watch and drive the terminal of the hosted endpoint at ADDRESS, from any member node.

    \b
    Example:
      spt rc coder@desktop            # detach with Ctrl-]
      spt rc coder --read-only
    """
    viewer = Viewer(address, read_only=read_only, replay=not no_replay, detach_key=parse_detach_key(detach_key))
    stdin_fd = sys.stdin.fileno()
    saved = None
    if os.isatty(stdin_fd):
        import termios
        import tty

        saved = termios.tcgetattr(stdin_fd)
        tty.setraw(stdin_fd)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: viewer.detach())
    if hasattr(signal, "SIGWINCH"):
        signal.signal(signal.SIGWINCH, lambda *_: viewer.resize())
    threading.Thread(target=viewer._stdin_loop, daemon=True).start()
    try:
        how, code = viewer.run()
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
    # status tokens on stderr (SPEC.md §3.8); stdout carries only the PTY's bytes
    sys.stderr.write(f"RC_ENDED:{address} exit={code}\n" if how == "ended" else f"RC_DETACHED:{address}\n")
    sys.stderr.flush()
