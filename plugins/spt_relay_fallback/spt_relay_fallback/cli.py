"""`spt relay serve | add | remove | list` (SPEC.md §3.9).

`serve` runs a relay in the foreground; it needs no node daemon. `add` and `remove` edit
`relay.urls` in this node's config.toml (and the local deny list, `sources.py`) and tell a
running daemon to follow; `list` shows the relays in use, where each came from, their
reachability, reflexive address and NAT mapping behaviour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from spt.cli._output import emit, out, print_json
from spt.cli._state import state
from spt.core.paths import StatePaths


@click.group(epilog="\b\nExamples:\n  spt relay serve --listen 0.0.0.0:47471\n  spt relay add spt-relay://relay.example.net:47471#KEY\n  spt relay list\n")
def relay() -> None:
    """Run a relay, or choose the relays this node registers with."""


def _parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `HOST`; port 0 picks a free port (tests)."""
    import ipaddress

    from spt.core.errors import UsageError

    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "47471"
    try:
        ipaddress.ip_address(host.strip("[]"))
        number = int(port)
        if not 0 <= number < 65536:
            raise ValueError(f"port {number} is out of range")
    except ValueError as exc:
        raise UsageError("BAD_ADDRESS", text, f"--listen takes IP:PORT ({exc})") from None
    return host.strip("[]"), number


def _allow_list(path: str) -> list[Any]:
    from spt.core.errors import ConfigError
    from spt.core.identity import NodeId

    keys = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            keys.append(NodeId.from_hex(text))
        except Exception:
            raise ConfigError(f"{path}:{number}", f"expected a node key (64 hex), got {text!r}") from None
    return keys


def _public_host(host: str) -> str:
    """What to print in the URL for a wildcard listen address: the address of the default route."""
    if host not in ("0.0.0.0", ""):
        return host
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source address
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


@relay.command()
@click.option("--listen", default="0.0.0.0:47471", show_default=True, help="UDP HOST:PORT to serve on.")
@click.option("--key-file", type=click.Path(dir_okay=False), help="The relay's key (made 0600 if absent).")
@click.option("--allow", "allow_file", type=click.Path(exists=True, dir_okay=False), help="Only these node keys (one hex key a line).")
@click.option("--token", help="Nodes must present this token (in the URL: spt-relay://TOKEN@host:port#key).")
@click.option("--max-nodes", type=click.IntRange(1), default=1024, show_default=True)
@click.option(
    "--rate", type=click.IntRange(0), default=4 * 1024 * 1024, show_default=True,
    help="Bytes per second each node may send through the relay (0: no cap).",
)
@click.option("--tcp-listen", help="TCP HOST:PORT for the TLS listener (bulk transit); off by default.")
def serve(
    listen: str, key_file: str | None, allow_file: str | None, token: str | None, max_nodes: int, rate: int,
    tcp_listen: str | None,
) -> None:
    """Serve as a relay (foreground): forwarding, reflexive addresses and rendezvous."""
    import asyncio
    import signal

    from spt.core.daemon import configure_logging
    from spt.core.store import load_or_create_key
    from spt_relay_fallback.server import RelayServer

    host, port = _parse_listen(listen)
    tcp = _parse_listen(tcp_listen) if tcp_listen else None
    allow = _allow_list(allow_file) if allow_file else None
    path = Path(key_file) if key_file else StatePaths.resolve().root / "relay.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    key, _ = load_or_create_key(path)
    configure_logging()

    async def run() -> None:
        server = RelayServer(
            key, host=host, port=port, allow=allow, token=token, rate=rate, max_nodes=max_nodes, tcp_listen=tcp,
        )
        await server.start()
        emit("RELAY_LISTENING", str(server.url(_public_host(host))))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.close()

    asyncio.run(run())


def _tell_daemon() -> dict[str, Any] | None:
    """Ask a running daemon to re-read the relay list; None when no daemon runs."""
    from spt.core.errors import DaemonDown
    from spt.core.ipc import call, connect

    try:
        conn = connect(StatePaths.resolve().socket)
    except DaemonDown:
        return None
    try:
        result = call(conn, "relay.sync")
    finally:
        conn.close()
    return result if isinstance(result, dict) else None


