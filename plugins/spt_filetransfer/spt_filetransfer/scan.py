"""The sender's side of a manifest: walk the given paths, refuse what is not sent, hash the rest.

Synchronous and blocking: the service runs it in a worker thread. Only regular files and
folders are sent (SPEC.md §8.5): a symlink, device, FIFO or socket anywhere in what was named is
refused here with FILE_UNREADABLE, never followed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import blake3

from spt.core.errors import Refusal, UsageError
from spt_filetransfer.manifest import CHUNK, FileEntry, Manifest

__all__ = ["hash_file", "scan"]


def _unreadable(path: str, why: str) -> Refusal:
    return Refusal("FILE_UNREADABLE", path, why)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def hash_file(path: str, expected_size: int) -> tuple[bytes, tuple[bytes, ...]]:
    """(whole-file hash, chunk hashes) of a regular file, read without following symlinks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _unreadable(path, exc.strerror or str(exc)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _unreadable(path, f"is {_kind(st.st_mode)}; only regular files and folders are sent")
        whole = blake3.blake3(max_threads=blake3.blake3.AUTO)
        chunks: list[bytes] = []
        done = 0
        while done < expected_size:
            data = os.pread(fd, min(CHUNK, expected_size - done), done)
            if not data:
                raise _unreadable(path, "the file shrank while it was being read")
            if len(data) < min(CHUNK, expected_size - done):
                raise _unreadable(path, "the file shrank while it was being read")
            chunks.append(blake3.blake3(data).digest())
            whole.update(data)
            done += len(data)
        return whole.digest(), tuple(chunks)
    finally:
        os.close(fd)


def _walk(top: Path, rel: str, out: list[tuple[str, str, int]]) -> None:
    try:
        st = os.lstat(top)
    except OSError as exc:
        raise _unreadable(str(top), exc.strerror or str(exc)) from exc
    if stat.S_ISREG(st.st_mode):
        out.append((str(top), rel, st.st_size))
        return
    if not stat.S_ISDIR(st.st_mode):
        raise _unreadable(str(top), f"is {_kind(st.st_mode)}; only regular files and folders are sent")
    try:
        names = sorted(os.listdir(top))
    except OSError as exc:
        raise _unreadable(str(top), exc.strerror or str(exc)) from exc
    for name in names:
        _walk(top / name, f"{rel}/{name}", out)


def scan(paths: Sequence[str]) -> tuple[Manifest, list[str]]:
    """The manifest of `paths` (absolute) and each file's source path, in manifest order.

    Raises FILE_UNREADABLE for a missing, unreadable or non-regular path, and BAD_USAGE when two
    top-level paths share a name or nothing would be sent.
    """
    found: list[tuple[str, str, int]] = []
    tops: list[str] = []
    for raw in paths:
        top = Path(raw)
        name = top.name
        if not name:
            raise UsageError("BAD_USAGE", raw, "name a file or folder, not a root")
        if name in tops:
            raise UsageError("BAD_USAGE", raw, f"two paths are named {name!r}; send them separately")
        tops.append(name)
        _walk(top, name, found)
    if not found:
        raise UsageError("BAD_USAGE", " ".join(paths), "nothing to send: the folders hold no files")
    files: list[FileEntry] = []
    for source, rel, size in found:
        whole, chunks = hash_file(source, size)
        files.append(FileEntry(rel, size, whole, chunks))
    return Manifest(tops[0], tuple(files)), [s for s, _, _ in found]
