"""The daemon's side of hosted endpoints: `endpoint run`, adoption, watching, rest and wake.

Each hosted perch has a row in `hosted` (command, environment, folder, remote-attach switch, the
pids of its current run and its last exit code) and, while its command runs, a host process
(`spt.core.hosting.host`) with a socket in `<state>/hosts/`. The daemon never owns that process:
at start it re-adopts every host whose socket answers (same pids), and a watcher connection per
host tells it when the command ends, so `alive` in rows is a fact, not a guess (SPEC.md §2.3).

Suspend (§4.6): SIGTERM to the command's process group, `grace` seconds, SIGKILL: the run ends and
the row keeps what wake needs. `--warm` is SIGSTOP; wake is SIGCONT, or the remembered command in
a fresh PTY. The perch's state itself (and with it the holding and release of messages) stays
with `Endpoints`; this module only moves processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from spt.core.caller import restricted_uid
from spt.core.endpoints import Perch
from spt.core.errors import ElevationRequired, Refusal, UsageError
from spt.core.hosting.wire import WireError, encode, read_frame
from spt.core.types import check_endpoint_id

if TYPE_CHECKING:
    from spt.core.daemon import Call, Daemon

log = logging.getLogger(__name__)

START_TIMEOUT: Final = 10.0
KILL_WAIT: Final = 3.0  # after SIGKILL, the exit is reported within this
PURGE_GRACE: Final = 2.0
DEFAULT_BUFFER: Final = 4 * 1024 * 1024
HOST_LINGER: Final = 30.0  # a host serves the tail and the exit this long after its command ended


@dataclass
class _Run:
    """One running host process, as this daemon knows it."""

    perch: str
    pid: int
    host_pid: int
    socket: Path
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    exit: int | None = None
    stopped: bool = False
    watcher: asyncio.Task[None] | None = None


class HostedTerminal:
    """A viewer's connection to a host process (what `NodeRuntime.attach_hosted` returns)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def recv(self) -> dict[str, Any] | None:
        try:
            return await read_frame(self._reader)
        except (WireError, ConnectionError):
            return None

    async def send_input(self, seq: int, data: bytes) -> None:
        self._writer.write(encode({"t": "input", "seq": int(seq), "data": bytes(data)}))
        await self._writer.drain()

    async def resize(self, rows: int, cols: int) -> None:
        self._writer.write(encode({"t": "resize", "rows": int(rows), "cols": int(cols)}))
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


def _program(name: str, env: Mapping[str, Any], cwd: str) -> str | None:
    """The file the host's `execvpe(name, …, env)` from `cwd` would run, or None: a name with a
    slash is a path from `cwd`, any other is looked up on the command's own PATH, whose relative
    entries ("." or "", "bin") are folders of `cwd` there, not of the daemon's."""
    import shutil

    if "/" in name:
        path = os.path.join(cwd, name)
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    folders = str(env.get("PATH") or os.defpath).split(os.pathsep)
    return shutil.which(name, path=os.pathsep.join(os.path.join(cwd, folder) for folder in folders))


