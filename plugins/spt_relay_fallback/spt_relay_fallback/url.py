"""Relay URLs: `spt-relay://[<token>@]<host>:<port>[?tcp=<port>]#<relay key hex>` (SPEC.md §7.6).

The key after `#` is pinned: a node talks only to a relay that proves that key. The optional
`<token>@` carries the access token of a relay started with `--token` (our design). The optional
`?tcp=<port>` names the relay's TLS/TCP listener (`relay serve --tcp-listen`), which a node on a
network that blocks UDP must know before it can reach the relay at all (our design).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

from spt.core.errors import ConfigError
from spt.core.identity import NodeId

SCHEME: Final = "spt-relay"
DEFAULT_PORT: Final = 47471


@dataclass(frozen=True, slots=True)
class RelayUrl:
    host: str
    port: int
    key: NodeId
    token: str | None = None
    tcp_port: int | None = None

    @classmethod
    def parse(cls, text: str) -> RelayUrl:
        """Parse and check a relay URL; ConfigError names what is wrong and the expected form."""
        form = f"expected {SCHEME}://HOST:PORT#RELAYKEYHEX"
        # an access token may sit before '@': errors name the URL without it
        shown = text.strip()
        if "@" in shown.split("#")[0]:
            scheme, _, rest = shown.partition("://")
            shown = f"{scheme}://…@{rest.split('@', 1)[1]}"
        try:
            parts = urlsplit(text.strip())
            port = parts.port
        except ValueError as exc:
            raise ConfigError(shown, f"not a relay URL ({exc}); {form}") from None
        if parts.scheme != SCHEME:
            raise ConfigError(shown, f"a relay URL starts with {SCHEME}://; {form}")
        if not parts.hostname:
            raise ConfigError(shown, f"a relay URL names a host; {form}")
        try:
            key = NodeId.from_hex(parts.fragment)
        except Exception:
            raise ConfigError(shown, f"a relay URL ends with # and the relay's 64-hex key; {form}") from None
        token = unquote(parts.username) if parts.username else None
        tcp = parse_qs(parts.query).get("tcp", [None])[-1]
        if tcp is not None and not (tcp.isdigit() and 0 < int(tcp) < 65536):
            raise ConfigError(shown, f"?tcp= takes the relay's TCP port (1-65535); {form}")
        return cls(parts.hostname, port or DEFAULT_PORT, key, token, int(tcp) if tcp else None)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        user = f"{self.token}@" if self.token else ""
        return f"{SCHEME}://{user}{self._rest()}"

    @property
    def public(self) -> str:
        """The URL without the access token, for display and logs."""
        return f"{SCHEME}://{self._rest()}"

    def _rest(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        tcp = f"?tcp={self.tcp_port}" if self.tcp_port else ""
        return f"{host}:{self.port}{tcp}#{self.key.hex}"


TOKEN_EXPORTER_LABEL: Final = b"EXPORTER-spt-relay-token"


def token_proof(token: str, conn: Any) -> bytes:
    """Proof of knowing a relay's access token on one connection, without sending the token:
    HMAC-SHA256 keyed with the token over the connection's TLS exporter value, which only the
    two ends of this connection can compute (both sides call this)."""
    challenge = conn.export_keying_material(TOKEN_EXPORTER_LABEL, 32)
    return hmac.new(token.encode("utf-8"), challenge, hashlib.sha256).digest()
