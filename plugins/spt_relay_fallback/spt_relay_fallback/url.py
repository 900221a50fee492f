"""Relay URLs: `spt-relay://[<token>@]<host>:<port>#<relay key hex>` (SPEC.md §7.6).

The key after `#` is pinned: a node talks only to a relay that proves that key. The optional
`<token>@` carries the access token of a relay started with `--token` (our design).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

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
        return cls(parts.hostname, port or DEFAULT_PORT, key, token)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.token}@" if self.token else ""
        return f"{SCHEME}://{user}{host}:{self.port}#{self.key.hex}"

    @property
    def public(self) -> str:
        """The URL without the access token, for display and logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{SCHEME}://{host}:{self.port}#{self.key.hex}"


TOKEN_EXPORTER_LABEL: Final = b"EXPORTER-spt-relay-token"


def token_proof(token: str, conn: Any) -> bytes:
    """Proof of knowing a relay's access token on one connection, without sending the token:
    HMAC-SHA256 keyed with the token over the connection's TLS exporter value, which only the
    two ends of this connection can compute (both sides call this)."""
    challenge = conn.export_keying_material(TOKEN_EXPORTER_LABEL, 32)
    return hmac.new(token.encode("utf-8"), challenge, hashlib.sha256).digest()
