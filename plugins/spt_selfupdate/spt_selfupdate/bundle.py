"""Release files on disk: the published source folder and the offline bundle for `--file`.

A source folder (what `spt update fetch --from` and `update.source` point at) holds
`latest.json` (`{"version": "<v>"}`, a hint only: the manifest is what is trusted) and, per
release, `<v>/manifest.json`, `<v>/manifest.sig` and one artifact per platform.

An offline bundle (`spt-<v>.sptupdate`, what an air-gapped site carries) is an uncompressed tar of
the same three kinds of files, flat. Reading one never trusts it: files are copied out under
size caps, and the caller verifies them like any other release.
"""

from __future__ import annotations

import json
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from spt_selfupdate.trust import _FILE_RE, MAX_ARTIFACT, MAX_MANIFEST, VerifyFailed

MANIFEST: Final = "manifest.json"
SIGNATURE: Final = "manifest.sig"
FETCH_TIMEOUT: Final = 30.0
MAX_FILES: Final = 16


def write_bundle(path: Path, files: Iterable[Path]) -> None:
    """An offline bundle of `files` (manifest, signature, artifacts), deterministic."""
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            info = tar.gettarinfo(str(f), arcname=f.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with open(f, "rb") as fh:
                tar.addfile(info, fh)


def read_bundle(path: Path, into: Path) -> None:
    """Copy a bundle's files into the folder `into`; a short or malformed bundle is refused."""
    total = 0
    try:
        with tarfile.open(path, "r:") as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_FILES or not member.isfile() or not _FILE_RE.match(member.name):
                    raise VerifyFailed("bad-bundle", f"unexpected member {member.name[:60]!r}")
                total += member.size
                if total > MAX_ARTIFACT + 2 * MAX_MANIFEST:
                    raise VerifyFailed("bad-bundle", "the bundle is too large")
                src = tar.extractfile(member)
                assert src is not None
                with open(into / member.name, "wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
                if (into / member.name).stat().st_size != member.size:
                    raise VerifyFailed("truncated", f"{member.name} ends early")
    except tarfile.ReadError as exc:
        raise VerifyFailed("truncated", f"the bundle ends early or is not a bundle: {exc}") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise VerifyFailed("truncated", f"the bundle cannot be read: {exc}") from None
    if not (into / MANIFEST).exists() or not (into / SIGNATURE).exists():
        raise VerifyFailed("truncated", "the bundle lacks its manifest or signature")


# --- a source folder or URL --------------------------------------------------------------------


def _join(source: str, *parts: str) -> str:
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        return source.rstrip("/") + "/" + "/".join(urllib.parse.quote(p) for p in parts)
    base = Path(parsed.path if parsed.scheme == "file" else source)
    return str(base.joinpath(*parts))


def read_source(source: str, *parts: str, limit: int) -> bytes:
    """A small file from a source folder (`/path`, `file:///path`) or `http(s)://` URL."""
    where = _join(source, *parts)
    try:
        if where.startswith(("http://", "https://")):
            with urllib.request.urlopen(where, timeout=FETCH_TIMEOUT) as resp:
                data: bytes = resp.read(limit + 1)
        else:
            with open(where, "rb") as fh:
                data = fh.read(limit + 1)
    except (OSError, ValueError) as exc:
        raise VerifyFailed("source-unreachable", f"{where}: {exc}") from None
    if len(data) > limit:
        raise VerifyFailed("malformed-manifest", f"{where} is larger than {limit} bytes")
    return data


def copy_source(source: str, parts: tuple[str, ...], target: Path, size: int) -> None:
    """Fetch an artifact into `target`, resuming after what is already there; at most `size` bytes."""
    where = _join(source, *parts)
    have = target.stat().st_size if target.exists() else 0
    if have >= size:
        return
    try:
        if where.startswith(("http://", "https://")):
            req = urllib.request.Request(where, headers={"Range": f"bytes={have}-"})
            with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT) as resp:
                if resp.status != 206:
                    have = 0  # the server ignored the range: start over
                _copy(resp, target, have, size)
        else:
            with open(where, "rb") as fh:
                fh.seek(have)
                _copy(fh, target, have, size)
    except (OSError, ValueError) as exc:
        raise VerifyFailed("source-unreachable", f"{where}: {exc}") from None


def _copy(src: object, target: Path, have: int, size: int) -> None:
    with open(target, "r+b" if have and target.exists() else "wb") as out:
        out.seek(have)
        out.truncate()
        left = size - have + 1  # one byte more than declared shows an oversized artifact
        while left > 0:
            block = src.read(min(1 << 20, left))  # type: ignore[attr-defined]
            if not block:
                break
            out.write(block)
            left -= len(block)


def latest_version(source: str) -> str:
    raw = read_source(source, "latest.json", limit=4096)
    try:
        doc = json.loads(raw)
        return str(doc["version"])
    except (ValueError, KeyError, TypeError):
        raise VerifyFailed("malformed-manifest", "latest.json does not name a version") from None
