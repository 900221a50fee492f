"""The joining secret: TOTP seeds and codes (RFC 6238), their URI, and seed commitments. Pure.

What lives here: `Secret`, the wrapper every seed, code and URI travels in so that no repr, str,
f-string or log line can show it; `new_seed`, `code_at`, `step_of`, `seconds_left`, `otpauth_uri`
(SPEC.md §5.1) and `seed_commitment` (§6.1, the value the log carries instead of the seed).

What must not: reading a clock or drawing randomness. Wall time arrives as seconds since the epoch
and the seed's 20 random bytes arrive as an argument.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from typing import Any, Final, Generic, TypeVar
from urllib.parse import quote

from spt.core.errors import LocalProtocolError
from spt.core.identity import sha256

__all__ = [
    "DIGITS",
    "SEED_BYTES",
    "STEP_SECONDS",
    "Secret",
    "code_at",
    "new_seed",
    "otpauth_uri",
    "seconds_left",
    "seed_commitment",
    "step_of",
]

SEED_BYTES: Final = 20
STEP_SECONDS: Final = 30
DIGITS: Final = 6
_SEED_DOMAIN: Final = b"spt/seed/v1"

T = TypeVar("T", bytes, str)


class Secret(Generic[T]):
    """A secret value (seed, code, otpauth URI, session key). Only `reveal()` gives it out.

    repr and str are redacted, so an accidental log line or exception message shows
    `<secret>`. Equality is constant-time; secrets are not hashable, so they never become keys.
    """

    __slots__ = ("_value",)
    _value: T

    def __init__(self, value: T) -> None:
        self._value = value

    def reveal(self) -> T:
        """The secret itself: only for the cryptography that needs it and the gated commands that show it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    def __str__(self) -> str:
        return "<secret>"

    def __format__(self, spec: str) -> str:
        return "<secret>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        a, b = self._value, other._value
        if isinstance(a, str) and isinstance(b, str):
            return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
        if isinstance(a, bytes) and isinstance(b, bytes):
            return hmac.compare_digest(a, b)
        return False

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> str | tuple[Any, ...]:
        # Pickling would copy the secret somewhere nobody audits.
        raise TypeError("a Secret cannot be pickled")


def new_seed(rand: bytes) -> Secret[bytes]:
    """A TOTP seed from `rand`, which must be 20 bytes from a CSPRNG (the shell's os.urandom)."""
    if len(rand) != SEED_BYTES:
        raise LocalProtocolError("", f"a TOTP seed is {SEED_BYTES} random bytes, got {len(rand)}")
    return Secret(bytes(rand))


def step_of(wall_seconds: float) -> int:
    """The RFC 6238 time step of a wall-clock instant (T0 = 0, 30-second steps)."""
    return math.floor(wall_seconds / STEP_SECONDS)


def seconds_left(wall_seconds: float) -> int:
    """Whole seconds until the current code changes, 1 to 30, as printed in `CODE:<name> <code> <n>s`."""
    return STEP_SECONDS - math.floor(wall_seconds) % STEP_SECONDS


def code_at(seed: Secret[bytes], step: int, *, digits: int = DIGITS) -> Secret[str]:
    """The code for `step` (RFC 4226 HOTP over HMAC-SHA-1 with counter = step), zero-padded."""
    if step < 0:
        raise LocalProtocolError(str(step), "a TOTP step is never negative")
    mac = hmac.new(seed.reveal(), step.to_bytes(8, "big"), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
    return Secret(str(value % 10**digits).zfill(digits))


def otpauth_uri(subnet_name: str, seed: Secret[bytes]) -> Secret[str]:
    """`otpauth://totp/spt:<name>?secret=<BASE32>&issuer=spt`; it holds the seed, so it is a Secret."""
    secret = base64.b32encode(seed.reveal()).decode("ascii").rstrip("=")
    return Secret(f"otpauth://totp/spt:{quote(subnet_name, safe='')}?secret={secret}&issuer=spt")


def seed_commitment(create_nonce: bytes, epoch: int, seed: Secret[bytes]) -> bytes:
    """SHA-256("spt/seed/v1" ‖ create nonce ‖ u64 epoch ‖ seed): what the log says about a seed."""
    if epoch < 0:
        raise LocalProtocolError(str(epoch), "a seed epoch is never negative")
    return sha256(_SEED_DOMAIN, create_nonce, epoch.to_bytes(8, "big"), seed.reveal())
