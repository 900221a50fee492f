"""The receiving side on disk: verify, write, record, resume, rename (SPEC.md §8.5, §9.19)."""

from __future__ import annotations

import mmap
import os
import threading
import time
from unittest import mock

import blake3
import pytest
from spt_filetransfer import inbox as inbox_mod
from spt_filetransfer.db import TransferDb
from spt_filetransfer.inbox import Incoming, open_transfer_dir
from spt_filetransfer.manifest import CHUNK, FileEntry, Manifest

from spt.core.errors import Refusal

TID = "ab" * 16


def manifest_of(files: dict[str, bytes]) -> Manifest:
    entries = []
    for path, data in files.items():
        chunks = tuple(blake3.blake3(data[i : i + CHUNK]).digest() for i in range(0, len(data), CHUNK))
        entries.append(FileEntry(path, len(data), blake3.blake3(data).digest(), chunks))
    return Manifest(next(iter(files)).split("/")[0], tuple(entries))


@pytest.fixture
def db(tmp_path):
    d = TransferDb(tmp_path / "state" / "transfers.db")
    yield d
    d.close()


def chunks_of(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def test_bad_chunk_is_never_written_and_good_ones_complete(tmp_path, db):
    data = os.urandom(3 * CHUNK + 5)
    m = manifest_of({"d/big.bin": data, "d/empty": b""})
    done = []
    inc = Incoming(db, TID, m, tmp_path / "ep", on_complete=done.append)
    inc.finish_empty_files()
    parts = chunks_of(data)
    assert inc.accept(0, 1, b"\0" * CHUNK) is False  # wrong bytes: refused, nothing recorded
    assert inc.bad_chunks == 1 and db.chunks(TID) == []
    for c in (0, 2, 1, 3):  # out of order: the whole file is read back and checked
        assert inc.accept(0, c, parts[c]) is True
    final = tmp_path / "ep" / "inbox" / TID / "d" / "big.bin"
    assert done == [TID] and final.read_bytes() == data
    assert not final.with_name("big.bin.partial").exists()
    assert (final.stat().st_mode & 0o111) == 0
    assert (tmp_path / "ep" / "inbox" / TID / "d" / "empty").read_bytes() == b""


def test_resume_trusts_the_record_without_rehashing(tmp_path, db):
    data = os.urandom(4 * CHUNK)
    m = manifest_of({"f.bin": data})
    parts = chunks_of(data)
    first = Incoming(db, TID, m, tmp_path / "ep", on_complete=lambda t: None)
    first.accept(0, 0, parts[0])
    first.accept(0, 1, parts[1])
    first.close()  # the daemon stops (or dies after its last flush)
    again = Incoming(db, TID, m, tmp_path / "ep", on_complete=lambda t: None)
    with mock.patch.object(inbox_mod.blake3, "blake3", side_effect=AssertionError("re-hashed")):
        again.load()
    assert again.verified[0] == {0, 1} and again.done_bytes == 2 * CHUNK
    assert again.bitmaps() == [bytes([0b0011])]
    again.accept(0, 2, parts[2])
    again.accept(0, 3, parts[3])
    assert again.complete and (tmp_path / "ep" / "inbox" / TID / "f.bin").read_bytes() == data


def test_a_recorded_chunk_that_is_bad_on_disk_is_fetched_again(tmp_path, db):
    data = os.urandom(2 * CHUNK)
    m = manifest_of({"f.bin": data})
    parts = chunks_of(data)
    inc = Incoming(db, TID, m, tmp_path / "ep", on_complete=lambda t: None)
    inc.accept(0, 0, parts[0])
    inc.close()
    partial = tmp_path / "ep" / "inbox" / TID / "f.bin.partial"
    with open(partial, "r+b") as fh:  # e.g. a power cut lost the page after the record survived
        fh.write(b"\0" * 16)
    inc = Incoming(db, TID, m, tmp_path / "ep", on_complete=lambda t: None)
    inc.load()
    inc.accept(0, 1, parts[1])
    assert not inc.complete and inc.verified[0] == {1}
    assert not (tmp_path / "ep" / "inbox" / TID / "f.bin").exists()
    inc.accept(0, 0, parts[0])
    assert inc.complete and (tmp_path / "ep" / "inbox" / TID / "f.bin").read_bytes() == data


def test_runs_from_aligned_buffers_go_direct_and_the_tail_and_resent_chunks_still_land(tmp_path, db):
    """The TCP path: `verify` on the data thread, `store_run` of consecutive chunks from
    page-aligned buffers on the writer thread (O_DIRECT where the file system has it)."""
    data = os.urandom(5 * CHUNK + 1000)
    m = manifest_of({"f.bin": data})
    parts = chunks_of(data)
    aligned = []
    for part in parts:  # page-aligned memory, as channel.Receiver opens frames into
        buf = mmap.mmap(-1, CHUNK)
        buf[: len(part)] = part
        aligned.append(memoryview(buf)[: len(part)])
    done = []
    inc = Incoming(db, TID, m, tmp_path / "ep", on_complete=done.append)
    assert inc.verify(0, 1, b"\0" * CHUNK, running=True) is False and inc.verified[0] == set()
    assert all(inc.verify(0, c, aligned[c], running=True) for c in range(6))  # in order, as the data thread
    inc.store_run(0, 0, aligned[:3], aligned=True, hashed=True)
    assert inc.verified[0] == {0, 1, 2} and not inc.complete
    partial = os.stat(tmp_path / "ep" / "inbox" / TID / "f.bin.partial")
    # its final size but not preallocated: unwritten extents slowed every O_DIRECT write
    assert partial.st_size == len(data) and partial.st_blocks * 512 < 4 * CHUNK
    direct = inc._direct.get(0)
    with mock.patch.object(Incoming, "_whole_hash", side_effect=AssertionError("read back")):
        inc.store_run(0, 2, aligned[2:6], aligned=True, hashed=True)  # chunk 2 again (a resend) among new ones
    assert done == [TID] and db.files_done(TID) == {0}
    assert (tmp_path / "ep" / "inbox" / TID / "f.bin").read_bytes() == data
    if os.uname().sysname == "Linux":
        assert direct is not None  # the aligned chunks took the O_DIRECT descriptor
    small = Incoming(db, "cd" * 16, manifest_of({"s.bin": data[: 2 * CHUNK]}), tmp_path / "ep", on_complete=done.append)
    small.store_run(0, 0, aligned[:2], aligned=True)
    assert 0 not in small._direct and small.complete  # a small file goes through the page cache
    assert (tmp_path / "ep" / "inbox" / ("cd" * 16) / "s.bin").read_bytes() == data[: 2 * CHUNK]
    for buf in aligned:
        buf.release()


def test_symlinked_inbox_or_transfer_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    ep = tmp_path / "ep"
    ep.mkdir()
    (ep / "inbox").symlink_to(outside)
    with pytest.raises(Refusal):
        open_transfer_dir(ep, TID, create=True, fresh=True)
    (ep / "inbox").unlink()
    (ep / "inbox").mkdir()
    (ep / "inbox" / TID).symlink_to(outside)
    with pytest.raises(Refusal):
        open_transfer_dir(ep, TID, create=True, fresh=True)
    assert list(outside.iterdir()) == []


def test_a_symlink_planted_inside_the_transfer_folder_is_not_followed(tmp_path, db):
    outside = tmp_path / "outside"
    outside.mkdir()
    data = os.urandom(100)
    m = manifest_of({"d/sub/x.txt": data})
    inc = Incoming(db, TID, m, tmp_path / "ep", on_complete=lambda t: None)
    fd = open_transfer_dir(tmp_path / "ep", TID, create=True, fresh=True)
    os.close(fd)
    (tmp_path / "ep" / "inbox" / TID / "d").mkdir()
    (tmp_path / "ep" / "inbox" / TID / "d" / "sub").symlink_to(outside)
    with pytest.raises(Refusal):
        inc.accept(0, 0, data)
    assert list(outside.iterdir()) == []


def test_the_writer_batches_consecutive_chunks_and_stops_when_the_stop_mark_is_batched():
    """The writer thread takes consecutive chunks off its queue for one write; the stop mark
    (`close`) may arrive while it gathers a batch, and it still stops at once."""
    from spt_filetransfer.dataserver import ChunkWriter

    entered, release = threading.Event(), threading.Event()
    runs = []

    class Recorder:
        def store_run(self, f, first, run, *, aligned, hashed):
            entered.set()
            release.wait(5)  # the first store blocks until everything else is queued
            runs.append((f, first, [bytes(d) for d in run], aligned and hashed))

    writer = ChunkWriter(Recorder())
    writer.put(0, 0, memoryview(b"\0"))
    assert entered.wait(5)
    for c in (1, 2):
        writer.put(0, c, memoryview(bytes([c])))
    writer.put(1, 0, memoryview(b"x"))  # another file: its own batch
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    writer.close()
    assert time.monotonic() - started < 4 and not writer.thread.is_alive()
    assert runs == [(0, 0, [b"\0"], True), (0, 1, [b"\1", b"\2"], True), (1, 0, [b"x"], True)]
