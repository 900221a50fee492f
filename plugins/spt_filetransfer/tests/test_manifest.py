"""Manifests and path safety (SPEC.md §8.5): pure, fast."""

from __future__ import annotations

import os

import blake3
import pytest
from spt_filetransfer.manifest import (
    CHUNK,
    FileEntry,
    Manifest,
    manifest_problem,
    unsafe_path_reason,
)
from spt_filetransfer.scan import scan

from spt.core.errors import Refusal, RemoteProtocolError


def entry(path: str, size: int = 3) -> FileEntry:
    data = b"x" * size
    chunks = tuple(blake3.blake3(data[i : i + CHUNK]).digest() for i in range(0, size, CHUNK))
    return FileEntry(path, size, blake3.blake3(data).digest(), chunks)


@pytest.mark.parametrize(
    "path",
    [
        "../../etc/x", "a/../b", "/etc/passwd", "C:/Windows/x", "c:evil", "a\\b", "a//b", "a/", "./a",
        "a/\x00b", "line\nbreak", "tab\there", "\x7fdel", "CON", "dir/nul.txt", "LPT1.log", "com9",
        "x" * 256, "d/" + "y" * 250, "",
    ],
)
def test_unsafe_paths_are_named(path):
    assert unsafe_path_reason(path) is not None


@pytest.mark.parametrize("path", ["a", "a/b/c.txt", "report.pdf", ".hidden", "déjà vu/ü.txt", "x" * 247, "console.txt"])
def test_safe_paths_pass(path):
    assert unsafe_path_reason(path) is None


def test_conflicting_paths_are_refused():
    assert "twice" in manifest_problem(Manifest("a", (entry("a/x"), entry("a/x"))))
    assert "both a file and a folder" in manifest_problem(Manifest("a", (entry("a"), entry("a/x"))))
    assert "partial" in manifest_problem(Manifest("a", (entry("a/x"), entry("a/x.partial"))))
    assert manifest_problem(Manifest("a", (entry("a/x"), entry("a/y")))) is None


def test_manifest_round_trips_and_digest_is_stable():
    m = Manifest("d", (entry("d/a", 5), entry("d/b", CHUNK + 1), entry("d/empty", 0)))
    back = Manifest.from_wire(m.to_wire())
    assert back == m
    assert back.digest() == m.digest()
    assert len(back.files[1].chunks) == 2 and back.total == CHUNK + 6


@pytest.mark.parametrize(
    "wire",
    [
        None, [], {"name": "a"}, {"name": "a", "files": []}, {"name": "a", "files": [["a", 1]]},
        {"name": "a", "files": [["a", -1, b"0" * 32, b""]]},
        {"name": "a", "files": [["a", 1, b"short", b"0" * 32]]},
        {"name": "a", "files": [["a", CHUNK + 1, b"0" * 32, b"0" * 32]]},  # needs two chunk hashes
        {"name": "a", "files": [[7, 1, b"0" * 32, b"0" * 32]]},
    ],
)
def test_garbage_manifests_raise_remote_protocol_errors(wire):
    with pytest.raises(RemoteProtocolError):
        Manifest.from_wire(wire)


def test_scan_refuses_symlinks_and_devices(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine")
    os.symlink("/etc/passwd", folder / "link")
    with pytest.raises(Refusal) as info:
        scan([str(folder)])
    assert info.value.instance_token == "FILE_UNREADABLE" and "symlink" in info.value.message
    with pytest.raises(Refusal) as info:
        scan(["/dev/null"])
    assert "device" in info.value.message
    with pytest.raises(Refusal) as info:
        scan([str(tmp_path / "missing")])
    assert info.value.instance_token == "FILE_UNREADABLE"


def test_scan_hashes_per_chunk_and_whole(tmp_path):
    data = os.urandom(2 * CHUNK + 10)
    (tmp_path / "f.bin").write_bytes(data)
    manifest, sources = scan([str(tmp_path / "f.bin")])
    [f] = manifest.files
    assert (f.path, f.size, sources) == ("f.bin", len(data), [str(tmp_path / "f.bin")])
    assert f.hash == blake3.blake3(data).digest()
    assert f.chunks[2] == blake3.blake3(data[2 * CHUNK :]).digest()