@relay.command()
@click.argument("url")
def add(url: str) -> None:
    """Register with the relay at URL (spt-relay://HOST:PORT#KEY) from now on, and announce it to
    this node's subnets so their other members use it too."""
    from spt_relay_fallback.config import read_urls, write_urls
    from spt_relay_fallback.sources import read_removed, write_removed
    from spt_relay_fallback.url import RelayUrl

    parsed = RelayUrl.parse(url)
    paths = StatePaths.resolve()
    urls = read_urls(paths.config_file) or []
    if str(parsed) not in urls:
        urls = [u for u in urls if RelayUrl.parse(u).public != parsed.public] + [str(parsed)]
        write_urls(paths.config_file, urls)
    removed = read_removed(paths.root)
    if parsed.public in removed:
        write_removed(paths.root, removed - {parsed.public})
    _tell_daemon()
    emit("RELAY_ADDED", parsed.public)


@relay.command()
@click.argument("url")
def remove(url: str) -> None:
    """Stop using the relay at URL, wherever it came from; one the subnet or the build offers
    stays removed on this node (a local deny list) until `spt relay add` brings it back."""
    from spt.core.errors import Refusal
    from spt_relay_fallback.config import read_urls, write_urls
    from spt_relay_fallback.sources import build_defaults, read_removed, write_removed
    from spt_relay_fallback.url import RelayUrl

    parsed = RelayUrl.parse(url)
    paths = StatePaths.resolve()
    urls = read_urls(paths.config_file) or []
    kept = [u for u in urls if RelayUrl.parse(u).public != parsed.public]
    # offered by the subnet or the build (not only by this node's own config)
    offered = {u.public for u in build_defaults()} | {r["url"] for r in _daemon_relays() if r["source"] != "local"}
    removed = read_removed(paths.root)
    in_config = len(kept) != len(urls)
    if not in_config and (parsed.public not in offered or parsed.public in removed):
        raise Refusal("NOT_CONFIGURED", parsed.public, "this node does not use that relay")
    if in_config:
        write_urls(paths.config_file, kept)
    if parsed.public in offered:
        write_removed(paths.root, removed | {parsed.public})
    _tell_daemon()
    emit("RELAY_REMOVED", parsed.public)


def _daemon_relays() -> list[dict[str, Any]]:
    """The relays a running daemon reports (empty when none runs)."""
    from spt.core.errors import DaemonDown
    from spt.core.ipc import call, connect

    try:
        conn = connect(StatePaths.resolve().socket)
    except DaemonDown:
        return []
    try:
        return list(call(conn, "relay.list")["relays"])
    finally:
        conn.close()


@relay.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """The relays this node uses, where each came from (local, subnet, default), whether it is
    reachable, and this node's address as it sees it."""
    from spt.core.errors import DaemonDown
    from spt.core.ipc import call, connect
    from spt_relay_fallback.config import read_urls
    from spt_relay_fallback.sources import build_defaults, read_removed
    from spt_relay_fallback.url import RelayUrl

    relays: list[dict[str, Any]]
    try:
        conn = connect(StatePaths.resolve().socket)
    except DaemonDown:
        paths = StatePaths.resolve()
        removed = read_removed(paths.root)
        local = [RelayUrl.parse(u) for u in read_urls(paths.config_file) or []]
        relays = [
            {"url": u.public, "source": source,
             "state": "removed locally" if source != "local" and u.public in removed else "daemon not running",
             "reachable": None, "reflexive": None, "mapping": None}
            for source, urls in (("local", local), ("default", build_defaults()))
            for u in urls
        ]
    else:
        try:
            relays = list(call(conn, "relay.list")["relays"])
        finally:
            conn.close()
    if as_json or state(ctx).json:
        print_json({"relays": relays})
        return
    if not relays:
        out("(no relays: add one with spt relay add URL, or join a subnet whose members use one)")
    for r in relays:
        out(f"{r['url']}  {r['source']}  {r['state']}  reflexive={r['reflexive'] or '-'}  mapping={r['mapping'] or '-'}")
