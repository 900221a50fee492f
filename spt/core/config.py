"""A node's `config.toml` (SPEC.md §3.11): `NodeConfig`, the parsed and validated config.
Unknown keys in spt's own sections are errors naming the key; sections spt does not know belong
to plugins and are handed to them as they are.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from spt.core.errors import ConfigError
from spt.core.paths import StatePaths
from spt.core.types import check_label

DEFAULT_PORT: Final = 47470


_KNOWN: Final[dict[str, set[str]]] = {
    "node": {"label"},
    "net": {"port", "static_peers", "punch_prime_ttl", "bind"},
    "discovery": {"mdns", "mdns_interfaces"},
    "relay": {"urls"},
    "notifications": {"command"},
    "file": {"max_transfer_bytes", "max_concurrent_per_peer", "inbox_quota_bytes"},
    "spool": {"max_bytes"},
    "rc": {"buffer_bytes"},
    "update": {"source", "check", "root", "check_interval", "peer_interval"},
    "join": {"max_failures", "lockout_seconds"},
    "plugins": {"disabled"},
    "timing": {"presence_interval", "offline_after", "idle_timeout", "anti_entropy"},
    "daemon": {"socket_group"},
}


@dataclass(frozen=True, slots=True)
class NodeConfig:
    label: str | None = None  # the default label; `spt node label set` overrides it
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    static_peers: tuple[str, ...] = ()
    punch_prime_ttl: int = 2
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] | None = None  # None means all interfaces
    relay_urls: tuple[str, ...] = ()
    notifications_command: str | None = None
    spool_max_bytes: int = 256 * 1024 * 1024
    join_max_failures: int = 10
    join_lockout_seconds: int = 3600
    disabled_plugins: tuple[str, ...] = ()
    presence_interval: float = 30.0
    offline_after: float = 90.0
    idle_timeout: float = 60.0
    socket_group: str | None = None  # system mode (SPEC.md §5.7): the group the socket opens to
    raw: Mapping[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> Mapping[str, Any]:
        value = self.raw.get(name, {})
        return value if isinstance(value, dict) else {}


def _get(raw: Mapping[str, Any], section: str, key: str, kind: type, default: Any) -> Any:
    value = raw.get(section, {}).get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{section}.{key}", f"expected {kind.__name__}, got {value!r}")
    return value


def _str_list(raw: Mapping[str, Any], section: str, key: str) -> tuple[str, ...]:
    value = raw.get(section, {}).get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{section}.{key}", f"expected a list of strings, got {value!r}")
    return tuple(value)


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> NodeConfig:
    """Validate a parsed `config.toml`, then apply environment overrides (`SPT_PORT`)."""
    env = os.environ if env is None else env
    for section, keys in _KNOWN.items():
        body = raw.get(section, {})
        if not isinstance(body, dict):
            raise ConfigError(section, f"[{section}] must be a table")
        unknown = set(body) - keys
        if unknown:
            raise ConfigError(f"{section}.{sorted(unknown)[0]}", f"unknown key; known keys: {', '.join(sorted(keys))}")
    port = _get(raw, "net", "port", int, DEFAULT_PORT)
    if "SPT_PORT" in env:
        try:
            port = int(env["SPT_PORT"])
        except ValueError:
            raise ConfigError("SPT_PORT", f"expected a port number, got {env['SPT_PORT']!r}") from None
    if not 0 <= port < 65536:
        raise ConfigError("net.port", f"port {port} is out of range 0–65535")
    interfaces = raw.get("discovery", {}).get("mdns_interfaces", "all")
    if interfaces == "all":
        mdns_interfaces: tuple[str, ...] | None = None
    else:
        mdns_interfaces = _str_list(raw, "discovery", "mdns_interfaces")
    max_failures = _get(raw, "join", "max_failures", int, 10)
    lockout = _get(raw, "join", "lockout_seconds", int, 3600)
    if max_failures < 1 or lockout < 1:
        raise ConfigError("join", "max_failures and lockout_seconds must be positive")
    label = raw.get("node", {}).get("label")
    if label is not None:
        check_label(str(label))
    return NodeConfig(
        label=label,
        port=port,
        bind=_get(raw, "net", "bind", str, "0.0.0.0"),
        static_peers=_str_list(raw, "net", "static_peers"),
        punch_prime_ttl=_get(raw, "net", "punch_prime_ttl", int, 2),
        mdns=_get(raw, "discovery", "mdns", bool, True),
        mdns_interfaces=mdns_interfaces,
        relay_urls=_str_list(raw, "relay", "urls"),
        notifications_command=raw.get("notifications", {}).get("command"),
        spool_max_bytes=_get(raw, "spool", "max_bytes", int, 256 * 1024 * 1024),
        join_max_failures=max_failures,
        join_lockout_seconds=lockout,
        disabled_plugins=_str_list(raw, "plugins", "disabled"),
        presence_interval=_get(raw, "timing", "presence_interval", float, 30.0),
        offline_after=_get(raw, "timing", "offline_after", float, 90.0),
        idle_timeout=_get(raw, "timing", "idle_timeout", float, 60.0),
        socket_group=_socket_group(raw),
        raw=raw,
    )


def _socket_group(raw: Mapping[str, Any]) -> str | None:
    value = raw.get("daemon", {}).get("socket_group")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise ConfigError("daemon.socket_group", "a group name or number (system mode)")
    return str(value)


def load_config(paths: StatePaths, env: Mapping[str, str] | None = None) -> NodeConfig:
    """Read `config.toml` (absent means defaults); a syntax error names the file and line."""
    try:
        text = paths.config_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return parse_config({}, env)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(paths.config_file), f"is not valid TOML: {exc}") from exc
    return parse_config(raw, env)
