"""Release trust (SPEC.md §8.8): the manifest, its signature, the trusted keys, and every check
that decides whether a release may be staged or applied. Pure: bytes and files in, a verified
`Release` or a `VerifyFailed` with its reason out.

A release is a canonical-JSON manifest (`manifest.json`, these exact bytes are what is signed and
hashed) and a signature document (`manifest.sig`: `{"key": <hex public key>, "sig": <hex>}`), the
Ed25519 signature over `"spt/release/v1"` ‖ the manifest bytes. The manifest names, per
platform, one artifact: a tar of wheels with its size and SHA-256.

The trusted set is two keys: the primary signs releases; the recovery key, kept offline, signs
only a release that names a new primary (`rotate_primary`). Once a node accepted such a release,
the old primary is revoked there for good (the node's own store keeps the rotation).

Every refusal has one reason word, printed as `VERIFY_FAILED:<reason>`; the test suite names each.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from spt.core.errors import Refusal
from spt.core.proto.canonical import canonical_bytes

DOMAIN: Final = b"spt/release/v1"
NAME: Final = "spt"
MAX_MANIFEST: Final = 64 * 1024
MAX_ARTIFACT: Final = 512 * 1024 * 1024
MAX_WHEELS: Final = 200
TEST_KEYS_ENV: Final = "SPT_UPDATE_TEST_KEYS"  # tests only: a JSON file naming other public keys

# The production trusted set. The private halves were generated outside this repository and are
# kept offline by the maintainer (`python -m spt_selfupdate.release keygen` makes such a pair).
EMBEDDED_PRIMARY: Final = "4d4058a9fa21e6e09799a103b31b264fb5c2dd8088b03d869520e9f3a3655da7"
EMBEDDED_RECOVERY: Final = "7fadf58dc93ca4cbfab800304778eaaedd4845d82282c4c24d2ad55ffbf8c28b"

_VERSION_RE: Final = re.compile(r"^(0|[1-9][0-9]{0,5})(\.(0|[1-9][0-9]{0,5})){0,3}$")
_FILE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")
_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")


class VerifyFailed(Refusal):
    """A release that must not be staged or applied: `VERIFY_FAILED:<reason> <detail>`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__("VERIFY_FAILED", reason, detail)
        self.reason = reason


def parse_version(text: str) -> tuple[int, ...]:
    """`1.2.3` as a tuple; only dotted decimal numbers (no pre-releases, nothing to misorder)."""
    if not isinstance(text, str) or not _VERSION_RE.match(text):
        raise VerifyFailed("malformed-manifest", f"version {str(text)[:40]!r} is not dotted numbers")
    parts = tuple(int(p) for p in text.split("."))
    return parts + (0,) * (4 - len(parts))


def platform_tag() -> str:
    """This interpreter's platform, as artifacts are keyed: `py311-linux-x86_64`."""
    return f"py{sys.version_info.major}{sys.version_info.minor}-{sys.platform}-{platform.machine().lower()}"


# --- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustedKeys:
    """The keys a node trusts now: the embedded set, as changed by accepted rotations."""

    primary: str
    recovery: str
    revoked: frozenset[str] = field(default_factory=frozenset)

    def role(self, key: str) -> str | None:
        if key == self.primary:
            return "primary"
        if key == self.recovery:
            return "recovery"
        return None

    def rotated(self, new_primary: str) -> TrustedKeys:
        return TrustedKeys(new_primary, self.recovery, self.revoked | {self.primary})


def _check_key(value: object, what: str) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ValueError(f"{what} must be 64 lowercase hex characters")
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(value))
    return value


def embedded_keys(env: dict[str, str] | None = None) -> TrustedKeys:
    """The package's trusted set, or (tests only) the set in the file `SPT_UPDATE_TEST_KEYS` names.

    A bad override raises ValueError: the plugin then shows as failed rather than trusting less.
    """
    env = dict(os.environ) if env is None else env
    path = env.get(TEST_KEYS_ENV)
    if not path:
        return TrustedKeys(EMBEDDED_PRIMARY, EMBEDDED_RECOVERY)
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{TEST_KEYS_ENV}: cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{TEST_KEYS_ENV}: {path} is not a JSON object")
    primary = _check_key(doc.get("primary"), "primary")
    recovery = _check_key(doc.get("recovery"), "recovery")
    if primary == recovery:
        raise ValueError("the primary and recovery keys must differ")
    return TrustedKeys(primary, recovery)


