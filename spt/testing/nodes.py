"""Real spt nodes for tests and the demo: one daemon process per temporary `SPT_HOME`.

Each node binds loopback only, on a free port, with mDNS off, so nothing leaves the machine.
The factory stops exactly the processes it started, by pid, and removes their folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from spt.core.identity import NodeId, NodeKey
    from spt.core.net.transport import Transport
    from spt.core.proto.membership import MembershipLog
    from spt.testing.netns import Lab

DEFAULT_CONFIG = """\
[net]
port = 0
bind = "127.0.0.1"

[discovery]
mdns = false
"""


ELEVATED_COMMANDS: Final = (
    ("subnet", "create"), ("subnet", "join"), ("subnet", "show-code"), ("subnet", "leave"), ("subnet", "prune"),
    ("subnet", "unlock"), ("node", "trust", "accept"), ("node", "rekey"), ("update", "apply"), ("update", "auto"),
)


def skip_unless_root(args: Sequence[str]) -> None:
    """Skip the running test when `args` is an elevated command and this is not root (SPEC §5.7)."""
    if os.geteuid() == 0 or "PYTEST_CURRENT_TEST" not in os.environ:
        return
    words = tuple(a for a in args if not a.startswith("-"))
    if any(words[: len(cmd)] == cmd for cmd in ELEVATED_COMMANDS):
        import pytest

        from spt.testing.required import NOT_ROOT

        pytest.skip(NOT_ROOT)


def stop_all(nodes: Sequence[Node], sig: int = signal.SIGTERM) -> None:
    """Signal every running daemon first, then wait for each (10 s, then SIGKILL): their
    shutdowns overlap, where one after the other a test's teardown waited for each in turn."""
    running = [n.proc for n in nodes if n.proc is not None and n.proc.poll() is None]
    for proc in running:
        proc.send_signal(sig)
    deadline = time.monotonic() + 10
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