class Hosting:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.store = daemon.store
        self.folder = daemon.paths.root / "hosts"
        self.runs: dict[str, _Run] = {}  # by perch key (lowercase id)
        section = daemon.config.section("rc")
        self.buffer_bytes = int(section.get("buffer_bytes", DEFAULT_BUFFER))
        self.linger = HOST_LINGER

    # -- files ------------------------------------------------------------------------------

    def _base(self, perch_id: str) -> Path:
        # hashed: an id of 64 characters would overflow a Unix socket path
        return self.folder / hashlib.sha256(perch_id.lower().encode()).hexdigest()[:16]

    def _row(self, perch_id: str) -> Any:
        return self.store.db.execute("SELECT * FROM hosted WHERE perch=?", (perch_id,)).fetchone()

    # -- facts ------------------------------------------------------------------------------

    def alive(self, perch_id: str) -> bool:
        run = self.runs.get(perch_id.lower())
        return run is not None and run.exit is None

    def pid(self, perch_id: str) -> int | None:
        """The pid of the running command (the same across daemon restarts), else None."""
        run = self.runs.get(perch_id.lower())
        return run.pid if run is not None and run.exit is None else None

    def count_alive(self) -> int:
        return sum(1 for run in self.runs.values() if run.exit is None)

    def info(self, perch_id: str) -> dict[str, Any] | None:
        """None when the perch is not hosted (or not the caller's); else alive, pid, remote_attach
        and the last exit."""
        row = self._row(perch_id)
        if row is None or self.daemon.endpoints.get(perch_id) is None:
            return None
        run = self.runs.get(perch_id.lower())
        return {
            "alive": self.alive(perch_id),
            "pid": run.pid if run else None,
            "remote_attach": bool(row["remote_attach"]),
            "exit": row["exit"],
        }

    # -- start and adoption -------------------------------------------------------------------

    async def start(self) -> None:
        """Re-adopt every host process that still answers (its pids stay what they were)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for row in self.store.query("SELECT * FROM hosted WHERE pid IS NOT NULL"):
            perch_id = str(row["perch"])
            sock = self._base(perch_id).with_suffix(".sock")
            run = _Run(perch_id, int(row["pid"]), int(row["host_pid"] or 0), sock)
            try:
                status = await self._ask(sock, {"t": "status"})
            except (OSError, WireError, TimeoutError):
                status = None
            if status is None or status.get("pid") != run.pid or status.get("exit") is not None:
                self._record_end(run, self._exit_from_file(perch_id))
                continue
            run.stopped = bool(status.get("stopped"))
            self.runs[perch_id.lower()] = run
            run.watcher = asyncio.get_running_loop().create_task(self._watch(run))
            log.info("hosted process adopted", extra={"perch": perch_id, "pid": run.pid})
            perch = self.daemon.endpoints.get(perch_id)
            if perch is not None:
                self.daemon.endpoints._changed(perch)  # alive again in the rows

    async def close(self) -> None:
        """Daemon shutdown: stop watching; the host processes keep running."""
        for run in self.runs.values():
            if run.watcher is not None:
                run.watcher.cancel()

    def _exit_from_file(self, perch_id: str) -> int | None:
        try:
            return int(json.loads(self._base(perch_id).with_suffix(".exit").read_text())["exit"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def _ask(self, sock: Path, msg: Mapping[str, Any], timeout: float = 3.0) -> dict[str, Any] | None:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(os.fspath(sock))
            try:
                writer.write(encode(dict(msg)))
                await writer.drain()
                return await read_frame(reader)
            finally:
                writer.close()

    async def _watch(self, run: _Run) -> None:
        """Hold a `watch` connection; the host says `ended` (or vanishes) when the command ends."""
        exit_code: int | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(os.fspath(run.socket))
            try:
                writer.write(encode({"t": "watch"}))
                await writer.drain()
                while True:
                    msg = await read_frame(reader)
                    if msg is None:
                        break
                    if msg["t"] == "ended":
                        exit_code = int(msg["exit"]) if msg.get("exit") is not None else None
                        break
            finally:
                writer.close()
        except (OSError, WireError):
            pass
        if exit_code is None:
            exit_code = self._exit_from_file(run.perch)
        self._record_end(run, exit_code)

    def _record_end(self, run: _Run, exit_code: int | None) -> None:
        if self.daemon.endpoints.closing:
            return  # the daemon is stopping, not the command
        run.exit = exit_code if exit_code is not None else -1
        run.ended.set()
        with self.store.transaction() as db:
            db.execute("UPDATE hosted SET pid=NULL, host_pid=NULL, exit=? WHERE perch=? AND pid=?",
                       (exit_code, run.perch, run.pid))
        log.info("hosted process ended", extra={"perch": run.perch, "pid": run.pid, "exit": exit_code})
        perch = self.daemon.endpoints.get(run.perch)
        if perch is not None:
            self.daemon.endpoints._changed(perch)

    # -- running --------------------------------------------------------------------------------

    async def run_op(self, call: Call) -> dict[str, Any]:
        """`spt endpoint run` (SPEC.md §3.6)."""
        uid = restricted_uid()
        if uid is not None and uid != os.getuid():
            # System mode: the host process would run the caller's command as the daemon's account,
            # which only root or that account may do (a caller can also run its command itself and
            # bind it with `spt ready <id>`).
            raise ElevationRequired("", ElevationRequired.MESSAGE)
        args = call.args
        argv = args.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
            raise UsageError("BAD_USAGE", "", "give the command after --: spt endpoint run -- COMMAND [ARGS…]")
        perch_id = check_endpoint_id(str(args.get("id") or os.path.basename(argv[0])))
        env = args.get("env")
        if not isinstance(env, dict):
            raise UsageError("BAD_USAGE", "", "the command's environment is a map")
        cwd = str(args.get("cwd") or "")
        if not os.path.isdir(cwd):
            raise UsageError("BAD_USAGE", cwd, "the working folder does not exist")
        if _program(argv[0], env, cwd) is None:  # else ENDPOINT_RUN_STARTED for a typo, then exit 127
            raise UsageError("BAD_COMMAND", argv[0], "no such program: not an executable file, nor on the PATH")
        eps = self.daemon.endpoints
        perch = eps.get(perch_id)
        if perch is not None and (self.alive(perch.id) or eps.delivery.listening(perch)):
            raise Refusal("COLLISION", perch.id, "the perch already has a live process or listener")
        if perch is None:
            eps._check_new_id(perch_id)
            home = self._home(args.get("subnet") or None)
            perch = eps._create(perch_id, home, "unbound", hosted=True)
            if home is not None:
                self.store.set_meta("last_home", home.name)
        elif not perch.hosted:
            perch = eps._update(perch, hosted=1)
        env = {str(k): str(v) for k, v in env.items()}
        env.update({"SPT_AGENT_ID": perch.id, "SPT_ENDPOINT_DIR": os.fspath(eps.folder(perch)),
                    "SPT_HOME": os.fspath(self.daemon.paths.root)})
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO hosted(perch, argv, env, cwd, remote_attach, started) VALUES(?,?,?,?,?,?) "
                "ON CONFLICT(perch) DO UPDATE SET argv=excluded.argv, env=excluded.env, cwd=excluded.cwd, "
                "remote_attach=excluded.remote_attach, started=excluded.started",
                (perch.id, json.dumps(argv), json.dumps(env), cwd, int(not args.get("no_remote_attach")), time.time()),
            )
        run = await self.spawn(perch)
        return {"id": perch.id, "pid": run.pid, "home": eps._subnet_name(perch.home)}

    def _home(self, subnet: str | None) -> Any:
        subnets = self.daemon.subnets
        if subnet:
            return subnets.require(subnet)
        held = sorted(subnets.held.values(), key=lambda s: s.canonical)
        if len(held) <= 1:
            return held[0] if held else None
        # the subnet most recently used as a home comes first: interactive run proposes it (§2.5)
        last = (self.store.get_meta("last_home") or "").lower()
        held.sort(key=lambda s: s.canonical != last)
        raise Refusal(
            "MULTI_SUBNET_HOME", "", f"this node holds {len(held)} subnets; pass --subnet <name>",
            lines=[f"  {s.name}" for s in held],
        )

    async def spawn(self, perch: Perch) -> _Run:
        """Start the remembered command of `perch` in a fresh PTY under a new host process."""
        row = self._row(perch.id)
        if row is None:
            raise Refusal("NOT_HOSTED", perch.id, "this endpoint has no remembered command")
        base = self._base(perch.id)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            base.with_suffix(".exit").unlink()
        spec = {
            "argv": json.loads(row["argv"]), "env": json.loads(row["env"]), "cwd": row["cwd"],
            "socket": os.fspath(base.with_suffix(".sock")), "exit_file": os.fspath(base.with_suffix(".exit")),
            "buffer_bytes": self.buffer_bytes, "linger": self.linger,
        }
        spec_file = base.with_suffix(".json")
        spec_file.write_text(json.dumps(spec))
        os.chmod(spec_file, 0o600)
        with open(base.with_suffix(".log"), "ab") as errlog:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "spt.core.hosting.host", os.fspath(spec_file),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=errlog,
                start_new_session=True, close_fds=True,
            )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
            pids = json.loads(line)
        except (TimeoutError, ValueError) as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise Refusal("RUN_FAILED", perch.id, f"the host process did not start; see {base.with_suffix('.log')}") from exc
        run = _Run(perch.id, int(pids["pid"]), int(pids["host_pid"]), base.with_suffix(".sock"))
        with self.store.transaction() as db:
            db.execute("UPDATE hosted SET pid=?, host_pid=?, exit=NULL WHERE perch=?", (run.pid, run.host_pid, perch.id))
        old = self.runs.get(perch.key)
        if old is not None and old.watcher is not None:
            old.watcher.cancel()
        self.runs[perch.key] = run
        run.watcher = asyncio.get_running_loop().create_task(self._watch(run))
        log.info("hosted process started", extra={"perch": perch.id, "pid": run.pid, "host_pid": run.host_pid})
        eps = self.daemon.endpoints
        fresh = eps.get(perch.id)
        if fresh is not None:
            eps._changed(fresh)
        return run

    # -- signals: suspend, wake, purge ----------------------------------------------------------

    async def _signal(self, run: _Run, sig: int) -> None:
        try:
            status = await self._ask(run.socket, {"t": "signal", "sig": int(sig)})
        except (OSError, WireError, TimeoutError):
            status = None
        if status is None and run.exit is None:  # the host is gone; the pid is still ours to end
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.pid, sig)

    async def rest(self, perch: Perch, *, warm: bool, grace: float) -> None:
        """§4.6: SIGSTOP (warm), or SIGTERM, `grace` seconds, SIGKILL. Nothing when not running."""
        run = self.runs.get(perch.key)
        if run is None or run.exit is not None:
            return
        if warm:
            await self._signal(run, signal.SIGSTOP)
            run.stopped = True
            return
        await self._end(run, grace)

    async def _end(self, run: _Run, grace: float) -> None:
        await self._signal(run, signal.SIGCONT)  # a stopped group cannot act on SIGTERM
        await self._signal(run, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.ended.wait(), max(0.0, grace))
        if not run.ended.is_set():
            await self._signal(run, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.ended.wait(), KILL_WAIT)

    async def wake(self, perch: Perch) -> None:
        """SIGCONT for a paused run, else the remembered command in a fresh PTY."""
        run = self.runs.get(perch.key)
        if run is not None and run.exit is None:
            if run.stopped:
                await self._signal(run, signal.SIGCONT)
                run.stopped = False
            return
        if self._row(perch.id) is not None:
            await self.spawn(perch)

    async def stop_for_purge(self, perch: Perch) -> None:
        """`endpoint purge`: the hosted process ends first, then its files go."""
        run = self.runs.get(perch.key)
        if run is not None and run.exit is None:
            await self._end(run, PURGE_GRACE)
        if run is not None and run.watcher is not None:
            run.watcher.cancel()
        self.runs.pop(perch.key, None)
        base = self._base(perch.id)
        for suffix in (".sock", ".json", ".exit", ".log"):
            with contextlib.suppress(FileNotFoundError):
                base.with_suffix(suffix).unlink()

    # -- viewers (the rc plugin, through NodeRuntime) --------------------------------------------

    async def attach(self, perch_id: str, hello: Mapping[str, Any]) -> HostedTerminal:
        """A viewer connection to the perch's host process. A run that ended and whose host is
        gone raises Refusal RC_ENDED with `exit=<n>`; a perch that is not hosted, NOT_HOSTED; one
        the caller may not use (system mode: another uid's), NO_PERCH."""
        if self.daemon.endpoints.get(perch_id) is None:
            raise Refusal("NO_PERCH", perch_id)
        row = self._row(perch_id)
        if row is None:
            raise Refusal("NOT_HOSTED", perch_id, "this endpoint is not hosted")
        sock = self._base(perch_id).with_suffix(".sock")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(os.fspath(sock)), 3.0)
        except (OSError, TimeoutError) as exc:
            if self.alive(perch_id):
                raise Refusal("NOT_HOSTED", perch_id, "the hosted process does not answer") from exc
            code = row["exit"] if row["exit"] is not None else -1
            raise Refusal("RC_ENDED", perch_id, f"exit={code}") from exc
        writer.write(encode({**hello, "t": "attach"}))
        await writer.drain()
        return HostedTerminal(reader, writer)


def register_ops(daemon: Daemon, hosting: Hosting) -> None:
    @daemon.op("endpoint.run")
    async def run(call: Call) -> Any:
        return await hosting.run_op(call)
