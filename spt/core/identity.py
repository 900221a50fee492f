"""Node identity: Ed25519 keys, the node id, signatures and the display form. Pure.

The 32-byte public key *is* the node's identity (SPEC.md §2.1). `NodeKey` holds the private half
and never prints it; `NodeId` is the public half, used everywhere a node is named.

Ed25519 comes from `cryptography` rather than PyNaCl (DESIGN.md §2 names PyNaCl): the TLS
certificates need `cryptography` anyway, and one library for both keeps one code path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from spt.core.errors import IdentityError

KEY_BYTES: Final = 32
SHORT_HEX: Final = 8
ELLIPSIS: Final = "\u2026"


@dataclass(frozen=True, slots=True, order=True)
class NodeId:
    """A node's public key. Ordered by bytes, which decides the surviving dial (SPEC.md §7.2)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_BYTES:
            raise IdentityError(self.raw.hex(), f"a node key is {KEY_BYTES} bytes, got {len(self.raw)}")

    @classmethod
    def from_hex(cls, text: str) -> NodeId:
        try:
            raw = bytes.fromhex(text)
        except ValueError as exc:
            raise IdentityError(text, "a node key is 64 hex characters") from exc
        return cls(raw)

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @property
    def short(self) -> str:
        """The first 8 hex characters, as shown in logs and display forms."""
        return self.raw.hex()[:SHORT_HEX]

    @property
    def fingerprint(self) -> str:
        """The key as 16 groups of 4 hex characters, for reading aloud (`spt node show`)."""
        h = self.raw.hex()
        return " ".join(h[i : i + 4] for i in range(0, len(h), 4))

    def display(self, label: str) -> str:
        """`LABEL (xxxxxxxx…)`, the form every human view uses."""
        return f"{label} ({self.short}{ELLIPSIS})"

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when `signature` is this key's Ed25519 signature of `data`."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    def __repr__(self) -> str:
        return f"NodeId({self.short})"


class NodeKey:
    """A node's private key. Its repr never shows the secret half."""

    __slots__ = ("_private", "node_id")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.node_id = NodeId(public)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> NodeKey:
        if len(raw) != KEY_BYTES:
            raise IdentityError("", f"a private key file holds {KEY_BYTES} bytes, this one {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """The raw private key, for the 0600 key file only."""
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def crypto_key(self) -> Ed25519PrivateKey:
        """The `cryptography` object, for building the TLS certificate."""
        return self._private

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def __repr__(self) -> str:
        return f"NodeKey({self.node_id.short}, private=<redacted>)"


def sha256(*parts: bytes) -> bytes:
    """SHA-256 of the concatenated parts; the spec's `‖` is plain concatenation."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()