# --- the manifest ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Artifact:
    platform: str
    file: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Release:
    """A manifest whose signature checked out against the trusted set."""

    version: str
    time: str
    notes: str
    artifacts: dict[str, Artifact]
    signed_by: str  # "primary" or "recovery"
    signer: str
    rotate_primary: str | None
    manifest_bytes: bytes
    sig_bytes: bytes

    @property
    def key(self) -> tuple[int, ...]:
        return parse_version(self.version)

    def artifact_for(self, tag: str) -> Artifact:
        art = self.artifacts.get(tag)
        if art is None:
            raise VerifyFailed("no-artifact-for-platform", f"release {self.version} has nothing for {tag}")
        return art


def manifest_document(
    version: str, time: str, notes: str, artifacts: Iterable[Artifact], rotate_primary: str | None = None
) -> bytes:
    """The canonical bytes of a manifest (what the maintainer tool signs)."""
    doc: dict[str, Any] = {
        "name": NAME,
        "version": version,
        "time": time,
        "notes": notes,
        "artifacts": {a.platform: {"file": a.file, "size": a.size, "sha256": a.sha256} for a in artifacts},
    }
    if rotate_primary is not None:
        doc["rotate_primary"] = rotate_primary
    parse_version(version)
    return canonical_bytes(doc)


def signature_document(key_hex: str, sig: bytes) -> bytes:
    return canonical_bytes({"key": key_hex, "sig": sig.hex()})


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), parse_float=_no_float, parse_constant=_no_float)
    except (UnicodeDecodeError, ValueError) as exc:
        raise VerifyFailed(f"malformed-{what}", str(exc)[:80]) from None


def _no_float(text: str) -> Any:
    raise ValueError(f"non-integer number {text[:20]!r}")


def verify_manifest(
    manifest_bytes: bytes,
    sig_bytes: bytes,
    keys: TrustedKeys,
    *,
    installed: str,
    highest_applied: str | None = None,
) -> Release:
    """Check signature, trust, shape and version of a release; raise VerifyFailed or return it.

    Order matters: nothing in the manifest is believed before its signature is checked.
    A version equal to the installed one is not an error for the caller: it raises
    VerifyFailed("up-to-date"), which `fetch` answers as UP_TO_DATE.
    """
    if len(manifest_bytes) > MAX_MANIFEST or len(sig_bytes) > 4096:
        raise VerifyFailed("malformed-manifest", "manifest or signature too large")
    sig_doc = _parse_json(sig_bytes, "signature")
    if not isinstance(sig_doc, dict) or set(sig_doc) != {"key", "sig"}:
        raise VerifyFailed("malformed-signature", "expected {key, sig}")
    signer, sig_hex = sig_doc["key"], sig_doc["sig"]
    if not isinstance(signer, str) or not _HEX64.match(signer) or not isinstance(sig_hex, str):
        raise VerifyFailed("malformed-signature", "key or signature is not hex")
    if signer in keys.revoked:
        raise VerifyFailed("revoked-key", f"{signer[:8]}… was replaced by a recovery-signed rotation")
    role = keys.role(signer)
    if role is None:
        raise VerifyFailed("unknown-key", f"{signer[:8]}… is not a trusted release key")
    try:
        sig = bytes.fromhex(sig_hex)
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(signer)).verify(sig, DOMAIN + manifest_bytes)
    except (ValueError, InvalidSignature):
        raise VerifyFailed("bad-signature", f"the signature does not match the manifest ({role} key)") from None
    doc = _parse_json(manifest_bytes, "manifest")
    if not isinstance(doc, dict) or canonical_bytes(doc) != manifest_bytes:
        raise VerifyFailed("malformed-manifest", "the manifest is not canonical JSON")
    known = {"name", "version", "time", "notes", "artifacts", "rotate_primary"}
    if not {"name", "version", "time", "notes", "artifacts"} <= set(doc) <= known:
        raise VerifyFailed("malformed-manifest", f"fields {sorted(doc)}")
    if doc["name"] != NAME:
        raise VerifyFailed("wrong-name", f"this is a release of {str(doc['name'])[:40]!r}, not {NAME}")
    version = doc["version"]
    parsed = parse_version(version)
    if not isinstance(doc["time"], str) or not isinstance(doc["notes"], str):
        raise VerifyFailed("malformed-manifest", "time and notes are strings")
    rotate = doc.get("rotate_primary")
    if role == "recovery" and rotate is None:
        raise VerifyFailed("recovery-without-rotation", "the recovery key signs only releases that name a new primary")
    if rotate is not None:
        if role != "recovery":
            raise VerifyFailed("rotation-not-by-recovery", "only the recovery key may name a new primary")
        try:
            _check_key(rotate, "rotate_primary")
        except ValueError as exc:
            raise VerifyFailed("malformed-manifest", str(exc)) from None
        # Equal to the current primary: this rotation was accepted here already (apply re-verifies).
        if rotate in keys.revoked or rotate == keys.recovery:
            raise VerifyFailed("bad-rotation", "the new primary must be a key never trusted before")
    artifacts = _artifacts(doc["artifacts"])
    installed_key = parse_version(installed)
    if parsed == installed_key:
        raise VerifyFailed("up-to-date", version)
    if parsed < installed_key:
        raise VerifyFailed("rollback", f"{version} is older than the installed {installed}")
    if highest_applied is not None and parsed < parse_version(highest_applied):
        raise VerifyFailed("rollback", f"{version} is older than {highest_applied}, applied here before")
    return Release(
        version=version, time=doc["time"], notes=doc["notes"], artifacts=artifacts, signed_by=role,
        signer=signer, rotate_primary=rotate, manifest_bytes=manifest_bytes, sig_bytes=sig_bytes,
    )