class Node:
    """One node: its state folder, environment, and daemon process once started."""

    def __init__(self, name: str, home: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.home = home
        self.env = dict(env)
        self.proc: subprocess.Popen[bytes] | None = None
        # how the daemon is started; tests may put a fault point in front (spt.testing.skew)
        self.daemon_argv: list[str] = [sys.executable, "-m", "spt", "daemon", "run"]

    def cli(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `spt ARGS…` as this node; returns the completed process (text mode).

        Under pytest as a normal user, an elevated command (subnet create, join…) skips the test
        with the one root-only reason (`spt.testing.required`): it could only be refused.
        """
        skip_unless_root(args)
        result = subprocess.run(
            [sys.executable, "-m", "spt", *args],
            input=input,
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"spt {' '.join(args)} exited {result.returncode}: {result.stderr}{result.stdout}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.cli("--json", *args, check=True).stdout)

    def ipc(self, op: str, args: Mapping[str, Any] | None = None, *, timeout: float = 60.0,
            on_event: Callable[[dict[str, Any]], None] | None = None) -> Any:
        """One control-socket call from this process (no CLI start-up): its result, or the
        daemon's refusal raised as an SptError (DaemonDown when nothing listens). Envelopes
        streamed to it (a ring's reply) go to `on_event` and are acknowledged after it returns,
        as the CLI does once it has flushed them."""
        from spt.core.ipc import call, connect

        conn = connect(self.home / "spt.sock")

        def handle(event: dict[str, Any]) -> None:
            if on_event is not None:
                on_event(event)
            if event.get("last") and "msg" in event:
                conn.send({"ack": event["msg"]})

        try:
            return call(conn, op, args, timeout=timeout, on_event=handle)
        finally:
            conn.close()

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start `spt ARGS…` in the background (for `spt ready`); the caller waits or kills it."""
        return subprocess.Popen(
            [sys.executable, "-m", "spt", *args],
            env=self.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
        )

    def start(self, timeout: float = 15.0) -> None:
        """Start the daemon in the foreground of a child process and wait for its socket."""
        log = open(self.home / "daemon.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            self.daemon_argv, env=self.env, stdout=log, stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        sock = self.home / "spt.sock"
        while time.monotonic() < deadline:
            if sock.exists() and self.cli("daemon", "status", env={"SPT_NO_AUTOSTART": "1"}).returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"node {self.name} did not start:\n{self.log()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        stop_all([self], sig)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def log(self) -> str:
        try:
            return (self.home / "daemon.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_listed(self, endpoint_id: str, timeout: float = 15.0) -> None:
        """Wait until `endpoint_id` shows in this node's `endpoint list` (rows replicate)."""
        from spt.testing.traffic import listed  # traffic imports this module
        from spt.testing.wait import wait_for

        wait_for(lambda: listed(self, endpoint_id), timeout, f"{endpoint_id} in {self.name}'s endpoint list", every=0.05)

    @property
    def key(self) -> str:
        return str(self.json("node", "show")["key"])

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`, what `--peer` on another node takes."""
        return str(next(a for a in self.json("node", "show")["addresses"] if a.startswith("127.")))


LAB_CONFIG = """\
[net]
port = 47470

[discovery]
mdns = false

[timing]
presence_interval = {presence}
offline_after = {offline}
idle_timeout = {idle}
"""


class LabNode(Node):
    """A node whose daemon runs inside a netns lab host; the CLI and `ipc()` reach it from here
    over its Unix socket (a path in the file system, which namespaces do not separate)."""

    def __init__(self, lab: Lab, host: str, name: str, home: Path, env: Mapping[str, str]) -> None:
        super().__init__(name, home, env)
        self.lab = lab
        self.host = host

    def start(self, timeout: float = 15.0) -> None:
        with open(self.home / "daemon.log", "ab") as log:
            self.proc = self.lab.popen(
                self.host, [sys.executable, "-m", "spt", "daemon", "run"], env=self.env,
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # "daemon started" is logged once discovery is up as well
            if "daemon started" in self.log() and self.cli("daemon", "status").returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"node {self.name} did not start in {self.host}:\n{self.log()}")

    @property
    def lab_address(self) -> str:
        """`ADDR:47470` of this node inside the lab (what `--peer` takes on its LAN)."""
        return f"{self.lab.addr(self.host)}:{_config_port(self.home)}"

    def members(self) -> list[dict[str, Any]]:
        doc = self.json("subnet", "status", "--nodes")
        return [m for s in doc["subnets"] for m in s.get("members", []) if not m["self"]]

    def path(self) -> dict[str, Any] | None:
        """The path to the one other member (None before the join has settled)."""
        others = self.members()
        return others[0]["path"] if len(others) == 1 else None


def _config_port(home: Path) -> int:
    import tomllib

    return int(tomllib.loads((home / "config.toml").read_text()).get("net", {}).get("port", 47470))


class LabNodes:
    """Makes `LabNode`s in hosts of a lab, each with its own short state folder; `close()` stops
    exactly the daemons it started."""

    def __init__(self, lab: Lab, *, presence: float = 0.5, offline: float = 3.0, config: str = "") -> None:
        self.lab = lab
        # the defaults' proportions (30 / 90 / 60 s): a silent connection closes before the TTL
        self.config = LAB_CONFIG.format(presence=presence, offline=offline, idle=offline * 2 / 3) + config
        self.nodes: list[LabNode] = []
        self.root = Path(tempfile.mkdtemp(prefix="spt-l-"))

    def __call__(self, host: str, label: str | None = None, *, config: str = "",
                 env: Mapping[str, str] | None = None, start: bool = True) -> LabNode:
        label = label or host
        home = self.root / label
        home.mkdir(mode=0o700)
        (home / "config.toml").write_text(f'[node]\nlabel = "{label}"\n\n' + self.config + config)
        node_env = {k: v for k, v in os.environ.items() if not k.startswith("SPT_")}
        node_env.update({"SPT_HOME": str(home), "SPT_NO_AUTOSTART": "1", "SPT_NO_SUDO": "1"})
        node_env.update(env or {})
        node = LabNode(self.lab, host, label, home, node_env)
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def subnet(self, hosts: Sequence[str], name: str = "home") -> list[LabNode]:
        """Nodes on `hosts` in one subnet: the first creates it, the rest join it by code
        through its lab address (static peer)."""
        nodes = [self(h) for h in hosts]
        nodes[0].cli("subnet", "create", name, check=True)
        for node in nodes[1:]:
            node.cli("subnet", "join", name, "--code", fresh_code(nodes[0], name), "--peer",
                     nodes[0].lab_address, "--timeout", "20", check=True)
        return nodes

    def close(self) -> None:
        stop_all(self.nodes)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def relay_server(home: Path, *, tcp: bool = False) -> Iterator[str]:
    """`spt relay serve` (the relay plugin's) on a free loopback port, with a TCP listener on
    another when `tcp`, its state in `home`: its URL while the block runs, then stopped."""
    listen = ["--listen", "127.0.0.1:0", *(["--tcp-listen", "127.0.0.1:0"] if tcp else [])]
    proc = subprocess.Popen(
        [sys.executable, "-m", "spt", "relay", "serve", *listen, "--key-file", str(home / "relay.key")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        env={"SPT_HOME": str(home), "PATH": ""},
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline().strip() if ready else ""
        assert line.startswith("RELAY_LISTENING:spt-relay://127.0.0.1:"), line
        yield line.split(":", 1)[1]
    finally:
        proc.terminate()
        proc.wait(10)


def fresh_code(member: Node, name: str, *, margin: float = 3.0) -> str:
    """The current join code from `member`, waiting for the next 30-second step when fewer than
    `margin` seconds are left, so that a join typed right after is not caught by the change."""
    for _ in range(3):
        line = member.cli("subnet", "show-code", name, "--no-qr", check=True).stdout.splitlines()[0]
        _, code, left = line.split()  # CODE:<name> <dddddd> <n>s
        if int(left.rstrip("s")) >= margin:
            return code
        time.sleep(int(left.rstrip("s")) + 0.2)
    raise AssertionError("could not read a fresh join code")


class NodeFactory:
    """Makes nodes in short temporary folders (a Unix socket path holds at most 107 bytes)."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self._root = Path(tempfile.mkdtemp(prefix="spt-t-"))

    def __call__(
        self, name: str = "", *, start: bool = True, config: str = DEFAULT_CONFIG, label: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Node:
        name = name or f"n{len(self.nodes)}"
        home = self._root / name
        home.mkdir(mode=0o700)
        (home / "config.toml").write_text(config + (f'\n[node]\nlabel = "{label}"\n' if label else ""))
        node_env = {k: v for k, v in os.environ.items() if not k.startswith("SPT_")}
        node_env.update({"SPT_HOME": str(home), "SPT_NO_AUTOSTART": "1", "SPT_NO_SUDO": "1"})
        node_env.update(env or {})
        node = Node(name, home, node_env)
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def many(self, names: Sequence[str]) -> list[Node]:
        return [self(n) for n in names]

    def subnet(
        self, labels: Sequence[str], name: str = "home", *, config: str = DEFAULT_CONFIG,
        env: Mapping[str, str] | None = None,
    ) -> list[Node]:
        """Nodes labelled `labels` in one subnet: the first creates it, the rest join it by code
        through the first node's address (static peer, no mDNS)."""
        nodes = [self(label, label=label, config=config, env=env) for label in labels]
        nodes[0].cli("subnet", "create", name, check=True)
        for node in nodes[1:]:
            node.cli("subnet", "join", name, "--code", fresh_code(nodes[0], name), "--peer", nodes[0].address, check=True)
        return nodes

    def close(self) -> None:
        stop_all(self.nodes)
        shutil.rmtree(self._root, ignore_errors=True)


@contextlib.asynccontextmanager
async def _throwaway_transport(key: NodeKey | Node) -> AsyncIterator[Transport]:
    """A transport with `key` (a node's: its key file) on a fresh loopback socket, closed after."""
    from spt.core.net.transport import AllowKeys, Transport
    from spt.core.store import load_or_create_key

    if isinstance(key, Node):
        key, _ = load_or_create_key(key.home / "node.key")
    transport = Transport(key, host="127.0.0.1", port=0, accept=AllowKeys())
    await transport.start()
    try:
        yield transport
    finally:
        await transport.close()


def _target(node: Node) -> tuple[NodeId, list[tuple[str, int]]]:
    from spt.core.identity import NodeId

    host, port = node.address.rsplit(":", 1)
    return NodeId.from_hex(node.key), [(host, int(port))]


async def dial_as_member(key: NodeKey | Node, target: Node) -> str:
    """Dial `target` on the member ALPN with `key` (a node's: its key file) from a throwaway
    socket: the refusal `target` gave, or "accepted: <why it closed>" if it let the key in."""
    import asyncio

    from spt.core.net.transport import HandshakeRefusedError

    async with _throwaway_transport(key) as transport:
        try:
            conn = await transport.connect(*_target(target), timeout=5)
        except HandshakeRefusedError as exc:
            return str(exc)
        return "accepted: " + await asyncio.wait_for(conn.wait_closed(), 5)


async def request_as_member(attacker: Node, target: Node, type_name: str, body: Any) -> Any:
    """One request to `target` on the member ALPN with `attacker`'s key, from a throwaway socket:
    the reply body (a refusal raises RequestError)."""
    async with _throwaway_transport(attacker) as transport:
        conn = await transport.connect(*_target(target), timeout=5)
        return (await conn.request(type_name, body, timeout=10)).body


def stored_log(node: Node) -> MembershipLog:
    """The membership log of `node`'s one subnet as its store holds it (what a restart loads),
    read without disturbing the running daemon."""
    import sqlite3

    from spt.core.proto.membership import Entry, MembershipLog

    con = sqlite3.connect(f"file:{node.home / 'spt.db'}?mode=ro", uri=True, timeout=5)
    try:
        (sid,) = con.execute("SELECT id FROM subnets").fetchone()
        rows = con.execute("SELECT data FROM log_entries WHERE subnet=?", (sid,)).fetchall()
    finally:
        con.close()
    return MembershipLog.from_entries(bytes(sid), [Entry.from_bytes(bytes(r[0])) for r in rows], stored=True)


def installed_plugin(site: Path, name: str, modules: Mapping[str, str], *, version: str = "1.0") -> Path:
    """A real installed distribution in the folder `site` (put it on PYTHONPATH): package
    `spt_<name>` holding `modules` (file name -> source), registered as spt plugin `name` by an
    entry point to its module `plugin`. Returns `site`."""
    pkg = site / f"spt_{name}"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for filename, source in modules.items():
        (pkg / filename).write_text(source)
    info = site / f"spt_{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: spt-{name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[spt.plugins]\n{name} = spt_{name}.plugin\n")
    (info / "top_level.txt").write_text(f"spt_{name}\n")
    (info / "RECORD").write_text("")
    return site
