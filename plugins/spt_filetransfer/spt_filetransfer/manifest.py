"""What a transfer offers: relative paths, sizes, BLAKE3 per 1 MiB chunk and per file. Pure.

What lives here: the `Manifest` value type, its wire form and the checks of everything a peer
may send in one (`Manifest.from_wire` raises `RemoteProtocolError` for malformed data), the path
safety rules of SPEC.md §8.5 (`unsafe_path_reason`, `manifest_problem`), and the manifest hash.

What must not: reading files, sockets or clocks. Hashing the sender's files is `scan.py`'s job.

Rules this module keeps:
1. A path is `/`-separated and relative; every rule is checked on every component, so nothing
   a peer offers can name a place outside the transfer's own inbox folder.
2. Chunk hashes are 32 bytes each, one per started MiB (none for an empty file), and a file's
   whole hash is separate: a receiver checks both.
3. The manifest hash covers paths, sizes and whole-file hashes in order, so two manifests with
   the same hash describe the same files.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any, Final

import blake3

from spt.core.errors import RemoteProtocolError

__all__ = [
    "CHUNK",
    "HASH_LEN",
    "MAX_FILES",
    "PARTIAL_SUFFIX",
    "FileEntry",
    "Manifest",
    "chunk_count",
    "manifest_problem",
    "unsafe_path_reason",
]

CHUNK: Final = 1024 * 1024
HASH_LEN: Final = 32
MAX_FILES: Final = 100_000
MAX_PATH_BYTES: Final = 4096
MAX_NAME_BYTES: Final = 255
PARTIAL_SUFFIX: Final = ".partial"
MAX_DEPTH: Final = 64  # folders deep; deeper offers are refused before any work
EMPTY_HASH: Final = blake3.blake3(b"").digest()

_RESERVED: Final = frozenset(
    {"con", "prn", "aux", "nul", "conin$", "conout$"}
    | {f"com{i}" for i in range(10)}
    | {f"lpt{i}" for i in range(10)}
    | {"com¹", "com²", "com³", "lpt¹", "lpt²", "lpt³"}
)
_DRIVE: Final = re.compile(r"^[A-Za-z]:")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def chunk_count(size: int) -> int:
    return (size + CHUNK - 1) // CHUNK


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file: its relative path, size in bytes, whole-file hash and chunk hashes."""

    path: str
    size: int
    hash: bytes
    chunks: tuple[bytes, ...]

    def chunk_len(self, index: int) -> int:
        """Bytes in chunk `index` (the last one may be short)."""
        return min(CHUNK, self.size - index * CHUNK)


@dataclass(frozen=True, slots=True)
class Manifest:
    """The files of one transfer. `name` is the top-level file or folder name (the event's `name`)."""

    name: str
    files: tuple[FileEntry, ...]

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def chunk_total(self) -> int:
        return sum(len(f.chunks) for f in self.files)

    def digest(self) -> bytes:
        """The manifest hash: BLAKE3 over (path, size, whole hash) of every file, in order."""
        h = blake3.blake3(b"spt-file-manifest/1\0")
        for f in self.files:
            raw = f.path.encode("utf-8")
            h.update(struct.pack(">I", len(raw)) + raw + struct.pack(">Q", f.size) + f.hash)
        return h.digest()

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "files": [[f.path, f.size, f.hash, b"".join(f.chunks)] for f in self.files]}

    @classmethod
    def from_wire(cls, data: Any) -> Manifest:
        """Parse a peer's manifest; RemoteProtocolError for anything malformed (not for unsafe paths)."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise RemoteProtocolError("manifest", "a manifest is a map with a string 'name' and a 'files' list")
        raw_files = data.get("files")
        if not isinstance(raw_files, list) or not raw_files:
            raise RemoteProtocolError("manifest", "a manifest lists at least one file")
        if len(raw_files) > MAX_FILES:
            raise RemoteProtocolError("manifest", f"a manifest lists at most {MAX_FILES} files")
        files: list[FileEntry] = []
        for item in raw_files:
            if not isinstance(item, list | tuple) or len(item) != 4:
                raise RemoteProtocolError("manifest", "a file entry is [path, size, hash, chunk hashes]")
            path, size, whole, chunks = item
            if not isinstance(path, str) or len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
                raise RemoteProtocolError("manifest", f"a path is a string of at most {MAX_PATH_BYTES} bytes")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > 1 << 50:
                raise RemoteProtocolError("manifest", f"bad size for {path!r}")
            if not isinstance(whole, bytes) or len(whole) != HASH_LEN:
                raise RemoteProtocolError("manifest", f"the hash of {path!r} is {HASH_LEN} bytes")
            n = chunk_count(size)
            if not isinstance(chunks, bytes) or len(chunks) != n * HASH_LEN:
                raise RemoteProtocolError("manifest", f"{path!r} needs {n} chunk hashes of {HASH_LEN} bytes")
            files.append(
                FileEntry(path, size, whole, tuple(chunks[i : i + HASH_LEN] for i in range(0, len(chunks), HASH_LEN)))
            )
        return cls(data["name"], tuple(files))


def unsafe_path_reason(path: str) -> str | None:
    """Why a relative path offered by a peer is unsafe (SPEC.md §8.5), or None when it is fine.

    A file's last component must also leave room for the `.partial` suffix while it arrives.
    """
    if not path:
        return "an empty path"
    if path.startswith("/"):
        return f"absolute path {path!r}"
    if "\\" in path:
        return f"backslash in path {path!r}"
    if _CONTROL.search(path):
        return f"control or NUL character in path {path!r}"
    if _DRIVE.match(path):
        return f"drive letter in path {path!r}"
    parts = path.split("/")
    for i, part in enumerate(parts):
        if part == "":
            return f"empty component in path {path!r}"
        if part in (".", ".."):
            return f"{part!r} component in path {path!r}"
        if ":" in part and i == 0:
            return f"drive or stream name in path {path!r}"
        try:
            size = len(part.encode("utf-8"))
        except UnicodeEncodeError:
            return f"path {path!r} is not valid UTF-8"
        limit = MAX_NAME_BYTES - len(PARTIAL_SUFFIX) if i == len(parts) - 1 else MAX_NAME_BYTES
        if size > limit:
            return f"name longer than {limit} bytes in path {path[:80]!r}…"
        stem = part.split(".", 1)[0].rstrip(" ").lower()
        if stem in _RESERVED:
            return f"reserved device name {part!r} in path {path!r}"
    return None


def manifest_problem(manifest: Manifest) -> str | None:
    """The first unsafe or conflicting path of a manifest, as a refusal reason; None when safe."""
    reason = unsafe_path_reason(manifest.name)
    if reason is not None or "/" in manifest.name:
        return f"bad top-level name: {reason or repr(manifest.name)}"
    seen: set[str] = set()
    for entry in manifest.files:
        reason = unsafe_path_reason(entry.path)
        if reason is not None:
            return reason
        key = entry.path
        if key in seen:
            return f"path {entry.path!r} is listed twice"
        if key.count("/") >= MAX_DEPTH:
            return f"path {entry.path!r} is nested deeper than {MAX_DEPTH} folders"
        seen.add(key)
    dirs: set[str] = set()
    for path in seen:  # each file adds its folders; stop at the first one already known
        parent = path.rpartition("/")[0]
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    for path in seen:
        if path in dirs:
            return f"path {path!r} is both a file and a folder"
        if path + PARTIAL_SUFFIX in seen or path + PARTIAL_SUFFIX in dirs:
            return f"the partial file of {path!r} collides with another path"
    return None