def _artifacts(raw: object) -> dict[str, Artifact]:
    if not isinstance(raw, dict) or not raw:
        raise VerifyFailed("malformed-manifest", "artifacts must be a non-empty object")
    found: dict[str, Artifact] = {}
    for tag, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) != {"file", "size", "sha256"}:
            raise VerifyFailed("malformed-manifest", f"artifact {str(tag)[:40]} needs file, size, sha256")
        name, size, digest = entry["file"], entry["size"], entry["sha256"]
        if not isinstance(name, str) or not _FILE_RE.match(name) or not _FILE_RE.match(str(tag)):
            raise VerifyFailed("malformed-manifest", f"unsafe artifact name {str(name)[:40]!r}")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_ARTIFACT:
            raise VerifyFailed("malformed-manifest", f"artifact size {size!r}")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise VerifyFailed("malformed-manifest", "sha256 must be 64 hex characters")
        found[str(tag)] = Artifact(str(tag), name, size, digest)
    return found


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify_artifact(release: Release, tag: str, path: Path) -> list[str]:
    """Check this platform's artifact file against the manifest; returns its wheel names.

    Size first (a short file is a truncated transfer), then the digest, then the contents: a
    flat tar of wheels only, one of them spt at the manifest's version.
    """
    art = release.artifact_for(tag)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise VerifyFailed("truncated", f"{art.file} is missing") from None
    if size < art.size:
        raise VerifyFailed("truncated", f"{art.file} has {size} of {art.size} bytes")
    if size > art.size:
        raise VerifyFailed("size-mismatch", f"{art.file} has {size} bytes, the manifest says {art.size}")
    if sha256_file(path) != art.sha256:
        raise VerifyFailed("digest-mismatch", f"{art.file} does not match its SHA-256 in the manifest")
    return wheel_names(path, release.version)


def wheel_names(path: Path, version: str) -> list[str]:
    """The wheels in an artifact tar; anything else in it (or no spt wheel) is refused."""
    names: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile() or "/" in member.name or not _FILE_RE.match(member.name) \
                        or not member.name.endswith(".whl"):
                    raise VerifyFailed("bad-artifact", f"unexpected member {member.name[:60]!r}")
                names.append(member.name)
                if len(names) > MAX_WHEELS:
                    raise VerifyFailed("bad-artifact", "too many files")
    except (tarfile.TarError, OSError) as exc:
        raise VerifyFailed("bad-artifact", f"not a tar of wheels: {exc}") from None
    if f"spt-{version}-py3-none-any.whl" not in names:
        raise VerifyFailed("bad-artifact", f"no spt {version} wheel in the artifact")
    return names
