"""Where a node keeps its state, and its `config.toml` (SPEC.md §3.11).

`StatePaths` names every file in the state folder; `NodeConfig` is the parsed, validated config.
Unknown keys in spt's own sections are errors naming the key; sections spt does not know belong
to plugins and are handed to them as they are.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from spt.core.errors import ConfigError
from spt.core.types import check_label

DEFAULT_PORT: Final = 47470
SOCKET_PATH_MAX: Final = 107  # sun_path holds 108 bytes including the NUL


@dataclass(frozen=True, slots=True)
class StatePaths:
    """The files of one node's state folder."""

    root: Path

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None) -> StatePaths:
        """`SPT_HOME` when set, else the platform's per-user data folder."""
        env = os.environ if env is None else env
        home = env.get("SPT_HOME")
        if home:
            return cls(Path(home).expanduser().absolute())
        import platformdirs

        return cls(Path(platformdirs.user_data_dir("spt", appauthor=False)))

    @property
    def key_file(self) -> Path:
        return self.root / "node.key"

    @property
    def db_file(self) -> Path:
        return self.root / "spt.db"

    @property
    def socket(self) -> Path:
        return self.root / "spt.sock"

    @property
    def log_file(self) -> Path:
        return self.root / "daemon.log"

    @property
    def lock_file(self) -> Path:
        return self.root / "daemon.lock"

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def endpoints(self) -> Path:
        return self.root / "endpoints"

    def ensure(self) -> None:
        """Create the folder, private to its owner (it holds the key and the store)."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if len(os.fsencode(self.socket)) > SOCKET_PATH_MAX:
            raise ConfigError(
                str(self.root),
                f"the state folder path is too long for a control socket ({SOCKET_PATH_MAX} bytes); "
                "choose a shorter SPT_HOME",
            )


_KNOWN: Final[dict[str, set[str]]] = {
    "node": {"label"},
    "net": {"port", "static_peers", "punch_prime_ttl", "bind"},
    "discovery": {"mdns", "mdns_interfaces"},
    "relay": {"urls"},
    "notifications": {"command"},
    "file": {"max_transfer_bytes", "max_concurrent_per_peer", "inbox_quota_bytes"},
    "spool": {"max_bytes"},
    "rc": {"buffer_bytes"},
    "update": {"source", "check"},
    "join": {"max_failures", "lockout_seconds"},
    "plugins": {"disabled"},
    "timing": {"presence_interval", "offline_after", "idle_timeout"},
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
        raw=raw,
    )


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
